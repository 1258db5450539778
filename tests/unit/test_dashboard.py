"""The dashboard app in-process (FastAPI's TestClient, a real catalog, audit log and
registry): tokens and roles, the drift numbers against hand counts, edits (direct, and
queued while another process writes the catalog), bad inputs, the fleet overview from
heartbeats and the spool, and the `status`, `report` and `token` commands."""

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from featurewatch.config import build_config
from featurewatch.dashboard import queries
from featurewatch.dashboard.app import create_app
from featurewatch.dashboard.auth import TokenStore
from featurewatch.errors import ConfigError
from featurewatch.platform.cli import app as cli
from featurewatch.platform.control.controller import PolicyController
from featurewatch.platform.control.policies import PolicyFile
from featurewatch.storage.audit import AuditLog
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.fleet import fleet_overview
from featurewatch.storage.heartbeats import Heartbeat
from featurewatch.storage.inbox import apply_registrations, pending
from featurewatch.storage.lake import write_segment
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.spool import Spool
from tests.conftest import free_port
from tests.unit.lake_helpers import T0, fill_home, segment, verdict_rows

PAGES = ["/", "/drift", "/features/sae1/7", "/timeline", "/sql"]
APIS = ["/api/overview", "/api/drift", "/api/features/sae1/7", "/api/timeline"]


def manual_policy():
    policy = {
        "id": "rising",
        "condition": {"tag": "misalignment", "statistic": "rate_ratio", "window": "1h",
                      "baseline": "2h", "threshold": 1.5, "consecutive": 2},
        "actions": [{"type": "alert", "url": "http://127.0.0.1:9/hook", "retries": 0,
                     "timeout_s": 1}],
        "approval": "manual",
    }  # fmt: skip
    return PolicyFile.model_validate({"policies": [policy]}).policies


@pytest.fixture
def home(tmp_path):
    """fill_home's four hours, plus a v2 replica whose untagged feature 20 fires in the
    last hour, and a decision of the controller waiting for approval."""
    cfg = fill_home(build_config({"home": str(tmp_path / "home")}), tmp_path / "s")
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        start = T0 + timedelta(hours=3, minutes=30)
        texts = ["the", " model", " says", " hostile", " things"] * 12
        tokens, features = segment(start, 60, {20: [2.0] * 40}, "v2", replica="rep2", texts=texts)
        files = write_segment(cat.lake, tokens, features, "v2seg__sae1")
        cat.commit_segment("v2seg", "sae1", files, tokens=60, feature_rows=len(features))
        FeatureRegistry(cat).label("sae1", 7, actor="test", label="toxic persona")
    (row,) = PolicyController(cfg, manual_policy()).tick(T0 + timedelta(hours=4))
    store = TokenStore(cfg.dashboard_tokens_file)
    tokens = {"operator": store.create("ana", "operator"), "viewer": store.create("vic", "viewer")}
    client = TestClient(create_app(cfg, platform_token="the-platform-token-5f0c2e9b7d"))
    yield cfg, client, tokens, row["decision"]
    client.app.state.data.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_every_page_and_call_needs_a_token_and_viewers_cannot_act(home):
    cfg, client, tokens, decision = home
    for path in PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
    for path in APIS:
        assert client.get(path).status_code == 401
        assert client.get(path, headers=bearer("not-a-token")).status_code == 401
    assert client.post("/api/sql", json={"sql": "SELECT 1"}).status_code == 401
    assert client.post(f"/api/decisions/{decision}/approve").status_code == 401

    viewer = bearer(tokens["viewer"])
    for path in PAGES + APIS:
        assert client.get(path, headers=viewer).status_code == 200, path
    refused = client.post(f"/api/decisions/{decision}/approve", headers=viewer)
    assert refused.status_code == 403 and "operator role" in refused.json()["error"]
    assert client.post(f"/decisions/{decision}/approve", headers=viewer).status_code == 403
    edit = client.post("/api/features/sae1/9", headers=viewer, json={"label": "x"})
    assert edit.status_code == 403
    assert AuditLog(cfg.audit_path).decision(decision)["status"] == "pending"
    # The viewer sees no approve button or edit form.
    assert "Approve</button>" not in client.get("/timeline", headers=viewer).text
    assert 'id="edit"' not in client.get("/features/sae1/7", headers=viewer).text

    # A login through the form sets the cookie the pages then accept; a revoked token
    # is refused at its next request.
    bad = client.post("/login", data={"token": "nope", "next": "/"})
    assert bad.status_code == 401 and "unknown token" in bad.text
    ok = client.post("/login", data={"token": tokens["viewer"], "next": "/drift"},
                     follow_redirects=False)  # fmt: skip
    assert ok.status_code == 303 and ok.headers["location"] == "/drift"
    assert client.get("/drift").status_code == 200
    TokenStore(cfg.dashboard_tokens_file).revoke("vic")
    assert client.get("/drift", follow_redirects=False).status_code == 303
    client.cookies.clear()
    # The platform's own token is an operator.
    assert (
        client.get("/api/timeline", headers=bearer("the-platform-token-5f0c2e9b7d")).status_code
        == 200
    )


def test_operators_approve_and_edit_with_history(home):
    cfg, client, tokens, decision = home
    op = bearer(tokens["operator"])
    page = client.get("/timeline", headers=op).text
    assert decision in page and "Approve</button>" in page
    done = client.post(f"/decisions/{decision}/approve", headers=op, follow_redirects=False)
    assert done.status_code == 303
    approved = AuditLog(cfg.audit_path).decision(decision)
    assert (approved["status"], approved["actor"]) == ("approved", "ana")
    again = client.post(f"/api/decisions/{decision}/approve", headers=op)
    assert again.status_code == 400 and "not pending" in again.json()["error"]

    edit = client.post("/api/features/sae1/9", headers=op,
                       json={"label": "sarcasm", "add_tags": ["watch"]})  # fmt: skip
    assert edit.json() == {"outcome": "applied"}
    form = client.post("/features/sae1/9", headers=op, follow_redirects=False,
                       data={"remove_tag": "misalignment", "label": ""})  # fmt: skip
    assert form.status_code == 303
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        shown = FeatureRegistry(cat).show("sae1", 9)
    assert shown["label"] == "sarcasm" and shown["tags"] == ["watch"]
    assert {(h["actor"], h["field"]) for h in shown["history"]} >= {("ana", "label"),
                                                                    ("ana", "tag")}  # fmt: skip
    # The page reads the published copy, which the edit refreshed.
    assert "sarcasm" in client.get("/features/sae1/9", headers=op).text


def ratio(w_f, w_n, b_f, b_n):
    return ((w_f + 0.5) / (w_n + 1)) / ((b_f + 0.5) / (b_n + 1))


def test_drift_numbers_and_filters_match_hand_counts(home):
    _, client, tokens, _ = home
    viewer = bearer(tokens["viewer"])
    # The newest data is the v2 minute at 12:30 and v1's at 12:50: windows end at 12:51.
    d = client.get("/api/drift?window=1h&baseline=2h", headers=viewer).json()
    assert d["end"].startswith("2026-03-02T12:51")
    movers = {m["feature_id"]: m for m in d["movers"]}
    # Window [11:51, 12:51): six v1 segments (30 firings each) and the v2 one (60
    # tokens, feature 20 on 40); baseline [9:51, 11:51): six at 3 and six at 30.
    seven = movers[7]
    assert (seven["win_fired"], seven["win_tokens"]) == (180, 420)
    assert (seven["base_fired"], seven["base_tokens"]) == (198, 720)
    assert seven["rate_ratio"] == pytest.approx(ratio(180, 420, 198, 720))
    assert seven["label"] == "toxic persona" and seven["tags"] == ["misalignment"]
    assert (movers[20]["win_fired"], movers[20]["base_fired"]) == (40, 0)
    # One sparkline point per bucket (3 h / 24) that saw tokens: one per v1 segment.
    assert len(seven["series"]["rate"]) == 18 and max(seven["series"]["rate"]) == 0.5

    tagged = client.get("/api/drift?window=1h&baseline=2h&tag=misalignment", headers=viewer)
    assert 20 not in {m["feature_id"] for m in tagged.json()["movers"]}
    only_v1 = client.get("/api/drift?window=1h&baseline=2h&version=v1", headers=viewer).json()
    seven = {m["feature_id"]: m for m in only_v1["movers"]}[7]
    assert seven["win_tokens"] == 360 and 20 not in {m["feature_id"] for m in only_v1["movers"]}

    # Exact windows from the raw rows, ending where asked: [12:35, 12:45) holds the 60
    # tokens of 12:40 (30 firings); [12:15, 12:35) those of 12:20 and 12:30 (v1, 60
    # firings) and v2's 60 tokens at 12:30 (feature 20 on 40).
    exact = client.get(
        "/api/drift?window=10m&baseline=20m&exact=true&end=2026-03-02T12:45:00Z", headers=viewer
    ).json()
    got = {m["feature_id"]: m for m in exact["movers"]}
    assert (got[7]["win_fired"], got[7]["win_tokens"]) == (30, 60)
    assert (got[7]["base_fired"], got[7]["base_tokens"]) == (60, 180)
    assert (got[20]["win_fired"], got[20]["base_fired"]) == (0, 40)

    page = client.get("/drift?window=1h&baseline=2h", headers=viewer).text
    assert 'id="movers-chart"' in page and 'id="spark-7"' in page and "toxic persona" in page
    feature = client.get("/api/features/sae1/20?span=4h", headers=viewer).json()
    assert feature["examples"][0]["value"] == 2.0
    html = client.get("/features/sae1/20", headers=viewer).text
    assert "<mark>the</mark>" in html  # the firing token, highlighted


def test_bad_inputs_are_refused_with_the_reason_and_the_service_keeps_going(home):
    _, client, tokens, _ = home
    viewer = bearer(tokens["viewer"])
    cases = {
        "/api/drift?window=abc": "window must be a positive duration",
        "/api/drift?baseline=999d": "baseline must be at most 366 days",
        "/api/drift?end=yesterday": "end must be an ISO time",
        "/api/drift?sae=nope": "'nope' has no data",
        "/api/drift?limit=0": "limit must be 1-200",
        "/api/features/sae1/999": "999",
        "/api/features/nope/1": "nope",
    }
    for path, message in cases.items():
        response = client.get(path, headers=viewer)
        assert response.status_code == 400 and message in response.json()["error"], path
    assert client.get("/api/features/sae1/x", headers=viewer).status_code == 422
    assert "window must be" in client.get("/drift?window=0h", headers=viewer).text

    refused = {
        "COPY tokens TO '/tmp/x.csv'": "COPY",
        "CREATE TABLE t AS SELECT 1": "CREATE",
        "SELECT * FROM read_csv('/etc/passwd')": "",
        "SELEC 1": "syntax",
        "": "empty query",
    }
    for text, message in refused.items():
        response = client.post("/api/sql", headers=viewer, json={"sql": text})
        assert response.status_code == 400 and message in response.json()["error"], text
    assert client.post("/api/sql", headers=viewer, content=b"{").status_code == 400
    assert client.post("/api/sql", headers=viewer, json={"q": 1}).status_code == 400
    page = client.get("/sql", params={"q": "DROP TABLE segments"}, headers=viewer).text
    assert 'id="sql-error"' in page and "DROP" in page

    op = bearer(tokens["operator"])
    for body, message in [
        ({"add_tags": ["Bad Tag!"]}, "tag"),
        ({}, "nothing to change"),
        ({"label": "x", "sneaky": 1}, "sneaky"),
    ]:
        response = client.post("/api/features/sae1/9", headers=op, json=body)
        assert response.status_code == 400 and message in response.json()["error"], body
    # Everything still works, and the SQL console returns real numbers.
    result = client.post(
        "/api/sql", headers=viewer, json={"sql": "SELECT count(*) AS n FROM tokens"}
    ).json()
    assert result["rows"] == [[24 * 60 + 60]] and result["columns"] == ["n"]


HOLD_CATALOG = """
import sys, time
from featurewatch.storage.catalog import Catalog
with Catalog(sys.argv[1], sys.argv[2]):
    print("holding", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def test_an_edit_while_another_process_writes_the_catalog_is_queued(home):
    cfg, client, tokens, _ = home
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CATALOG, str(cfg.catalog_path), str(cfg.lake_dir), "60"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        response = client.post("/api/features/sae1/11", headers=bearer(tokens["operator"]),
                               json={"label": "deception"})  # fmt: skip
        assert response.json() == {"outcome": "queued"}
    finally:
        holder.kill()
        holder.wait()
    assert len(pending(cfg.inbox_dir)) == 1
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:  # the writer's next round
        assert [r.kind for r in apply_registrations(cat, cfg.inbox_dir)] == ["feature_edit"]
        shown = FeatureRegistry(cat).show("sae1", 11)
    assert shown["label"] == "deception" and shown["history"][-1]["actor"] == "ana"


def test_fleet_overview_reads_heartbeats_the_lake_and_the_spool(home, tmp_path):
    cfg, client, tokens, _ = home
    replica = Heartbeat(cfg.status_dir, "replica", "ModelServer#abc")
    fields = {"model": "tiny", "model_version": "v1", "queue_depth": 2}
    replica.beat(fields, {"acked_vectors": 100, "dropped_vectors": 0})
    time.sleep(0.2)
    replica.beat(fields, {"acked_vectors": 300, "dropped_vectors": 7})
    collector = Heartbeat(cfg.status_dir, "collector", "127.0.0.1:7070")
    collector.beat({}, {"accepted_vectors": 50, "rejected_batches": 1})
    time.sleep(0.2)
    collector.beat({}, {"accepted_vectors": 450, "rejected_batches": 1})
    gone = Heartbeat(cfg.status_dir, "replica", "ModelServer#old")
    gone.beat({"model": "tiny", "model_version": "v0"}, {"acked_vectors": 5})
    # Sealed spool segments the pipeline has not encoded yet.
    spool = Spool(cfg.spool_dir)
    spool.append(b"x" * 10)
    spool.seal()
    spool.close()

    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:  # answers scored in-line
        # a blocked answer and a stream a gate stopped both count as blocked
        verdict_rows(cat, T0 + timedelta(hours=3), "v1", 3, 40, "vs1",
                     actions=["blocked", "stopped", "flagged"])  # fmt: skip
        verdict_rows(cat, T0 - timedelta(hours=30), "v1", 9, 10, "vs-old")  # a day before

    now = T0 + timedelta(hours=3, minutes=55)
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir) as cat:
        overview = fleet_overview(cfg, cat, timedelta(minutes=30), now=now)
    assert overview["verdicts"] == [{
        "model": "tiny", "model_version": "v1", "tag": "misalignment", "answers": 40,
        "flagged": 3, "blocked": 2, "regenerated": 0, "flagged_share": 0.075,
    }]  # fmt: skip
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir) as cat:
        later = fleet_overview(cfg, cat, timedelta(minutes=30), now=now + timedelta(minutes=1))
    # `now` is in March: every heartbeat (written today) is in the future of it, so
    # judge liveness from the real clock's figures instead.
    live = {r["name"]: r for r in fleet_overview(cfg, _analyst(cfg), timedelta(minutes=30))[
        "replicas"]}  # fmt: skip
    assert live["ModelServer#abc"]["live"] and live["ModelServer#abc"]["counters"][
        "dropped_vectors"] == 7  # fmt: skip
    assert live["ModelServer#abc"]["rates"]["acked_vectors"] > 0
    seen = {(r["model_version"], r["replica"]): r["tokens"] for r in overview["lake_replicas"]}
    # [12:25, 12:55): v1 segments at 12:30, 12:40, 12:50 and the v2 one at 12:30.
    assert seen == {("v1", "rep"): 180, ("v2", "rep2"): 60}
    assert overview["drops"]["dropped_vectors"] == 7
    assert overview["ingest"]["accepted_vectors"] == 450
    assert overview["pipeline"]["pending"] == 1 and overview["pipeline"]["sae_version"] == "sae1"
    assert later["pipeline"]["lag_s"] == overview["pipeline"]["lag_s"] + 60

    out = CliRunner().invoke(cli, ["status", "--home", str(cfg.home), "--window", "30m"])
    assert out.exit_code == 0 and "ModelServer#abc" in out.output and "1 of 1 sealed" in out.output
    as_json = CliRunner().invoke(cli, ["status", "--home", str(cfg.home), "--format", "json"])
    assert json.loads(as_json.output)["drops"]["dropped_vectors"] == 7
    bad = CliRunner().invoke(cli, ["status", "--home", str(cfg.home), "--window", "soon"])
    assert bad.exit_code == 2 and "--window" in bad.output
    page = client.get("/", headers=bearer(tokens["viewer"])).text
    assert "ModelServer#abc" in page and "7 vectors dropped" in page
    assert '<table id="verdicts">' in page


def _analyst(cfg):
    return Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir)


def test_report_and_token_commands(home, tmp_path):
    cfg = home[0]
    runner = CliRunner()
    out = tmp_path / "r" / "report.html"
    args = ["--home", str(cfg.home)]
    result = runner.invoke(cli, ["report", "--out", str(out), "--window", "1h", "--baseline",
                                 "2h", *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    page = out.read_text()
    # Self-contained: plotly.js inside, nothing fetched from elsewhere.
    assert "Plotly" in page and "<script src" not in page and "<link" not in page
    assert 'id="trend-7"' in page and "toxic persona" in page and "rising" in page
    bad = runner.invoke(cli, ["report", "--out", str(out), "--window", "x", *args])
    assert bad.exit_code == 1 and "window must be" in bad.output
    folder = runner.invoke(cli, ["report", "--out", str(tmp_path), *args])
    assert folder.exit_code == 2

    made = runner.invoke(cli, ["token", "create", "ops-bot", "--role", "operator", *args])
    assert made.exit_code == 0
    assert TokenStore(cfg.dashboard_tokens_file).identify(made.output.strip()).role == "operator"
    listed = json.loads(runner.invoke(cli, ["token", "list", *args]).output)["tokens"]
    assert {t["name"] for t in listed} == {"ana", "vic", "ops-bot"}
    assert made.output.strip() not in (cfg.home / "dashboard_tokens.json").read_text()
    for argv, message in [
        (["token", "create", "x", "--role", "admin"], "role must be one of"),
        (["token", "create", "ana", "--role", "viewer"], "exists"),
        (["token", "create", "bad name", "--role", "viewer"], "token name"),
        (["token", "revoke", "nobody"], "no token named"),
    ]:
        result = runner.invoke(cli, [*argv, *args])
        assert result.exit_code == 2 and message in result.output, argv
    assert runner.invoke(cli, ["token", "revoke", "ops-bot", *args]).exit_code == 0
    assert TokenStore(cfg.dashboard_tokens_file).identify(made.output.strip()) is None


def test_the_reviewers_cases(home):
    """Inputs a review found answered with 500s or let through, and concurrent edits."""
    import threading

    cfg, client, tokens, decision = home
    viewer, op = bearer(tokens["viewer"]), bearer(tokens["operator"])
    latin = {"Authorization": "Bearer é".encode("latin-1")}
    assert client.get("/api/overview", headers=latin).status_code == 401
    assert client.post("/login", data={"token": "é"}).status_code == 401
    odd = client.post("/api/sql", headers=viewer, json={"sql": (
        "SELECT DATE '2020-01-01' AS d, 1.5::DECIMAL(4,2) AS m, 'a'::BLOB AS b, "
        "'nan'::DOUBLE AS n, INTERVAL 1 HOUR AS i")})  # fmt: skip
    assert odd.status_code == 200
    # (an interval comes as months, days, nanoseconds)
    assert odd.json()["rows"] == [["2020-01-01", 1.5, "61", None, [0, 0, 3_600_000_000_000]]]
    capped = client.post(
        "/api/sql", headers=viewer, json={"sql": "SELECT * FROM range(5000)"}
    ).json()
    assert (capped["shown_rows"], capped["truncated"]) == (1000, True)
    far = client.get("/api/drift?end=0001-01-01T00:00:00", headers=viewer)
    assert far.status_code == 400 and "before year 1" in far.json()["error"]
    # A POST from another origin (the cookie goes to every port of the host) is refused.
    forged = client.post(
        f"/api/decisions/{decision}/approve", headers={**op, "Origin": "http://evil.example"}
    )
    assert forged.status_code == 403
    assert AuditLog(cfg.audit_path).decision(decision)["status"] == "pending"
    # After login, the filters asked for come back.
    sent = client.get("/drift?window=2h&tag=misalignment", follow_redirects=False)
    assert sent.headers["location"] == "/login?next=%2Fdrift%3Fwindow%3D2h%26tag%3Dmisalignment"
    # Edits from many threads at once: each applied, none lost, the lock kept.
    results = []

    def edit(i):
        body = {"label": f"label {i}", "add_tags": [f"t{i}"]}
        results.append(client.post(f"/api/features/sae1/{i}", headers=op, json=body).status_code)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(12, 18)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        shown = FeatureRegistry(cat).entries("sae1").to_pylist()
    assert {e["feature_id"]: e["label"] for e in shown if e["feature_id"] >= 12} == {
        i: f"label {i}" for i in range(12, 18)
    }


def test_a_slow_console_query_holds_up_no_page_and_leaves_nothing_behind(home, monkeypatch):
    """Issue 24: a slow query ran on the event loop and froze every page; the console
    shared the pages' connection; overflowing windows answered 500."""
    _, client, tokens, _ = home
    viewer = bearer(tokens["viewer"])
    monkeypatch.setattr(queries, "SQL_TIMEOUT_S", 4.0)
    # A real server (one event loop for every request, as users run it).
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(client.app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    slow: dict = {}

    def run_slow():
        started = time.perf_counter()
        slow["response"] = requests.post(f"{base}/api/sql", headers=viewer, json={
            "sql": "SELECT count(*) FROM range(1000000000000)"}, timeout=30)  # fmt: skip
        slow["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.5)  # the query is running
    try:
        for path in ("/api/overview", "/api/timeline", "/"):
            started = time.perf_counter()
            assert requests.get(base + path, headers=viewer, timeout=30).status_code == 200
            assert time.perf_counter() - started < 2.0, path  # not behind the 4 s query
        quick = requests.post(f"{base}/api/sql", headers=viewer, timeout=30,
                              json={"sql": "SELECT 41 + 1 AS n"})  # fmt: skip
        assert quick.json()["rows"] == [[42]]
        thread.join()
    finally:
        server.should_exit = True
    assert slow["seconds"] >= 3.5 and slow["response"].status_code == 400
    assert "stopped after 4 s" in slow["response"].json()["error"]

    # Several statements, a failing one among them: the pages and the console go on.
    for text in ("SELECT 1; SELECT 2 AS two", "SELECT 1; SELECT * FROM nowhere", "SELECT 1;;"):
        client.post("/api/sql", headers=viewer, json={"sql": text})
        assert client.get("/api/overview", headers=viewer).status_code == 200
        again = client.post("/api/sql", headers=viewer, json={"sql": "SELECT 7 AS n"})
        assert again.json()["rows"] == [[7]], text
    # Results are capped in bytes as well as rows.
    wide = client.post("/api/sql", headers=viewer, json={
        "sql": "SELECT repeat('x', 100000) AS w FROM range(500)"}).json()  # fmt: skip
    assert wide["truncated"] and 0 < wide["shown_rows"] < 500
    assert sum(len(r[0]) for r in wide["rows"]) <= queries.SQL_BYTE_CAP
    # Values that overflow are a 400 naming the parameter.
    for path, name in [("/api/drift?window=99999999999999999999d", "window"),
                       ("/api/drift?baseline=9999999999999999w", "baseline"),
                       ("/api/features/sae1/7?span=99999999999999999999h", "span"),
                       ("/api/drift?limit=99999999999999999999999", "limit")]:  # fmt: skip
        response = client.get(path, headers=viewer)
        assert response.status_code == 400 and name in response.json()["error"], path


def test_failed_logins_are_logged_and_limited_and_weak_platform_tokens_refused(home, caplog):
    """Issue 24: a one-character platform token was an operator login, and failed logins
    were neither limited nor logged."""
    cfg, client, tokens, _ = home
    for weak in ("x", "short-one", "a" * 30):
        with pytest.raises(ConfigError, match="platform token .* is too weak"):
            create_app(cfg, platform_token=weak)
    for i in range(20):
        assert client.get("/api/overview", headers=bearer(f"guess-{i}")).status_code == 401
    # The address is locked out for a while, right token or not, pages and login alike.
    locked = client.get("/api/overview", headers=bearer(tokens["viewer"]))
    assert locked.status_code == 429 and "too many failed logins" in locked.json()["error"]
    assert client.post("/login", data={"token": tokens["viewer"]}).status_code == 429
    logged = [r.getMessage() for r in caplog.records if "failed dashboard login" in
              r.getMessage()]  # fmt: skip
    assert len(logged) == 20 and "testclient" in logged[0]
    assert not any("guess" in m for m in logged)  # the token is never logged
