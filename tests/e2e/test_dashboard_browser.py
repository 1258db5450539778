"""The dashboard in a real browser (Debian's chromium, driven by Playwright) over the
home the demo filled: every page loads, the charts render with the catalog's numbers,
a viewer cannot approve, an operator clicks Approve, and each page is saved as a
screenshot (in $FW_SCREENSHOTS, else the test's temporary folder)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from featurewatch.config import build_config
from featurewatch.platform.control.controller import PolicyController, load_policy_list
from featurewatch.storage.audit import AuditLog
from tests.conftest import free_port
from tests.e2e.conftest import run

CHROMIUM = os.environ.get("FW_CHROMIUM") or shutil.which("chromium") or "chromium"


def start_dashboard(home: Path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurewatch.platform.cli", "dashboard", "--home", str(home),
         "--listen", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the dashboard did not start listening within 60 s")


def plot_y(page, div_id: str, trace: int = 0) -> list:
    """The y values a rendered plotly chart holds (plotly.js sets `.data` on its div)."""
    return page.evaluate(
        "([id, t]) => Array.from(document.getElementById(id).data[t].y)", [div_id, trace]
    )


def numbers(page, selector: str) -> list[float]:
    return [float(t) for t in page.locator(selector).all_inner_texts()]


@pytest.mark.slow
def test_the_dashboard_in_a_browser_over_the_demo_home(demo_home, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # a query or an approval in the dashboard process can take seconds on a busy machine
    expect.set_options(timeout=30_000)

    home, report = demo_home
    shots = Path(os.environ.get("FW_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    # A policy that holds (the demo's top mover fired) and waits for a person.
    top = report["top_movers"][0]["feature_id"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "policies:\n  - id: watch-top-mover\n"
        f"    condition: {{feature: {top}, statistic: firing_rate, window: 1h, baseline: 1h,"
        " threshold: 0.0}\n"
        "    actions: [{type: alert, url: 'http://127.0.0.1:9/hook', retries: 0}]\n"
        "    approval: manual\n"
    )
    # Evaluated as of two minutes after the persona phase: the controller reads whole
    # minutes, and the demo's traffic may all sit in the minute that is still open.
    persona = report["phases"]["persona"]
    after = datetime.fromisoformat(persona["end"]).replace(second=0, microsecond=0)
    controller = PolicyController(build_config({"home": str(home)}), load_policy_list(policy))
    (row,) = controller.tick(after + timedelta(minutes=2))
    assert row["outcome"] == "fired", row
    decision = row["decision"]
    tokens = {}
    for name, role in (("ana", "operator"), ("vic", "viewer")):
        made = run(["token", "create", name, "--role", role, "--home", str(home)], timeout=60)
        assert made.returncode == 0, made.stderr
        tokens[role] = made.stdout.strip()

    proc, base = start_dashboard(home)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def login(token):
                page.goto(f"{base}/logout")
                page.fill("#token", token)
                page.click("#login")

            # Anonymous: every page sends you to the login form; the API refuses.
            page.goto(f"{base}/drift")
            assert page.url.startswith(f"{base}/login")
            assert page.request.get(f"{base}/api/overview").status == 401
            login(tokens["viewer"])

            # Fleet: the demo's replica and collector, from their heartbeats, with the
            # vectors the demo counted as acked.
            page.goto(f"{base}/")
            expect(page.locator("#replicas")).to_contain_text("smollm2-135m-instruct")
            assert numbers(page, "#replicas td.acked") == [report["vectors_acked"]]
            assert numbers(page, "#collectors td.accepted") == [report["vectors_acked"]]
            page.screenshot(path=str(shots / "fleet.png"), full_page=True)

            # Drift over the demo's two phases (exact windows: the phases are shorter
            # than a minute or two): the window is the persona phase, the baseline
            # before it. Table and charts hold the API's numbers, and the API's window
            # counts match a plain SQL count over the lake.
            end = datetime.fromisoformat(persona["end"])
            seconds = int((end - datetime.fromisoformat(persona["start"])).total_seconds())
            end_arg = quote(end.isoformat())
            query = f"window={seconds}s&baseline=10m&exact=true&end={end_arg}"
            page.goto(f"{base}/drift?{query}")
            api = page.request.get(f"{base}/api/drift?{query}").json()
            movers = api["movers"]
            assert movers, api
            assert numbers(page, "#movers td.win-rate") == pytest.approx(
                [m["win_rate"] for m in movers], rel=1e-3
            )
            page.wait_for_selector("#movers-chart .main-svg")  # drawn by plotly.js
            assert plot_y(page, "movers-chart", 1) == pytest.approx([m["win_rate"] for m in movers])
            first = movers[0]["feature_id"]
            assert plot_y(page, f"spark-{first}") == pytest.approx(movers[0]["series"]["rate"])
            counted = page.request.post(
                f"{base}/api/sql",
                data=json.dumps({"sql": "SELECT count(*) FROM tokens WHERE ts >= '"
                                 + api["window_start"] + "' AND ts < '" + api["end"]
                                 + "' AND sae_version = '" + api["sae_version"] + "'"}),
                headers={"Content-Type": "application/json"},
            ).json()  # fmt: skip
            assert counted["rows"] == [[movers[0]["win_tokens"]]]
            page.screenshot(path=str(shots / "drift.png"), full_page=True)

            # A feature: the trend chart's points are the API's, examples are marked.
            page.click(f"#movers a[href$='/{first}']")
            page.wait_for_selector("#trend-chart .main-svg")
            feature = page.request.get(f"{base}/api/features/{api['sae_version']}/{first}").json()
            assert plot_y(page, "trend-chart", 1) == pytest.approx(feature["trend"]["rate"])
            assert page.locator("#examples mark").count() >= 1
            assert page.locator("#edit").count() == 0  # viewers do not edit
            page.screenshot(path=str(shots / "feature.png"), full_page=True)

            # The SQL console: the lake's row count, and a refused write.
            page.goto(f"{base}/sql")
            page.fill("#q", "SELECT count(*) AS n FROM feature_acts")
            page.click("#run")
            expect(page.locator("#sql-result")).to_contain_text(str(report["feature_rows"]))
            page.screenshot(path=str(shots / "sql.png"), full_page=True)
            page.fill("#q", "DELETE FROM segments")
            page.click("#run")
            expect(page.locator("#sql-error")).to_contain_text("read-only")

            # The timeline: a viewer sees the pending decision without a button.
            page.goto(f"{base}/timeline")
            row = page.locator(f"#pending tr[data-decision='{decision}']")
            expect(row).to_contain_text("operators approve")
            status = page.request.post(f"{base}/api/decisions/{decision}/approve").status
            assert status == 403

            # An operator approves it with a click.
            login(tokens["operator"])
            page.goto(f"{base}/timeline")
            page.click(f"#pending tr[data-decision='{decision}'] button.approve")
            page.wait_for_url(f"{base}/timeline?approved={decision}")
            expect(page.locator("#pending")).not_to_contain_text(decision)
            expect(page.locator("#events")).to_contain_text("approved")
            page.screenshot(path=str(shots / "timeline.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    approved = AuditLog(home / "audit.duckdb").decision(decision)
    assert (approved["status"], approved["actor"]) == ("approved", "ana")
    for name in ("fleet", "drift", "feature", "sql", "timeline"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
