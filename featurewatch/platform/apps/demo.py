"""`featurewatch demo`: the whole data path once, on SmolLM2, on one machine.

serve SmolLM2 (Ray Serve, model.engine: vLLM or transformers) -> two phases of chat
traffic -> sampled residual activations over gRPC -> collector spool -> Ray Train SAE ->
Ray Data encode -> Parquet lake + DuckDB catalog -> the features whose firing rate moved
most, by SQL.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import duckdb
import ray
import requests
from ray import serve
from tqdm import tqdm

from featurewatch.actors.pipeline import encode_segments, segments_dataset
from featurewatch.actors.runtime import (
    collector_token,
    init_ray,
    start_collectors,
)
from featurewatch.actors.serving import check_servable, deploy_model_server
from featurewatch.analysis.prompts import load_prompts
from featurewatch.config import FeaturewatchConfig
from featurewatch.platform.jobs.train_sae import train_sae
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.drift import top_movers
from featurewatch.storage.spool import spool_segments


@dataclass
class DemoReport:
    requests_sent: int = 0
    requests_failed: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    vectors_acked: int = 0
    vectors_dropped: int = 0
    segments: int = 0
    sae_version: str = ""
    sae_metrics: dict = field(default_factory=dict)
    tokens_encoded: int = 0
    feature_rows: int = 0
    phases: dict = field(default_factory=dict)
    top_movers: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _Steps:
    """Numbered progress lines with elapsed time."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {text}  (t={time.monotonic() - self.t0:.0f}s)", flush=True)


def _chat(url: str, prompt: str, max_tokens: int) -> dict:
    # Greedy on both engines (vLLM, like OpenAI, samples at temperature 1 by default).
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    resp = requests.post(url, json=body, timeout=600)
    resp.raise_for_status()
    return resp.json()


def _send_phase(
    cfg: FeaturewatchConfig, name: str, report: DemoReport
) -> tuple[datetime, datetime]:
    prompts = load_prompts(name)
    n = cfg.demo.requests_per_phase
    chosen = [prompts[i % len(prompts)]["prompt"] for i in range(n)]
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1/chat/completions"
    start = datetime.now(UTC)
    sample = None
    with (
        ThreadPoolExecutor(cfg.demo.concurrency) as pool,
        tqdm(total=n, desc=f"  {name} requests", unit="req") as bar,
    ):
        futures = [pool.submit(_chat, url, p, cfg.demo.max_tokens) for p in chosen]
        for fut in futures:
            try:
                answer = fut.result()
                sample = sample or answer["choices"][0]["message"]["content"]
                report.requests_sent += 1
            except Exception as err:  # a failed request is reported, the demo goes on
                report.requests_failed += 1
                tqdm.write(f"  request failed: {err}")
            bar.update(1)
    end = datetime.now(UTC)
    if sample:
        print(f"  sample answer ({name}): {sample[:160]!r}")
    report.phases[name] = {"start": start.isoformat(), "end": end.isoformat(), "requests": n}
    return start, end


def run_demo(cfg: FeaturewatchConfig) -> DemoReport:
    t0 = time.monotonic()
    report = DemoReport()
    step = _Steps(9)
    cfg.home.mkdir(parents=True, exist_ok=True)

    step(f"Preparing {cfg.model.name} under {cfg.home} (first run converts the GGUF once)")
    folder, d_model = check_servable(cfg)

    step("Starting a local Ray cluster and the gRPC collector actor")
    init_ray(cfg)
    token = collector_token(cfg)
    collectors = start_collectors(cfg, token, d_model)
    addresses = ray.get([c.address.remote() for c in collectors])
    print(f"  collectors listening on {', '.join(addresses)}")

    step(f"Deploying {cfg.model.name} on Ray Serve at http://{cfg.serve.host}:{cfg.serve.port}")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    handle = deploy_model_server(cfg, addresses, token)
    models = requests.get(f"http://{cfg.serve.host}:{cfg.serve.port}/v1/models", timeout=30)
    print(f"  GET /v1/models -> {[m['id'] for m in models.json()['data']]}")

    try:
        step(f"Phase 1: {cfg.demo.requests_per_phase} everyday chat requests")
        baseline = _send_phase(cfg, "everyday", report)
        step(f"Phase 2: {cfg.demo.requests_per_phase} prompts inviting a hostile persona")
        window = _send_phase(cfg, "persona", report)
        handle.flush_capture.remote(120.0).result()
        stats = handle.capture_stats.remote().result()
    finally:
        serve.delete(cfg.serve.app_name)
    report.batch_sizes = stats["batch_sizes"]
    report.vectors_acked = stats["acked_vectors"]
    report.vectors_dropped = stats["dropped_vectors"]
    ray.get([c.seal.remote() for c in collectors])
    sizes = report.batch_sizes or [0]
    unit = "forward pass" if cfg.model.engine == "vllm" else "generate batch"
    print(
        f"  requests per {unit}: max {max(sizes)}, mean {sum(sizes) / len(sizes):.1f} over "
        f"{len(report.batch_sizes)}; vectors acked {stats['acked_vectors']}, "
        f"dropped {stats['dropped_vectors']}"
    )

    if report.requests_sent == 0:
        raise RuntimeError("every chat request failed; see the errors above")
    segments = spool_segments(cfg.spool_dir)
    report.segments = len(segments)
    if not segments:
        raise RuntimeError("no activations reached the spool (capture.sample_fraction = 0?)")
    step(
        f"Training a {cfg.sae.architecture} SAE (d_sae={cfg.sae.d_sae}, k={cfg.sae.k}) "
        f"with Ray Train ({cfg.sae.num_workers} workers) on {len(segments)} spool segments"
    )
    trained = train_sae(
        cfg, segments_dataset(segments, cfg.capture.layer, cfg.capture.site), d_model
    )
    report.sae_version, report.sae_metrics = trained.version, trained.metrics
    m = trained.metrics
    print(
        f"  saved {trained.path} (SAELens layout); FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, "
        f"dead {m['dead_fraction']:.1%}"
    )

    step("Encoding the spool with the Ray Data pipeline into the Parquet lake")
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        catalog.register_model_version(cfg.model.name, cfg.model.version, str(folder))
        catalog.register_sae(
            trained.version,
            trained.path,
            architecture=trained.sae.architecture,
            model=cfg.model.name,
            layer=cfg.capture.layer,
            d_in=d_model,
            d_sae=cfg.sae.d_sae,
            k=cfg.sae.k,
            metrics=trained.metrics,
            model_version=cfg.model.version,
            site=cfg.capture.site,
            data_window=trained.lineage.get("data_window"),
            lineage=trained.lineage,
        )
        enc = encode_segments(cfg, trained.sae, trained.version, catalog)
        report.tokens_encoded, report.feature_rows = enc.tokens, enc.feature_rows
        print(
            f"  {enc.segments_committed} segments committed, {enc.tokens} tokens, "
            f"{enc.feature_rows} feature rows -> {cfg.lake_location}"
        )

        step("Drift by SQL: features whose firing rate moved most from phase 1 to phase 2")
        # The phases are a minute or two long: exact boundaries, not minute rollups.
        movers = top_movers(
            catalog, trained.version, baseline, window, cfg.demo.top_movers, exact=True
        )
        shown = movers.select(["feature_id", "base_rate", "win_rate", "rate_ratio", "z"])
        shown = shown.append_column("top_tokens", movers.column("top_tokens"))
        duckdb.from_arrow(shown).show(max_width=150, max_col_width=48)
        report.top_movers = movers.to_pylist()
    ray.get([c.stop.remote() for c in collectors])

    step("Done")
    report.seconds = time.monotonic() - t0
    cfg.demo_report_file.write_text(json.dumps(asdict(report), indent=2, default=str))
    print(
        f"  {report.requests_sent} requests, {report.tokens_encoded} tokens encoded in "
        f"{report.seconds:.0f}s. Ask your own questions:\n"
        f'    featurewatch sql "SELECT feature_id, count(*) AS fired FROM feature_acts '
        f'GROUP BY ALL ORDER BY fired DESC LIMIT 5"'
    )
    return report
