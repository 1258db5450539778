"""`featurewatch up`: the data path as a service on a Ray cluster, until stopped.

It starts the collectors (`collector.count`), the model server on Ray Serve (its HTTP
proxy on the head node only: on a cluster whose nodes share one host, a proxy per node
would fight over the port) and runs the pipeline as a service in this process, with
the newest SAE registered for the model (without one it collects and waits for one).
With `ray.place_by_role` each part lands only on the nodes that advertise its role.

Ray keeps the parts alive: Serve replaces a replica whose node died, a dead collector
is restarted on another ingest node and replays its spool, the replicas' senders fail
over to the collectors that answer and resend what was not acked, and a pipeline round
that fails is retried. Stopping (SIGTERM, Ctrl-C) drains: it waits for the replicas'
send queues to empty, seals every collector's spool and runs a last round, so what was
acked is in the lake when the command exits. Events go to stdout as JSON lines
(`ready`, `round`, `stopped`) for scripts and tests.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import asdict

import ray

from featurewatch.errors import ConfigError
from featurewatch.platform.config import FeaturewatchConfig
from featurewatch.platform.discover import registered_sae
from featurewatch.platform.pipeline import EncodeReport, encode_segments, follow_segments
from featurewatch.platform.runtime import collector_token, init_ray, start_collectors
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.heartbeats import read_heartbeats

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0


def _emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


def _nodes() -> list[dict]:
    return [
        {"node_id": n["NodeID"], "name": n.get("NodeName"), "resources": n["Resources"]}
        for n in ray.nodes()
        if n["Alive"]
    ]


def _drain_replicas(cfg: FeaturewatchConfig, since: float, timeout_s: float) -> bool:
    """Wait until every replica that beat after `since` reports an empty send queue and
    nothing in flight (replicas beat every 2 s; a dead one never beats again)."""
    deadline = time.time() + timeout_s
    time.sleep(2.5)  # one beat of every live replica after `since`
    while time.time() < deadline:
        beats = [b for b in read_heartbeats(cfg.home, "replica") if b["updated_at"] > since]
        if all(b.get("queue_depth", 0) == 0 and b.get("in_flight", 0) == 0 for b in beats):
            return True
        time.sleep(0.5)
    return False


def _run_pipeline(cfg, catalog, stop: threading.Event, every_s: float) -> tuple:
    """The pipeline as a service once an SAE is registered; returns (sae, version)."""
    from featurewatch.sae import load

    announced = False
    while not stop.is_set():
        try:
            choice = registered_sae(cfg, catalog)
        except ConfigError as err:
            if not announced:
                _emit("waiting", reason=f"{err}; collecting until one is registered")
                announced = True
            stop.wait(every_s)
            continue
        sae = load(choice.path)
        _emit("encoding", sae_version=choice.version)
        follow_segments(
            cfg,
            sae,
            choice.version,
            catalog,
            every_s=every_s,
            stop=stop,
            on_report=lambda r: _emit("round", **asdict(r)),
        )
        return sae, choice.version
    return None, None


def run_up(cfg: FeaturewatchConfig, every_s: float = 2.0) -> dict:
    from ray import serve

    from featurewatch.capture.models import model_dims, resolve_model_path
    from featurewatch.platform.serving import deploy_model_server

    folder = resolve_model_path(cfg.model.path, cfg.models_dir)
    d_model, layers = model_dims(folder)
    if cfg.capture.layer >= layers:
        raise ConfigError(f"capture.layer {cfg.capture.layer} >= the model's {layers} layers")
    cfg.home.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    token = collector_token(cfg)
    collectors = start_collectors(cfg, token, d_model)
    addresses = ray.get([c.address.remote() for c in collectors])
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
    )
    deploy_model_server(cfg, addresses, token)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        catalog.register_model_version(cfg.model.name, cfg.model.version, str(folder))
        _emit(
            "ready",
            url=f"http://{cfg.serve.host}:{cfg.serve.port}",
            collectors=addresses,
            nodes=_nodes(),
        )
        sae, sae_version = _run_pipeline(cfg, catalog, stop, every_s)
        stopped_at = time.time()
        drained = _drain_replicas(cfg, stopped_at, DRAIN_TIMEOUT_S)
        ray.get([c.seal.remote() for c in collectors], timeout=60)
        last = EncodeReport(0, 0, 0, 0)
        if sae is not None:
            last = encode_segments(cfg, sae, sae_version, catalog)
        serve.delete(cfg.serve.app_name)
        ray.get([c.stop.remote() for c in collectors], timeout=60)
    summary = {"drained": drained, "last_round": asdict(last), "sae_version": sae_version}
    _emit("stopped", **summary)
    return summary
