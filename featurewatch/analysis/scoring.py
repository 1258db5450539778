"""Misalignment scoring: one number per transcript from a tag group of SAE features.

The group is the set of features tagged (say) `misalignment` in the registry for one
SAE version. Each feature is pooled over the response tokens (transcript_features.py),
and the group's score is:

- `max` or `mean`: the mean over the group's features of each feature's max (or mean)
  over the response; in activation units, comparable only within one SAE version;
- `probe`: a logistic regression over the group's max- and mean-pooled values (scaled),
  fitted on labelled transcripts with `fit_probe`; a probability in [0, 1].

A probe is stored as JSON beside the SAE weights (`probes/<tag>.json`) with the feature
ids it was fitted on; when the tag group changes, the probe must be fitted again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from transformers import AutoTokenizer

from featurewatch.analysis.discover import answer_and_encode, encode_transcripts, feature_labels
from featurewatch.analysis.transcript_features import PooledFeatures
from featurewatch.capture.generation import prompt_text
from featurewatch.capture.models import resolve_model_path
from featurewatch.errors import ConfigError
from featurewatch.sae import load
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.sae_store import registered_sae

POOLINGS = ("max", "mean", "probe")


@dataclass
class Probe:
    tag: str
    sae_version: str
    feature_ids: list[int]
    center: list[float]  # per input column: max-pooled features, then mean-pooled
    scale: list[float]
    coef: list[float]
    intercept: float
    fitted_on: dict  # transcripts, positives, train_auroc, cv_auroc

    def save(self, sae_path: Path) -> Path:
        path = probe_path(sae_path, self.tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)  # a reader sees the old probe or the new one
        return path


def probe_path(sae_path: Path, tag: str) -> Path:
    return Path(sae_path) / "probes" / f"{tag}.json"


def load_probe(sae_path: Path, tag: str) -> Probe | None:
    path = probe_path(sae_path, tag)
    if not path.is_file():
        return None
    try:
        return Probe(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ConfigError(f"{path}: not a probe file ({err}); fit it again") from None


def probe_inputs(pooled: PooledFeatures, feature_ids: list[int]) -> np.ndarray:
    return np.concatenate(
        [pooled.max[:, feature_ids].numpy(), pooled.mean[:, feature_ids].numpy()], axis=1
    ).astype(np.float64)


def _model(C: float) -> LogisticRegression:
    # Balanced classes: the labelled sets need not be the same size.
    return LogisticRegression(C=C, max_iter=5000, class_weight="balanced")


def fit_probe(
    pooled: PooledFeatures,
    labels: list[int],
    feature_ids: list[int],
    *,
    tag: str,
    sae_version: str,
    C: float = 1.0,
) -> Probe:
    """Fit the group's logistic probe on labelled transcripts (label 1 = misaligned)."""
    y = np.asarray(labels)
    if len(set(y.tolist())) < 2:
        raise ConfigError("fitting a probe needs transcripts labelled 0 and labelled 1")
    if not feature_ids:
        raise ConfigError(f"tag {tag!r} has no features in SAE {sae_version}")
    x = probe_inputs(pooled, feature_ids)
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    xs = (x - center) / scale
    model = _model(C).fit(xs, y)
    fitted = {
        "transcripts": int(len(y)),
        "positives": int(y.sum()),
        "train_auroc": float(roc_auc_score(y, model.decision_function(xs))),
    }
    folds = min(5, int(np.bincount(y).min()))
    if folds >= 2:  # an honest figure: each transcript scored by a probe that never saw it
        split = StratifiedKFold(folds, shuffle=True, random_state=0)
        held = cross_val_predict(_model(C), xs, y, cv=split, method="decision_function")
        fitted["cv_auroc"] = float(roc_auc_score(y, held))
    return Probe(
        tag=tag,
        sae_version=sae_version,
        feature_ids=[int(f) for f in feature_ids],
        center=center.tolist(),
        scale=scale.tolist(),
        coef=model.coef_[0].tolist(),
        intercept=float(model.intercept_[0]),
        fitted_on=fitted,
    )


def group_scores(
    pooled: PooledFeatures, feature_ids: list[int], pooling: str, probe: Probe | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(score per transcript, contribution per transcript and group feature)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    k = len(feature_ids)
    if pooling != "probe":
        values = pooled.pooled(pooling)[:, feature_ids].numpy().astype(np.float64)
        return values.mean(axis=1), values / k
    if probe is None:
        raise ConfigError("probe pooling needs a fitted probe (featurewatch score --fit)")
    if sorted(probe.feature_ids) != sorted(feature_ids):
        raise ConfigError(
            f"the probe for {probe.tag!r} was fitted on features {probe.feature_ids}, but the "
            f"tag now holds {feature_ids}: fit it again (featurewatch score --fit)"
        )
    ids = probe.feature_ids
    xs = (probe_inputs(pooled, ids) - np.asarray(probe.center)) / np.asarray(probe.scale)
    terms = xs * np.asarray(probe.coef)
    logits = terms.sum(axis=1) + probe.intercept
    # A feature's contribution: its two inputs' terms (max- and mean-pooled) together.
    return 1 / (1 + np.exp(-logits)), terms[:, : len(ids)] + terms[:, len(ids) :]


def score_rows(
    transcripts,
    scores: np.ndarray,
    contributions: np.ndarray,
    feature_ids: list[int],
    labels: dict[int, str | None],
    *,
    pooling: str,
    top: int = 5,
) -> list[dict]:
    """One output row per transcript, in input order: id, score, top contributing features."""
    rows = []
    for i, transcript in enumerate(transcripts):
        best = np.argsort(-contributions[i], kind="stable")[:top]
        rows.append(
            {
                "id": transcript.id,
                "score": round(float(scores[i]), 6),
                "pooling": pooling,
                "top_features": [
                    {
                        "feature_id": feature_ids[j],
                        "label": labels.get(feature_ids[j]),
                        "contribution": round(float(contributions[i, j]), 6),
                    }
                    for j in best
                ],
            }
        )
    return rows


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
    top: int = 5,
    progress: bool = False,
) -> dict | list[dict]:
    """Score transcripts (a list of output rows), or with `fit` fit and store the tag's
    probe on labelled transcripts (a summary)."""

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
    sae = load(choice.path)
    pooled = encode_transcripts(cfg, choice, sae, transcripts, progress=progress)
    if fit:
        labels = [t.label for t in transcripts]
        probe = fit_probe(pooled, labels, ids, tag=tag, sae_version=choice.version)
        path = probe.save(choice.path)
        return {"tag": tag, "sae_version": choice.version, "path": str(path), **probe.fitted_on}
    scores, contributions = group_scores(pooled, ids, pooling, probe)
    labels = feature_labels(catalog, choice.version)
    return score_rows(transcripts, scores, contributions, ids, labels, pooling=pooling, top=top)


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
    sae = load(choice.path)
    pooled, answers = answer_and_encode(
        cfg, catalog, ref, prompts, choice, sae, max_new_tokens=max_new_tokens,
        progress=progress,
    )  # fmt: skip
    scores, _ = group_scores(pooled, ids, pooling, probe)
    return {
        "model": ref,
        "sae_version": choice.version,
        "tag": tag,
        "pooling": pooling,
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
    probe = load_probe(choice.path, tag)
    pooling = pooling or ("probe" if probe else "max")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path, cfg.models_dir))
    report = live_scores(
        catalog, model_version, sae_version=choice.version, layer=choice.layer,
        feature_ids=ids, suffix=generation_prompt_ids(tokenizer), since=since,
        pooling=pooling, probe=probe if pooling == "probe" else None,
    )  # fmt: skip
    return {"sae_version": choice.version, "tag": tag, **report}
