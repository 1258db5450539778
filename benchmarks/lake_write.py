"""Lake write speed: the lake writer against a bare pyarrow Parquet write of the same rows.

Each round encodes one spool segment's worth of output (`--tokens` sampled tokens, k = 32
active features each, spread over a few minutes, as a sealed segment is): the lake
writer (`write_segment`: hive partitions, zstd, the `feature_acts` and `tokens` rows
plus their minute rollups, temporary names and renames) against `pq.write_table` of the
same two tables into one zstd file each. Prints feature rows/s for both and the ratio
(target: at least 0.5), best of `--rounds` alternating rounds.

    .venv/bin/python benchmarks/lake_write.py [--tokens 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from drift_query import END, K, feature_weights, hour_tables

from featurewatch.storage.lake import write_segment


def segment(tokens: int):
    """One segment: `tokens` tokens over ten minutes (within one hour partition)."""
    rng = np.random.default_rng(1)
    tok, feats = hour_tables(END - timedelta(hours=3), tokens, feature_weights(rng), rng, False)

    # squeeze the hour's timestamps into its first ten minutes
    def squeeze(table):
        ts = table.column("ts")
        start = pc.min(ts)
        squeezed = pc.add(
            start, pc.divide(pc.subtract(ts, start).cast("int64"), 6).cast("duration[us]")
        )
        return table.set_column(0, "ts", squeezed)

    return squeeze(tok), squeeze(feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokens, features = segment(args.tokens)
    root = Path(tempfile.mkdtemp(prefix="fw-lake-write-"))
    lake_s, bare_s = [], []
    try:
        for r in range(args.rounds):
            start = time.perf_counter()
            write_segment(root / "lake", tokens, features, f"seg-{r}")
            lake_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            pq.write_table(features, root / f"features-{r}.parquet", compression="zstd")
            pq.write_table(tokens, root / f"tokens-{r}.parquet", compression="zstd")
            bare_s.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = features.num_rows
    lake_rate, bare_rate = rows / min(lake_s), rows / min(bare_s)
    print(
        f"{rows:,} feature rows ({args.tokens:,} tokens x k={K}) per segment: lake writer "
        f"{lake_rate:,.0f} rows/s, bare pyarrow write {bare_rate:,.0f} rows/s, "
        f"**ratio {lake_rate / bare_rate:.2f}** (target 0.5)"
    )


if __name__ == "__main__":
    main()
