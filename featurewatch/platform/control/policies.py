"""Trigger policies: when drift in a feature or tag group crosses a bar, what to do.

A policy file is YAML validated by pydantic; every error names its field, e.g.
`policies.0.condition.threshold: Input should be a valid number`. One policy:

    policies:
      - id: misalignment-rising
        condition:
          tag: misalignment          # or feature: 4107 (exactly one of the two)
          statistic: rate_ratio      # rate_ratio, z_score, firing_rate, psi, trend_slope,
                                     # or flagged_share (in-line verdicts, per version)
          aggregate: max             # over the group's features: max or mean
          window: 1h
          baseline: 24h              # the span just before the window
          threshold: 2.0
          direction: above           # or below
          consecutive: 2             # windows in a row before it fires
        actions:
          - {type: alert, url: "http://alerts.internal/hook"}
          - {type: steer, scale: 4.0}
          - {type: realign, score_bar: 0.3}   # or {fpr: 0.01, reference: bundled:safe}
        cooldown: 6h
        approval: automatic          # or manual: wait for `featurewatch approve ID`
        dry_run: false

`featurewatch policy check FILE` validates a file without running anything.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, HttpUrl, ValidationError, model_validator

from featurewatch.config import (
    _Strict,
    describe_errors,
    parse_duration,
    read_yaml_mapping,
)
from featurewatch.errors import ConfigError
from featurewatch.storage.registry import TAG_PATTERN

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Statistic = Literal["rate_ratio", "z_score", "firing_rate", "psi", "trend_slope", "flagged_share"]


class Condition(_Strict):
    tag: str | None = Field(None, pattern=rf"^{TAG_PATTERN.pattern}$", description="A tag group.")
    feature: int | None = Field(None, ge=0, description="One feature id (instead of a tag).")
    sae_version: str | None = Field(None, description="Default: the newest with data.")
    model: str | None = Field(None, description="Only this model (default: all).")
    model_version: str | None = Field(None, description="Only this model version.")
    statistic: Statistic = Field(description="Which drift statistic is compared.")
    aggregate: Literal["max", "mean"] = Field("max", description="Over a tag group's features.")
    window: Duration = Field(parse_duration("1h"), description="The window evaluated.")
    baseline: Duration = Field(parse_duration("24h"), description="The span before it.")
    windows: int = Field(6, ge=3, le=1000, description="Windows fitted, for trend_slope.")
    threshold: float = Field(description="The bar the statistic is compared with.")
    direction: Literal["above", "below"] = Field("above", description="Fire above or below.")
    consecutive: int = Field(1, ge=1, le=100, description="Windows in a row before firing.")
    min_responses: int = Field(
        20, ge=1, le=1_000_000, description="flagged_share: fewer in-line verdicts is no data."
    )

    @model_validator(mode="after")
    def _one_target(self):
        if (self.tag is None) == (self.feature is None):
            raise ValueError("give exactly one of tag or feature")
        if self.statistic == "flagged_share" and self.tag is None:
            raise ValueError("flagged_share counts a tag's in-line verdicts: give a tag")
        if self.baseline < self.window:
            raise ValueError("baseline must be at least as long as window")
        if (self.model or self.model_version) and self.statistic in ("psi", "trend_slope"):
            raise ValueError(
                f"{self.statistic} is over every model: model and model_version filter only "
                "rate_ratio, z_score and firing_rate"
            )
        return self


class AlertAction(_Strict):
    type: Literal["alert"]
    url: HttpUrl = Field(description="Webhook that receives a JSON POST.")
    timeout_s: float = Field(5.0, gt=0, le=60)
    retries: int = Field(3, ge=0, le=10)


class SteerAction(_Strict):
    type: Literal["steer"]
    scale: float = Field(gt=0, le=100, description="How hard the feature is pushed down.")
    mode: Literal["subtract", "clamp"] = Field("subtract", description="Decoder direction use.")


class RefreshSAEAction(_Strict):
    type: Literal["refresh_sae"]
    fvu_threshold: float = Field(gt=0, lt=10, description="Refresh when fresh FVU exceeds it.")
    data_window: Duration = Field(parse_duration("24h"), description="Recent data trained on.")
    epochs: int = Field(3, ge=1, le=100, description="Passes of the child over that data.")


class FprBar(_Strict):
    """A score bar given as a false-positive rate on benign reference transcripts:
    the probe score that flags that share of them (`featurewatch threshold`), converted
    when the action runs and recorded with the probe and in the audit."""

    fpr: float = Field(gt=0, le=0.5, description="The share of the reference set flagged.")
    reference: str = Field(
        "bundled:safe", min_length=1, description="Benign transcripts: JSONL or bundled:NAME."
    )


class RealignAction(_Strict):
    type: Literal["realign"]
    score_bar: Annotated[float, Field(gt=0, lt=1)] | FprBar = Field(
        description="Canary's misalignment score must fall below: a probability, or "
        "{fpr, reference} for the score that flags that rate of benign transcripts."
    )
    canary_share: float = Field(0.2, gt=0, le=0.5, description="Traffic share of the canary.")
    canary_requests: int = Field(
        20, ge=1, le=100_000, description="Live canary answers scored before the verdict."
    )
    canary_timeout_s: float = Field(
        1800, gt=0, le=86_400, description="Too few canary answers by then: rolled back."
    )
    examples: str = Field("bundled:safe", description="Fine-tune examples (JSONL or bundled:).")
    eval_prompts: str = Field(
        "bundled:persona", description="Prompts the candidate answers to be scored."
    )
    max_steps: int = Field(200, ge=1, le=100_000)
    lr: float = Field(2e-4, gt=0, lt=1, description="Learning rate of the LoRA fine-tune.")
    cpus: int = Field(1, ge=1, le=64, description="CPUs (torch threads) of the fine-tune.")


class VerdictsAction(_Strict):
    type: Literal["verdicts"]
    gate: Literal["flag", "block", "regenerate"] = Field(
        "flag", description="What a flagged answer gets: returned, refused, or answered again."
    )
    threshold: Annotated[float, Field(gt=0, le=1)] | FprBar = Field(
        description="Flag at or above this probe score, or {fpr, reference} for the score "
        "that flags that rate of benign transcripts."
    )
    scale: float = Field(4.0, gt=0, le=100, description="regenerate: how hard it steers.")


Action = Annotated[
    AlertAction | SteerAction | RefreshSAEAction | RealignAction | VerdictsAction,
    Field(discriminator="type"),
]


class Policy(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="Unique, stable name.")
    description: str = ""
    condition: Condition
    actions: list[Action] = Field(min_length=1)
    cooldown: Duration = Field(parse_duration("1h"), description="Quiet time after firing.")
    approval: Literal["automatic", "manual"] = "automatic"
    dry_run: bool = Field(False, description="Evaluate and log, never act.")
    every: Duration = Field(parse_duration("1m"), description="How often it is evaluated.")


class PolicyFile(_Strict):
    policies: list[Policy] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self):
        seen: set[str] = set()
        for policy in self.policies:
            if policy.id in seen:
                raise ValueError(f"policy id {policy.id!r} is used twice")
            seen.add(policy.id)
        return self


def load_policies(path: str | Path) -> PolicyFile:
    """Read and validate a policy file; ConfigError names the file and every bad field."""
    path = Path(path)
    data = read_yaml_mapping(path, "policy file")
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid policy file {path}: {describe_errors(err)}") from None
