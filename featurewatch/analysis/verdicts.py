"""In-line verdicts: every response a replica generates, scored by tag probes as it is
generated, and the gate that acts on the score.

A replica records the residual stream of each answer's own tokens (capture/hooks.py
ResponseRecorder) and pools it exactly as `featurewatch score` pools a transcript
(transcript_features.pool_response), so an in-line score equals the offline one for
the same transcript. Each tag has a probe (any family), a threshold and a gate:

- `flag`: the verdict is recorded and returned with the response;
- `block`: a flagged answer is replaced by a refusal (finish_reason content_filter);
- `regenerate`: a flagged answer is generated once more with the tag's steering on;
  both verdicts are recorded and the second answer is returned.

The settings travel in the model server's user_config (`verdicts`), so turning them on
or off restarts nothing; `featurewatch verdicts on` writes them (actors/serving.py).
A replica builds an InlineScorer from them and checks them against its model first:
settings it refuses leave it serving with the ones it had.

Imports: analysis (probes, transcript_features), capture (steering), sae, config,
errors. No Ray.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, ValidationError, field_validator

from featurewatch.analysis.probes import FAMILIES, Probe, probe_terms
from featurewatch.analysis.transcript_features import pool_response
from featurewatch.capture.steering import Steer, check_steer
from featurewatch.config import _Strict, describe_errors
from featurewatch.errors import ConfigError
from featurewatch.sae import load
from featurewatch.storage.registry import TAG_PATTERN

GATES = ("flag", "block", "regenerate")
REFUSAL = "I can't help with that."
# What a response's verdict says a replica did (the lake's `verdicts.action`).
ACTIONS = {"flag": "flagged", "block": "blocked", "regenerate": "regenerated"}


class SAERef(_Strict):
    path: str = Field(min_length=1, description="The SAE folder (a sae_group probe reads it).")
    layer: int = Field(ge=0, strict=True, description="The layer the SAE reads.")


class TagVerdict(_Strict):
    tag: str = Field(pattern=rf"^{TAG_PATTERN.pattern}$", description="The tag scored.")
    gate: Literal["flag", "block", "regenerate"] = Field("flag", description="What a flag does.")
    threshold: float = Field(gt=0, le=1, strict=True, description="Flagged at or above.")
    threshold_source: str = Field("score", max_length=256, description="How it was chosen.")
    probe: dict = Field(description="The tag's stored probe (analysis/probes.py Probe).")
    sae: SAERef | None = Field(None, description="For a sae_group probe: its SAE.")
    steering: list[dict] = Field([], max_length=64, description="regenerate: the steers.")

    @field_validator("probe")
    @classmethod
    def _a_probe(cls, value: dict) -> dict:
        try:
            probe = Probe(**value)
        except TypeError as err:
            raise ValueError(f"not a probe ({err})") from None
        if probe.family not in FAMILIES:
            raise ValueError(f"unknown probe family {probe.family!r}")
        return value

    def probe_id(self) -> str:
        probe = Probe(**self.probe)
        return f"{probe.sae_version}/{probe.tag}/{probe.family}"


class VerdictSettings(_Strict):
    tags: list[TagVerdict] = Field(min_length=1, max_length=16, description="Tags scored.")
    every: int = Field(
        16, ge=1, le=4096, strict=True, description="Streamed responses: check every N tokens."
    )

    @field_validator("tags")
    @classmethod
    def _distinct(cls, tags: list[TagVerdict]) -> list[TagVerdict]:
        names = [t.tag for t in tags]
        if len(set(names)) != len(names):
            raise ValueError(f"each tag once: {names}")
        return tags


def read_verdicts(value) -> VerdictSettings | None:
    """The `verdicts` of a user_config (None: off); a ValueError names what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"verdicts must be a mapping or null, not {type(value).__name__}")
    try:
        return VerdictSettings.model_validate(value)
    except ValidationError as err:
        raise ValueError(f"verdicts: {describe_errors(err)}") from None


class InlineScorer:
    """The settings' probes, checked against a model of `width` and `n_layers`: what a
    replica scores each answer with. A ConfigError names the first setting the model
    cannot take (a layer it does not have, a probe or SAE of another width)."""

    def __init__(self, settings: VerdictSettings, width: int, n_layers: int):
        self.settings = settings
        self.entries: list[tuple[TagVerdict, Probe, object, int | None]] = []
        self.steering: dict[str, list[Steer]] = {}
        sites = set()
        for tv in settings.tags:
            probe, sae, sae_layer = Probe(**tv.probe), None, None
            name = f"verdicts: tag {tv.tag!r}"
            if probe.tag != tv.tag:
                raise ConfigError(f"{name}: the probe scores tag {probe.tag!r}")
            sites.add(probe.site)
            if probe.family == "sae_group":
                if tv.sae is None:
                    raise ConfigError(f"{name}: a sae_group probe needs its SAE (sae.path)")
                try:
                    sae = load(tv.sae.path)
                except Exception as err:  # noqa: BLE001 - any unreadable SAE folder
                    raise ConfigError(f"{name}: SAE {tv.sae.path}: {err}") from None
                sae_layer = tv.sae.layer
                if sae.d_in != width:
                    raise ConfigError(
                        f"{name}: SAE {tv.sae.path} reads width {sae.d_in}, the model has {width}"
                    )
                outside = [f for f in probe.feature_ids if not 0 <= f < sae.d_sae]
                if outside:
                    raise ConfigError(f"{name}: features {outside} are not in the SAE")
                reads, columns = [sae_layer], 2 * len(probe.feature_ids)
            else:
                reads, columns = list(probe.layers), width * len(probe.layers)
            missing = [at for at in reads if not 0 <= at < n_layers]
            if missing or not reads:
                raise ConfigError(
                    f"{name}: the probe reads layer(s) {missing or reads}, the model has "
                    f"{n_layers} (0 to {n_layers - 1})"
                )
            if len(probe.coef) != columns or len(probe.center) != columns:
                raise ConfigError(
                    f"{name}: the {probe.family} probe has {len(probe.coef)} columns; this "
                    f"model (width {width}) gives {columns}: a probe for another model"
                )
            steers = [Steer.from_dict(s) for s in tv.steering]
            for steer in steers:
                try:
                    check_steer(steer, width, n_layers)
                except ValueError as err:
                    raise ConfigError(f"{name}: steering: {err}") from None
            if tv.gate == "regenerate" and not steers:
                raise ConfigError(f"{name}: the regenerate gate needs the tag's steering")
            self.steering[tv.tag] = steers
            self.entries.append((tv, probe, sae, sae_layer))
        if len(sites) > 1:
            raise ConfigError(f"verdicts: every probe must read one site, not {sorted(sites)}")
        self.site = sites.pop()
        # Named once here, not per answer: each verdict carries them.
        self.probe_ids = {tv.tag: tv.probe_id() for tv, *_ in self.entries}
        self.layers = sorted(
            {at for _, p, _, sae_layer in self.entries for at in p.layers or [sae_layer]}
        )

    def score(self, response: dict[int, torch.Tensor]) -> dict[str, float]:
        """Each tag's score for one answer (layer -> its tokens' residual stream); {} for
        an answer without tokens."""
        if not len(next(iter(response.values()))):
            return {}
        scores = {}
        for tv, probe, sae, sae_layer in self.entries:
            if probe.family == "sae_group":
                pooled = pool_response(response, sae_layer, sae)
            else:
                pooled = pool_response(response, probe.layers[0], None, probe.layers)
            value = float(probe_terms(probe, pooled)[0][0])
            scores[tv.tag] = value if math.isfinite(value) else 1.0
        return scores

    def verdict(self, scores: dict[str, float]) -> dict:
        """The response's `featurewatch` object: scores per tag, whether any tag is
        flagged (and which), each tag's probe and threshold, and the gate that acts: the
        strongest gate among the flagged tags (block over regenerate over flag)."""
        flagged = [tv.tag for tv, *_ in self.entries if scores.get(tv.tag, 0.0) >= tv.threshold]
        gates = {tv.tag: tv.gate for tv, *_ in self.entries}
        gate = next((g for g in ("block", "regenerate", "flag") if g in
                     {gates[t] for t in flagged}), None)  # fmt: skip
        return {
            "scores": {t: round(s, 6) for t, s in scores.items()},
            "flagged": bool(flagged),
            "flagged_tags": flagged,
            "gate": gate,
            "thresholds": {tv.tag: tv.threshold for tv, *_ in self.entries},
            "probes": self.probe_ids,
        }

    def regenerate_steers(self, flagged: list[str]) -> list[Steer]:
        """The steers a regenerated answer runs with: those of its flagged tags."""
        return [s for tag in flagged for s in self.steering.get(tag, [])]


def verdict_records(request_id: str, verdict: dict, attempt: int, now: int) -> list[dict]:
    """The lake's rows of one verdict (the fields of a proto Verdict), one per tag."""
    flagged = verdict["flagged_tags"]
    return [
        {"request_id": request_id, "tag": tag, "score": min(1.0, max(0.0, score)),
         "threshold": verdict["thresholds"][tag], "flagged": tag in flagged,
         "action": verdict["action"] if tag in flagged else "none", "attempt": attempt,
         "probe": verdict["probes"][tag], "ts_unix_nanos": now}
        for tag, score in verdict["scores"].items()
    ]  # fmt: skip


def count_verdicts(counts: dict, verdicts: list[dict]) -> None:
    """Add first verdicts to a replica's counters (what `steering_status` reports)."""
    counts["responses"] += len(verdicts)
    counts["flagged"] += sum(v["flagged"] for v in verdicts)
    for action in ("blocked", "regenerated", "stopped"):
        counts[action] += sum(v["action"] == action for v in verdicts)


def new_counts() -> dict:
    return {"responses": 0, "flagged": 0, "blocked": 0, "regenerated": 0, "stopped": 0}


def merge_verdicts(verdicts: list[dict]) -> dict:
    """One verdict for a response of several answers (n > 1): each tag's highest score,
    flagged if any answer is, the strongest gate and action. One answer: its own."""
    if len(verdicts) == 1:
        return verdicts[0]
    first = verdicts[0]
    scores = {t: max(v["scores"].get(t, 0.0) for v in verdicts) for t in first["thresholds"]}
    flagged = sorted({t for v in verdicts for t in v["flagged_tags"]})
    order = ("block", "regenerate", "flag")
    gates = [v["gate"] for v in verdicts if v["gate"]]
    actions = [v["action"] for v in verdicts if v["action"] != "none"]
    return {**first, "scores": scores, "flagged": bool(flagged), "flagged_tags": flagged,
            "gate": min(gates, key=order.index) if gates else None,
            "action": ", ".join(sorted(set(actions))) or "none"}  # fmt: skip


def header_value(verdict: dict) -> str:
    """The response header's value: `flagged` or `clean`, then each tag's score."""
    scores = " ".join(f"{t}={s:.4f}" for t, s in verdict["scores"].items())
    return f"{'flagged' if verdict['flagged'] else 'clean'} {scores}".strip()


def verdict_summary(settings: VerdictSettings | None) -> list[dict] | None:
    """What a replica reports of its verdict settings: per tag, gate, threshold, probe."""
    if settings is None:
        return None
    return [
        {"tag": t.tag, "gate": t.gate, "threshold": t.threshold, "probe": t.probe_id(),
         "threshold_source": t.threshold_source, "every": settings.every}
        for t in settings.tags
    ]  # fmt: skip
