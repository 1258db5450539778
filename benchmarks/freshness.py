"""Freshness: how long from a sampled token to its features being queryable in SQL.

One process, every part real and at its default settings: a collector (gRPC on
loopback, the spool sealing segments after `collector.segment_max_age_s`), the
replica's ActivationSender streaming batches at a steady rate, the pipeline as a service
(`follow_segments`: Ray Data on a local cluster, a round every 2 s, as `featurewatch
pipeline --follow` runs it), and a reader polling the published catalog as an analyst's
connection does. The lag of a batch is the first time a reader sees its request in
`tokens`, minus the time it was sampled. The SAE is a random TopK of the default size
(1,024 latents, k 16) over SmolLM2's width: encoding cost, not quality, matters here.

Prints p50, p95 and max, the ratio of p95 to the 15 s target (under 1 meets it), and
where the time goes: waiting for the segment to seal, then the pipeline after sealing.

    .venv/bin/python benchmarks/freshness.py [--seconds 90] [--rate 10] [--rows 32]
        [--every 2] [--segment-max-age S]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from featurewatch.actors.collector import CollectorServer
from featurewatch.actors.pipeline import follow_segments
from featurewatch.actors.runtime import init_ray
from featurewatch.capture.sender import ActivationSender
from featurewatch.config import build_config
from featurewatch.proto.codec import make_batch
from featurewatch.sae.model import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.spool import segment_id, spool_segments

WIDTH, TARGET_S, VERSION = 576, 15.0, "fresh-sae"


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to send")
    parser.add_argument("--rate", type=float, default=10.0, help="batches per second")
    parser.add_argument("--rows", type=int, default=32, help="sampled tokens per batch")
    parser.add_argument("--every", type=float, default=2.0, help="pipeline round interval")
    parser.add_argument(
        "--segment-max-age", type=float, default=None, help="default: the config's default"
    )
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="fw-fresh-"))
    overrides = {"home": str(home), "ray": {"num_cpus": 2}}
    if args.segment_max_age is not None:
        overrides["collector"] = {"segment_max_age_s": args.segment_max_age}
    cfg = build_config(overrides)
    init_ray(cfg)
    torch.manual_seed(0)
    sae = build("topk", WIDTH, cfg.sae.d_sae, k=cfg.sae.k)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.05)
    sae_path = sae.save(home / "saes" / VERSION)

    token = "freshness-token"
    collector = CollectorServer(
        cfg.spool_dir, token, segment_max_age_s=cfg.collector.segment_max_age_s
    ).start()
    sender = ActivationSender(collector.address, token, "bench-replica")

    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    stop = threading.Event()

    def read_like_an_analyst() -> None:
        while not stop.is_set():
            try:
                with Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir) as reader:
                    rows = reader.query("SELECT DISTINCT request_id FROM tokens").to_pylist()
                now = time.time()
                for row in rows:
                    seen_at.setdefault(row["request_id"], now)
            except Exception:  # noqa: BLE001 - no catalog yet
                pass
            time.sleep(0.25)

    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        catalog.register_sae(
            VERSION, sae_path, architecture="topk", model=cfg.model.name,
            layer=cfg.capture.layer, site=cfg.capture.site, d_in=WIDTH,
            d_sae=cfg.sae.d_sae, k=cfg.sae.k, metrics={},
        )  # fmt: skip
        pipeline = threading.Thread(
            target=follow_segments,
            args=(cfg, sae, VERSION, catalog),
            kwargs={"every_s": args.every, "stop": stop},
            daemon=True,
        )
        reader = threading.Thread(target=read_like_an_analyst, daemon=True)
        pipeline.start()
        reader.start()

        started, sent = time.monotonic(), 0
        while time.monotonic() - started < args.seconds:
            request = f"req-{sent}"
            now = time.time()
            n = args.rows
            batch = make_batch(
                torch.randn(n, WIDTH).half(),
                model=cfg.model.name, model_version=cfg.model.version,
                layer=cfg.capture.layer, site=cfg.capture.site,
                request_ids=[request], request_index=[0] * n, token_pos=list(range(n)),
                token_id=[7] * n, ts_unix_nanos=[int(now * 1e9)] * n, token_text=["t"] * n,
                replica_id="bench-replica",
            )  # fmt: skip
            sender.submit(batch)
            sent_at[request] = now
            sent += 1
            time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
        deadline = time.monotonic() + 4 * cfg.collector.segment_max_age_s + 60
        while len(seen_at.keys() & sent_at.keys()) < len(sent_at):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        stop.set()
        pipeline.join(timeout=120)
        reader.join(timeout=10)
        segment_of = {
            r["request_id"]: r["segment_id"]
            for r in catalog.query("SELECT DISTINCT request_id, segment_id FROM tokens").to_pylist()
        }
    sender.close()
    collector.stop()

    sealed_at = {segment_id(p): p.stat().st_mtime for p in spool_segments(cfg.spool_dir)}
    lags, waits, after = [], [], []
    for request, t0 in sent_at.items():
        if request in seen_at:
            lags.append(seen_at[request] - t0)
            sealed = sealed_at.get(segment_of.get(request))
            if sealed is not None:
                waits.append(sealed - t0)
                after.append(seen_at[request] - sealed)
    result = {
        "batches_sent": len(sent_at),
        "batches_seen": len(lags),
        "segment_max_age_s": cfg.collector.segment_max_age_s,
        "pipeline_every_s": args.every,
        "lag_p50_s": round(percentile(lags, 50), 2),
        "lag_p95_s": round(percentile(lags, 95), 2),
        "lag_max_s": round(max(lags), 2),
        "p95_over_target": round(percentile(lags, 95) / TARGET_S, 2),
        "waiting_for_seal_p50_s": round(percentile(waits, 50), 2),
        "after_seal_p50_s": round(percentile(after, 50), 2),
        "after_seal_p95_s": round(percentile(after, 95), 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
