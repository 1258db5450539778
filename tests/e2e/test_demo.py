"""The demo path end to end on SmolLM2-135M-Instruct, reduced in size, through the CLI."""

import json

import pytest

from tests.e2e.conftest import run


@pytest.mark.slow
def test_demo_on_smollm2_then_sql_after_exit(demo_home):
    home, report = demo_home
    assert report["requests_sent"] == 16 and report["requests_failed"] == 0
    assert max(report["batch_sizes"]) > 1  # requests shared forward passes
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
    # the demo serves through vLLM by default, and the lake says so
    engines = run(
        ["sql", "SELECT DISTINCT engine FROM tokens", "--format", "json", "--home", str(home)],
        timeout=120,
    )
    assert engines.returncode == 0, engines.stderr
    assert json.loads(engines.stdout) == {"engine": "vllm"}
    bad = run(["sql", "SELECT nope FROM feature_acts", "--home", str(home)], timeout=120)
    assert bad.returncode != 0
    assert "nope" in bad.stderr
