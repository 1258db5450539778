"""The fleet overview: what `featurewatch status` prints and the dashboard's first page
shows. Read from files only (the catalog's readers' copy, the spool, the heartbeats,
the deployed application record), so it works from any machine that sees the home,
without joining the Ray cluster.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from featurewatch import __version__
from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.deployed_app import read_deployed
from featurewatch.storage.heartbeats import read_heartbeats
from featurewatch.storage.lake import VERDICT_LOG
from featurewatch.storage.spool import oldest_waiting, spool_segments, waiting_segments

# Sampled tokens per model, version and replica in the window, from the raw rows.
LAKE_REPLICAS_SQL = """
SELECT model, model_version, replica, count(*) AS tokens, max(ts) AS last_seen
FROM tokens WHERE ts >= ? AND ts < ?
GROUP BY ALL ORDER BY model, model_version, replica
"""

# In-line verdicts per model, version and tag over the last day: first answers scored,
# those flagged, and what the gates did (a stream a gate stopped counts as blocked).
VERDICTS_SQL = """
SELECT model, model_version, tag,
       count(*) FILTER (WHERE attempt = 0) AS answers,
       count(*) FILTER (WHERE attempt = 0 AND flagged) AS flagged,
       count(*) FILTER (WHERE action IN ('blocked', 'stopped')) AS blocked,
       count(*) FILTER (WHERE action = 'regenerated') AS regenerated
FROM verdicts WHERE ts >= ? AND ts < ?
GROUP BY ALL ORDER BY model, model_version, tag
"""
VERDICTS_WINDOW = timedelta(hours=24)


def _deployed(cfg: FeaturewatchConfig) -> dict | None:
    try:
        saved = read_deployed(cfg.deployed_app_file)
        if saved is None:
            return None
        model, capture = saved["config"]["model"], saved["config"]["capture"]
    except (ConfigError, KeyError, TypeError):
        return None
    return {
        "model": model["name"],
        "model_version": model["version"],
        "num_replicas": model["num_replicas"],
        "sample_fraction": capture["sample_fraction"],
        "request_fraction": capture["request_fraction"],
        "max_vectors_per_s": capture.get("max_vectors_per_s"),
        "canary": saved.get("canary"),
    }


def _pipeline(cfg: FeaturewatchConfig, catalog: Catalog, now: float) -> dict:
    """Sealed segments the newest SAE version has not encoded yet, and how long the
    oldest of them has waited (the pipeline's lag; its Ray metric measures the same)."""
    newest = catalog.query(
        "SELECT sae_version, max(committed_at) AS last_commit FROM segments "
        "WHERE sae_version != ? GROUP BY sae_version ORDER BY last_commit DESC LIMIT 1",
        [VERDICT_LOG],  # the verdicts' own commits are not an SAE's
    ).to_pylist()
    if not newest:
        sealed = spool_segments(cfg.spool_dir)
        return {"sae_version": None, "sealed": len(sealed), "pending": len(sealed),
                "lag_s": None, "last_commit": None}  # fmt: skip
    sae_version = newest[0]["sae_version"]
    sealed, waiting = waiting_segments(cfg.spool_dir, sae_version, catalog)
    oldest = oldest_waiting(cfg.spool_dir, sae_version, catalog)
    return {
        "sae_version": sae_version,
        "sealed": len(sealed),
        "pending": len(waiting),
        "lag_s": 0.0 if oldest is None else round(now - oldest, 1),
        "last_commit": newest[0]["last_commit"],
    }


def fleet_overview(
    cfg: FeaturewatchConfig,
    catalog: Catalog,
    window: timedelta = timedelta(minutes=5),
    now: datetime | None = None,
) -> dict:
    """Models, versions and replicas (live ones from their heartbeats, and those seen in
    the lake within `window`), sampling, ingest, drops and pipeline lag."""
    now = now or datetime.now(UTC)
    clock = now.timestamp()
    replicas = read_heartbeats(cfg.status_dir, "replica", clock)
    collectors = read_heartbeats(cfg.status_dir, "collector", clock)
    seen = catalog.query(LAKE_REPLICAS_SQL, [now - window, now]).to_pylist()
    for row in seen:
        row["tokens_per_s"] = round(row["tokens"] / window.total_seconds(), 2)
    verdicts = catalog.query(VERDICTS_SQL, [now - VERDICTS_WINDOW, now]).to_pylist()
    for row in verdicts:
        row["flagged_share"] = round(row["flagged"] / row["answers"], 4) if row["answers"] else None
    versions = catalog.query(
        "SELECT model, model_version, registered_at FROM model_versions ORDER BY registered_at DESC"
    ).to_pylist()
    live_collectors = [c for c in collectors if c["live"]]
    live_replicas = [r for r in replicas if r["live"]]
    return {
        "at": now,
        "featurewatch_version": __version__,
        "window_s": window.total_seconds(),
        "deployed": _deployed(cfg),
        "replicas": replicas,
        "collectors": collectors,
        "lake_replicas": seen,
        "verdicts": verdicts,
        "model_versions": versions,
        "ingest": {
            "collectors_live": len(live_collectors),
            "vectors_per_s": round(
                sum(c["rates"].get("accepted_vectors", 0.0) for c in live_collectors), 1
            ),
            "accepted_vectors": sum(c["counters"].get("accepted_vectors", 0) for c in collectors),
            "rejected_batches": sum(c["counters"].get("rejected_batches", 0) for c in collectors),
        },
        "drops": {
            "dropped_vectors": sum(r["counters"].get("dropped_vectors", 0) for r in replicas),
            "budget_dropped_vectors": sum(
                r["counters"].get("budget_dropped_vectors", 0) for r in replicas
            ),
            "dropped_per_s": round(
                sum(r["rates"].get("dropped_vectors", 0.0) for r in live_replicas), 2
            ),
        },
        "pipeline": _pipeline(cfg, catalog, clock),
    }


def _age(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s"


def format_overview(overview: dict) -> str:
    """The overview as a few aligned blocks of text for a terminal."""
    lines = [f"featurewatch {__version__} status at {overview['at']:%Y-%m-%d %H:%M:%S} UTC"]
    deployed = overview["deployed"]
    if deployed:
        lines.append(
            f"deployed: {deployed['model']} {deployed['model_version']} x"
            f"{deployed['num_replicas']} replicas, sample_fraction "
            f"{deployed['sample_fraction']}, request_fraction {deployed['request_fraction']}"
            + (f", canary {deployed['canary']['model_version']}" if deployed["canary"] else "")
        )
    else:
        lines.append("deployed: no model server recorded in this home")
    lines.append("")
    lines.append("replicas (heartbeats):")
    if not overview["replicas"]:
        lines.append("  none")
    for r in overview["replicas"]:
        state = "live" if r["live"] else f"gone ({_age(r['age_s'])} ago)"
        c, rate = r["counters"], r["rates"]
        lines.append(
            f"  {r['name']:<24} {r.get('model', '?')} {r.get('model_version', '?'):<20} "
            f"{state:<12} acked {c.get('acked_vectors', 0):>9} "
            f"({rate.get('acked_vectors', 0.0):.1f}/s) dropped {c.get('dropped_vectors', 0)} "
            f"queue {r.get('queue_depth', 0)}"
        )
    lines.append(f"sampled tokens in the lake, last {overview['window_s'] / 60:.0f} min:")
    if not overview["lake_replicas"]:
        lines.append("  none")
    for row in overview["lake_replicas"]:
        lines.append(
            f"  {row['model']} {row['model_version']:<20} {row['replica']:<24} "
            f"{row['tokens']:>7} tokens ({row['tokens_per_s']}/s)"
        )
    if overview["verdicts"]:
        lines.append("in-line verdicts, last 24 h:")
    for row in overview["verdicts"]:
        lines.append(
            f"  {row['model']} {row['model_version']:<20} {row['tag']:<16} {row['answers']:>7} "
            f"answers, {row['flagged']} flagged, {row['blocked']} blocked, "
            f"{row['regenerated']} regenerated"
        )
    ingest, drops, pipe = overview["ingest"], overview["drops"], overview["pipeline"]
    lines += [
        "",
        f"ingest: {ingest['collectors_live']} live collectors, {ingest['vectors_per_s']} "
        f"vectors/s, {ingest['accepted_vectors']} accepted, "
        f"{ingest['rejected_batches']} batches rejected",
        f"drops: {drops['dropped_vectors']} vectors (send buffer full), "
        f"{drops['budget_dropped_vectors']} over the vectors/s budget, "
        f"{drops['dropped_per_s']}/s now",
        f"pipeline: SAE {pipe['sae_version']}, {pipe['pending']} of {pipe['sealed']} sealed "
        f"segments waiting, lag {_age(pipe['lag_s'])}, last commit {pipe['last_commit']}",
        f"model versions: {len(overview['model_versions'])} registered",
    ]
    return "\n".join(lines)
