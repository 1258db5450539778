"""The Parquet lake: sparse feature rows and sampled tokens, hive-partitioned.

Layout: <lake>/<table>/model=<m>/date=<YYYY-MM-DD>/hour=<HH>/<segment>__<sae>.parquet.
`model`, `date` and `hour` live only in the path (hive style); DuckDB reads them back as
columns. The lake is a local folder or any pyarrow filesystem (`lake_store.LakeStore`);
files appear whole (a temporary name and a rename on a local disk, one upload on an
object store), and a file becomes visible to SQL only when the catalog commits it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from featurewatch.storage.lake_store import LakeStore, as_lake_store
from featurewatch.storage.rollups import feature_rollups, token_rollups

TS = pa.timestamp("us", tz="UTC")

# Columns stored in the files (partition columns model/date/hour come from the path).
# Every table starts with the keys that name a sampled token.
TOKEN_KEY_FIELDS = [
    ("ts", TS),
    ("model_version", pa.string()),
    ("replica", pa.string()),
    ("request_id", pa.string()),
    ("token_pos", pa.int32()),
    ("layer", pa.int16()),
    ("sae_version", pa.string()),
]
FEATURE_ACTS_SCHEMA = pa.schema(
    TOKEN_KEY_FIELDS + [("feature_id", pa.int32()), ("value", pa.float32())]
)
TOKENS_SCHEMA = pa.schema(
    TOKEN_KEY_FIELDS
    + [
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        # ||x - x_hat||^2 / ||x||^2: rises when the dictionary goes stale on new traffic.
        ("recon_error", pa.float32()),
        ("segment_id", pa.string()),
        # the serving engine that computed the vector: 'hf' or 'vllm' (NULL in files
        # written before the column existed)
        ("engine", pa.string()),
    ]
)
ROLLUP_KEY_FIELDS = [
    ("period_start", TS),
    ("period_minutes", pa.int16()),  # 1 as written, 60 once compaction folds an hour
    ("model_version", pa.string()),
    ("sae_version", pa.string()),
    ("layer", pa.int16()),
]
# True on a minute or hour row once its whole day is also summed in a day row of the
# `*_daily` table: queries over whole days read the day row and skip these.
DAY_FOLDED = ("day_folded", pa.bool_())
FEATURE_ROLLUPS_SCHEMA = pa.schema(
    ROLLUP_KEY_FIELDS
    + [
        ("feature_id", pa.int32()),
        ("fired", pa.int64()),
        ("sum_value", pa.float64()),
        ("sum_sq", pa.float64()),
        ("max_value", pa.float32()),
        DAY_FOLDED,
    ]
)
TOKEN_ROLLUPS_SCHEMA = pa.schema(ROLLUP_KEY_FIELDS + [("tokens", pa.int64()), DAY_FOLDED])
# One row per response and tag that a replica scored in-line (proto Verdict): not tied
# to an SAE version (sae_version in the catalog's file list is VERDICT_LOG).
VERDICTS_SCHEMA = pa.schema(
    [
        ("ts", TS),
        ("model_version", pa.string()),
        ("replica", pa.string()),
        ("request_id", pa.string()),
        ("tag", pa.string()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("flagged", pa.bool_()),
        ("action", pa.string()),
        ("attempt", pa.int16()),
        ("probe", pa.string()),
        ("engine", pa.string()),
        ("segment_id", pa.string()),
    ]
)
# In the catalog's manifest the verdicts' commits stand where an SAE version would; no
# SAE version can take this name (SAE names start with a letter or digit).
VERDICT_LOG = "(verdicts)"
SCHEMAS = {
    "feature_acts": FEATURE_ACTS_SCHEMA,
    "tokens": TOKENS_SCHEMA,
    "feature_rollups": FEATURE_ROLLUPS_SCHEMA,
    "token_rollups": TOKEN_ROLLUPS_SCHEMA,
    # One row per closed day and key, written by compaction (period_minutes 1440).
    "feature_daily": FEATURE_ROLLUPS_SCHEMA,
    "token_daily": TOKEN_ROLLUPS_SCHEMA,
    "verdicts": VERDICTS_SCHEMA,
}
# Tables that gained columns since their first files: `tokens` got `engine`. Older files
# read NULL there (the catalog's views match columns by name; compaction fills them in).
GROWN_TABLES = {"tokens"}


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A batch of an older file in the table's current schema: missing columns NULL."""
    missing = [f for f in schema if f.name not in batch.schema.names]
    for field in missing:
        batch = batch.append_column(field, pa.nulls(batch.num_rows, field.type))
    return batch.select(schema.names).cast(schema) if missing else batch


# Raw rows are partitioned by model, date and hour; rollups (a few rows per feature and
# hour) by model and date only, so a week's baseline reads a handful of files.
PARTITION_COLUMNS = {
    "feature_acts": ("model", "date", "hour"),
    "tokens": ("model", "date", "hour"),
    "feature_rollups": ("model", "date"),
    "token_rollups": ("model", "date"),
    "feature_daily": ("model", "date"),
    "token_daily": ("model", "date"),
    "verdicts": ("model", "date", "hour"),
}


def write_partitioned(
    lake: LakeStore | str | Path, table_name: str, table: pa.Table, file_stem: str
) -> list[str]:
    """Write `table` (its columns plus `model`) split into its hive partitions.

    Returns the written paths relative to the lake. Re-writing the same stem replaces
    the same files, so a retried segment never leaves two copies.
    """
    schema = SCHEMAS[table_name]
    if table.num_rows == 0:
        return []
    lake = as_lake_store(lake)
    columns = PARTITION_COLUMNS[table_name]
    # Partition keys from integer hours since the epoch: formatting a date string per
    # row cost more than writing the file.
    ts = table.column(schema.names[0])  # every table leads with its time column
    hour_index = pc.divide(ts.cast(pa.int64()), 3_600_000_000)
    if "hour" not in columns:
        hour_index = pc.multiply(pc.divide(hour_index, 24), 24)
    keys = pa.table({"model": table.column("model"), "hour_index": hour_index})
    groups = keys.group_by(["model", "hour_index"]).aggregate([])
    written = []
    for model, index in zip(
        groups.column("model").to_pylist(), groups.column("hour_index").to_pylist(), strict=True
    ):
        start = datetime.fromtimestamp(index * 3600, UTC)
        values = {"model": model, "date": f"{start:%Y-%m-%d}", "hour": f"{start:%H}"}
        part = table
        if groups.num_rows > 1:
            mask = pc.and_(
                pc.equal(keys.column("model"), model), pc.equal(keys.column("hour_index"), index)
            )
            part = table.filter(mask)
        part = part.select(schema.names).cast(schema)
        rel = "/".join([table_name, *(f"{c}={values[c]}" for c in columns)])
        rel = f"{rel}/{file_stem}.parquet"
        lake.write_table(rel, part, compression="zstd", row_group_size=1_000_000)
        written.append(rel)
    return written


def write_segment(
    lake: LakeStore | str | Path, tokens: pa.Table, features: pa.Table, file_stem: str
):
    """Every lake table of one encoded segment: its tokens, its sparse feature rows and
    their per-minute rollups. Returns {table name: written paths} for the catalog."""
    lake = as_lake_store(lake)
    return {
        "tokens": write_partitioned(lake, "tokens", tokens, file_stem),
        "feature_acts": write_partitioned(lake, "feature_acts", features, file_stem),
        "feature_rollups": write_partitioned(
            lake, "feature_rollups", feature_rollups(features), file_stem
        ),
        "token_rollups": write_partitioned(lake, "token_rollups", token_rollups(tokens), file_stem),
    }
