"""The `featurewatch sae ...` jobs: gather offline activations, train, evaluate.

gather: corpus prefill -> spools DIR/train and DIR/eval (held-out documents)
train:  spool segments -> Ray Train -> SAE folder + catalog row with metrics and lineage
eval:   an SAE against held-out activations (FVU, L0, dead fraction) and against the
        model itself (CE-loss recovered on held-out text); stored with the version
"""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path

import torch

from featurewatch.actors.pipeline import segments_dataset
from featurewatch.actors.runtime import init_ray
from featurewatch.capture.hooks import find_decoder_layers, site_module
from featurewatch.capture.models import load_model, model_dims, resolve_model_path
from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError
from featurewatch.platform.jobs.gather import gather_activations, padded_batches, token_chunks
from featurewatch.platform.jobs.train_sae import train_sae
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import unpack_vectors
from featurewatch.sae import load
from featurewatch.sae.evaluate import ce_loss_recovered
from featurewatch.sae.matching import match_latents
from featurewatch.sae.train import evaluate, typical_rows
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.sae_store import registered_sae, sae_version_or_folder
from featurewatch.storage.spool import read_segment, sealed_segments


def _load_lm(cfg: FeaturewatchConfig):

    folder = resolve_model_path(cfg.model.path, cfg.models_dir)
    torch.set_num_threads(cfg.model.torch_threads)
    model, tokenizer = load_model(folder, cfg.model.dtype)
    return folder, model, tokenizer


def gather(cfg: FeaturewatchConfig, out: Path, tokens: int, eval_tokens: int, **kwargs) -> dict:

    _, model, tokenizer = _load_lm(cfg)
    reports = {}
    for split, count in (("train", tokens), ("eval", eval_tokens)):
        if count > 0:
            reports[split] = gather_activations(
                cfg, model, tokenizer, out / split, tokens=count, split=split, **kwargs
            ).__dict__
    return reports


def _segments(spool: Path, what: str) -> list[Path]:
    segments = sealed_segments(spool)
    if not segments:
        raise ConfigError(f"{what} {spool} holds no sealed spool segments")
    return segments


MATCH_VECTORS = 4096  # held-out vectors the matching correlates latents on


def latent_matches(parent, child, vectors: torch.Tensor | None) -> list[tuple]:
    """A child's latents matched to its parent's (sae/matching.py), as catalog rows."""
    if vectors is not None:
        vectors = vectors[:MATCH_VECTORS]
    return [astuple(m) for m in match_latents(parent, child, vectors)]


def spool_vectors(spool: Path, limit: int, layer: int, site: str) -> torch.Tensor:
    """Up to `limit` vectors of one (layer, site) from a spool, as float32."""
    return segment_vectors(_segments(spool, "--eval-spool"), limit, layer, site, str(spool))


def segment_vectors(
    paths: list[Path], limit: int, layer: int, site: str, where: str = "the segments"
) -> torch.Tensor:
    """Up to `limit` vectors of one (layer, site) from sealed segments, as float32,
    without the outlier rows training drops (so FVU is measured as training sees it)."""

    parts, total = [], 0
    for path in paths:
        for payload in read_segment(path):
            batch = pb.ActivationBatch.FromString(payload)
            if batch.layer != layer or batch.site != site:
                continue
            vectors = torch.from_numpy(unpack_vectors(batch))
            vectors = vectors[typical_rows(vectors)]  # as in training
            parts.append(vectors)
            total += len(vectors)
            if total >= limit:
                return torch.cat(parts)[:limit]
    if not parts:
        raise ConfigError(f"{where} hold no vectors of layer {layer}, site {site}")
    return torch.cat(parts)


def train(
    cfg: FeaturewatchConfig,
    spool: Path,
    *,
    eval_spool: Path | None = None,
    version: str | None = None,
    parent: str | None = None,
) -> dict:
    """Train on a spool with Ray Train and register the version with its lineage."""

    segments = _segments(spool, "--spool")
    eval_segments = _segments(eval_spool, "--eval-spool") if eval_spool else None
    init_from = None
    if parent is not None:
        with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
            try:
                init_from = registered_sae(cfg, catalog, parent).path
            except ConfigError:
                raise ConfigError(
                    f"--parent {parent!r} is not an SAE version in the catalog"
                ) from None
    d_in, _ = model_dims(resolve_model_path(cfg.model.path, cfg.models_dir))
    init_ray(cfg, log_to_driver=True)  # the training progress bar
    layer, site = cfg.capture.layer, cfg.capture.site
    trained = train_sae(
        cfg,
        segments_dataset(segments, layer, site),
        d_in,
        version=version,
        eval_data=segments_dataset(eval_segments, layer, site) if eval_segments else None,
        parent_version=parent,
        init_from=init_from,
    )
    matches = []
    if init_from is not None:  # a child: its latents matched to its parent's
        held_out = spool_vectors(eval_spool, MATCH_VECTORS, layer, site) if eval_spool else None
        matches = latent_matches(load(init_from), trained.sae, held_out)
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog, catalog.transaction():
        if matches:
            catalog.record_matches(parent, trained.version, matches)
        catalog.register_sae(
            trained.version,
            trained.path,
            architecture=trained.sae.architecture,
            model=cfg.model.name,
            layer=layer,
            d_in=d_in,
            d_sae=cfg.sae.d_sae,
            k=cfg.sae.k,
            metrics=trained.metrics,
            model_version=cfg.model.version,
            site=site,
            parent_version=parent,
            data_window=trained.lineage.get("data_window"),
            lineage=trained.lineage,
        )
    return {"version": trained.version, "path": str(trained.path), **trained.metrics}


def evaluate_sae(
    cfg: FeaturewatchConfig,
    version_or_path: str,
    *,
    eval_spool: Path | None,
    ce_chunks: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    held_out_fraction: float = 0.1,
) -> dict:
    """FVU/L0/dead on held-out activations and CE-loss recovered on held-out text."""

    version, path = sae_version_or_folder(cfg, version_or_path)
    _, model, tokenizer = _load_lm(cfg)
    layer, site = cfg.capture.layer, cfg.capture.site
    sae = load(path, expected_d_in=model.config.hidden_size)
    metrics: dict = {}
    if eval_spool is not None:
        metrics.update(evaluate(sae, spool_vectors(eval_spool, 200_000, layer, site)))
    if ce_chunks > 0:
        chunks = token_chunks(tokenizer, "eval", seq_len, held_out_fraction)
        taken = (c for i, c in enumerate(chunks) if i < ce_chunks)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = ((ids, mask) for _, ids, mask in padded_batches(taken, batch_size, pad))
        block = site_module(find_decoder_layers(model)[layer], site)
        metrics.update(ce_loss_recovered(model, block, sae, batches))
    if version is not None and cfg.catalog_path.exists():
        with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
            catalog.update_sae_metrics(version, metrics)
    (path / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics
