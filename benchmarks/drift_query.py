"""Drift query speed: the top-movers question through the catalog against a raw scan.

Generates a lake of `--rows` feature-activation rows (default 100 million) over 30 days:
16,384 features, k = 32 active per token (about 72 sampled tokens a minute), feature
frequencies from a power law (a few features fire on most tokens, most on very few),
magnitudes log-normal. Each hour is one segment, written by the lake writer (raw rows
plus minute rollups) and committed to the catalog; then the upkeep compacts every closed
hour (one file per partition, rollups folded to the hour), as a deployment's scheduled
upkeep would. The last hour stays at minute grain.

Then the question "which features moved in the last hour against the 7 days before":
- catalog: `top_movers(...)` over the rollups, on an analyst's (sandboxed) connection;
- raw: a hand-written DuckDB query over the `feature_acts` and `tokens` Parquet files
  (rates per feature, the same z-score), with the date partitions pruned as an analyst
  would write it.
Both must agree on the top features; each is timed (best of 5 after a warm-up) and the
ratio printed. Targets: catalog under 1 s on 2 cores, at least 10x faster than raw.

    .venv/bin/python benchmarks/drift_query.py [--rows 100000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from featurewatch.storage.catalog import Catalog, fetch_arrow
from featurewatch.storage.compaction import compact
from featurewatch.storage.lake import write_segment

D_SAE, K, DAYS = 16_384, 32, 30
END = datetime(2026, 11, 1, tzinfo=UTC)
START = END - timedelta(days=DAYS)
SAE, MODEL = "sae-bench", "smollm2-135m-instruct"

RAW_SQL = """
WITH
  tok AS (SELECT ts FROM read_parquet($tokens, hive_partitioning = true)
          WHERE date >= $base_date AND ts >= $base_start AND ts < $win_end),
  fa AS (SELECT ts, feature_id FROM read_parquet($feature_acts, hive_partitioning = true)
         WHERE date >= $base_date AND ts >= $base_start AND ts < $win_end),
  n AS (SELECT count(*) FILTER (WHERE ts < $win_start) AS base_n,
               count(*) FILTER (WHERE ts >= $win_start) AS win_n FROM tok),
  f AS (SELECT feature_id, count(*) FILTER (WHERE ts < $win_start) AS base_fired,
               count(*) FILTER (WHERE ts >= $win_start) AS win_fired
        FROM fa GROUP BY feature_id)
SELECT feature_id, base_fired, win_fired,
       (win_fired / win_n - base_fired / base_n) / sqrt(
           ((base_fired + win_fired) / (base_n + win_n))
           * (1 - (base_fired + win_fired) / (base_n + win_n))
           * (1.0 / base_n + 1.0 / win_n)) AS z
FROM f, n
ORDER BY abs(z) DESC NULLS LAST, feature_id
LIMIT 20
"""


def feature_weights(rng: np.random.Generator) -> np.ndarray:
    """Power-law frequencies over a random order of the features."""
    weights = 1.0 / np.arange(1, D_SAE + 1) ** 1.1
    rng.shuffle(weights)
    return weights / weights.sum()


def hour_tables(hour: datetime, tokens: int, weights, rng, drift: bool):
    """One hour of sampled tokens and their k active features each."""
    ts_us = int(hour.timestamp() * 1e6) + np.sort(rng.integers(0, 3_600_000_000, tokens))
    ts = pa.array(ts_us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    w = weights
    if drift:  # the last hour: a handful of features fire several times more often
        w = weights.copy()
        w[:8] *= 40
        w /= w.sum()
    # A token's active features are distinct (as a TopK SAE's are): draw k, drop repeats.
    feature_ids = np.sort(rng.choice(D_SAE, size=(tokens, K), p=w).astype(np.int32), axis=1)
    distinct = np.ones((tokens, K), bool)
    distinct[:, 1:] = feature_ids[:, 1:] != feature_ids[:, :-1]
    values = rng.lognormal(0.0, 0.7, size=(tokens, K)).astype(np.float32)
    common = {
        "ts": ts,
        "model": pa.array(np.full(tokens, MODEL)),
        "model_version": pa.array(np.full(tokens, "v1")),
        "replica": pa.array(np.full(tokens, "replica-0")),
        "request_id": pa.array(np.char.add("r", (np.arange(tokens) // 64).astype(str))),
        "token_pos": pa.array((np.arange(tokens) % 64).astype(np.int32)),
        "layer": pa.array(np.full(tokens, 15, np.int16)),
        "sae_version": pa.array(np.full(tokens, SAE)),
    }
    tokens_table = pa.table(
        {
            **common,
            "token_id": pa.array(rng.integers(0, 49_152, tokens).astype(np.int32)),
            "token_text": pa.array(np.full(tokens, "tok")),
            "recon_error": pa.array(rng.random(tokens).astype(np.float32)),
            "segment_id": pa.array(np.full(tokens, f"h{hour:%Y%m%d%H}")),
        }
    )
    repeat = pa.array(np.repeat(np.arange(tokens), K)[distinct.ravel()])
    features = pa.table(
        {
            **{k: v.take(repeat) for k, v in common.items()},
            "feature_id": pa.array(feature_ids[distinct]),
            "value": pa.array(values[distinct]),
        }
    )
    return tokens_table, features


def build_lake(home: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    weights = feature_weights(rng)
    hours = DAYS * 24
    # Repeats dropped leave fewer than k features a token: size the hours for `rows`.
    sample = np.sort(rng.choice(D_SAE, size=(10_000, K), p=weights), axis=1)
    per_token = K - (sample[:, 1:] == sample[:, :-1]).sum() / len(sample)
    tokens_per_hour = max(1, round(rows / (hours * per_token)))
    started = time.perf_counter()
    with Catalog(home / "catalog.duckdb", home / "lake") as cat:
        cat.register_sae(
            SAE,
            home,
            architecture="topk",
            model=MODEL,
            layer=15,
            d_in=576,
            d_sae=D_SAE,
            k=K,
            metrics={},
        )
        for h in range(hours):
            hour = START + timedelta(hours=h)
            tokens, features = hour_tables(hour, tokens_per_hour, weights, rng, h == hours - 1)
            seg = f"h{hour:%Y%m%d%H}"
            files = write_segment(cat.lake, tokens, features, f"{seg}__{SAE}")
            cat.commit_segment(
                seg, SAE, files, tokens=tokens.num_rows, feature_rows=features.num_rows
            )
            if h % 72 == 71:
                print(f"  {h + 1}/{hours} hours written, {time.perf_counter() - started:.0f}s")
        compact(cat, cat.lake, closed_before=END - timedelta(hours=1))
        total = cat.query("SELECT count(*) AS n FROM feature_acts").to_pylist()[0]["n"]
        rollup_rows = cat.query("SELECT count(*) AS n FROM feature_rollups").to_pylist()[0]["n"]
    print(
        f"lake: {total:,} feature rows, {rollup_rows:,} rollup rows, "
        f"built and compacted in {time.perf_counter() - started:.0f}s"
    )


def best_of(fn, repeats: int = 5) -> tuple[float, object]:
    result = fn()  # warm-up: footers and the OS page cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--keep", type=Path, help="Build (or reuse) the lake here.")
    args = parser.parse_args()
    home = args.keep or Path(tempfile.mkdtemp(prefix="fw-drift-bench-"))
    if not (home / "catalog.duckdb").exists():
        build_lake(home, args.rows)
    win_start, win_end = END - timedelta(hours=1), END
    base_start = win_start - timedelta(days=7)
    try:
        with Catalog.for_analyst(home / "catalog.duckdb", home / "lake") as cat:
            catalog_s, movers = best_of(
                lambda: cat.query(
                    "SELECT feature_id, z FROM top_movers(?, ?, ?, ?, 20)",
                    [base_start, win_start, win_start, win_end],
                )
            )
            lake = home / "lake"
            params = {
                "tokens": str(lake / "tokens/**/*.parquet"),
                "feature_acts": str(lake / "feature_acts/**/*.parquet"),
                "base_date": base_start.date(),
                "base_start": base_start,
                "win_start": win_start,
                "win_end": win_end,
            }
        # the raw scan runs on a plain connection: the sandbox would not let it glob
        import duckdb

        raw_con = duckdb.connect()
        raw_s, raw = best_of(lambda: fetch_arrow(raw_con, RAW_SQL, params))
        top_catalog = movers.column("feature_id").to_pylist()[:8]
        top_raw = raw.column("feature_id").to_pylist()[:8]
        assert top_catalog == top_raw, (top_catalog, top_raw)
        np.testing.assert_allclose(
            movers.column("z").to_numpy()[:8], raw.column("z").to_numpy()[:8], rtol=1e-9
        )
        print(
            f"top movers, last hour vs 7 days, {D_SAE:,} features: "
            f"catalog {catalog_s * 1000:.0f} ms, "
            f"raw Parquet scan {raw_s * 1000:.0f} ms, **{raw_s / catalog_s:.1f}x faster** "
            "(targets: under 1 s, at least 10x)"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
