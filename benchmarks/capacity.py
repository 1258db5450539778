"""Capacity: what a fleet needs, from per-core figures measured in this run, checked
against the real platform at two sizes on this machine.

1. Per-core figures, each on one thread: the collector's CPU per vector (a real
   `featurewatch collect` process fed at full rate by one client process, its CPU time
   over the vectors it acked), the SAE encode (the config's default TopK over width
   576) and the lake write (the pipeline's own tables, `write_segment`, the catalog
   commit) per token.
2. The model: a fleet of R replicas each sampling s vectors/s sends V = R * s vectors/s
   and needs V / ingest collector cores, V / encode encoder cores and V / lake writer
   cores, plus a fixed cost while data flows: the pipeline starts a Ray Data job every
   round that finds sealed segments. That cost is measured at a trickle (--calibrate
   vectors/s, where the per-vector part is negligible). The stage with the lowest
   per-core rate is the first per-vector bottleneck.
3. The check: the real path (a collector process, a sender process at V vectors/s, the
   pipeline as a service on Ray Data) at two sizes for --seconds each. It measures the
   cores the platform kept busy (the whole machine's busy CPU less the sender's own)
   and whether the pipeline kept up (every sent token in the lake at the end), and
   prints them next to the model's prediction.

    .venv/bin/python benchmarks/capacity.py [--sizes 4000 16000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from ingest import ROWS, TOKEN, measure, template

from featurewatch.actors.collector import start_collector_process
from featurewatch.actors.pipeline import _segment_tables, follow_segments
from featurewatch.actors.runtime import init_ray
from featurewatch.config import build_config
from featurewatch.sae.model import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import write_segment

WIDTH, VERSION = 576, "capacity-sae"


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy so far."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def ingest_per_core(tmp: Path, seconds: float = 6.0) -> float:
    """Vectors a collector process acks per CPU second of its own."""
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    proc, address = start_collector_process(
        tmp / "ingest-spool", token_file, extra_args=("--width", str(WIDTH))
    )
    collector = psutil.Process(proc.pid)
    before = sum(collector.cpu_times()[:2])
    rate = measure(address, 1, seconds)
    used = sum(collector.cpu_times()[:2]) - before
    proc.terminate()
    proc.wait(30)
    return rate * seconds / used


def make_sae(cfg):
    torch.manual_seed(0)
    sae = build("topk", WIDTH, cfg.sae.d_sae, k=cfg.sae.k)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.05)
    return sae


def encode_and_lake_per_core(cfg, sae, tmp: Path, tokens: int = 16384) -> tuple[float, float]:
    """(tokens/s the SAE encodes, tokens/s the lake writer and catalog take) on one thread."""
    torch.set_num_threads(1)
    x = torch.randn(tokens, WIDTH)
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in x.split(cfg.pipeline.batch_size):
            ids, values = sae.encode_sparse(chunk)
    encode_rate = tokens / (time.perf_counter() - start)
    with torch.no_grad():
        ids, values = sae.encode_sparse(x)
    now = time.time_ns()
    cols = {
        "ts_ns": np.array([now + i * 1_000_000 for i in range(tokens)]),
        "model": np.array(["m"] * tokens),
        "model_version": np.array(["v1"] * tokens),
        "replica": np.array(["r"] * tokens),
        "request_id": np.array([f"q{i // 64}" for i in range(tokens)]),
        "token_pos": np.arange(tokens) % 64,
        "layer": np.full(tokens, 15),
        "token_id": np.full(tokens, 7),
        "token_text": np.array(["t"] * tokens),
        "recon_error": np.zeros(tokens, np.float32),
        "segment_id": np.array(["s"] * tokens),
        "feature_ids": ids.numpy(),
        "feature_values": values.numpy(),
    }
    with Catalog(tmp / "lake-bench.duckdb", tmp / "lake-bench") as catalog:
        start = time.perf_counter()
        tok, feats = _segment_tables(cols, VERSION, "full")
        files = write_segment(catalog.lake, tok, feats, f"bench__{VERSION}")
        catalog.commit_segment("bench", VERSION, files, tokens=tokens,
                               feature_rows=feats.num_rows)  # fmt: skip
        lake_rate = tokens / (time.perf_counter() - start)
    torch.set_num_threads(2)
    return encode_rate, lake_rate


def send_at(address: str, vectors_per_s: float, seconds: float, out: mp.Queue) -> None:
    """A replica's sender at a steady rate (batches of ROWS vectors)."""
    from featurewatch.capture.sender import ActivationSender

    sender = ActivationSender(address, TOKEN, "capacity-replica")
    base = template()
    batches_per_s = vectors_per_s / ROWS
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        batch = type(base)()
        batch.CopyFrom(base)
        batch.request_ids[:] = [f"req-{sent}"]
        sender.submit(batch)
        sent += 1
        time.sleep(max(0.0, start + sent / batches_per_s - time.monotonic()))
    sender.flush(120)
    stats = sender.snapshot()
    sender.close()
    out.put((stats.acked_vectors, stats.dropped_vectors))


def run_size(cfg, sae, catalog, address: str, vectors_per_s: float, seconds: float) -> dict:
    """The platform at one size: busy cores less the sender's, and whether it kept up."""
    stop, commits = threading.Event(), []
    pipeline = threading.Thread(
        target=follow_segments, args=(cfg, sae, VERSION, catalog),
        kwargs={"every_s": 2.0, "stop": stop,
                "on_report": lambda report: commits.append(report.tokens)},
        daemon=True,
    )  # fmt: skip
    tokens_before = catalog.query("SELECT count(*) AS n FROM tokens").to_pylist()[0]["n"]
    out: mp.Queue = mp.Queue()
    sender = mp.Process(target=send_at, args=(address, vectors_per_s, seconds, out))
    cpu0, wall0 = busy_cpu(), time.monotonic()
    pipeline.start()
    sender.start()
    sender_ps = psutil.Process(sender.pid)
    sender_cpu = 0.0
    while sender.is_alive():
        try:
            sender_cpu = sum(sender_ps.cpu_times()[:2])
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    acked, dropped = out.get()
    sender.join()
    wall, cpu = time.monotonic() - wall0, busy_cpu() - cpu0
    # Keeping up: the last segment seals within segment_max_age_s (5 s) and should be in
    # the lake a round or two later. (The pipeline thread owns the catalog connection
    # until it stops: count its reports instead of querying.)
    sent_until = time.monotonic()
    while sum(commits) < acked and time.monotonic() < sent_until + 60:
        time.sleep(0.25)
    caught_up_s = time.monotonic() - sent_until
    stop.set()
    pipeline.join(timeout=120)
    in_lake = catalog.query("SELECT count(*) AS n FROM tokens").to_pylist()[0]["n"] - tokens_before
    return {
        "vectors_per_s": vectors_per_s,
        "acked": acked,
        "dropped": dropped,
        "in_lake": in_lake,
        "platform_cores": round((cpu - sender_cpu) / wall, 2),
        "in_lake_after_s": round(caught_up_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[4000.0, 16000.0])
    parser.add_argument("--calibrate", type=float, default=256.0, help="trickle, vectors/s")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    mp.set_start_method("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="fw-capacity-"))
    cfg = build_config({"home": str(tmp / "home"), "ray": {"num_cpus": 2}})
    sae = make_sae(cfg)

    ingest = ingest_per_core(tmp)
    encode, lake = encode_and_lake_per_core(cfg, sae, tmp)
    per_core = {"ingest": ingest, "encode": encode, "lake_write": lake}
    bottleneck = min(per_core, key=per_core.get)
    per_vector_cores = sum(1 / v for v in per_core.values())

    init_ray(cfg)
    token_file = tmp / "token"
    collector, address = start_collector_process(
        cfg.spool_dir, token_file, extra_args=("--width", str(WIDTH), "--segment-max-age-s", "5")
    )
    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        catalog.register_sae(
            VERSION, make_sae(cfg).save(cfg.sae_dir / VERSION), architecture="topk",
            model="bench", layer=15, site="resid_post", d_in=WIDTH, d_sae=cfg.sae.d_sae,
            k=cfg.sae.k, metrics={},
        )  # fmt: skip
        trickle = run_size(cfg, sae, catalog, address, args.calibrate, args.seconds)
        rows = [run_size(cfg, sae, catalog, address, v, args.seconds) for v in args.sizes]
    collector.terminate()
    collector.wait(30)
    fixed = trickle["platform_cores"] - args.calibrate * per_vector_cores
    print(json.dumps({"per_core_vectors_per_s": {k: round(v) for k, v in per_core.items()},
                      "first_bottleneck": bottleneck, "fixed_cores_while_data_flows": fixed,
                      "trickle": trickle}, indent=2))  # fmt: skip
    for row in rows:
        predicted = fixed + row["vectors_per_s"] * per_vector_cores
        kept_up = row["in_lake"] == row["acked"]
        print(
            f"{row['vectors_per_s']:,.0f} vectors/s: platform busy {row['platform_cores']:.2f} "
            f"cores, model {predicted:.2f} (fixed {fixed:.2f} + {row['vectors_per_s']:,.0f} x "
            f"{per_vector_cores * 1e6:.1f} us), measured/model "
            f"{row['platform_cores'] / predicted:.2f}; {row['acked']:,} acked, "
            f"{row['in_lake']:,} in the lake {row['in_lake_after_s']} s after the last send, "
            f"{row['dropped']} dropped, kept up: {'yes' if kept_up else 'NO'}"
        )
    print(f"machine limit by the model: {(2 - fixed) / per_vector_cores:,.0f} vectors/s on 2 cores")


if __name__ == "__main__":
    main()
