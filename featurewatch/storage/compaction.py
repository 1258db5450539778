"""Lake upkeep: compaction of small files, retention by age, and deleting what they
retired.

Every segment writes a file per table and partition, so a busy hour holds many small
files. Compaction rewrites each closed hour's raw files (per table, partition and SAE
version) into one, and each day's rollup files into one with every closed hour's minute
rows folded into one 60-minute row per key, which is what keeps a week-long baseline to
a few rows per feature and hour in a handful of files. Retention drops
partitions past their age: raw rows (`feature_acts`, `tokens`) after `raw_days`,
rollups after `rollup_days`.

Neither blocks or tears a reader: new files are written under fresh names first, then
one catalog transaction swaps them into the views; the old files are only retired, and
deleted once `grace` has passed, so a query that started on the old views still finds
them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featurewatch.config import LakeConfig
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import SCHEMAS, conform
from featurewatch.storage.lake_store import LakeStore, as_lake_store
from featurewatch.storage.rollups import fold_closed_hours, fold_day

RAW_TABLES = ("feature_acts", "tokens", "verdicts")
ROLLUP_TABLES = ("feature_rollups", "token_rollups")
DAILY_TABLE = {"feature_rollups": "feature_daily", "token_rollups": "token_daily"}
COMPACTED = "compacted"  # lake_files.segment_id of a file written by compaction
ROWS_PER_WRITE = 1_000_000  # bounded memory: rows held before a row group is written
ROLLUP_ROW_GROUP = 16_384  # about an hour of one busy model's hour rows


@dataclass
class Partition:
    """The files of one table, partition (an hour of raw rows, a day of rollups) and
    SAE version."""

    table_name: str
    directory: str  # <table>/model=<m>/date=<d>[/hour=<h>], relative to the lake
    sae_version: str
    files: list[str] = field(default_factory=list)
    folded_until: list[datetime | None] = field(default_factory=list)

    @property
    def start(self) -> datetime:
        parts = dict(p.split("=", 1) for p in Path(self.directory).parts[1:])
        day = datetime.strptime(parts["date"], "%Y-%m-%d").replace(tzinfo=UTC)
        return day + timedelta(hours=int(parts.get("hour", 0)))

    @property
    def end(self) -> datetime:
        hourly = "hour=" in self.directory
        return self.start + (timedelta(hours=1) if hourly else timedelta(days=1))

    def needs_compaction(self, closed_before: datetime) -> bool:
        if self.table_name in RAW_TABLES:
            # A closed hour in more than one file.
            return self.end <= closed_before and len(self.files) > 1
        # Rollups: any file from a segment, or a compacted one folded before an hour of
        # this day closed.
        if self.start + timedelta(hours=1) > closed_before:
            return False  # no hour of this day has closed yet
        fold_limit = min(self.end, closed_before)
        return len(self.files) > 1 or any(
            until is None or until < fold_limit for until in self.folded_until
        )


@dataclass
class UpkeepReport:
    partitions_compacted: int = 0
    files_compacted: int = 0
    partitions_dropped: int = 0
    files_deleted: int = 0


def partitions(catalog: Catalog) -> list[Partition]:
    grouped: dict[tuple[str, str, str], Partition] = {}
    for table_name, path, _segment, sae_version, folded_until in catalog.lake_file_list():
        key = (table_name, str(Path(path).parent), sae_version)
        part = grouped.setdefault(key, Partition(*key))
        part.files.append(path)
        part.folded_until.append(folded_until)
    return list(grouped.values())


def _write_table(lake: LakeStore, directory: str, sae_version: str, table_name: str, rows) -> str:
    """Write one compacted file (a table, or raw batches streamed from `rows` files)."""
    schema = SCHEMAS[table_name]
    rel = f"{directory}/{COMPACTED}-{uuid.uuid4().hex[:12]}__{sae_version}.parquet"
    with (
        lake.writing(rel) as where,
        pq.ParquetWriter(where, schema, compression="zstd", filesystem=lake.fs) as writer,
    ):
        if isinstance(rows, pa.Table):
            # Rollups sorted by time in small row groups: a window that covers part of
            # the day reads only its hours' groups (Parquet min/max statistics).
            rows = rows.select(schema.names).cast(schema).sort_by("period_start")
            writer.write_table(rows, row_group_size=ROLLUP_ROW_GROUP)
        else:
            # Raw rows stream through, at most ROWS_PER_WRITE in memory at once.
            pending, held = [], 0
            for src in rows:
                for batch in src.iter_batches(batch_size=65_536):
                    pending.append(conform(batch, schema))
                    held += batch.num_rows
                    if held >= ROWS_PER_WRITE:
                        writer.write_table(pa.Table.from_batches(pending).cast(schema))
                        pending, held = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending).cast(schema))
    return rel


def _write_compacted(lake: LakeStore, part: Partition, closed_before: datetime) -> dict:
    """The partition's rows in one new file: {table name: new path}. Rollups get their
    closed hours folded and, once the day has closed, a day row per key in the daily
    table, their hour rows marked `day_folded`."""
    sources = [lake.parquet_file(f) for f in part.files]
    args = (lake, part.directory, part.sae_version)
    if part.table_name not in ROLLUP_TABLES:
        return {part.table_name: _write_table(*args, part.table_name, sources)}
    # A day's rollups are a few rows per feature and hour: fold them in memory.
    rows = pa.concat_tables([src.read() for src in sources])
    day_closed = part.end <= closed_before
    fine = fold_closed_hours(rows, part.table_name, closed_before)
    fine = fine.append_column("day_folded", pa.repeat(day_closed, fine.num_rows))
    written = {part.table_name: _write_table(*args, part.table_name, fine)}
    if day_closed:
        daily = fold_day(rows, part.table_name)
        daily = daily.append_column("day_folded", pa.repeat(True, daily.num_rows))
        daily_table = DAILY_TABLE[part.table_name]
        directory = part.directory.replace(part.table_name, daily_table, 1)
        written[daily_table] = _write_table(lake, directory, part.sae_version, daily_table, daily)
    return written


def compact(
    catalog: Catalog, lake: LakeStore | str | Path, closed_before: datetime
) -> UpkeepReport:
    """Merge the files of every raw partition whose hour ended before `closed_before`,
    and fold the closed hours (and closed days) of every rollup partition; one catalog
    swap for all."""
    report = UpkeepReport()
    lake = as_lake_store(lake)
    swaps = []
    all_parts = partitions(catalog)
    by_key = {(p.table_name, p.directory, p.sae_version): p for p in all_parts}
    for part in all_parts:
        if part.table_name not in (*RAW_TABLES, *ROLLUP_TABLES):
            continue  # daily tables are rewritten with their rollups
        if not part.needs_compaction(closed_before):
            continue
        for table_name, new in _write_compacted(lake, part, closed_before).items():
            if table_name == part.table_name:
                old = part.files
                folded = min(part.end, closed_before) if table_name in ROLLUP_TABLES else None
            else:  # the day rows replace any earlier ones of this day
                directory = part.directory.replace(part.table_name, table_name, 1)
                earlier = by_key.get((table_name, directory, part.sae_version))
                old, folded = (earlier.files if earlier else []), None
            swaps.append((table_name, part.sae_version, old, [new], folded))
        report.partitions_compacted += 1
        report.files_compacted += len(part.files)
    catalog.replace_files(swaps)
    return report


def retain(catalog: Catalog, now: datetime, raw_days: int, rollup_days: int) -> UpkeepReport:
    """Drop raw partitions older than `raw_days` and rollups older than `rollup_days`."""
    report = UpkeepReport()
    swaps = []
    for part in partitions(catalog):
        days = raw_days if part.table_name in RAW_TABLES else rollup_days
        if part.end <= now - timedelta(days=days):
            swaps.append((part.table_name, part.sae_version, part.files, [], None))
            report.partitions_dropped += 1
    catalog.replace_files(swaps)
    return report


def delete_retired(
    catalog: Catalog, lake: LakeStore | str | Path, now: datetime, grace: timedelta
) -> int:
    """Delete the files retired more than `grace` ago; returns how many."""
    lake = as_lake_store(lake)
    paths = catalog.take_retired(now - grace)
    for rel in paths:
        lake.delete(rel)
    return len(paths)


def upkeep(
    catalog: Catalog,
    lake: LakeStore | str | Path,
    now: datetime,
    *,
    compact_delay: timedelta,
    raw_days: int,
    rollup_days: int,
    grace: timedelta,
) -> UpkeepReport:
    """Retention, then compaction of hours closed `compact_delay` ago, then deleting
    files retired more than `grace` ago: one pass of the scheduled upkeep."""
    dropped = retain(catalog, now, raw_days, rollup_days)
    report = compact(catalog, lake, now - compact_delay)
    report.partitions_dropped = dropped.partitions_dropped
    report.files_deleted = delete_retired(catalog, lake, now, grace)
    return report


def scheduled_upkeep(catalog: Catalog, settings: LakeConfig, what: str = "all") -> UpkeepReport:
    """One pass of upkeep with the lake's configured delays and retention: "compact",
    "retain", or "all" (retention, compaction, then deleting retired files)."""
    now = datetime.now(UTC)
    delay = timedelta(minutes=settings.compact_delay_minutes)
    if what == "compact":
        return compact(catalog, catalog.lake, now - delay)
    if what == "retain":
        return retain(catalog, now, settings.raw_retention_days, settings.rollup_retention_days)
    return upkeep(
        catalog,
        catalog.lake,
        now,
        compact_delay=delay,
        raw_days=settings.raw_retention_days,
        rollup_days=settings.rollup_retention_days,
        grace=timedelta(minutes=settings.retired_grace_minutes),
    )
