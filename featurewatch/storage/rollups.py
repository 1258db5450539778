"""Per-minute rollups of a segment's rows, so drift questions over months read thousands
of rows per feature instead of every activation.

Two lake tables, written beside `feature_acts` and `tokens` and committed with them:
- `feature_minutes`: per minute and (model, model_version, sae_version, layer,
  feature_id): times fired, sum, sum of squares and max of the activation value;
- `token_minutes`: per minute and (model, model_version, sae_version, layer): tokens
  seen. A feature that did not fire in a minute has no row, so the tokens it could have
  fired on are counted here.
Each segment writes its own partial rows; the views sum them (sums and counts add, max
takes the max), so segments that share a minute never need rewriting.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

ROLLUP_KEYS = ["model", "model_version", "sae_version", "layer"]


def _minute(ts: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.floor_temporal(ts, unit="minute")


def feature_minutes(features: pa.Table) -> pa.Table:
    """Per-minute, per-feature aggregates of sparse feature rows (`feature_acts`)."""
    value = features.column("value").cast(pa.float64())
    table = pa.table(
        {
            "minute": _minute(features.column("ts")),
            **{key: features.column(key) for key in ROLLUP_KEYS},
            "feature_id": features.column("feature_id"),
            "value": value,
            "value_sq": pc.multiply(value, value),
        }
    )
    grouped = table.group_by(["minute", *ROLLUP_KEYS, "feature_id"]).aggregate(
        [("value", "count"), ("value", "sum"), ("value_sq", "sum"), ("value", "max")]
    )
    return grouped.rename_columns(
        ["minute", *ROLLUP_KEYS, "feature_id", "fired", "sum_value", "sum_sq", "max_value"]
    )


def token_minutes(tokens: pa.Table) -> pa.Table:
    """Tokens seen per minute and (model, model_version, sae_version, layer)."""
    table = pa.table(
        {
            "minute": _minute(tokens.column("ts")),
            **{key: tokens.column(key) for key in ROLLUP_KEYS},
        }
    )
    grouped = table.group_by(["minute", *ROLLUP_KEYS]).aggregate([([], "count_all")])
    return grouped.rename_columns(["minute", *ROLLUP_KEYS, "tokens"])
