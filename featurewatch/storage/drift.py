"""Drift questions as SQL over the catalog's views and macros."""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import Catalog, fetch_arrow

# Top movers between a baseline and a comparison window, for one SAE version, with the
# tokens where each feature fired hardest in the comparison window. {rate_change} is
# `rate_change` (per-minute rollups) or `rate_change_exact` (raw rows, any boundary).
TOP_MOVERS_SQL = """
WITH movers AS (
    SELECT * FROM {rate_change}($base_start, $base_end, $win_start, $win_end)
    WHERE sae_version = $sae_version
    ORDER BY abs(z) DESC NULLS LAST, feature_id
    LIMIT $limit
),
examples AS (
    SELECT fa.feature_id, tk.token_text,
           row_number() OVER (PARTITION BY fa.feature_id ORDER BY fa.value DESC) AS rank
    FROM feature_acts fa
    JOIN tokens tk
      ON tk.request_id = fa.request_id AND tk.token_pos = fa.token_pos
     AND tk.layer = fa.layer AND tk.sae_version = fa.sae_version
    WHERE fa.sae_version = $sae_version
      AND fa.ts >= $win_start AND fa.ts < $win_end
      AND fa.feature_id IN (SELECT feature_id FROM movers)
),
top_tokens AS (
    SELECT feature_id, string_agg(token_text, ' | ' ORDER BY rank) AS top_tokens
    FROM examples WHERE rank <= 4 GROUP BY feature_id
)
SELECT m.feature_id,
       m.base_fired, m.base_tokens, m.win_fired, m.win_tokens,
       round(m.base_rate, 4) AS base_rate,
       round(m.win_rate, 4) AS win_rate,
       round(m.rate_ratio, 2) AS rate_ratio,
       round(m.z, 2) AS z,
       t.top_tokens
FROM movers m LEFT JOIN top_tokens t USING (feature_id)
ORDER BY abs(m.z) DESC NULLS LAST, m.feature_id
"""


def latest_sae_version(catalog: Catalog) -> str:
    """The SAE version of the most recent rollup: what `drift` looks at by default."""
    row = catalog.query(
        "SELECT sae_version FROM token_rollups ORDER BY period_start DESC, sae_version LIMIT 1"
    ).to_pylist()
    if not row:
        raise CatalogError("the lake holds no encoded tokens yet: run the pipeline first")
    return row[0]["sae_version"]


def top_movers(
    catalog: Catalog,
    sae_version: str,
    baseline: tuple[datetime, datetime],
    window: tuple[datetime, datetime],
    limit: int = 10,
    *,
    exact: bool = False,
) -> pa.Table:
    """The `limit` features whose firing rate moved most (|z|) from `baseline` to
    `window` (each a (start, end) pair, half-open). Over the per-minute rollups, so
    boundaries count in whole minutes; `exact` reads the raw rows instead."""
    params = {
        "base_start": baseline[0],
        "base_end": baseline[1],
        "win_start": window[0],
        "win_end": window[1],
        "sae_version": sae_version,
        "limit": limit,
    }
    known = catalog.query(
        "SELECT 1 FROM sae_versions WHERE sae_version = ? UNION ALL "
        "SELECT 1 FROM token_rollups WHERE sae_version = ? LIMIT 1",
        [sae_version, sae_version],
    )
    if known.num_rows == 0:
        raise CatalogError(f"SAE version {sae_version!r} has no data and is not registered")
    macro = "rate_change_exact" if exact else "rate_change"
    return fetch_arrow(catalog.con, TOP_MOVERS_SQL.format(rate_change=macro), params)
