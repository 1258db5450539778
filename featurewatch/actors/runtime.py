"""Starting the pieces every job needs: Ray, the home folder, the collector token."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from pathlib import Path

import psutil
import ray
from ray._common.utils import (  # where Ray puts sessions and its current-cluster record
    get_default_ray_temp_dir,
    get_ray_address_file,
)

from featurewatch.actors.collector import CollectorActor
from featurewatch.config import FeaturewatchConfig, check_token
from featurewatch.errors import ConfigError
from featurewatch.storage.spool import collector_spool_dir

log = logging.getLogger(__name__)


def quiet_ray_logs() -> None:
    """Ray Data/Serve/Train log every step at INFO; the CLI prints its own progress."""
    for name in ("ray.data", "ray.serve", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def init_ray(cfg: FeaturewatchConfig, *, log_to_driver: bool = False) -> None:
    """Connect to cfg.ray.address, or start a local cluster ('local' never joins another).

    log_to_driver carries workers' output (and Ray's tqdm progress bars) to this
    terminal; the demo leaves it off to keep its own output readable."""
    quiet_ray_logs()
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, include_dashboard=False, log_to_driver=log_to_driver)
        return
    start_local_ray(
        num_cpus=cfg.ray.num_cpus,
        object_store_memory_mb=cfg.ray.object_store_memory_mb,
        log_to_driver=log_to_driver,
        metrics_export_port=cfg.ray.metrics_export_port,
    )


def start_local_ray(
    *,
    num_cpus: int,
    object_store_memory_mb: int,
    log_to_driver: bool = False,
    metrics_export_port: int | None = None,
    attempts: int = 2,
) -> None:
    """ray.init(address="local"), tried again when the node misses Ray's startup deadline.

    Ray gives a new node a fixed 30 s to register with its GCS; a busy machine has missed
    it. The failed attempt's daemons are killed and its logs' tails are logged, so a second
    failure still says why."""
    # A fixed metrics port lets Prometheus scrape a local cluster (a private argument of
    # ray.init; `ray start --metrics-export-port` is the public one for clusters).
    port = {"_metrics_export_port": metrics_export_port} if metrics_export_port else {}
    warn_if_stale_ray_address()
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                object_store_memory=object_store_memory_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                **port,
            )
            return
        except Exception as error:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(error):
                raise
            log.warning(
                "Ray's local node missed its startup deadline (attempt %d of %d).\n%s",
                attempt,
                attempts,
                _session_log_tails(),
            )
            _kill_ray_daemons()
            ray.shutdown()
            if attempt == attempts:
                raise


def warn_if_stale_ray_address(record: Path | None = None) -> bool:
    """Warn when Ray's record of "the current cluster" (written by `ray start`, removed by
    `ray stop`) names a cluster that is gone: Ray's state API reads it, and Ray Train's
    placement-group cleaner then waits on that dead address, so every fine-tune or SAE
    training job on a local cluster ends about 12 s late. Whether it warned."""
    record = record or Path(get_ray_address_file(None))
    try:
        host, _, gcs_port = record.read_text().strip().rpartition(":")
        with socket.create_connection((host, int(gcs_port)), timeout=1.0):
            return False  # a cluster answers there
    except (OSError, ValueError):
        if not record.is_file():
            return False
    log.warning(
        "%s names a Ray cluster that is gone (left by a `ray start` that was not `ray "
        "stop`ped); Ray Train jobs will each wait about 12 s on it. Delete the file or run "
        "`ray stop` when no other Ray runs here.",
        record,
    )
    return True


def _session_log_tails(lines: int = 15) -> str:

    logs = Path(get_default_ray_temp_dir()) / "session_latest" / "logs"
    out = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        path = logs / name
        if path.is_file():
            # the raylet's periodic state dumps say nothing about why it did not start
            kept = [
                x for x in path.read_text(errors="replace").splitlines() if "[state-dump]" not in x
            ]
            tail = kept[-lines:]
            out.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(out) or f"(no logs under {logs})"


def _kill_ray_daemons() -> None:
    """SIGKILL the failed node's daemons (GCS, raylet, agents): this process's children
    that run from Ray's package."""
    package = os.path.dirname(ray.__file__)
    for child in psutil.Process().children(recursive=True):
        try:
            if package in " ".join(child.cmdline()):
                child.kill()
        except psutil.NoSuchProcess:
            pass


def collector_token(cfg: FeaturewatchConfig) -> str:
    """The configured bearer token, or one generated once and kept in the home (0600)."""
    if cfg.collector.token:
        return cfg.collector.token
    path = cfg.token_file
    if path.is_file():
        try:
            return check_token(path.read_text().strip(), str(path))
        except ValueError as err:
            raise ConfigError(f"{err}; delete the file to have a new one made") from None
    cfg.home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


COLLECTOR_NAMESPACE = "featurewatch"


def collector_lookup(names: list[str]):
    """A function giving the current addresses of the named collector actors that answer
    within a few seconds (one restarting after its node died does not, yet)."""

    def resolve() -> list[str]:
        refs = []
        for name in names:
            try:
                refs.append(ray.get_actor(name, namespace=COLLECTOR_NAMESPACE).address.remote())
            except ValueError:  # no such actor (collectors started by other means)
                continue
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=3.0) if refs else ([], [])
        return [ray.get(ref) for ref in refs if ref in ready]

    return resolve


def collector_names(cfg: FeaturewatchConfig) -> list[str]:
    """The named collector actors of this home (every model of a fleet shares them):
    replicas look them up by name to find a collector Ray restarted at a new address."""
    home = hashlib.sha1(str(cfg.home.resolve()).encode()).hexdigest()[:10]
    return [f"collector-{home}-{i}" for i in range(cfg.collector.count)]


def start_collectors(cfg: FeaturewatchConfig, token: str, width: int | dict[str, int]) -> list:
    """cfg.collector.count collector actors, each with its own spool directory, spread
    over the nodes that take ingest. Ray restarts one whose node dies (on another such
    node), and the restarted collector replays its spool first: on a cluster whose
    spool is on storage that follows it (the same disk, a network volume), what the
    dead one acked is sealed and reaches the lake."""

    cc = cfg.collector
    placement = {
        "resources": cfg.role_resources("ingest"),
        "scheduling_strategy": "SPREAD",
        "max_restarts": -1,
        "namespace": COLLECTOR_NAMESPACE,
    }
    return [
        CollectorActor.options(name=name, **placement).remote(
            str(collector_spool_dir(cfg.spool_dir, i)),
            token,
            status_dir=str(cfg.status_dir),
            host=cc.host,
            port=cc.port if cc.count == 1 else 0,
            expected_width=width,
            max_batch_bytes=cc.max_batch_bytes,
            segment_max_bytes=cc.segment_max_bytes,
            segment_max_age_s=cc.segment_max_age_s,
            tls_cert_file=cc.tls_cert_file,
            tls_key_file=cc.tls_key_file,
            previous_tokens=tuple(cc.previous_tokens),
            max_streams=cc.max_streams,
            max_streams_per_host=cc.max_streams_per_host,
            stream_idle_s=cc.stream_idle_s,
            seq_window=cc.seq_window,
        )
        for i, name in enumerate(collector_names(cfg))
    ]
