"""A fleet of two models (Llama and GPT-2 at different widths, their own layers, sampling,
replicas and SAEs) served and monitored by one `featurewatch up`: every lake row says
which model, version and replica it came from, and drift SQL spans or splits the fleet."""

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import requests
import torch
from ray import serve

from featurewatch.config import build_config
from featurewatch.platform.apps.up import run_up
from featurewatch.proto import activations_pb2 as pb
from featurewatch.sae import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.heartbeats import read_heartbeats
from featurewatch.storage.spool import read_segment, sealed_segments
from tests.conftest import build_tiny_model, free_port

LLAMA, GPT2 = "tiny-llama", "tiny-gpt2"


def fleet_config(home, llama_dir, gpt2_dir):
    model = {"replica_cpus": 0.25, "torch_threads": 1, "max_tokens_limit": 32}
    return build_config(
        {
            "home": str(home),
            "model": {"name": LLAMA, "path": str(llama_dir), "num_replicas": 2, **model},
            "capture": {"layers": [1], "sample_fraction": 1.0, "batch_rows": 16},
            "fleet": [
                {
                    "model": {
                        "name": GPT2,
                        "path": str(gpt2_dir),
                        "version": "g1",
                        "num_replicas": 2,
                        **model,
                    },
                    "capture": {"layers": [2], "sample_fraction": 0.5, "batch_rows": 16},
                }
            ],
            "collector": {"segment_max_age_s": 1.0},
            "pipeline": {"encoder_cpus": 0.25},
            "serve": {"port": free_port(), "app_name": "fw-fleet"},
            "demo": {"max_tokens": 8},
        }
    )


def register_random_sae(catalog, home, model, version, width, layer):
    torch.manual_seed(layer)
    sae = build("topk", width, 96, k=4)
    with torch.no_grad():  # random directions: a fresh SAE is all zeros
        sae.W_enc.normal_()
        sae.W_dec.normal_()
    sae.save(home / "saes" / version)
    catalog.register_sae(
        version, home / "saes" / version, architecture="topk", model=model, layer=layer,
        d_in=width, d_sae=96, k=4, metrics={}, site="resid_post",
    )  # fmt: skip


def chat(url, text):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def spooled_per_model(home) -> Counter:
    seen, per_model = set(), Counter()
    for spool in [home / "spool", *sorted((home / "spool").glob("collector-*"))]:
        for path in sealed_segments(spool):
            for payload in read_segment(path):
                b = pb.ActivationBatch.FromString(payload)
                if (b.replica_id, b.stream_epoch, b.seq) not in seen:
                    seen.add((b.replica_id, b.stream_epoch, b.seq))
                    per_model[(b.model, b.width, b.layer)] += b.rows
    return per_model


def test_a_fleet_of_two_models_lands_in_one_lake(ray_cluster, tiny_llama_dir, tmp_path):
    gpt2_dir = build_tiny_model("gpt2", tmp_path / "gpt2", hidden=48, layers=3)
    home = tmp_path / "home"
    cfg = fleet_config(home, tiny_llama_dir, gpt2_dir)
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        register_random_sae(catalog, home, LLAMA, "llama-sae", 64, 1)
        register_random_sae(catalog, home, GPT2, "gpt2-sae", 48, 2)

    stop, result = threading.Event(), {}
    runner = threading.Thread(target=lambda: result.update(run_up(cfg, every_s=1.0, stop=stop)))
    started = datetime.now(UTC)
    runner.start()
    base = f"http://127.0.0.1:{cfg.serve.port}"
    urls = {LLAMA: base, GPT2: f"{base}/{GPT2}"}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if all(requests.get(f"{u}/v1/models", timeout=5).ok for u in urls.values()):
                    break
            except requests.RequestException:
                pass
            assert runner.is_alive() and time.monotonic() < deadline, "the fleet did not start"
            time.sleep(1)
        for name, url in urls.items():
            served = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
            assert [m["id"] for m in served] == [name]
            for i in range(8):
                assert chat(url, f"{name} request {i}: hello there").ok
    finally:
        stop.set()
        runner.join(timeout=300)
        serve.shutdown()
    assert result["drained"] and result["sae_versions"] == {LLAMA: "llama-sae", GPT2: "gpt2-sae"}

    replicas = {b["name"]: b["model"] for b in read_heartbeats(home / "status", "replica")}
    assert Counter(replicas.values()) == {LLAMA: 2, GPT2: 2}
    # The collectors took each model at its own width and layer; nothing was refused.
    spooled = spooled_per_model(home)
    assert {key[:3] for key in spooled} == {(LLAMA, 64, 1), (GPT2, 48, 2)}
    (collector,) = read_heartbeats(home / "status", "collector")
    assert collector["counters"]["rejected_batches"] == 0

    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
        rows = catalog.query(
            "SELECT model, model_version, replica, layer, sae_version, count(*) AS n "
            "FROM tokens GROUP BY ALL"
        ).to_pylist()
        end = datetime.now(UTC) + timedelta(minutes=1)
        start = started - timedelta(minutes=1)
        fleet_wide = catalog.query(
            "SELECT s.model, w.sae_version, max(w.tokens) AS tokens, count(*) AS features "
            "FROM window_counts(?, ?) w JOIN sae_versions s USING (sae_version) "
            "GROUP BY ALL ORDER BY s.model",
            [start, end],
        ).to_pylist()
        by_model = catalog.query(
            "SELECT model, count(*) AS n FROM feature_acts GROUP BY model"
        ).to_pylist()
        one_model = catalog.query(
            "SELECT model, count(*) AS n FROM feature_acts WHERE model = ? GROUP BY model", [GPT2]
        ).to_pylist()
    # Every row names its model, version and replica; each model's rows are its own
    # replicas' at its own layer, encoded by its own SAE, each spooled vector once.
    for r in rows:
        assert replicas[r["replica"]] == r["model"]
        expected = {LLAMA: ("v1", 1, "llama-sae"), GPT2: ("g1", 2, "gpt2-sae")}[r["model"]]
        assert (r["model_version"], r["layer"], r["sae_version"]) == expected
    per_model = Counter()
    for r in rows:
        per_model[r["model"]] += r["n"]
    assert per_model == {LLAMA: spooled[(LLAMA, 64, 1)], GPT2: spooled[(GPT2, 48, 2)]}
    # One drift query spans the fleet (a row per model's SAE); a filter splits it.
    assert [(r["model"], r["sae_version"], r["tokens"]) for r in fleet_wide] == [
        (GPT2, "gpt2-sae", per_model[GPT2]),
        (LLAMA, "llama-sae", per_model[LLAMA]),
    ]
    assert all(r["features"] > 0 for r in fleet_wide)
    assert {r["model"] for r in by_model} == {LLAMA, GPT2}
    assert one_model == [r for r in by_model if r["model"] == GPT2]
