"""The demo path end to end on SmolLM2-135M-Instruct, reduced in size, through the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

CLI = [sys.executable, "-m", "featurewatch.platform.cli"]


def run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, **kwargs)


@pytest.mark.slow
def test_demo_on_smollm2_then_sql_after_exit(tmp_path):
    home = tmp_path / "home"
    config = tmp_path / "demo.yaml"
    config.write_text(
        f"home: {home}\n"
        f"serve: {{port: {free_port()}}}\n"
        "demo: {requests_per_phase: 8, max_tokens: 16, top_movers: 5}\n"
        "sae: {d_sae: 256, k: 8, epochs: 4}\n"
    )
    # Reuse a SmolLM2 copy converted by an earlier run if one exists (saves ~15 s).
    cached = Path(os.environ.get("FEATUREWATCH_HOME", "~/.featurewatch")).expanduser()
    cached = cached / "models" / "smollm2-135m-instruct"
    if (cached / "config.json").is_file():
        shutil.copytree(cached, home / "models" / "smollm2-135m-instruct")

    demo = run(["demo", "--config", str(config)], timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "[9/9] Done" in demo.stdout
    report = json.loads((home / "demo_report.json").read_text())
    assert report["requests_sent"] == 16 and report["requests_failed"] == 0
    assert max(report["batch_sizes"]) > 1
    assert report["vectors_acked"] > 0 and report["vectors_dropped"] == 0
    assert report["tokens_encoded"] == report["vectors_acked"]
    assert report["feature_rows"] > 0
    assert len(report["top_movers"]) == 5
    assert (home / "saes" / report["sae_version"] / "sae_weights.safetensors").is_file()

    # the catalog answers after the demo has exited
    count = run(
        ["sql", "SELECT count(*) AS n FROM feature_acts", "--format", "json", "--home", str(home)],
        timeout=120,
    )
    assert count.returncode == 0, count.stderr
    assert json.loads(count.stdout) == {"n": report["feature_rows"]}
    bad = run(["sql", "SELECT nope FROM feature_acts", "--home", str(home)], timeout=120)
    assert bad.returncode != 0
    assert "nope" in bad.stderr
