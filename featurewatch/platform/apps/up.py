"""`featurewatch up`: the data path as a service on a Ray cluster, until stopped.

It starts the collectors (`collector.count`), the model server on Ray Serve (its HTTP
proxy on the head node only: on a cluster whose nodes share one host, a proxy per node
would fight over the port) and runs the pipeline as a service in this process, each
model encoding with the newest SAE registered for it (without one its vectors wait in
the spool). A fleet (`fleet:` in the config) gets an application per model, at
/<name>/, sharing the collectors, the pipeline and the lake.
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
from ray import serve

from featurewatch.actors.pipeline import (
    EncodeReport,
    encode_segments,
    fleet_lanes,
    follow_lanes,
    take_registered_sae,
)
from featurewatch.actors.runtime import collector_token, init_ray, start_collectors
from featurewatch.actors.serving import check_servable, deploy_model_server
from featurewatch.config import FeaturewatchConfig
from featurewatch.platform.control.actor import start_controller
from featurewatch.platform.control.controller import load_policy_list
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
    nothing in flight (replicas beat every 2 s; a dead one never beats again). False
    on timeout, or when no replica beats at all (nothing to tell it by)."""
    deadline = time.time() + timeout_s
    time.sleep(2.5)  # one beat of every live replica after `since`
    while time.time() < deadline:
        beats = [b for b in read_heartbeats(cfg.status_dir, "replica") if b["updated_at"] > since]
        if beats and all(
            b.get("queue_depth", 0) == 0 and b.get("in_flight", 0) == 0 for b in beats
        ):
            return True
        time.sleep(0.5)
    return False


def run_up(
    cfg: FeaturewatchConfig, every_s: float = 2.0, stop: threading.Event | None = None
) -> dict:
    """Run until `stop` is set (by default: until SIGTERM or SIGINT)."""

    members = cfg.fleet_configs()
    folders, widths = {}, {}
    for member in members:
        folders[member.model.name], widths[member.model.name] = check_servable(member)
    # Checked before the minutes-long start: a bad policy file is named at once.
    policies = load_policy_list(cfg.control.policies) if cfg.control.policies else None
    cfg.home.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    if stop is None:
        # After ray.init (which sets its own SIGTERM handler) and before the minutes-long
        # start, so that a stop meanwhile is not lost.
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    token = collector_token(cfg)
    # Alone, a model's width; a fleet's collectors check each model's own (an allow-list).
    collectors = start_collectors(
        cfg, token, widths if len(members) > 1 else widths[cfg.model.name]
    )
    lanes, drained, last = fleet_lanes(cfg), False, EncodeReport(0, 0, 0, 0)
    controller = None
    try:
        if policies is not None:
            controller = start_controller(cfg, policies, cfg.control.every_s)
        addresses = ray.get([c.address.remote() for c in collectors])
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        )
        deploy_model_server(cfg, addresses, token)  # every model of the fleet
        base = f"http://{cfg.serve.host}:{cfg.serve.port}"
        with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
            for member in members:
                name = member.model.name
                catalog.register_model_version(name, member.model.version, str(folders[name]))
            _emit(
                "ready",
                url=base,
                models={m.model.name: base + m.serve.route_prefix.rstrip("/") for m in members},
                collectors=addresses,
                nodes=_nodes(),
            )
            follow_lanes(
                lanes,
                catalog,
                every_s=every_s,
                stop=stop,
                on_report=lambda r: _emit("round", **asdict(r)),
            )
            # Drain: what the replicas queued reaches a collector, the applications go
            # (no new traffic), every spool is sealed, and a last round encodes it all.
            drained = _drain_replicas(cfg, time.time(), DRAIN_TIMEOUT_S)
            _delete_applications(members)
            ray.get([c.seal.remote() for c in collectors], timeout=60)
            for lane in lanes:
                # A stop before the first round found no lane its SAE yet.
                if lane.sae is not None or take_registered_sae(lane, catalog):
                    report = encode_segments(
                        lane.cfg, lane.sae, lane.sae_version, catalog, model=lane.model
                    )
                    last.segments_committed += report.segments_committed
                    last.tokens += report.tokens
                    last.feature_rows += report.feature_rows
    finally:
        if controller is not None:
            try:
                ray.get(controller.stop.remote(), timeout=60)
            except ray.exceptions.RayError as err:  # it may be restarting: it goes with us
                log.warning("the controller did not stop cleanly: %s", err)
        _delete_applications(members)  # never leave replicas streaming to dead collectors
        ray.get([c.stop.remote() for c in collectors], timeout=60)
    versions = {lane.cfg.model.name: lane.sae_version for lane in lanes}
    summary = {"drained": drained, "last_round": asdict(last), "sae_versions": versions}
    _emit("stopped", **summary)
    return summary


def _delete_applications(members: list[FeaturewatchConfig]) -> None:

    running = serve.status().applications
    for member in members:
        if member.serve.app_name in running:
            serve.delete(member.serve.app_name)
