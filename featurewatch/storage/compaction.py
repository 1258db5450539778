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

import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import SCHEMAS
from featurewatch.storage.rollups import fold_closed_hours

RAW_TABLES = ("feature_acts", "tokens")
ROLLUP_TABLES = ("feature_rollups", "token_rollups")
COMPACTED = "compacted"  # lake_files.segment_id of a file written by compaction
ROWS_PER_WRITE = 1_000_000  # bounded memory: rows held before a row group is written


@dataclass
class Partition:
    """The files of one table, partition (an hour of raw rows, a day of rollups) and
    SAE version."""

    table_name: str
    directory: str  # <table>/model=<m>/date=<d>[/hour=<h>], relative to the lake
    sae_version: str
    files: list[str] = field(default_factory=list)
    segment_ids: set[str] = field(default_factory=set)
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
    for table_name, path, segment, sae_version, folded_until in catalog.lake_file_list():
        key = (table_name, str(Path(path).parent), sae_version)
        part = grouped.setdefault(key, Partition(*key))
        part.files.append(path)
        part.segment_ids.add(segment)
        part.folded_until.append(folded_until)
    return list(grouped.values())


def _write_compacted(lake_dir: Path, part: Partition, closed_before: datetime) -> str:
    """One file holding the partition's rows (closed hours of rollups folded)."""
    schema = SCHEMAS[part.table_name]
    rel = f"{part.directory}/{COMPACTED}-{uuid.uuid4().hex[:12]}__{part.sae_version}.parquet"
    target = lake_dir / rel
    tmp = target.with_name(f".{target.name}.tmp")
    sources = [pq.ParquetFile(lake_dir / f) for f in part.files]
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        if part.table_name in ROLLUP_TABLES:
            # A day's rollups are a few rows per feature and hour: fold them in memory.
            rows = pa.concat_tables([src.read() for src in sources])
            folded = fold_closed_hours(rows, part.table_name, closed_before)
            writer.write_table(folded.select(schema.names).cast(schema))
        else:
            # Raw rows stream through, at most ROWS_PER_WRITE in memory at once.
            pending, held = [], 0
            for src in sources:
                for batch in src.iter_batches(batch_size=65_536):
                    pending.append(batch)
                    held += batch.num_rows
                    if held >= ROWS_PER_WRITE:
                        writer.write_table(pa.Table.from_batches(pending).cast(schema))
                        pending, held = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending).cast(schema))
    os.replace(tmp, target)
    return rel


def compact(catalog: Catalog, lake_dir: Path, closed_before: datetime) -> UpkeepReport:
    """Merge the files of every raw partition whose hour ended before `closed_before`,
    and fold the closed hours of every rollup partition; one catalog swap for all."""
    report = UpkeepReport()
    swaps = []
    for part in partitions(catalog):
        if not part.needs_compaction(closed_before):
            continue
        new = _write_compacted(Path(lake_dir), part, closed_before)
        folded = min(part.end, closed_before) if part.table_name in ROLLUP_TABLES else None
        swaps.append((part.table_name, part.sae_version, part.files, [new], folded))
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


def delete_retired(catalog: Catalog, lake_dir: Path, now: datetime, grace: timedelta) -> int:
    """Delete the files retired more than `grace` ago; returns how many."""
    paths = catalog.take_retired(now - grace)
    for rel in paths:
        (Path(lake_dir) / rel).unlink(missing_ok=True)
    return len(paths)


def upkeep(
    catalog: Catalog,
    lake_dir: Path,
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
    report = compact(catalog, lake_dir, now - compact_delay)
    report.partitions_dropped = dropped.partitions_dropped
    report.files_deleted = delete_retired(catalog, lake_dir, now, grace)
    return report
