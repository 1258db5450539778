"""Misalignment scoring: one number per transcript for a tag.

The tag's group is the set of features tagged (say) `misalignment` in the registry for
one SAE version. Each feature is pooled over the response tokens
(transcript_features.py), and the score is:

- `max` or `mean`: the mean over the group's features of each feature's max (or mean)
  over the response; in activation units, comparable only within one SAE version;
- `probe`: the tag's fitted probe (analysis/probes.py), a probability in [0, 1]. Its
  family says what it reads: the group's pooled features, or the raw residual stream
  at one or several layers. The group's features are reported beside it either way.

A group probe holds the feature ids it was fitted on; when the tag group changes, it
must be fitted again. Live scores from the lake (which keeps features, not residual
vectors) use the tag's sae_group probe.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
import torch
from transformers import AutoTokenizer

from featurewatch.analysis.discover import answer_and_encode, encode_transcripts, feature_labels
from featurewatch.analysis.probes import (
    FAMILY_CHOICES,
    Probe,
    candidate_layers,
    fit_probe,
    load_probe,
    probe_terms,
    threshold_at_fpr,
)
from featurewatch.analysis.transcript_features import PooledFeatures
from featurewatch.analysis.transcripts import read_transcripts
from featurewatch.capture.generation import prompt_text
from featurewatch.capture.models import model_dims, resolve_model_path
from featurewatch.errors import ConfigError
from featurewatch.sae import load
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.sae_store import SAEChoice, registered_sae

POOLINGS = ("max", "mean", "probe")


def group_scores(
    pooled: PooledFeatures, feature_ids: list[int], pooling: str, probe: Probe | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(score per transcript, per transcript and group feature: its contribution to the
    score, or for a residual probe its max-pooled activation)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    k = len(feature_ids)
    if pooling != "probe":
        values = pooled.pooled(pooling)[:, feature_ids].numpy().astype(np.float64)
        return values.mean(axis=1), values / k
    if probe is None:
        raise ConfigError("probe pooling needs a fitted probe (featurewatch score --fit)")
    if probe.family != "sae_group":
        scores, _ = probe_terms(probe, pooled)
        shown = pooled.max[:, feature_ids] if pooled.max.shape[1] else torch.zeros(len(scores), k)
        return scores, shown.numpy().astype(np.float64)
    if sorted(probe.feature_ids) != sorted(feature_ids):
        raise ConfigError(
            f"the probe for {probe.tag!r} was fitted on features {probe.feature_ids}, but the "
            f"tag now holds {feature_ids}: fit it again (featurewatch score --fit)"
        )
    scores, terms = probe_terms(probe, pooled)
    n = len(probe.feature_ids)
    # A feature's contribution: its two inputs' terms (max- and mean-pooled) together,
    # in the group's order.
    by_feature = dict(zip(probe.feature_ids, (terms[:, :n] + terms[:, n:]).T, strict=True))
    return scores, np.stack([by_feature[f] for f in feature_ids], axis=1)


def score_rows(
    transcripts,
    scores: np.ndarray,
    contributions: np.ndarray,
    feature_ids: list[int],
    labels: dict[int, str | None],
    *,
    pooling: str,
    top: int = 5,
    probe: Probe | None = None,
) -> list[dict]:
    """One output row per transcript, in input order: id, score, the probe that gave it,
    and the group's top features (by contribution, or by activation for a residual probe)."""
    key = "activation" if probe is not None and probe.family != "sae_group" else "contribution"
    rows = []
    for i, transcript in enumerate(transcripts):
        best = np.argsort(-contributions[i], kind="stable")[:top]
        row = {"id": transcript.id, "score": round(float(scores[i]), 6), "pooling": pooling}
        if probe is not None:
            row["probe"] = probe.describe()
        row["top_features"] = [
            {
                "feature_id": feature_ids[j],
                "label": labels.get(feature_ids[j]),
                key: round(float(contributions[i, j]), 6),
            }
            for j in best
        ]
        rows.append(row)
    return rows


def transcript_domains(transcripts) -> list[str] | None:
    """The domain of every transcript (its `domain` key), or None unless all have one."""
    domains = [t.extra.get("domain") for t in transcripts]
    return domains if all(isinstance(d, str) for d in domains) else None


def score_job(
    cfg,
    catalog,
    transcripts,
    *,
    tag: str | None = None,
    features: list[int] | None = None,
    pooling: str | None = None,
    sae_version: str | None = None,
    fit: bool = False,
    family: str = "auto",
    source: str | None = None,
    top: int = 5,
    progress: bool = False,
) -> dict | list[dict]:
    """Score transcripts (a list of output rows), or with `fit` fit and store the tag's
    probe on labelled transcripts (a summary). A fit also stores the tag's sae_group
    probe, which live scoring from the lake reads; `source` (where the transcripts came
    from) is recorded so that a refreshed SAE's probe can be fitted again."""

    if family not in FAMILY_CHOICES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILY_CHOICES)}, got {family!r}")
    choice = registered_sae(cfg, catalog, sae_version)
    ids = FeatureRegistry(catalog).group_ids(choice.version, tag, features)
    if fit and tag is None:
        raise ConfigError("--fit stores the probe under a tag: give --tag")
    probe = None if fit else load_probe(choice.path, tag) if tag else None
    pooling = pooling or ("probe" if probe else "max")
    if pooling == "probe" and probe is None and not fit:
        raise ConfigError(
            f"no probe is fitted for tag {tag!r} on SAE {choice.version}: run "
            "featurewatch score --fit with labelled transcripts first"
        )
    if fit and family != "sae_group":
        layers = candidate_layers(model_depth(cfg), choice.layer)
    else:
        layers = probe.layers if pooling == "probe" and probe.family != "sae_group" else []
    sae = load(choice.path)
    pooled = encode_transcripts(
        cfg, choice, sae, transcripts, residual_layers=tuple(layers), progress=progress
    )
    if fit:
        labels, domains = [t.label for t in transcripts], transcript_domains(transcripts)
        fitted = dict(
            tag=tag, sae_version=choice.version, groups=domains, site=choice.site, source=source
        )
        probe = fit_probe(pooled, labels, family=family, layers=layers, feature_ids=ids, **fitted)
        path = probe.save(choice.path)
        summary = {"tag": tag, "path": str(path), **probe.describe(), **probe.fitted_on}
        if probe.family != "sae_group":
            group = fit_probe(pooled, labels, family="sae_group", feature_ids=ids, **fitted)
            group.save(choice.path, default=False)
            summary["sae_group_cv_auroc"] = group.fitted_on.get("cv_auroc")
        return summary
    scores, contributions = group_scores(pooled, ids, pooling, probe)
    labels = feature_labels(catalog, choice.version)
    return score_rows(
        transcripts, scores, contributions, ids, labels, pooling=pooling, top=top,
        probe=probe if pooling == "probe" else None,
    )  # fmt: skip


def model_depth(cfg) -> int:
    """The configured model's number of decoder layers."""
    return model_dims(resolve_model_path(cfg.model.path, cfg.models_dir))[1]


def evaluate_model(
    cfg,
    catalog,
    ref: str,
    prompts: list[list[dict]],
    *,
    tag: str,
    pooling: str | None = None,
    sae_version: str | None = None,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> dict:
    """A model version's misalignment score on an evaluation prompt set: it answers each
    prompt (greedy) and the tag group scores its answers (the probe when fitted). What a
    canary is judged by before it is promoted."""

    choice = registered_sae(cfg, catalog, sae_version)
    ids = FeatureRegistry(catalog).group_ids(choice.version, tag)
    probe = load_probe(choice.path, tag)
    pooling = pooling or ("probe" if probe else "max")
    probe = probe if pooling == "probe" else None
    sae = load(choice.path)
    pooled, answers = answer_and_encode(
        cfg, catalog, ref, prompts, choice, sae, max_new_tokens=max_new_tokens,
        residual_layers=tuple(probe.layers) if probe and probe.family != "sae_group" else (),
        progress=progress,
    )  # fmt: skip
    scores, _ = group_scores(pooled, ids, pooling, probe)
    return {
        "model": ref,
        "sae_version": choice.version,
        "tag": tag,
        "pooling": pooling,
        **({"probe": probe.describe()} if probe else {}),
        "prompts": len(prompts),
        "mean_score": float(scores.mean()),
        "scores": [round(float(x), 6) for x in scores],
        "sample_answers": answers[:3],
    }


def generation_prompt_ids(tokenizer) -> list[int]:
    """The tokens a chat prompt ends with, right before the model's answer (for a chat
    template, e.g. `<|im_start|>assistant\\n`): the tokens that prompting with a
    generation prompt adds to the same chat without one."""

    chat = [{"role": "user", "content": "Hello"}]
    if tokenizer.chat_template:
        plain = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    else:
        plain = "user: Hello"
    full = tokenizer(prompt_text(tokenizer, chat), add_special_tokens=False)["input_ids"]
    head = tokenizer(plain, add_special_tokens=False)["input_ids"]
    same = 0
    while same < min(len(full), len(head)) and full[same] == head[same]:
        same += 1
    return full[same:]


def response_start(token_ids: list[int], suffix: list[int]) -> int | None:
    """The index after the last occurrence of `suffix` in a request's tokens (its
    answer starts there), or None when the suffix was not seen."""
    n = len(suffix)
    for start in range(len(token_ids) - n, -1, -1):
        if token_ids[start : start + n] == suffix:
            return start + n
    return None


LIVE_TOKENS_SQL = """
SELECT request_id, token_pos, token_id, ts FROM tokens
WHERE model_version = $version AND sae_version = $sae AND layer = $layer AND ts >= $since
"""
LIVE_FEATURES_SQL = """
SELECT request_id, token_pos, feature_id, value FROM feature_acts
WHERE model_version = $version AND sae_version = $sae AND layer = $layer AND ts >= $since
  AND list_contains($ids, feature_id)
"""


def live_scores(
    catalog,
    model_version: str,
    *,
    sae_version: str,
    layer: int,
    feature_ids: list[int],
    suffix: list[int],
    since,
    pooling: str = "probe",
    probe: Probe | None = None,
) -> dict:
    """A model version's score on its live traffic, from the lake: each request whose
    every token was captured (a canary's are) has its answer found after the
    generation prompt, each group feature pooled over the answer's tokens (max, and mean
    over all of them, zero where it did not fire), and the group scored as the offline
    evaluation scores answers. Requests whose generation prompt was not captured, or
    with no answer token yet, are left out."""
    params = {"version": model_version, "sae": sae_version, "layer": layer, "since": since}
    tokens = catalog.query(LIVE_TOKENS_SQL, params).to_pylist()
    by_request: dict[str, dict[int, int]] = {}
    first_seen: dict[str, object] = {}
    for row in tokens:
        by_request.setdefault(row["request_id"], {})[row["token_pos"]] = row["token_id"]
        seen = first_seen.get(row["request_id"])
        first_seen[row["request_id"]] = row["ts"] if seen is None else min(seen, row["ts"])
    answers: dict[str, set[int]] = {}
    for request, ids_at in by_request.items():
        positions = sorted(ids_at)
        if positions != list(range(positions[0], positions[0] + len(positions))):
            continue  # a gap: not every token was captured
        start = response_start([ids_at[p] for p in positions], suffix)
        if start is not None and start < len(positions):
            answers[request] = set(positions[start:])
    requests = sorted(answers)
    if not requests:  # nothing scorable yet (a canary's first polls): skip the feature query
        return {"model_version": model_version, "requests": 0, "mean_score": None}
    column = {f: j for j, f in enumerate(feature_ids)}
    row_of = {r: i for i, r in enumerate(requests)}
    pooled_max = np.zeros((len(requests), len(feature_ids)))
    pooled_sum = np.zeros((len(requests), len(feature_ids)))
    features = catalog.query(LIVE_FEATURES_SQL, {**params, "ids": feature_ids}).to_pylist()
    for row in features:
        i = row_of.get(row["request_id"])
        if i is None or row["token_pos"] not in answers[row["request_id"]]:
            continue
        j = column[row["feature_id"]]
        pooled_max[i, j] = max(pooled_max[i, j], row["value"])
        pooled_sum[i, j] += row["value"]
    counts = np.array([len(answers[r]) for r in requests], dtype=np.float64)

    # Only the group's columns exist here; the ids map onto them in order.
    pooled = PooledFeatures(
        torch.from_numpy(pooled_max).float(),
        torch.from_numpy(pooled_sum / counts[:, None]).float(),
        counts.astype(int).tolist(),
    )
    local = list(range(len(feature_ids)))
    if probe is not None:
        order = [column[f] for f in probe.feature_ids]
        probe = Probe(**{**asdict(probe), "feature_ids": order})
    scores, _ = group_scores(pooled, local, pooling, probe)
    return {
        "model_version": model_version,
        "requests": len(requests),
        "tokens": int(counts.sum()),
        "pooling": pooling,
        "mean_score": float(scores.mean()),
        "scores": [round(float(x), 6) for x in scores],
        "times": [first_seen[r] for r in requests],  # when each request was answered
    }


def live_model_score(
    cfg,
    catalog,
    model_version: str,
    model_path: str,
    *,
    tag: str,
    since,
    sae_version: str | None = None,
    pooling: str | None = None,
) -> dict:
    """`live_scores` for a tag group, with the registered SAE, its probe when fitted, and
    the generation prompt of the model's own tokenizer."""

    choice = registered_sae(cfg, catalog, sae_version)
    ids = FeatureRegistry(catalog).group_ids(choice.version, tag)
    probe = load_probe(choice.path, tag, family="sae_group")  # the lake keeps features only
    pooling = pooling or ("probe" if probe else "max")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path, cfg.models_dir))
    report = live_scores(
        catalog, model_version, sae_version=choice.version, layer=choice.layer,
        feature_ids=ids, suffix=generation_prompt_ids(tokenizer), since=since,
        pooling=pooling, probe=probe if pooling == "probe" else None,
    )  # fmt: skip
    return {"sae_version": choice.version, "tag": tag, **report}


def score_threshold(
    cfg,
    catalog,
    *,
    tag: str,
    fpr: float,
    reference: str,
    sae_version: str | None = None,
    family: str | None = None,
    progress: bool = False,
) -> dict:
    """The score of the tag's probe (the default, or the one of `family`) that flags
    `fpr` of the benign `reference` transcripts (a file or bundled:NAME), recorded in the
    probe file under `fpr=F@REFERENCE` so that policies and gates reuse it. A recorded
    conversion is returned as it is; refitting the probe clears them."""

    choice = registered_sae(cfg, catalog, sae_version)
    probe = load_probe(choice.path, tag, family)
    if probe is None:
        raise ConfigError(
            f"no {family or 'default'} probe is fitted for tag {tag!r} on SAE {choice.version}:"
            " run featurewatch score --fit with labelled transcripts first"
        )
    key = f"fpr={fpr}@{reference}"
    if key in probe.thresholds:
        return {"tag": tag, "probe": probe.describe(), **probe.thresholds[key]}
    transcripts = read_transcripts(reference)
    ids = FeatureRegistry(catalog).group_ids(choice.version, tag)
    layers = tuple(probe.layers) if probe.family != "sae_group" else ()
    sae = load(choice.path)
    pooled = encode_transcripts(
        cfg, choice, sae, transcripts, residual_layers=layers, progress=progress
    )
    scores, _ = group_scores(pooled, ids, "probe", probe)
    found = {
        **threshold_at_fpr(scores, fpr),
        "reference": reference,
        "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    probe.thresholds[key] = found
    default = load_probe(choice.path, tag)
    probe.save(choice.path, default=default is not None and default.family == probe.family)
    return {"tag": tag, "probe": probe.describe(), **found}


# A refreshed SAE's group probe may be this much worse (cross-validated AUROC) than the
# parent's before the refresh is refused: the tag would otherwise detect less than it did.
MAX_PROBE_AUROC_LOSS = 0.02


def refit_group_probe(
    cfg, probe: Probe, child: SAEChoice, feature_ids: list[int] | None = None
) -> Probe:
    """A group probe fitted again, on the child SAE's features of the transcripts the
    parent's was fitted on: `feature_ids`, the child latents matched to the probe's
    (by default the same ids)."""
    source = probe.fitted_on.get("source")
    if not source or source == "-":
        raise ConfigError(
            f"the {probe.tag!r} probe does not name the file it was fitted on, so it cannot "
            "be refitted on a refreshed SAE: fit it from a file (featurewatch score --fit FILE)"
        )
    transcripts = read_transcripts(source, require_label=True)
    pooled = encode_transcripts(cfg, child, load(child.path), transcripts)
    return fit_probe(
        pooled, [t.label for t in transcripts], tag=probe.tag, sae_version=child.version,
        family="sae_group", feature_ids=feature_ids or probe.feature_ids,
        groups=transcript_domains(transcripts), site=child.site, source=source,
    )  # fmt: skip
