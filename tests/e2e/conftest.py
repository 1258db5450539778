"""The demo runs once per session on SmolLM2; the end-to-end tests read what it left."""

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


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """`featurewatch demo`, reduced in size, in a fresh home: (home, its demo report)."""
    tmp_path = tmp_path_factory.mktemp("demo")
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
    return home, json.loads((home / "demo_report.json").read_text())
