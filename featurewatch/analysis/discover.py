"""Feature discovery: which SAE features separate two sets of responses, and which rose
from one model version to another.

By contrast: both sets of transcripts go through the model and the SAE (see
transcript_features.py); each feature is pooled over a response's tokens, and features
are ranked by AUROC (the chance that a random positive response pools higher than a
random negative one; ties count half) with Cohen's d as the effect size. Confidence
intervals come from a bootstrap over responses, for the features reported.

By model diffing: the same prompts are answered by two model versions (greedy), each
response is encoded through its own model with the same SAE, and features are ranked by
the mean paired rise of their pooled activation, as the persona-features work found its
"toxic persona" latent. Intervals come from a bootstrap over prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from featurewatch.analysis.transcript_features import pooled_features
from featurewatch.analysis.transcripts import Transcript
from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError
from featurewatch.sae import load
from featurewatch.storage.catalog import recorded_path
from featurewatch.storage.sae_store import SAEChoice, registered_sae


def auroc(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Per column: P(positive > negative) + P(equal) / 2, from average ranks (Mann-Whitney)."""
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = rankdata(np.concatenate([positive, negative]), axis=0)
    return (ranks[:n_pos].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def cohens_d(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Per column: difference of means over the pooled standard deviation (0 where both
    sets are constant)."""
    n_pos, n_neg = len(positive), len(negative)
    diff = positive.mean(axis=0) - negative.mean(axis=0)
    if n_pos + n_neg <= 2:
        return np.zeros_like(diff)
    var = ((n_pos - 1) * positive.var(axis=0, ddof=1 if n_pos > 1 else 0)) + (
        (n_neg - 1) * negative.var(axis=0, ddof=1 if n_neg > 1 else 0)
    )
    sd = np.sqrt(var / (n_pos + n_neg - 2))
    return np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 0)


def _interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - confidence) / 2 * 100
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100 - tail, axis=0)


def rank_contrast(
    positive: np.ndarray,
    negative: np.ndarray,
    *,
    top: int = 20,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """The `top` features by AUROC (then effect size), each with bootstrap intervals."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    area, effect = auroc(positive, negative), cohens_d(positive, negative)
    chosen = np.lexsort((-effect, -area))[:top]
    pos, neg = positive[:, chosen], negative[:, chosen]
    rng = np.random.default_rng(seed)
    areas, effects = np.empty((bootstrap, len(chosen))), np.empty((bootstrap, len(chosen)))
    for b in range(bootstrap):
        p = pos[rng.integers(0, len(pos), len(pos))]
        n = neg[rng.integers(0, len(neg), len(neg))]
        areas[b], effects[b] = auroc(p, n), cohens_d(p, n)
    area_lo, area_hi = _interval(areas, confidence) if bootstrap else (area[chosen],) * 2
    eff_lo, eff_hi = _interval(effects, confidence) if bootstrap else (effect[chosen],) * 2
    return [
        {
            "feature_id": int(f),
            "auroc": float(area[f]),
            "auroc_lo": float(area_lo[j]),
            "auroc_hi": float(area_hi[j]),
            "effect_size": float(effect[f]),
            "effect_lo": float(eff_lo[j]),
            "effect_hi": float(eff_hi[j]),
            "mean_positive": float(positive[:, f].mean()),
            "mean_negative": float(negative[:, f].mean()),
            "fired_positive": float((positive[:, f] > 0).mean()),
            "fired_negative": float((negative[:, f] > 0).mean()),
        }
        for j, f in enumerate(chosen)
    ]


def rank_rise(
    base: np.ndarray,
    candidate: np.ndarray,
    *,
    top: int = 20,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """The `top` features by mean paired rise (candidate - base, row i = prompt i)."""
    base, candidate = np.asarray(base, np.float64), np.asarray(candidate, np.float64)
    if base.shape != candidate.shape:
        raise ValueError(f"paired arrays differ in shape: {base.shape} vs {candidate.shape}")
    delta = candidate - base
    rise = delta.mean(axis=0)
    chosen = np.argsort(-rise, kind="stable")[:top]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(delta), (bootstrap, len(delta)))
    samples = delta[:, chosen][picks].mean(axis=1) if bootstrap else rise[chosen][None]
    low, high = _interval(samples, confidence)
    return [
        {
            "feature_id": int(f),
            "rise": float(rise[f]),
            "rise_lo": float(low[j]),
            "rise_hi": float(high[j]),
            "mean_base": float(base[:, f].mean()),
            "mean_candidate": float(candidate[:, f].mean()),
            "fired_base": float((base[:, f] > 0).mean()),
            "fired_candidate": float((candidate[:, f] > 0).mean()),
        }
        for j, f in enumerate(chosen)
    ]


# ---- jobs: model + SAE + registry around the statistics


def model_folder(cfg: FeaturewatchConfig, catalog, ref: str) -> Path:
    """A model version of the configured model (from the catalog) or a model folder."""
    rows = catalog.query(
        "SELECT path FROM model_versions WHERE model = ? AND model_version = ?",
        [cfg.model.name, ref],
    ).to_pylist()
    if rows:
        return recorded_path(cfg.home, rows[0]["path"])
    if Path(ref).is_dir():
        return Path(ref)
    raise ConfigError(
        f"{ref!r} is neither a registered version of {cfg.model.name!r} nor a model folder"
    )


def feature_labels(catalog, sae_version: str) -> dict[int, str | None]:
    rows = catalog.query(
        "SELECT feature_id, label FROM features WHERE sae_version = ?", [sae_version]
    ).to_pylist()
    return {r["feature_id"]: r["label"] for r in rows}


def encode_transcripts(
    cfg: FeaturewatchConfig,
    choice: SAEChoice,
    sae,
    transcripts,
    *,
    residual_layers: tuple[int, ...] = (),
    progress: bool = False,
):
    """PooledFeatures of the transcripts' responses through the configured model (with
    the residual stream's means at `residual_layers`)."""

    folder = resolve_model_path(cfg.model.path, cfg.models_dir)
    model, tokenizer = load_model(folder, cfg.model.dtype)
    if model.config.hidden_size != sae.d_in:
        raise ConfigError(
            f"SAE {choice.version} has d_in {sae.d_in} but {folder} has width "
            f"{model.config.hidden_size}"
        )
    return pooled_features(
        model, tokenizer, sae, transcripts, layer=choice.layer, site=choice.site,
        residual_layers=residual_layers, progress=progress,
    )  # fmt: skip


def answer_and_encode(
    cfg: FeaturewatchConfig,
    catalog,
    ref: str,
    prompts: list[list[dict]],
    choice: SAEChoice,
    sae,
    *,
    max_new_tokens: int = 48,
    residual_layers: tuple[int, ...] = (),
    progress: bool = False,
):
    """A model version (or folder) answers the prompts greedily; its own activations on
    its answers are encoded with the SAE (and pooled at `residual_layers`), as
    monitoring would see them served. Returns (PooledFeatures, answers)."""

    model, tokenizer = load_model(model_folder(cfg, catalog, ref), cfg.model.dtype)
    if model.config.hidden_size != sae.d_in:
        raise ConfigError(f"SAE {choice.version} does not fit model {ref!r} (width)")
    generator = BatchGenerator(model, tokenizer)
    answers: list[str] = []
    for start in range(0, len(prompts), 8):
        chunk = prompts[start : start + 8]
        answers += generator.generate(chunk, [max_new_tokens] * len(chunk)).texts
    # An empty answer still needs one token to encode.
    transcripts = [
        Transcript(i + 1, [*p, {"role": "assistant", "content": a or " "}])
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    features = pooled_features(
        model, tokenizer, sae, transcripts, layer=choice.layer, site=choice.site,
        residual_layers=residual_layers, progress=progress,
    )  # fmt: skip
    return features, answers


def discover_contrast(
    cfg: FeaturewatchConfig,
    catalog,
    positive: list[Transcript],
    negative: list[Transcript],
    *,
    sae_version: str | None = None,
    pooling: str = "max",
    top: int = 20,
    bootstrap: int = 1000,
    progress: bool = False,
) -> dict:
    """Rank the SAE's features by how well they separate positive from negative."""

    choice = registered_sae(cfg, catalog, sae_version)
    sae = load(choice.path)
    pooled = encode_transcripts(cfg, choice, sae, positive + negative, progress=progress)
    values = pooled.pooled(pooling).numpy()
    rows = rank_contrast(
        values[: len(positive)], values[len(positive) :], top=top, bootstrap=bootstrap
    )
    labels = feature_labels(catalog, choice.version)
    for row in rows:
        row["label"] = labels.get(row["feature_id"])
    return {
        "sae_version": choice.version,
        "pooling": pooling,
        "positive": len(positive),
        "negative": len(negative),
        "features": rows,
    }


def discover_diff(
    cfg: FeaturewatchConfig,
    catalog,
    prompts: list[list[dict]],
    base: str,
    candidate: str,
    *,
    sae_version: str | None = None,
    pooling: str = "mean",
    max_new_tokens: int = 48,
    top: int = 20,
    bootstrap: int = 1000,
    progress: bool = False,
) -> dict:
    """Rank features by how much they rose from the base to the candidate model, each
    answering the same prompts (lists of messages ending with the user's turn)."""

    choice = registered_sae(cfg, catalog, sae_version)
    sae = load(choice.path)
    pooled, examples = {}, {}
    for name, ref in (("base", base), ("candidate", candidate)):
        features, answers = answer_and_encode(
            cfg, catalog, ref, prompts, choice, sae, max_new_tokens=max_new_tokens,
            progress=progress,
        )  # fmt: skip
        pooled[name] = features.pooled(pooling).numpy()
        examples[name] = answers[:3]
    rows = rank_rise(pooled["base"], pooled["candidate"], top=top, bootstrap=bootstrap)
    labels = feature_labels(catalog, choice.version)
    for row in rows:
        row["label"] = labels.get(row["feature_id"])
    return {
        "sae_version": choice.version,
        "base": base,
        "candidate": candidate,
        "pooling": pooling,
        "prompts": len(prompts),
        "sample_answers": examples,
        "features": rows,
    }
