"""Operators' metrics through `ray.util.metrics`, served by Ray in Prometheus format.

Ray's metrics agent on each node serves every metric recorded in that node's Ray
processes (actors, Serve replicas, drivers) on the node's metrics export port, with a
`ray_` prefix: `featurewatch_collector_accepted_vectors` is scraped as
`ray_featurewatch_collector_accepted_vectors_total`. See the docs, "Operating it".

Metrics must never take a service down: every export here logs its failure and returns.
The components (CollectorServer, PolicyController) count or report in plain Python and
never import this module; the Ray shells around them do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from ray.util.metrics import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]


def safely(what: str, record: Callable[[], None]) -> None:
    """Run one export; a failure is logged, never raised into the service."""
    try:
        record()
    except Exception:  # noqa: BLE001 - metrics must never take a service down
        log.exception("exporting %s metrics failed", what)


class Exporter:
    """Calls `export` every period_s on a daemon thread until close(), which exports once
    more so the last counts are not lost."""

    def __init__(self, period_s: float, export: Callable[[], None], what: str):
        self.export, self.what = export, what
        self._stop = threading.Event()
        threading.Thread(target=self._loop, args=(period_s,), name=f"fw-metrics-{what}",
                         daemon=True).start()  # fmt: skip

    def _loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            safely(self.what, self.export)

    def close(self) -> None:
        self._stop.set()
        safely(self.what, self.export)


class CounterDeltas:
    """Totals a component already counts (a stats dict), exported as Ray counters: each
    export adds what grew since the last one, so the component itself needs no Ray and
    its hot path pays nothing."""

    def __init__(self, prefix: str, descriptions: Mapping[str, str], tags: dict[str, str]):
        self.tags = tags
        self.counters = {
            name: Counter(f"{prefix}_{name}", description=text, tag_keys=tuple(tags))
            for name, text in descriptions.items()
        }
        self.last = dict.fromkeys(self.counters, 0)

    def export(self, stats: Mapping[str, int]) -> None:
        for name, counter in self.counters.items():
            delta = stats[name] - self.last[name]
            if delta > 0:
                counter.inc(delta, tags=self.tags)
            self.last[name] = stats[name]


class CaptureMetrics:
    """A replica's capture sender: its counters and the depth of its send buffer."""

    COUNTERS = {
        "acked_vectors": "Captured vectors acked as durable by a collector.",
        "acked_bytes": "Vector payload bytes acked by a collector.",
        "dropped_vectors": "Vectors dropped because the send buffer was full.",
        "dropped_batches": "Batches dropped because the send buffer was full.",
        "rejected_batches": "Batches a collector refused as invalid.",
        "budget_dropped_vectors": "Vectors skipped by the vectors/s budget.",
    }

    def __init__(self, model: str, replica: str):
        self.deltas = CounterDeltas(
            "featurewatch_capture", self.COUNTERS, {"model": model, "replica": replica}
        )
        self.queue = Gauge(
            "featurewatch_capture_queue_depth",
            description="Batches waiting in the send buffer.",
            tag_keys=("model", "replica"),
        )

    def export(self, stats: Mapping[str, int]) -> None:
        self.deltas.export(stats)
        self.queue.set(stats["queue_depth"], tags=self.deltas.tags)


COLLECTOR_COUNTERS = {
    "accepted_batches": "Batches stored durably (fsynced) and acked.",
    "accepted_vectors": "Vectors stored durably and acked.",
    "accepted_bytes": "Serialized batch bytes stored durably and acked.",
    "duplicate_batches": "Resent batches already stored: acked as duplicates, not stored.",
    "rejected_batches": "Batches refused as invalid (the stream is aborted naming the field).",
    "fsyncs": "Spool fsyncs (one per group commit).",
    "disk_full_refusals": "Batches answered RESOURCE_EXHAUSTED: the spool's disk was full.",
    "refused_streams": "Streams refused: the collector's or one host's limit of open streams.",
    "idle_closed_streams": "Streams closed after stream_idle_s without a message.",
    "auth_failures": "Calls with a missing or wrong bearer token (each logged with its host).",
    "auth_locked_out": "Calls refused because their host failed authentication too often.",
}


def collector_metrics(collector: str) -> CounterDeltas:
    return CounterDeltas("featurewatch_collector", COLLECTOR_COUNTERS, {"collector": collector})


class PipelineMetrics:
    """`follow_segments` rounds: what they committed, how long they took, and the lake's
    lag behind the spool: how long the oldest sealed segment not yet in the lake has
    waited. Ray drops a gauge that is not set again within about two export intervals
    (20 s), so a thread publishes the lag every few seconds; it keeps growing while a
    long round runs, and falls when a round's commits are measured."""

    def __init__(self, model: str, every_s: float = 2.0):
        self.model = model
        keys = ("model", "sae_version")
        self.committed = {
            name: Counter(f"featurewatch_pipeline_{name}", description=text, tag_keys=keys)
            for name, text in (
                ("segments_committed", "Spool segments committed to the lake and catalog."),
                ("tokens_committed", "Token rows committed to the lake."),
                ("feature_rows_committed", "Feature activation rows committed to the lake."),
            )
        }
        self.lag = Gauge(
            "featurewatch_pipeline_lag_seconds",
            description="How long the oldest sealed segment not yet in the lake has waited "
            "(0 when the pipeline has caught up).",
            tag_keys=("model",),
        )
        self.duration = Histogram(
            "featurewatch_pipeline_round_seconds",
            description="Duration of one pipeline round; outcome ok or failed.",
            boundaries=SECONDS,
            tag_keys=("model", "outcome"),
        )
        self.waiting_since: float | None = None  # seal time of the oldest waiting segment
        self.exporter = Exporter(every_s, self._publish_lag, "pipeline")

    def measure_lag(self, oldest_waiting: Callable[..., float | None], *args) -> None:
        """Look again at what waits (oldest_waiting(*args): a Unix time, or None when
        nothing does); a failed look keeps the previous answer, so the lag still grows."""

        def measure() -> None:
            self.waiting_since = oldest_waiting(*args)

        safely("pipeline", measure)

    def _publish_lag(self) -> None:
        since = self.waiting_since
        lag = 0.0 if since is None else max(0.0, time.time() - since)
        self.lag.set(lag, tags={"model": self.model})

    def record_round(self, report, ok: bool, sae_version: str, seconds: float) -> None:
        """`report` is the round's EncodeReport, or None when it failed before one."""

        def record() -> None:
            outcome = "ok" if ok else "failed"
            self.duration.observe(seconds, tags={"model": self.model, "outcome": outcome})
            if report is None:
                return
            tags = {"model": self.model, "sae_version": sae_version}
            for name, value in (
                ("segments_committed", report.segments_committed),
                ("tokens_committed", report.tokens),
                ("feature_rows_committed", report.feature_rows),
            ):
                if value > 0:
                    self.committed[name].inc(value, tags=tags)

        safely("pipeline", record)

    def close(self) -> None:
        self.exporter.close()


class ControllerMetrics:
    """What the policy controller did: evaluations by outcome, triggers fired, action
    results, and how long each policy's drift queries took. Passed to PolicyController
    as its `metrics` (it calls evaluated, fired and action)."""

    def __init__(self):
        self.evaluations = Counter(
            "featurewatch_controller_evaluations",
            description="Policy evaluations by outcome: fired, not_met, no_data, cooldown, error.",
            tag_keys=("policy", "outcome"),
        )
        self.triggers = Counter(
            "featurewatch_controller_triggers",
            description="Policies fired, by the decision's status: approved (automatic), "
            "pending (manual approval) or dry_run.",
            tag_keys=("policy", "status"),
        )
        self.actions = Counter(
            "featurewatch_controller_actions",
            description="Actions run for approved decisions, by policy, kind (alert, steer, "
            "...) and outcome (done, failed, skipped).",
            tag_keys=("policy", "kind", "outcome"),
        )
        self.query_seconds = Histogram(
            "featurewatch_controller_query_seconds",
            description="Time to evaluate one policy: its drift queries over the catalog "
            "for every window it checks.",
            boundaries=SECONDS,
            tag_keys=("statistic",),
        )

    def evaluated(self, policy: str, statistic: str, outcome: str, seconds: float) -> None:
        def record() -> None:
            self.evaluations.inc(tags={"policy": policy, "outcome": outcome})
            self.query_seconds.observe(seconds, tags={"statistic": statistic})

        safely("controller", record)

    def fired(self, policy: str, status: str) -> None:
        safely("controller", lambda: self.triggers.inc(tags={"policy": policy, "status": status}))

    def action(self, policy: str, kind: str, outcome: str) -> None:
        tags = {"policy": policy, "kind": kind, "outcome": outcome}
        safely("controller", lambda: self.actions.inc(tags=tags))
