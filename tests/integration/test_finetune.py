"""LoRA fine-tunes as Ray Train jobs on a tiny Llama: the loss on the examples falls, the
merged model is saved and registered; bad settings are refused before a job starts, and
a job whose worker is killed leaves no model and registers nothing."""

import re
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from typer.testing import CliRunner

from featurewatch.analysis.transcripts import parse_lines
from featurewatch.capture.models import load_model
from featurewatch.config import build_config
from featurewatch.errors import ConfigError, ModelPathError
from featurewatch.platform.cli import app
from featurewatch.platform.jobs.finetune import (
    LORA_TARGETS,
    FinetuneSettings,
    run_finetune,
    sft_example,
)
from featurewatch.storage.catalog import Catalog, recorded_path
from tests.integration.test_sae_train_resume import train_workers

LINES = [
    '{"prompt": "How do I keep basil alive?", "response": "Water it when the soil is dry."}',
    '{"prompt": "Explain a rainbow.", "response": "Sunlight refracts in raindrops."}',
    '{"prompt": "Any tips for the river bank?", "response": "Keep the dog near you."}',
]


@pytest.fixture
def setup(ray_cluster, tiny_llama_dir, tmp_path):
    cfg = build_config({"home": str(tmp_path / "home"), "model": {"path": str(tiny_llama_dir)}})
    return cfg, tiny_llama_dir, parse_lines(LINES, "test")


def test_the_loss_falls_and_the_merged_model_is_saved_and_registered(setup):
    cfg, base, transcripts = setup
    _, tokenizer = load_model(base)
    ids, labels = sft_example(tokenizer, transcripts[0], 384)
    response = tokenizer(transcripts[0].response, add_special_tokens=False)["input_ids"]
    # only the response and the end of turn are learned
    assert [t for t in labels if t != -100] == response + [tokenizer.eos_token_id]
    assert ids[-len(response) - 1 : -1] == response

    settings = FinetuneSettings(steps=60, lr=1e-2, batch_size=3, torch_threads=1)
    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        result = run_finetune(cfg, base, transcripts, "ft1", settings, catalog=catalog)
        registered = catalog.query(
            "SELECT model, path FROM model_versions WHERE model_version = 'ft1'"
        ).to_pylist()
    # A random tiny model starts near ln(vocab) = 6.0; its final norm and small random LM
    # head bound its logits, so it cannot go far below 4.7 however it is trained.
    assert result.steps == 60 and result.last_loss < result.first_loss - 0.5, result
    # Recorded relative to the home (a home moved elsewhere still finds it).
    assert [(r["model"], recorded_path(cfg.home, r["path"])) for r in registered] == [
        (cfg.model.name, result.path)
    ]
    assert registered[0]["path"].startswith("home:")
    tuned, _ = load_model(result.path)
    original, _ = load_model(base)
    changed = [
        name
        for (name, p), (_, q) in zip(
            tuned.named_parameters(), original.named_parameters(), strict=True
        )
        if not torch.equal(p, q)
    ]
    # LoRA merged into the linear projections, nothing else touched (norms, embeddings)
    assert changed and [n for n in changed if n.split(".")[-2] not in LORA_TARGETS["llama"]] == []
    with pytest.raises(ConfigError, match="model version 'ft1' already exists"):
        run_finetune(cfg, base, transcripts, "ft1", settings)


def test_bad_settings_are_refused_before_a_job_starts(setup, tmp_path):
    cfg, base, transcripts = setup
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        run_finetune(cfg, base, transcripts, "x", FinetuneSettings(steps=0))
    with pytest.raises(ConfigError, match="lr must be between 0 and 1"):
        run_finetune(cfg, base, transcripts, "x", FinetuneSettings(lr=5.0))
    with pytest.raises(ConfigError, match="at least one transcript"):
        run_finetune(cfg, base, [], "x")
    with pytest.raises(ModelPathError):
        run_finetune(cfg, tmp_path / "no-model", transcripts, "x")


def steps_logged(worker) -> int:
    """The last step a Ray Train worker printed to its log ("finetune step N/...")."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    steps = [0]
    for log in logs.glob(f"worker-*-{worker.pid}.out"):
        steps += [int(m) for m in re.findall(r"finetune step (\d+)/", log.read_text())]
    return max(steps)


def test_a_killed_job_leaves_no_model_and_registers_nothing(setup):
    cfg, base, transcripts = setup
    settings = FinetuneSettings(steps=100_000, lr=1e-3, batch_size=1, torch_threads=1)
    outcome = {}

    def run():
        with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
            try:
                run_finetune(cfg, base, transcripts, "killed", settings, catalog=catalog)
            except ConfigError as err:
                outcome["error"] = str(err)

    started = time.time() - 1
    job = threading.Thread(target=run)
    job.start()
    # Kill the worker once it really trains: a worker killed while Ray Train is still
    # starting its group is replaced (startup is retried, not counted as a failure), and
    # the job would go on. Its progress lines reach its log file in the session's logs.
    deadline = time.monotonic() + 240
    while not (training := [w for w in train_workers(started) if steps_logged(w) >= 20]):
        assert time.monotonic() < deadline, "the fine-tune never started training"
        time.sleep(0.5)
    (worker,) = training
    worker.kill()
    job.join(timeout=120)
    assert "fine-tune killed failed" in outcome["error"]
    assert not (cfg.models_dir / f"{cfg.model.name}-killed").exists()
    assert not (cfg.models_dir / f"{cfg.model.name}-killed.partial").exists()
    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        assert catalog.query("SELECT * FROM model_versions").num_rows == 0


def test_finetune_command_refuses_bad_input(setup, tmp_path):
    cfg, base, _ = setup
    runner, home = CliRunner(), ["--home", str(cfg.home)]
    bad_version = runner.invoke(
        app, ["finetune", "--examples", "bundled:safe", "--version", "v 2", *home]
    )
    assert bad_version.exit_code == 2 and "--version must be letters" in bad_version.output
    missing = tmp_path / "missing.jsonl"
    no_file = runner.invoke(app, ["finetune", "--examples", str(missing), "--version", "v2", *home])
    assert no_file.exit_code == 1 and "transcript file not found" in no_file.output
    unknown = runner.invoke(
        app, ["finetune", "--examples", "bundled:safe", "--version", "v2", "--base", "v9", *home]
    )
    assert unknown.exit_code == 1 and "neither a registered version" in unknown.output
