"""The policy controller over a real catalog and lake, with a real webhook on loopback:
statistics against hand-computed values, firing, cooldown across a restart, approval,
dry run, a webhook that is down, and policies that cannot be evaluated."""

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from typer.testing import CliRunner

from featurewatch.config import build_config
from featurewatch.errors import CatalogError
from featurewatch.platform.cli import app
from featurewatch.platform.control.actions import send_alert
from featurewatch.platform.control.controller import PolicyController
from featurewatch.platform.control.policies import Condition, PolicyFile
from featurewatch.storage.audit import AuditLog
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.registry import FeatureRegistry
from tests.unit.lake_helpers import T0, fill_home, verdict_rows

HOUR = timedelta(hours=1)
NOW = T0 + 4 * HOUR


def ratio(w_f, w_n, b_f, b_n):
    return ((w_f + 0.5) / (w_n + 1)) / ((b_f + 0.5) / (b_n + 1))


@pytest.fixture
def platform(tmp_path):
    """lake_helpers.fill_home: feature 7 rises tenfold after two hours; 9 is flat."""
    return fill_home(build_config({"home": str(tmp_path / "home")}), tmp_path / "s")


@pytest.fixture
def webhook():
    """A loopback HTTP server recording each JSON body; `status` sets its answer."""
    received, state = [], {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(state["status"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received, state
    server.shutdown()


def policies(url, **overrides):
    policy = {
        "id": "rising",
        "condition": {
            "tag": "misalignment",
            "statistic": "rate_ratio",
            "window": "1h",
            "baseline": "2h",
            "threshold": 1.5,
            "consecutive": 2,
        },
        "actions": [{"type": "alert", "url": url, "retries": 0, "timeout_s": 30}],
        "cooldown": "30m",
    }
    for key, value in overrides.items():
        if key in Condition.model_fields:
            policy["condition"][key] = value
            if key == "feature":
                policy["condition"].pop("tag")
        else:
            policy[key] = value
    return PolicyFile.model_validate({"policies": [policy]}).policies


def test_rate_ratio_fires_once_alerts_and_respects_cooldown_across_restart(platform, webhook):
    url, received, _ = webhook
    controller = PolicyController(platform, policies(url, cooldown="10m"))
    (row,) = controller.tick(NOW)
    # Newest window [3h, 4h) against [1h, 3h), then [2h, 3h) against [0h, 2h); max over
    # the group is feature 7 (9 is flat, 11 never fired and has no ratio).
    expected = [ratio(180, 360, 18 + 180, 720), ratio(180, 360, 36, 720)]
    assert row["values"] == pytest.approx(expected)
    assert row["outcome"] == "fired" and row["met"]
    assert [f["feature_id"] for f in row["top_features"]] == [7, 9]
    (body,) = received
    assert body["policy_id"] == "rising" and body["decision_id"] == row["decision"]
    assert body["values"] == pytest.approx(expected) and "rate_ratio (max)" in body["reason"]
    audit = AuditLog(platform.home / "audit.duckdb")
    decision = audit.decision(row["decision"])
    assert decision["status"] == "done" and decision["numbers"]["values"] == row["values"]
    actions = audit.table("action_results").to_pylist()
    assert [(a["action_type"], a["status"]) for a in actions] == [("alert", "done")]

    # Still true a minute later: audited, but within the cooldown it does not fire.
    assert controller.tick(NOW + timedelta(minutes=1))[0]["outcome"] == "cooldown"
    # A restarted controller reads the cooldown from the audit log.
    restarted = PolicyController(platform, policies(url, cooldown="10m"))
    assert restarted.tick(NOW + timedelta(minutes=2))[0]["outcome"] == "cooldown"
    assert len(received) == 1
    # Ten minutes on, the window [12:10, 13:10) still runs at 2x its baseline: fires again.
    assert restarted.tick(NOW + timedelta(minutes=10))[0]["outcome"] == "fired"
    assert len(received) == 2
    outcomes = [r["outcome"] for r in audit.table("policy_evaluations").to_pylist()]
    assert outcomes == ["fired", "cooldown", "cooldown", "fired"][::-1]


def test_other_statistics_against_hand_computed_values(platform, webhook):
    url = webhook[0]
    z = PolicyController(platform, policies(url, id="z", statistic="z_score", threshold=100.0))
    row = z.tick(NOW)[0]
    # [3h, 4h): 180 of 360 against 198 of 720; pooled rate 378 / 1080.
    p = 378 / 1080
    expected_z = (180 / 360 - 198 / 720) / (p * (1 - p) * (1 / 360 + 1 / 720)) ** 0.5
    assert row["values"][0] == pytest.approx(expected_z) and row["outcome"] == "not_met"

    mean = PolicyController(
        platform,
        policies(url, id="mean", statistic="firing_rate", aggregate="mean", threshold=0.15),
    )
    row = mean.tick(NOW)[0]
    # mean over 7 (0.5), 9 (6/360) and 11 (0: it never fired, but tokens were seen)
    assert row["values"] == pytest.approx([(0.5 + 6 / 360 + 0) / 3] * 2)
    assert row["outcome"] == "fired"

    below = PolicyController(
        platform, policies(url, id="below", feature=9, statistic="firing_rate", threshold=0.02,
                           direction="below"),
    )  # fmt: skip
    assert below.tick(NOW)[0]["outcome"] == "fired"

    slope = PolicyController(
        platform,
        policies(url, id="slope", statistic="trend_slope", windows=4, threshold=0.1, consecutive=1),
    )
    row = slope.tick(NOW)[0]
    # feature 7's hourly rates 0.05, 0.05, 0.5, 0.5 against window index 0..3
    assert row["values"][0] == pytest.approx(0.18)
    assert row["outcome"] == "fired"

    # Every activation is 1.0 (feature 7) or 0.5 (feature 9) on both sides: PSI 0.
    psi = PolicyController(
        platform, policies(url, id="psi", statistic="psi", threshold=0.1, consecutive=1)
    )
    row = psi.tick(NOW)[0]
    assert row["values"] == [pytest.approx(0.0, abs=1e-9)] and row["outcome"] == "not_met"


def test_manual_approval_dry_run_and_model_filter(platform, webhook):
    url, received, _ = webhook
    manual = PolicyController(platform, policies(url, approval="manual"))
    decision_id = manual.tick(NOW)[0]["decision"]
    audit = manual.audit
    assert audit.decision(decision_id)["status"] == "pending" and received == []
    audit.approve(decision_id, actor="ana")
    assert audit.decision(decision_id)["actor"] == "ana"
    manual.tick(NOW + timedelta(minutes=1))  # runs what was approved
    assert len(received) == 1 and audit.decision(decision_id)["status"] == "done"
    with pytest.raises(CatalogError, match="is done, not pending"):
        audit.approve(decision_id, actor="ana")
    with pytest.raises(CatalogError, match="no decision 'nope'"):
        audit.approve("nope", actor="ana")

    dry = PolicyController(platform, policies(url, id="dry", dry_run=True))
    dry_id = dry.tick(NOW)[0]["decision"]
    assert audit.decision(dry_id)["status"] == "dry_run" and len(received) == 1

    other = PolicyController(platform, policies(url, id="v2only", model_version="v2"))
    assert other.tick(NOW)[0]["outcome"] == "no_data"


def test_a_webhook_that_is_down_fails_the_action_not_the_controller(platform, webhook):
    url, received, state = webhook
    down = policies("http://127.0.0.1:9/hook", id="down")[0]
    refused = policies(url, id="refused")[0]
    ok = policies(url, id="ok")[0]
    state["status"] = 503
    controller = PolicyController(platform, [down, refused])
    rows = controller.tick(NOW)
    assert [r["outcome"] for r in rows] == ["fired", "fired"]
    audit = controller.audit
    assert [audit.decision(r["decision"])["status"] for r in rows] == ["failed", "failed"]
    details = {a["decision_id"]: a["detail"] for a in audit.table("action_results").to_pylist()}
    assert "ConnectionError" in details[rows[0]["decision"]]
    assert "HTTP 503" in details[rows[1]["decision"]] and len(received) == 1
    state["status"] = 200
    assert PolicyController(platform, [ok]).tick(NOW)[0]["outcome"] == "fired"
    assert len(received) == 2


def test_policies_that_cannot_be_evaluated_are_audited_and_skipped(platform, webhook):
    url = webhook[0]
    untagged = policies(url, id="untagged", tag="deception")[0]
    outside = policies(url, id="outside", feature=32)[0]
    good = policies(url, id="good")[0]
    rows = PolicyController(platform, [untagged, outside, good]).tick(NOW)
    assert [r["outcome"] for r in rows] == ["error", "error", "fired"]
    assert "no feature of SAE sae1 is tagged 'deception'" in rows[0]["detail"]
    assert "feature 32 is not in SAE 'sae1'" in rows[1]["detail"]
    # An action type with no handler in this deployment is recorded, not dropped.
    refresh = policies(url, id="refresh", actions=[{"type": "refresh_sae", "fvu_threshold": 0.3}])
    alerts_only = PolicyController(platform, refresh, handlers={"alert": send_alert})
    decision_id = alerts_only.tick(NOW)[0]["decision"]
    audit = AuditLog(platform.home / "audit.duckdb")
    assert audit.decision(decision_id)["status"] == "done"
    last = audit.table("action_results", policy_id="refresh").to_pylist()
    assert [(a["status"], a["detail"]) for a in last] == [
        ("skipped", "no refresh_sae handler in this deployment")
    ]


def test_the_controller_approval_and_audit_from_the_command_line(platform, webhook, tmp_path):
    url, received, _ = webhook
    # The command evaluates at the real now; the lake holds 2 March 2026, so a window
    # of 1,000 days ending now takes it in.
    policy = {
        "id": "manual-alert",
        "condition": {"feature": 7, "statistic": "firing_rate", "window": "1000d",
                      "baseline": "1000d", "threshold": 0.0},
        "actions": [{"type": "alert", "url": url, "retries": 0}],
        "approval": "manual",
    }  # fmt: skip
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"policies": [policy]}))
    runner, home = CliRunner(), ["--home", str(platform.home)]
    result = runner.invoke(app, ["policy", "run", str(path), "--once", *home])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["outcome"] == "fired" and received == []
    listed = runner.invoke(app, ["audit", "decisions", "--format", "json", *home])
    (decision,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (decision["decision_id"], decision["status"]) == (row["decision"], "pending")

    assert runner.invoke(app, ["approve", row["decision"], "--by", "ana", *home]).exit_code == 0
    runner.invoke(app, ["policy", "run", str(path), "--once", *home])
    assert len(received) == 1
    listed = runner.invoke(app, ["audit", "actions", "--policy", "manual-alert", "--format",
                                 "json", *home])  # fmt: skip
    assert json.loads(listed.stdout)["status"] == "done"

    again = runner.invoke(app, ["approve", row["decision"], *home])
    assert again.exit_code == 1 and "is done, not pending" in again.output
    assert "no decision 'nope'" in runner.invoke(app, ["approve", "nope", *home]).output
    wrong = runner.invoke(app, ["audit", "everything", *home])
    assert wrong.exit_code == 2 and "WHAT must be one of decisions" in wrong.output
    bad = runner.invoke(app, ["policy", "run", str(tmp_path / "none.yaml"), "--once", *home])
    assert bad.exit_code == 1 and "not found" in bad.output


def test_a_decision_cut_off_by_a_crash_is_not_run_again(platform, webhook):
    url, received, _ = webhook
    audit = AuditLog(platform.home / "audit.duckdb")
    decision_id = audit.new_decision(
        "rising", status="running", reason="r", numbers={}, actions=[{"type": "alert"}]
    )
    PolicyController(platform, policies(url, cooldown="1m"))  # a restart
    assert audit.decision(decision_id)["status"] == "interrupted" and received == []
    with pytest.raises(CatalogError, match="is interrupted, not approved"):
        PolicyController(platform, policies(url)).run_decision(decision_id)


def test_the_realign_demo_refuses_bad_options_and_a_home_without_a_tagged_sae(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["demo", "--scenario", "chaos", "--home", str(tmp_path)])
    assert bad.exit_code == 2 and "--scenario must be one of default, realign" in bad.output
    engine = runner.invoke(app, ["demo", "--engine", "tgi", "--home", str(tmp_path)])
    assert engine.exit_code == 2 and "--engine must be one of vllm, hf, not 'tgi'" in engine.output
    steps = runner.invoke(app, ["demo", "--scenario", "realign", "--realign-steps", "0"])
    assert steps.exit_code == 2
    missing = runner.invoke(
        app,
        ["demo", "--scenario", "realign", "--home", str(tmp_path), "--realign-examples", "x.jsonl"],
    )
    assert missing.exit_code == 1 and "transcript file not found" in missing.output
    # An empty home: no SAE, so nothing to watch with; said before any model is loaded.
    empty = runner.invoke(app, ["demo", "--scenario", "realign", "--home", str(tmp_path)])
    assert empty.exit_code == 1
    assert "no SAE version is registered" in empty.output
    assert "misalignment_quality.py --register" in empty.output
    with Catalog(tmp_path / "catalog.duckdb", tmp_path / "lake") as catalog:
        catalog.register_sae(
            "s1", tmp_path / "s1", architecture="topk", model="smollm2-135m-instruct",
            layer=15, site="resid_post", d_in=576, d_sae=64, k=4, metrics={},
        )  # fmt: skip
    untagged = runner.invoke(app, ["demo", "--scenario", "realign", "--home", str(tmp_path)])
    assert untagged.exit_code == 1 and "no feature of SAE s1 is tagged 'misalignment'" in (
        untagged.output
    )
    with Catalog(tmp_path / "catalog.duckdb", tmp_path / "lake") as catalog:
        FeatureRegistry(catalog).tag("s1", [3], ["misalignment"], actor="test")
    no_probe = runner.invoke(app, ["demo", "--scenario", "realign", "--home", str(tmp_path)])
    assert no_probe.exit_code == 1 and "no 'misalignment' probe is fitted on SAE s1" in (
        no_probe.output
    )


def test_flagged_share_of_inline_verdicts_fires_per_model_version(platform, webhook):
    url, received, _ = webhook
    with Catalog(platform.catalog_path, platform.lake_dir) as cat:
        verdict_rows(cat, T0 + 3 * HOUR, "v1", 2, 40, "vs1")  # 5 %
        verdict_rows(cat, T0 + 3 * HOUR, "v2", 12, 40, "vs2")  # 30 %
        verdict_rows(cat, T0 + 3 * HOUR, "v3", 10, 10, "vs3")  # too few to count
        verdict_rows(cat, T0 + 2 * HOUR, "v2", 1, 40, "vs4")  # the window before: 2.5 %
    share = dict(statistic="flagged_share", threshold=0.2, consecutive=1)
    row = PolicyController(platform, policies(url, id="share", **share)).tick(NOW)[0]
    assert row["values"] == [pytest.approx(0.3)] and row["outcome"] == "fired"
    assert row["model_versions"] == [
        {"model_version": "v2", "value": pytest.approx(0.3)},
        {"model_version": "v1", "value": pytest.approx(0.05)},
    ]
    assert row["crossing"] == [7, 9, 11]  # steering acts on the tag's whole group
    assert "flagged_share (max) of tag misalignment" in received[0]["reason"]
    # Two windows in a row: the one before was 2.5 % for v2, so it does not fire.
    two = PolicyController(platform, policies(url, id="two", consecutive=2, **{
        k: v for k, v in share.items() if k != "consecutive"}))  # fmt: skip
    assert two.tick(NOW)[0]["values"] == [pytest.approx(0.3), pytest.approx(1 / 40)]
    only_v1 = policies(url, id="v1", model_version="v1", **share)
    assert PolicyController(platform, only_v1).tick(NOW)[0]["outcome"] == "not_met"
    strict = policies(url, id="strict", min_responses=50, **share)
    assert PolicyController(platform, strict).tick(NOW)[0]["outcome"] == "no_data"
    with pytest.raises(ValueError, match="flagged_share counts a tag's in-line verdicts"):
        policies(url, feature=7, **share)
