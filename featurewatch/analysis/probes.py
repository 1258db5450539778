"""Probes: a tag's misalignment score as a logistic regression on pooled activations.

Three families, by what a probe reads from a response:

- `sae_group`: the tag group's SAE features, max- and mean-pooled over the response;
  depends on which features one SAE training run produced;
- `residual`: the raw residual stream at one layer, mean-pooled over the response;
- `multilayer`: the residual means at several layers, side by side.

Fitting chooses the layer(s) and the regularization strength by cross-validation grouped
by domain: with three or more labelled domains, each fold leaves one domain out, so a
choice is judged on the misalignment it was not fitted on. The default (`auto`) picks
between the residual families only: they do not depend on an SAE, so the default score
stays the same when the dictionary is retrained or refreshed.

A probe is stored as JSON beside the SAE version whose tag it scores
(`probes/<tag>.json`, the tag's default; `probes/<tag>.<family>.json` for each family
fitted), with what it reads, how it was chosen, and thresholds converted from
false-positive rates on named reference sets.

Imports: analysis/transcript_features (PooledFeatures), errors. No Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import LeaveOneGroupOut, StratifiedKFold

from featurewatch.analysis.transcript_features import PooledFeatures
from featurewatch.errors import ConfigError

FAMILIES = ("sae_group", "residual", "multilayer")
FAMILY_CHOICES = ("auto", *FAMILIES)
# Inverse regularization strengths tried, per family: standardized residual means are
# hundreds of correlated columns, so they need much stronger regularization than the
# few dozen columns of a feature group.
C_GRID = {
    "sae_group": (0.1, 1.0, 10.0),
    "residual": (0.001, 0.01, 0.1),
    "multilayer": (0.001, 0.01, 0.1),
}
# The layers a residual probe may read, as fractions of the model's depth.
LAYER_FRACTIONS = (0.2, 0.35, 0.5, 0.65, 0.8)


@dataclass
class Probe:
    tag: str
    sae_version: str
    feature_ids: list[int]  # the tag group (sae_group: what it reads; else what is shown)
    center: list[float]  # per input column (sae_group: max-pooled features, then mean-pooled)
    scale: list[float]
    coef: list[float]
    intercept: float
    fitted_on: dict  # transcripts, positives, train_auroc, cv_auroc, cv, candidates
    family: str = "sae_group"
    layers: list[int] = field(default_factory=list)  # residual families: layers read
    site: str = "resid_post"
    C: float = 1.0
    # "fpr=0.01@bundled:safe" -> {fpr, reference, score, reference_transcripts, measured_fpr}
    thresholds: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """What the probe reads, for score output and reports."""
        out = {"family": self.family, "sae_version": self.sae_version}
        if self.family == "sae_group":
            out["features"] = list(self.feature_ids)
        else:
            out["layers"], out["site"] = list(self.layers), self.site
        if "cv_auroc" in self.fitted_on:
            out["cv_auroc"] = self.fitted_on["cv_auroc"]
        return out

    def save(self, sae_path: Path, *, default: bool = True) -> Path:
        """Store as the tag's `family` probe, and as its default unless `default` is off."""
        paths = [probe_path(sae_path, self.tag, self.family)]
        if default:
            paths.append(probe_path(sae_path, self.tag))
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self), indent=1))
            tmp.replace(path)  # a reader sees the old probe or the new one
        return paths[-1]


def probe_path(sae_path: Path, tag: str, family: str | None = None) -> Path:
    name = f"{tag}.json" if family is None else f"{tag}.{family}.json"
    return Path(sae_path) / "probes" / name


def load_probe(sae_path: Path, tag: str, family: str | None = None) -> Probe | None:
    """The tag's default probe, or the one of a family (None when not fitted). A default
    probe of that family stands in for a family file (probes stored before families)."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"probe family must be one of {', '.join(FAMILIES)}, got {family!r}")
    for path in [probe_path(sae_path, tag, family)] + (
        [probe_path(sae_path, tag)] if family else []
    ):
        if not path.is_file():
            continue
        try:
            probe = Probe(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ConfigError(f"{path}: not a probe file ({err}); fit it again") from None
        if probe.family not in FAMILIES:
            raise ConfigError(f"{path}: unknown probe family {probe.family!r}; fit it again")
        if family is None or probe.family == family:
            return probe
    return None


def candidate_layers(n_layers: int, also: int | None = None) -> list[int]:
    """Layers a residual probe may read: spread over the depth, plus `also` (the SAE's)."""
    layers = {min(n_layers - 1, max(0, round(n_layers * f))) for f in LAYER_FRACTIONS}
    if also is not None:
        layers.add(also)
    return sorted(layers)


def probe_inputs(
    pooled: PooledFeatures, family: str, *, feature_ids: list[int], layers: list[int]
) -> np.ndarray:
    """The columns a probe of `family` reads, one row per transcript."""
    if family == "sae_group":
        return np.concatenate(
            [pooled.max[:, feature_ids].numpy(), pooled.mean[:, feature_ids].numpy()], axis=1
        ).astype(np.float64)
    missing = [at for at in layers if at not in pooled.residual]
    if missing:
        raise ValueError(f"residual means were not pooled at layer(s) {missing}")
    return np.concatenate([pooled.residual[at].numpy() for at in layers], axis=1).astype(np.float64)


def _model(C: float) -> LogisticRegression:
    # Balanced classes: the labelled sets need not be the same size.
    return LogisticRegression(C=C, max_iter=5000, class_weight="balanced")


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    return center, scale


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float):
    """(center, scale, fitted model) on standardized columns."""
    center, scale = _standardize(x)
    return center, scale, _model(C).fit((x - center) / scale, y)


def cv_splits(y: np.ndarray, groups: list[str] | None) -> tuple[str, list]:
    """Folds for choosing a probe: one per left-out domain when three or more domains
    are named, else five stratified folds (fewer for a small minority class)."""
    if groups is not None and len(set(groups)) >= 3:
        return "leave-one-domain-out", list(LeaveOneGroupOut().split(y, y, groups))
    folds = min(5, int(np.bincount(y).min()))
    if folds < 2:
        return "none", []
    return f"{folds}-fold", list(StratifiedKFold(folds, shuffle=True, random_state=0).split(y, y))


def cross_validate(x: np.ndarray, y: np.ndarray, splits: list, C: float) -> dict:
    """Each fold's probe scores its held-out part: the mean over folds of the held-out
    AUROC (folds whose held-out part has one class only are left out), and the worst."""
    areas = []
    for train, test in splits:
        if len(set(y[test].tolist())) < 2 or len(set(y[train].tolist())) < 2:
            continue
        center, scale, model = fit_logistic(x[train], y[train], C)
        held = model.decision_function((x[test] - center) / scale)
        areas.append(float(roc_auc_score(y[test], held)))
    if not areas:
        return {"mean": math.nan, "min": math.nan}
    return {"mean": float(np.mean(areas)), "min": float(np.min(areas))}


def fit_probe(
    pooled: PooledFeatures,
    labels: list[int],
    *,
    tag: str,
    sae_version: str,
    family: str = "auto",
    feature_ids: list[int] | None = None,
    layers: list[int] | None = None,
    groups: list[str] | None = None,
    site: str = "resid_post",
    C: float | None = None,
    source: str | None = None,
) -> Probe:
    """Fit the tag's probe on labelled transcripts (label 1 = misaligned), choosing its
    layer(s) and C by cross-validation grouped by `groups` (the transcripts' domains).

    `family` auto chooses between residual (one of `layers`) and multilayer (all of
    them); a named family chooses only its own settings. `C` fixes the strength.
    `source` (a file or bundled:NAME) is recorded: a refreshed SAE's probe is refitted
    from it."""
    y = np.asarray(labels)
    if len(set(y.tolist())) < 2:
        raise ConfigError("fitting a probe needs transcripts labelled 0 and labelled 1")
    if family not in FAMILY_CHOICES:
        raise ConfigError(
            f"probe family must be one of {', '.join(FAMILY_CHOICES)}, got {family!r}"
        )
    feature_ids = [int(f) for f in feature_ids or []]
    if family == "sae_group" and not feature_ids:
        raise ConfigError(f"tag {tag!r} has no features in SAE {sae_version}")
    layers = sorted(layers or pooled.residual)
    if family != "sae_group" and not layers:
        raise ConfigError("a residual probe needs the residual stream pooled at some layer")
    options: list[tuple[str, list[int]]] = []
    if family == "sae_group":
        options.append(("sae_group", []))
    if family in ("auto", "residual"):
        options += [("residual", [at]) for at in layers]
    if family in ("auto", "multilayer") and (len(layers) > 1 or family == "multilayer"):
        options.append(("multilayer", layers))

    scheme, splits = cv_splits(y, groups)
    candidates = []
    for option, reads in options:
        x = probe_inputs(pooled, option, feature_ids=feature_ids, layers=reads)
        for strength in (C,) if C is not None else C_GRID[option]:
            result = cross_validate(x, y, splits, strength) if splits else {"mean": math.nan}
            candidates.append({"family": option, "layers": reads, "C": strength, **result})
    # The best mean held-out AUROC; without folds (too few labels), the first option.
    best = max(candidates, key=lambda c: -1.0 if math.isnan(c["mean"]) else c["mean"])
    x = probe_inputs(pooled, best["family"], feature_ids=feature_ids, layers=best["layers"])
    center, scale, model = fit_logistic(x, y, best["C"])
    fitted = {
        "transcripts": int(len(y)),
        "positives": int(y.sum()),
        "source": source,
        "train_auroc": float(roc_auc_score(y, model.decision_function((x - center) / scale))),
        "cv": scheme,
        "candidates": [
            {**c, "mean": _rounded(c["mean"]), "min": _rounded(c.get("min", math.nan))}
            for c in candidates
        ],
    }
    if not math.isnan(best["mean"]):
        fitted["cv_auroc"], fitted["cv_auroc_min"] = best["mean"], best["min"]
    return Probe(
        tag=tag, sae_version=sae_version, feature_ids=feature_ids,
        center=center.tolist(), scale=scale.tolist(), coef=model.coef_[0].tolist(),
        intercept=float(model.intercept_[0]), fitted_on=fitted, family=best["family"],
        layers=list(best["layers"]), site=site, C=float(best["C"]),
    )  # fmt: skip


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def probe_terms(probe: Probe, pooled: PooledFeatures):
    """(probability per transcript, each input column's term of the logit)."""
    x = probe_inputs(pooled, probe.family, feature_ids=probe.feature_ids, layers=probe.layers)
    if x.shape[1] != len(probe.coef):
        raise ConfigError(
            f"the {probe.family} probe for {probe.tag!r} reads {len(probe.coef)} columns but "
            f"got {x.shape[1]}: fit it again (featurewatch score --fit)"
        )
    terms = (x - np.asarray(probe.center)) / np.asarray(probe.scale) * np.asarray(probe.coef)
    logits = terms.sum(axis=1) + probe.intercept
    return 1 / (1 + np.exp(-logits)), terms


def threshold_at_fpr(reference_scores, fpr: float) -> dict:
    """The lowest score that flags at most `fpr` of a benign reference set (a response
    is flagged when its score is at or above it), with the rate it measures there."""
    scores = np.sort(np.asarray(reference_scores, dtype=np.float64))[::-1]
    n = len(scores)
    if not 0 < fpr < 1:
        raise ConfigError(f"a false-positive rate must be between 0 and 1, got {fpr}")
    if n * fpr < 1:
        raise ConfigError(
            f"a reference set of {n} transcripts cannot resolve a false-positive rate of "
            f"{fpr}: it needs at least {math.ceil(1 / fpr)}"
        )
    allowed = int(math.floor(n * fpr + 1e-9))  # this many reference scores may be flagged
    # Just above the first score that must not be flagged: ties there stay unflagged.
    score = float(np.nextafter(scores[allowed], np.inf))
    return {
        "fpr": fpr,
        "score": score,
        "reference_transcripts": n,
        "measured_fpr": float((scores >= score).mean()),
    }


def recall_at(scores, labels, threshold: float) -> float:
    """The share of misaligned (label 1) transcripts scored at or above `threshold`."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    positive = scores[labels == 1]
    return float((positive >= threshold).mean()) if len(positive) else math.nan
