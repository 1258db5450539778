"""The Ray Data encode pipeline: sealed spool segments -> SAE features -> lake + catalog.

read segments (one task per segment) -> SAE encode (actor pool, weights by object ref)
-> per segment: Parquet files, then one catalog commit (manifest + views). A segment
already in the manifest for this SAE version is skipped, so re-running adds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from featurewatch.actors.metrics import PipelineMetrics
from featurewatch.actors.runtime import init_ray
from featurewatch.actors.sae_encoder import padded_2d, sharded_encode
from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import unpack_vectors
from featurewatch.sae import load
from featurewatch.sae.model import SparseAutoencoder
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.inbox import apply_registrations
from featurewatch.storage.lake import VERDICT_LOG, VERDICTS_SCHEMA, write_partitioned, write_segment
from featurewatch.storage.sae_store import registered_sae, sae_folder, sae_store
from featurewatch.storage.spool import oldest_waiting, read_segment, segment_id, waiting_segments

log = logging.getLogger(__name__)


@dataclass
class EncodeReport:
    segments_committed: int
    segments_skipped: int
    tokens: int
    feature_rows: int
    duplicate_vectors: int = 0


def segment_columns(path: str, model: str | None = None) -> dict[str, np.ndarray]:
    """Every vector of a sealed segment as columns (vector is [n, width] float32); with
    `model`, only that model's (a fleet's models share the spool, at their own widths)."""
    vectors, cols = (
        [],
        {
            k: []
            for k in (
                "model",
                "model_version",
                "replica",
                "request_id",
                "token_pos",
                "layer",
                "site",
                "batch_key",
                "token_id",
                "token_text",
                "engine",
                "ts_ns",
            )
        },
    )
    for payload in read_segment(Path(path)):
        batch = pb.ActivationBatch.FromString(payload)
        if (model is not None and batch.model != model) or batch.rows == 0:
            continue  # another model's, or verdicts only (commit_verdicts reads those)
        n = batch.rows
        vectors.append(unpack_vectors(batch))
        cols["model"] += [batch.model] * n
        cols["model_version"] += [batch.model_version] * n
        cols["replica"] += [batch.replica_id] * n
        cols["request_id"] += [batch.request_ids[i] for i in batch.request_index]
        cols["token_pos"] += list(batch.token_pos)
        cols["layer"] += [batch.layer] * n
        cols["site"] += [batch.site] * n
        # (replica, epoch, seq) names the batch; a resend to another collector repeats it.
        cols["batch_key"] += [f"{batch.replica_id}/{batch.stream_epoch}/{batch.seq}"] * n
        cols["token_id"] += list(batch.token_id)
        cols["token_text"] += list(batch.token_text) if batch.token_text else [""] * n
        cols["engine"] += [batch.engine] * n
        cols["ts_ns"] += list(batch.ts_unix_nanos)
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["vector"] = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    out["segment_id"] = np.asarray([segment_id(Path(path))] * len(out["model"]))
    return out


def _read_segments(
    batch: dict[str, np.ndarray], layer: int | None, site: str | None, model: str | None
) -> dict[str, np.ndarray]:
    parts = [segment_columns(p, model) for p in batch["path"]]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = np.ones(len(cols["layer"]), dtype=bool)
    if layer is not None:
        keep &= cols["layer"] == layer
    if site is not None:
        keep &= cols["site"] == site
    return cols if keep.all() else {k: v[keep] for k, v in cols.items()}


def segments_dataset(
    paths: list[Path],
    layer: int | None = None,
    site: str | None = None,
    resources: dict | None = None,
    model: str | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of the vectors in sealed segments (one block per segment), optionally
    only those of one (layer, site) and model: an SAE reads only the point it was
    trained for. `resources`: where the reads may run (cfg.role_resources("ingest"))."""
    items = [{"path": str(p)} for p in paths]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Reading is unpacking bytes: a quarter CPU, not Ray's default of one, so a read is
    # never left waiting behind the replicas and encoders on a small machine.
    return ds.map_batches(
        _read_segments,
        batch_size=1,
        num_cpus=0.25,
        resources=resources or None,
        fn_kwargs={"layer": layer, "site": site, "model": model},
    )


def _privacy(texts: np.ndarray, mode: str) -> list[str | None]:
    if mode == "full":
        return texts.tolist()
    if mode == "hashed":
        return [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts.tolist()]
    return [None] * len(texts)


def _segment_tables(cols: dict[str, np.ndarray], sae_version: str, token_text: str):
    ts = pa.array(cols["ts_ns"] // 1000, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    n = len(cols["ts_ns"])
    common = {
        "ts": ts,
        "model": pa.array(cols["model"].astype(str)),
        "model_version": pa.array(cols["model_version"].astype(str)),
        "replica": pa.array(cols["replica"].astype(str)),
        "request_id": pa.array(cols["request_id"].astype(str)),
        "token_pos": pa.array(cols["token_pos"].astype(np.int32)),
        "layer": pa.array(cols["layer"].astype(np.int16)),
        "sae_version": pa.array([sae_version] * n),
    }
    tokens = pa.table(
        {
            **common,
            "token_id": pa.array(cols["token_id"].astype(np.int32)),
            "token_text": pa.array(_privacy(cols["token_text"].astype(str), token_text)),
            "recon_error": pa.array(cols["recon_error"].astype(np.float32)),
            "segment_id": pa.array(cols["segment_id"].astype(str)),
            # "" from a sender older than the field: unknown, so NULL
            "engine": pa.array([e or None for e in cols["engine"].astype(str).tolist()]),
        }
    )
    # Sparse rows: one per (token, active feature).
    values = cols["feature_values"]
    token_idx, slot = np.nonzero(values > 0)
    take = pa.array(token_idx)
    features = pa.table(
        {
            **{k: v.take(take) for k, v in common.items()},
            "feature_id": pa.array(cols["feature_ids"][token_idx, slot].astype(np.int32)),
            "value": pa.array(values[token_idx, slot].astype(np.float32)),
        }
    )
    return tokens, features


def _concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate batches; the sparse feature columns of threshold SAEs (ReLU,
    JumpReLU) have as many columns as the batch's busiest token, so pad them (value 0
    is inactive and never stored)."""
    sparse = {"feature_ids": np.int32, "feature_values": np.float32}
    out = {}
    for key in parts[0]:
        arrays = [p[key] for p in parts]
        if key in sparse:
            arrays = [padded_2d(a, sparse[key]) for a in arrays]
            width = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays]
        out[key] = np.concatenate(arrays)
    return out


def unique_in_order(values: np.ndarray) -> list[str]:
    """Distinct values in order of first appearance (np.unique would sort them)."""
    return list(dict.fromkeys(values.tolist()))


def _commit_segment(cfg, catalog, sae_version, seg, parts, seen, report) -> None:
    """Write one segment's lake files and commit them with its manifest entry."""
    cols = _concat_columns(parts)
    # A batch resent to another collector after a lost ack sits in two spools: keep
    # its first copy only. Only this segment's distinct keys are looked up.
    keys = np.unique(cols["batch_key"]).tolist()
    batch_keys = [k for k in keys if k not in seen]
    if len(batch_keys) < len(keys):
        fresh = np.isin(cols["batch_key"], batch_keys)
        report.duplicate_vectors += int((~fresh).sum())
        cols = {k: v[fresh] for k, v in cols.items()}
    tokens, features = _segment_tables(cols, sae_version, cfg.pipeline.token_text)
    files = write_segment(catalog.lake, tokens, features, f"{seg}__{sae_version}")
    if catalog.commit_segment(
        seg,
        sae_version,
        files,
        tokens=tokens.num_rows,
        feature_rows=features.num_rows,
        batch_keys=batch_keys,
    ):
        seen.update(batch_keys)
        report.segments_committed += 1
        report.tokens += tokens.num_rows
        report.feature_rows += features.num_rows
    else:
        report.segments_skipped += 1


def encode_segments(
    cfg: FeaturewatchConfig,
    sae: SparseAutoencoder,
    sae_version: str,
    catalog: Catalog,
    paths: list[Path] | None = None,
    since: float | None = None,
    progress: bool = False,
    model: str | None = None,
) -> EncodeReport:
    """Encode every sealed segment (of every collector's spool, by default) not yet
    committed for `sae_version`; with `since` (a Unix time), only those sealed since;
    with `model`, only that model's vectors (a fleet). `progress` draws a bar of
    segments committed (a backfill from the command line)."""
    all_paths, todo = waiting_segments(cfg.spool_dir, sae_version, catalog, paths, since)
    report = EncodeReport(0, len(all_paths) - len(todo), 0, 0)
    if not todo:
        return report
    pc = cfg.pipeline
    ds = sharded_encode(
        segments_dataset(
            todo, cfg.capture.layer, cfg.capture.site, cfg.role_resources("ingest"), model
        ),
        sae,
        pc.sae_shards,
        batch_size=pc.batch_size,
        actors_per_shard=pc.encoder_actors,
        cpus_per_actor=pc.encoder_cpus,
        resources=cfg.role_resources("encoding"),
    )
    # Batches come out in segment order, so a segment is complete when the next one
    # starts: it is written and committed then, and memory holds about one segment
    # however many are waiting.
    ds.context.execution_options.preserve_order = True
    seen = catalog.ingested_batches(sae_version)
    bar = tqdm(total=len(todo), unit="segment", desc="encode", disable=not progress)
    current, parts, handled = None, [], set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        seg_ids = batch["segment_id"]
        for seg in unique_in_order(seg_ids):
            if seg != current and parts:
                handled.add(current)
                _commit_segment(cfg, catalog, sae_version, current, parts, seen, report)
                bar.update(1)
                parts = []
            current = seg
            mask = seg_ids == seg
            parts.append({k: v[mask] for k, v in batch.items()})
    if parts:
        handled.add(current)
        _commit_segment(cfg, catalog, sae_version, current, parts, seen, report)
        bar.update(1)
    # A segment with nothing for this SAE (another model's, another layer's) is
    # committed empty, so it is not read again every round.
    empty = [segment_id(p) for p in todo if segment_id(p) not in handled]
    committed = catalog.commit_empty_segments(empty, sae_version)
    report.segments_committed += committed
    bar.update(committed)
    bar.close()
    return report


def segment_verdicts(path: Path) -> pa.Table:
    """The in-line verdicts a sealed segment holds: the `verdicts` table's columns, plus
    `model` and the key of the batch that carried each."""
    rows: dict[str, list] = {name: [] for name in (*VERDICTS_SCHEMA.names, "model", "batch_key")}
    for payload in read_segment(path):
        batch = pb.ActivationBatch.FromString(payload)
        for v in batch.verdicts:
            rows["ts"].append(v.ts_unix_nanos // 1000)
            rows["model"].append(batch.model)
            rows["model_version"].append(batch.model_version)
            rows["replica"].append(batch.replica_id)
            rows["engine"].append(batch.engine or None)
            rows["segment_id"].append(segment_id(path))
            rows["batch_key"].append(f"{batch.replica_id}/{batch.stream_epoch}/{batch.seq}")
            for name in ("request_id", "tag", "score", "threshold", "flagged", "action",
                         "attempt", "probe"):  # fmt: skip
                rows[name].append(getattr(v, name))
    rows["ts"] = pa.array(rows["ts"], pa.int64()).cast(VERDICTS_SCHEMA.field("ts").type)
    return pa.table(rows)


def commit_verdicts(cfg: FeaturewatchConfig, catalog: Catalog) -> int:
    """Write the verdicts of every sealed segment not yet read for them to the lake's
    `verdicts` table, one catalog commit per segment (exactly once, as features are; a
    batch resent to a second collector is kept once). Needs no SAE. Returns the rows."""
    _, todo = waiting_segments(cfg.spool_dir, VERDICT_LOG, catalog)
    seen, written, empty = catalog.ingested_batches(VERDICT_LOG), 0, []
    for path in todo:
        seg, table = segment_id(path), segment_verdicts(path)
        keys = unique_in_order(table.column("batch_key").to_numpy(zero_copy_only=False))
        fresh = [k for k in keys if k not in seen]
        if not fresh:
            empty.append(seg)
            continue
        table = table.filter(pc.is_in(table.column("batch_key"), pa.array(fresh)))
        files = {"verdicts": write_partitioned(catalog.lake, "verdicts", table, f"{seg}__verdicts")}
        if catalog.commit_segment(seg, VERDICT_LOG, files, tokens=0, feature_rows=table.num_rows,
                                  batch_keys=fresh):  # fmt: skip
            seen.update(fresh)
            written += table.num_rows
    catalog.commit_empty_segments(empty, VERDICT_LOG)
    return written


def successor(cfg: FeaturewatchConfig, request, sae_version: str) -> bool:
    """Whether a registration just applied is a refreshed child of the SAE in use (same
    model and hook point): the pipeline then encodes with it."""
    return (
        request.kind == "sae"
        and request.parent_version == sae_version
        and request.model == cfg.model.name
        and request.layer == cfg.capture.layer
        and (request.site or "resid_post") == cfg.capture.site
    )


@dataclass
class Lane:
    """One model's encoding in the pipeline service: its config, its SAE (None until one
    is registered for the model) and, in a fleet, the model whose vectors it takes."""

    cfg: FeaturewatchConfig
    sae: SparseAutoencoder | None = None
    sae_version: str | None = None
    model: str | None = None
    since: float | None = None  # after a switch: also the child's training window


def fleet_lanes(cfg: FeaturewatchConfig) -> list[Lane]:
    """A lane per served model, each waiting for its SAE; alone, a model takes every
    vector in the spool (as before fleets), in a fleet only its own."""
    members = cfg.fleet_configs()
    return [Lane(m, model=m.model.name if len(members) > 1 else None) for m in members]


def follow_segments(
    cfg: FeaturewatchConfig,
    sae: SparseAutoencoder,
    sae_version: str,
    catalog: Catalog,
    *,
    every_s: float,
    stop: threading.Event,
    on_report=None,
    on_switch=None,
) -> None:
    """The pipeline as a service for one model and SAE; see follow_lanes."""
    lane = Lane(cfg, sae, sae_version)
    follow_lanes([lane], catalog, every_s=every_s, stop=stop, on_report=on_report,
                 on_switch=on_switch)  # fmt: skip


def take_registered_sae(lane: Lane, catalog: Catalog) -> bool:
    """Give a lane without an SAE the newest registered for its model, if one reads the
    captured layer and site; whether the lane has one now."""
    try:
        choice = registered_sae(lane.cfg, catalog)
    except ConfigError:
        return False
    captured = (lane.cfg.capture.layer, lane.cfg.capture.site)
    if (choice.layer, choice.site) != captured:
        log.warning(
            "pipeline: %s's newest SAE %s reads layer %s %s, not the captured layer %s %s: "
            "not encoding with it", lane.cfg.model.name, choice.version, choice.layer,
            choice.site, *captured,
        )  # fmt: skip
        return False
    lane.sae, lane.sae_version = load(choice.path), choice.version
    return True


def follow_lanes(
    lanes: list[Lane],
    catalog: Catalog,
    *,
    every_s: float,
    stop: threading.Event,
    on_report=None,
    on_switch=None,
) -> None:
    """Encode new sealed segments as they appear, for every lane, until `stop` is set:
    the pipeline as a service. Between rounds it applies pending registration requests
    (it is the catalog's one writer); a lane without an SAE takes the newest registered
    for its model, and a lane switches to a refreshed child of its SAE when one is
    accepted (the child then also encodes the segments of its own training window, so
    drift over it has a baseline). A failing round is logged and retried next round
    (segments are committed exactly once, so a retry never doubles a row)."""

    # Rounds run in this (driver) process, whose metrics Ray's metrics agent exports too.
    metrics = [PipelineMetrics(lane.cfg.model.name) for lane in lanes]
    for lane, lane_metrics in zip(lanes, metrics, strict=True):
        if lane.sae_version is not None:  # the lag shows while the first round runs
            lane_metrics.measure_lag(oldest_waiting, lane.cfg.spool_dir, lane.sae_version, catalog,
                                     lane.since)  # fmt: skip
    while not stop.is_set():
        try:
            requests = apply_registrations(catalog, lanes[0].cfg.inbox_dir)
        except Exception:  # noqa: BLE001 - the service outlives one bad round
            log.exception("applying registrations failed; retrying")
            requests = []
        try:
            commit_verdicts(lanes[0].cfg, catalog)  # one spool for every lane
        except Exception:  # noqa: BLE001 - the service outlives one bad round
            log.exception("committing verdicts failed; retrying")
        for lane, lane_metrics in zip(lanes, metrics, strict=True):
            started, report, ok = time.monotonic(), None, False
            try:
                for request in requests:
                    if lane.sae_version and successor(lane.cfg, request, lane.sae_version):
                        log.warning("pipeline: %s replaces %s", request.sae_version,
                                    lane.sae_version)  # fmt: skip
                        folder = sae_folder(sae_store(lane.cfg), request.sae_version,
                                            Path(request.path))  # fmt: skip
                        lane.sae, lane.sae_version = load(folder), request.sae_version
                        window = request.data_window
                        lane.since = window[0].timestamp() if window else None
                        if on_switch is not None:
                            on_switch(lane.sae_version)
                if lane.sae is None and not take_registered_sae(lane, catalog):
                    continue  # no SAE for this model yet: its vectors wait in the spool
                report = encode_segments(lane.cfg, lane.sae, lane.sae_version, catalog,
                                         since=lane.since, model=lane.model)  # fmt: skip
                if on_report is not None and report.segments_committed:
                    on_report(report)
                ok = True
            except Exception:  # noqa: BLE001 - the service outlives one bad round
                log.exception("pipeline round failed for %s; retrying", lane.cfg.model.name)
            lane_metrics.record_round(report, ok, lane.sae_version, time.monotonic() - started)
            lane_metrics.measure_lag(oldest_waiting, lane.cfg.spool_dir, lane.sae_version, catalog,
                                     lane.since)  # fmt: skip
        stop.wait(every_s)
    for lane_metrics in metrics:
        lane_metrics.close()


def run_pipeline(
    cfg: FeaturewatchConfig,
    sae_version: str | None = None,
    *,
    follow: bool = False,
    every_s: float = 2.0,
    on_registered=None,
    on_report=None,
) -> EncodeReport | None:
    """`featurewatch pipeline`: apply the registrations that jobs queued while no
    pipeline ran (this process is the catalog's writer), then encode every waiting
    segment with a registered SAE once; with `follow`, keep encoding as segments seal
    until interrupted (Ctrl-C)."""
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        for request in apply_registrations(catalog, cfg.inbox_dir):
            if on_registered is not None:
                on_registered(request)
        choice = registered_sae(cfg, catalog, sae_version)
        if (choice.layer, choice.site) != (cfg.capture.layer, cfg.capture.site):
            raise ConfigError(
                f"SAE {choice.version} reads layer {choice.layer} {choice.site}; the "
                f"config captures layer {cfg.capture.layer} {cfg.capture.site}"
            )
        sae = load(choice.path)
        init_ray(cfg)
        if not follow:
            commit_verdicts(cfg, catalog)
            return encode_segments(cfg, sae, choice.version, catalog, progress=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops the service
            follow_segments(
                cfg, sae, choice.version, catalog, every_s=every_s, stop=threading.Event(),
                on_report=on_report,
            )  # fmt: skip
    return None
