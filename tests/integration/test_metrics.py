"""Ray serves featurewatch's own metrics in Prometheus format: a real collector actor, a
pipeline round and the controller actor record them, and the node's metrics export port
is scraped over HTTP, as Prometheus would."""

import os
import threading
import time

import grpc
import pytest
import ray
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from featurewatch.actors.collector import CollectorActor
from featurewatch.actors.pipeline import follow_segments
from featurewatch.config import build_config
from featurewatch.platform.control.actor import ControllerActor
from featurewatch.proto import activations_pb2_grpc as pb_grpc
from featurewatch.sae.model import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.spool import sealed_segments
from tests.unit.test_codec import batch_of
from tests.unit.test_controller import platform, policies, webhook  # noqa: F401 (fixtures)

TOKEN = "metrics-test-token-5f0c2e9b7d"
WIDTH = 16
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def metrics_url() -> str:
    node = ray._private.worker.global_worker.node
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def scrape() -> list[tuple[str, dict, float]]:
    text = requests.get(metrics_url(), timeout=10).text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples, name: str, **labels) -> float | None:
    """The sum of `name`'s series carrying these labels; None before Ray exports it."""
    found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
    return sum(found) if found else None


def wait_for_metrics(expected: dict, at_least: dict, timeout: float = 90.0):
    """Scrape until every expected value is there (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape()
        got = {key: value(samples, key[0], **dict(key[1])) for key in expected | at_least}
        missing = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
        missing |= {
            k: (got[k], f">= {v}") for k, v in at_least.items() if got[k] is None or got[k] < v
        }
        if not missing:
            return got
        names = sorted({n for n, _, _ in samples if "featurewatch" in n})
        assert time.monotonic() < deadline, f"never reached (got, expected): {missing}; {names}"
        time.sleep(0.5)


def random_sae():
    torch.manual_seed(0)
    sae = build("topk", WIDTH, 32, k=4)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_()
    return sae


def metric(name: str, **labels):
    return (f"ray_featurewatch_{name}", tuple(sorted(labels.items())))


def test_collector_pipeline_and_controller_metrics_are_scraped(
    ray_cluster,
    platform,  # noqa: F811
    webhook,  # noqa: F811
    tmp_path,
):
    # The controller actor fires one alert (its policy is met at once), meanwhile...
    url, received, _ = webhook
    policy = policies(
        url, id="metrics-rising", feature=7, statistic="firing_rate", window="1000d",
        baseline="1000d", threshold=0.0, consecutive=1, every="1s", cooldown="1d",
    )  # fmt: skip
    controller = ControllerActor.remote(platform, policy, 0.3)

    # ...a collector actor takes three batches, a resend and a bad batch...
    cfg = build_config(
        {
            "home": str(tmp_path / "fw"),
            "model": {"name": "metrics-test"},
            "capture": {"layers": [1]},
        }
    )
    collector = CollectorActor.remote(
        str(cfg.spool_dir), TOKEN, metrics_every_s=0.5, expected_width=WIDTH
    )
    address = ray.get(collector.address.remote())
    batches = [batch_of(torch.randn(4, WIDTH).half(), seq=seq) for seq in (1, 2, 3)]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CollectorStub(channel)
        for batch in batches:
            assert not stub.Push(batch, metadata=AUTH).duplicate
        assert stub.Push(batches[1], metadata=AUTH).duplicate
        with pytest.raises(grpc.RpcError) as info:
            stub.Push(batch_of(torch.randn(4, WIDTH + 1).half(), seq=4), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ray.get(collector.seal.remote())

    # ...and the pipeline encodes the sealed segment, which has waited two minutes. Its
    # on_report holds the round open, like a long encode: the lag is published meanwhile.
    (segment,) = sealed_segments(cfg.spool_dir)
    sealed_at = time.time() - 120
    os.utime(segment, (sealed_at, sealed_at))
    reports, release, stop = [], threading.Event(), threading.Event()
    pipeline = {"model": "metrics-test"}
    committed = pipeline | {"sae_version": "sae-metrics"}
    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        service = threading.Thread(
            target=follow_segments,
            args=(cfg, random_sae(), "sae-metrics", catalog),
            kwargs={
                "every_s": 3600.0,  # one round; `stop` ends the service
                "stop": stop,
                "on_report": lambda report: (reports.append(report), release.wait(120)),
            },
        )
        service.start()
        try:
            wait_for_metrics({}, at_least={metric("pipeline_lag_seconds", **pipeline): 120})
            deadline = time.monotonic() + 120  # the lag shows from the round's start
            while not reports and time.monotonic() < deadline:
                time.sleep(0.1)
            release.set()
            (report,) = reports
            assert (report.segments_committed, report.tokens) == (1, 12) and report.feature_rows > 0

            deadline = time.monotonic() + 60
            while not received and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(received) == 1
            ray.get(controller.stop.remote())
            ray.get(collector.stop.remote())

            # The round is over: the lag falls to 0 while the pipeline keeps running.
            started = time.monotonic()
            got = wait_for_metrics(
                {
                    metric("collector_accepted_batches_total", collector=address): 3,
                    metric("collector_accepted_vectors_total", collector=address): 12,
                    metric("collector_accepted_bytes_total", collector=address): sum(
                        b.ByteSize() for b in batches
                    ),
                    metric("collector_duplicate_batches_total", collector=address): 1,
                    metric("collector_rejected_batches_total", collector=address): 1,
                    metric("pipeline_segments_committed_total", **committed): 1,
                    metric("pipeline_tokens_committed_total", **committed): 12,
                    metric(
                        "pipeline_feature_rows_committed_total", **committed
                    ): report.feature_rows,
                    metric("pipeline_round_seconds_count", **pipeline, outcome="ok"): 1,
                    metric("pipeline_lag_seconds", **pipeline): 0,
                    metric(
                        "controller_evaluations_total", policy="metrics-rising", outcome="fired"
                    ): 1,
                    metric(
                        "controller_triggers_total", policy="metrics-rising", status="approved"
                    ): 1,
                    metric(
                        "controller_actions_total",
                        policy="metrics-rising",
                        kind="alert",
                        outcome="done",
                    ): 1,
                },
                at_least={
                    metric("collector_fsyncs_total", collector=address): 1,
                    metric("controller_query_seconds_count", statistic="firing_rate"): 1,
                },
            )
        finally:
            release.set()
            stop.set()
            service.join()
    print(f"metrics scraped {time.monotonic() - started:.1f}s after the work: {got}")
    ray.kill(controller)
    ray.kill(collector)


FIXED_PORT = """
import sys, time, ray, requests
from ray.util.metrics import Counter
from featurewatch.config import build_config
from featurewatch.actors.runtime import init_ray

port = int(sys.argv[1])
init_ray(build_config({"home": sys.argv[2], "ray": {"metrics_export_port": port}}))
Counter("featurewatch_port_probe", description="probe").inc(3)
url = f"http://{ray.nodes()[0]['NodeManagerAddress']}:{port}/metrics"
for _ in range(60):
    try:  # Ray's agent, which serves the port, may still be starting
        if "ray_featurewatch_port_probe_total" in requests.get(url, timeout=5).text:
            print("scraped", flush=True)
            break
    except requests.RequestException:
        pass
    time.sleep(1)
"""


def test_a_local_cluster_serves_metrics_on_the_configured_port(tmp_path):
    """`ray.metrics_export_port` fixes the port of a cluster featurewatch starts (its own
    process: this session's cluster is already up)."""
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    done = subprocess.run(
        [sys.executable, "-c", FIXED_PORT, str(port), str(tmp_path / "home")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert "scraped" in done.stdout, done.stderr[-2000:]
