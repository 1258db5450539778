"""The DuckDB catalog: manifest of committed lake files, versions, views and macros.

Parquet stays the source of truth. A lake file becomes visible only when the catalog
commits it: the manifest insert and the rebuilt views happen in one DuckDB transaction,
so a crash between writing files and committing leaves nothing half-visible, and a
segment already in the manifest is never committed twice.

A process that opens a DuckDB file read-write locks out all others, and a reader's
shared lock keeps the writer out. So readers never open the writer's file: after every
commit the writer checkpoints and publishes a copy (`catalog.readers.duckdb`) by atomic
rename, and analysts (`Catalog.for_analyst`: read-only and sandboxed) open the latest
copy. A reader keeps the copy it opened (a consistent state, old or new, never torn)
while the pipeline goes on committing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from featurewatch import __version__
from featurewatch.errors import CatalogError
from featurewatch.storage.lake import GROWN_TABLES, PARTITION_COLUMNS, SCHEMAS
from featurewatch.storage.lake_store import LakeStore, as_lake_store
from featurewatch.storage.macros import MACROS_SQL, ROLLUPS_VIEW_SQL

log = logging.getLogger(__name__)

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS segments (
    segment_id   VARCHAR NOT NULL,
    sae_version  VARCHAR NOT NULL,
    tokens       BIGINT NOT NULL,
    feature_rows BIGINT NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (segment_id, sae_version)
);
CREATE TABLE IF NOT EXISTS lake_files (
    table_name  VARCHAR NOT NULL,
    path        VARCHAR NOT NULL PRIMARY KEY,
    segment_id  VARCHAR NOT NULL,
    sae_version VARCHAR NOT NULL
);
-- Rollup files written by compaction: minute rows of hours that ended before this time
-- are folded into hour rows.
ALTER TABLE lake_files ADD COLUMN IF NOT EXISTS folded_until TIMESTAMPTZ;
-- Files taken out of the views by compaction or retention; deleted from disk only after
-- a grace period, so a reader that opened the catalog before still finds its files.
CREATE TABLE IF NOT EXISTS retired_files (
    path       VARCHAR NOT NULL PRIMARY KEY,
    retired_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS batches (
    batch_key   VARCHAR NOT NULL,
    sae_version VARCHAR NOT NULL,
    segment_id  VARCHAR NOT NULL,
    PRIMARY KEY (batch_key, sae_version)
);
CREATE TABLE IF NOT EXISTS sae_versions (
    sae_version  VARCHAR PRIMARY KEY,
    path         VARCHAR NOT NULL,
    architecture VARCHAR NOT NULL,
    model        VARCHAR NOT NULL,
    layer        INTEGER NOT NULL,
    d_in         INTEGER NOT NULL,
    d_sae        INTEGER NOT NULL,
    k            INTEGER,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    metrics      JSON
);
-- Lineage, added after the first release: catalogs made before it gain the columns.
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS parent_version VARCHAR;
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS model_version VARCHAR;
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS site VARCHAR;
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS data_start TIMESTAMPTZ;
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS data_end TIMESTAMPTZ;
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS lineage JSON;
CREATE TABLE IF NOT EXISTS model_versions (
    model         VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    path          VARCHAR NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (model, model_version)
);
-- Which latent of a child SAE is which of its parent's (sae/matching.py): one row per
-- pair of the optimal one-to-one matching, recorded when the child is registered.
CREATE TABLE IF NOT EXISTS sae_matches (
    parent_version VARCHAR NOT NULL,
    child_version  VARCHAR NOT NULL,
    parent_id      INTEGER NOT NULL,
    child_id       INTEGER NOT NULL,
    cosine         DOUBLE NOT NULL,
    correlation    DOUBLE,
    PRIMARY KEY (child_version, parent_id)
);
-- What the catalog's views were last built over (the lake's location): a reader that
-- finds the lake elsewhere (a home restored or mounted at another path) builds its own.
CREATE TABLE IF NOT EXISTS catalog_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
-- Which featurewatch wrote a row (older rows: NULL).
ALTER TABLE sae_versions ADD COLUMN IF NOT EXISTS featurewatch_version VARCHAR;
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS featurewatch_version VARCHAR;
-- The feature registry (storage/registry.py): what people learned about a feature of
-- one SAE version, and every change to it.
CREATE TABLE IF NOT EXISTS feature_labels (
    sae_version VARCHAR NOT NULL,
    feature_id  INTEGER NOT NULL,
    label       VARCHAR,
    description VARCHAR,
    owner       VARCHAR,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sae_version, feature_id)
);
CREATE TABLE IF NOT EXISTS feature_tags (
    sae_version VARCHAR NOT NULL,
    feature_id  INTEGER NOT NULL,
    tag         VARCHAR NOT NULL,
    PRIMARY KEY (sae_version, feature_id, tag)
);
CREATE TABLE IF NOT EXISTS feature_history (
    sae_version VARCHAR NOT NULL,
    feature_id  INTEGER NOT NULL,
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor       VARCHAR NOT NULL,
    field       VARCHAR NOT NULL,
    old_value   VARCHAR,
    new_value   VARCHAR
);
CREATE OR REPLACE VIEW features AS
SELECT coalesce(l.sae_version, t.sae_version) AS sae_version,
       coalesce(l.feature_id, t.feature_id) AS feature_id,
       l.label, l.description, l.owner, coalesce(t.tags, []) AS tags, l.updated_at
FROM feature_labels l
FULL JOIN (SELECT sae_version, feature_id, list(tag ORDER BY tag) AS tags
           FROM feature_tags GROUP BY ALL) t
  ON l.sae_version = t.sae_version AND l.feature_id = t.feature_id;
"""

_DUCK_TYPES = {
    "timestamp[us, tz=UTC]": "TIMESTAMPTZ",
    "string": "VARCHAR",
    "int32": "INTEGER",
    "int16": "SMALLINT",
    "int64": "BIGINT",
    "float": "FLOAT",
    "double": "DOUBLE",
    "bool": "BOOLEAN",
}


HIVE_TYPES = {"model": "VARCHAR", "date": "DATE", "hour": "INTEGER"}


def _day_folded_file(path: str, folded_until) -> bool:
    """Whether compaction wrote this rollup file after its day closed (all its rows are
    in the day's day rows)."""
    day = re.search(r"date=(\d{4}-\d{2}-\d{2})", path)
    if folded_until is None or day is None:
        return False
    day_end = datetime.strptime(day.group(1), "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    return folded_until >= day_end


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _empty_view_sql(table_name: str) -> str:
    schema = SCHEMAS[table_name]
    cols = [f"NULL::{_DUCK_TYPES[str(f.type)]} AS {f.name}" for f in schema]
    cols += [f"NULL::{HIVE_TYPES[c]} AS {c}" for c in PARTITION_COLUMNS[table_name]]
    return f"SELECT {', '.join(cols)} WHERE false"


# Statements an analyst may run: queries (SELECT, FROM, WITH, VALUES, DESCRIBE, SHOW,
# SUMMARIZE all parse as SELECT) and EXPLAIN. Everything else (COPY, ATTACH, SET,
# INSTALL/LOAD, EXPORT, CREATE, PRAGMA, CALL...) is refused before DuckDB runs it.
ANALYST_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def readers_path(path: Path) -> Path:
    """Where the writer publishes the copy that readers open."""
    path = Path(path)
    return path.with_name(f"{path.stem}.readers{path.suffix}")


# One read descriptor per catalog file and process, shared by every writer object on it
# (they share DuckDB's database too) and closed with the last: closing any descriptor
# of the file drops the process's lock on it (see Catalog.publish).
_COPY_FDS: dict[str, list[int]] = {}
_COPY_FDS_LOCK = threading.Lock()


def _acquire_copy_fd(path: Path) -> int:
    key = str(Path(path).resolve())
    with _COPY_FDS_LOCK:
        if key not in _COPY_FDS:
            _COPY_FDS[key] = [os.open(key, os.O_RDONLY), 0]
        entry = _COPY_FDS[key]
        entry[1] += 1
        return entry[0]


def _release_copy_fd(path: Path) -> None:
    key = str(Path(path).resolve())
    with _COPY_FDS_LOCK:
        entry = _COPY_FDS[key]
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])
            del _COPY_FDS[key]


class Catalog:
    """One DuckDB file over the lake. Use as a context manager to close the connection."""

    def __init__(
        self,
        path: Path,
        lake: LakeStore | str | Path,
        *,
        read_only: bool = False,
        sandboxed: bool = False,
    ):
        self.path = Path(path)
        self.lake = as_lake_store(lake)
        self.sandboxed = sandboxed
        self._in_transaction = False
        self._copy_fd: int | None = None
        self.read_only = read_only = read_only or sandboxed
        if read_only and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run the pipeline (or the demo) first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Analysts read the published copy (a catalog from before copies were published
        # has none yet: then the writer's file).
        opened = self.path
        if sandboxed and readers_path(self.path).exists():
            opened = readers_path(self.path)
        config = {}
        if sandboxed:
            config = {
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "allow_community_extensions": False,
            }
        try:
            self.con = duckdb.connect(str(opened), read_only=read_only, config=config)
        except duckdb.Error as err:
            raise CatalogError(f"cannot open catalog {self.path}: {err}") from None
        self.lake.register(self.con)  # the views read the lake's files through it
        if sandboxed:
            self._sandbox()
        if read_only and self._views_elsewhere():
            try:  # this connection's own views, over the lake where it is now
                self._rebuild_views(temp=True)
            except duckdb.Error as err:  # a file gone: queries name it; `lake check` too
                log.warning("the lake moved and its views cannot be rebuilt: %s", err)
        if not read_only:
            self.con.execute(_SCHEMA_SQL)
            self._rebuild_views()
            self.con.execute(ROLLUPS_VIEW_SQL)
            self.con.execute(MACROS_SQL)
            self.publish()

    @classmethod
    def for_analyst(cls, path: Path, lake: LakeStore | str | Path) -> Catalog:
        """A connection for people's SQL: read-only; files readable only inside the lake;
        no extensions, ATTACH, COPY, EXPORT or settings changes."""
        return cls(path, lake, sandboxed=True)

    def _sandbox(self) -> None:
        # DuckDB itself enforces these even if a statement slipped past the allow-list:
        # file access only under the lake (the views read its Parquet), then the
        # configuration locked so no statement can undo it.
        self.con.execute("SET allowed_directories = ?", [self.lake.readable_prefixes()])
        self.con.execute("SET enable_external_access = false")
        # Repeated drift queries read the same footers: keep them in memory.
        self.con.execute("SET parquet_metadata_cache = true")
        self.con.execute("SET lock_configuration = true")

    def check_analyst_sql(self, sql: str) -> list:
        """The statements of `sql`, or a CatalogError naming the first refused one."""
        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as err:
            raise CatalogError(str(err)) from None
        if not statements:
            raise CatalogError("empty query")
        for number, statement in enumerate(statements, 1):
            if statement.type == duckdb.StatementType.EXPLAIN:
                # EXPLAIN ANALYZE runs what it explains: check the statement inside.
                inner = re.sub(r"(?is)^\s*explain\s+(analyze\s+)?", "", statement.query)
                try:
                    (statement,) = self.con.extract_statements(inner)
                except (duckdb.Error, ValueError):
                    raise CatalogError(
                        f"statement {number}: cannot check what EXPLAIN runs"
                    ) from None
            if statement.type not in ANALYST_STATEMENTS or (
                statement.type == duckdb.StatementType.EXPLAIN
            ):
                # Name it by its first word (DuckDB parses INSTALL as LOAD, PRAGMA x = 1
                # as SET, CHECKPOINT as CALL).
                kind = (statement.query.split() or [statement.type.name])[0].upper()
                raise CatalogError(
                    f"statement {number} is {kind}: analyst connections are read-only and "
                    "run only queries (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)"
                )
        return statements

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.read_only:
            self.publish()
        self.con.close()
        if self._copy_fd is not None:
            _release_copy_fd(self.path)  # only now: see publish()
            self._copy_fd = None

    def publish(self) -> None:
        """Checkpoint, then copy the catalog to `readers_path` under a temporary name
        and rename it over the last copy: readers never block this writer, and never
        see a half-written copy.

        The copy reads through one descriptor opened once and closed after DuckDB: the
        writer's lock is a POSIX record lock, which the process loses the moment it
        closes *any* descriptor of the file (shutil.copyfile did, and another process
        could then open the catalog for writing beside this one)."""
        self.con.execute("CHECKPOINT")
        if self._copy_fd is None:
            self._copy_fd = _acquire_copy_fd(self.path)
        target = readers_path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        size = os.fstat(self._copy_fd).st_size
        with open(tmp, "wb") as out:
            copied = 0
            while copied < size:
                sent = os.sendfile(out.fileno(), self._copy_fd, copied, size - copied)
                if sent == 0:
                    break
                copied += sent
        os.replace(tmp, target)

    @contextmanager
    def transaction(self):
        """One DuckDB transaction: committed when the block ends, rolled back if it raises.
        A block inside another joins the outer transaction (DuckDB has no nesting), so
        several registry edits can commit as one."""
        if self._in_transaction:
            yield self.con
            return
        self.con.execute("BEGIN TRANSACTION")
        self._in_transaction = True
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False
        self.con.execute("COMMIT")

    # ---- manifest

    def committed_segments(self, sae_version: str) -> set[str]:
        rows = self.con.execute(
            "SELECT segment_id FROM segments WHERE sae_version = ?", [sae_version]
        ).fetchall()
        return {r[0] for r in rows}

    def ingested_batches(self, sae_version: str | None = None) -> set[str]:
        """Keys (replica/epoch/seq) of every batch already in the lake."""
        sql = "SELECT batch_key FROM batches"
        params: list = []
        if sae_version is not None:
            sql += " WHERE sae_version = ?"
            params = [sae_version]
        return {r[0] for r in self.con.execute(sql, params).fetchall()}

    def commit_segment(
        self,
        segment_id: str,
        sae_version: str,
        files: dict[str, list[str]],
        *,
        tokens: int,
        feature_rows: int,
        batch_keys: list[str] | None = None,
    ) -> bool:
        """Record a segment's lake files and expose them; False if already committed."""
        with self.transaction() as con:
            exists = con.execute(
                "SELECT count(*) FROM segments WHERE segment_id = ? AND sae_version = ?",
                [segment_id, sae_version],
            ).fetchone()[0]
            if exists:
                return False
            con.execute(
                "INSERT INTO segments (segment_id, sae_version, tokens, feature_rows) "
                "VALUES (?, ?, ?, ?)",
                [segment_id, sae_version, tokens, feature_rows],
            )
            for table_name, paths in files.items():
                for rel in paths:
                    con.execute(
                        "INSERT OR REPLACE INTO lake_files "
                        "(table_name, path, segment_id, sae_version) VALUES (?, ?, ?, ?)",
                        [table_name, rel, segment_id, sae_version],
                    )
            if batch_keys:
                con.executemany(
                    "INSERT INTO batches VALUES (?, ?, ?)",
                    [(key, sae_version, segment_id) for key in batch_keys],
                )
            self._rebuild_views()
        self.publish()
        return True

    def commit_empty_segments(self, segment_ids: list[str], sae_version: str) -> int:
        """Record segments that hold nothing for `sae_version` (another model's, another
        layer's) as done, so they are not read again; one transaction and one publish
        for all, and no view changes (they add no files). Returns how many were new."""
        if not segment_ids:
            return 0
        with self.transaction() as con:
            done = self.committed_segments(sae_version)
            new = [s for s in dict.fromkeys(segment_ids) if s not in done]
            if new:
                con.executemany(
                    "INSERT INTO segments (segment_id, sae_version, tokens, feature_rows) "
                    "VALUES (?, ?, 0, 0)",
                    [[s, sae_version] for s in new],
                )
        if new:
            self.publish()
        return len(new)

    def lake_file_list(self) -> list[tuple]:
        """(table_name, path, segment_id, sae_version, folded_until) of every visible
        lake file."""
        return self.con.execute(
            "SELECT table_name, path, segment_id, sae_version, folded_until FROM lake_files "
            "ORDER BY path"
        ).fetchall()

    def replace_files(self, swaps: list[tuple]) -> None:
        """Swap lake files in one transaction. Each swap is (table_name, sae_version,
        old paths, new paths, folded_until): the new files (written by compaction)
        become visible and the old ones leave the views and are retired; an empty `new`
        is retention dropping them."""
        if not swaps:
            return
        with self.transaction() as con:
            for table_name, sae_version, old, new, folded_until in swaps:
                for rel in old:
                    con.execute("DELETE FROM lake_files WHERE path = ?", [rel])
                    con.execute("INSERT OR REPLACE INTO retired_files (path) VALUES (?)", [rel])
                if new:
                    con.executemany(
                        "INSERT OR REPLACE INTO lake_files "
                        "(table_name, path, segment_id, sae_version, folded_until) "
                        "VALUES (?, ?, 'compacted', ?, ?)",
                        [[table_name, rel, sae_version, folded_until] for rel in new],
                    )
            self._rebuild_views()
        self.publish()

    def take_retired(self, older_than) -> list[str]:
        """Forget and return the retired files retired before `older_than`: the caller
        deletes them from disk."""
        rows = self.con.execute(
            "DELETE FROM retired_files WHERE retired_at < ? RETURNING path", [older_than]
        ).fetchall()
        return [r[0] for r in rows]

    def _views_elsewhere(self) -> bool:
        """Whether the stored views name another lake location than this connection's
        (a catalog from before the record, with no lake files, reads as not)."""
        try:
            row = self.con.execute("SELECT value FROM catalog_meta WHERE key = 'lake'").fetchone()
        except duckdb.Error:  # a catalog from before catalog_meta
            return True
        return row is None or row[0] != self.lake.url("")

    def _rebuild_views(self, temp: bool = False) -> None:
        if not temp:
            self.con.execute(
                "INSERT OR REPLACE INTO catalog_meta VALUES ('lake', ?)", [self.lake.url("")]
            )
        files: dict[str, list[tuple]] = {name: [] for name in SCHEMAS}
        for table_name, path, folded_until in self.con.execute(
            "SELECT table_name, path, folded_until FROM lake_files ORDER BY path"
        ).fetchall():
            files[table_name].append((path, folded_until))
        for table_name in SCHEMAS:
            self._create_view(table_name, table_name, [p for p, _ in files[table_name]], temp=temp)
        # `feature_days` / `token_days`: every day's rollups once, for questions over whole
        # days: its day rows, plus the minute and hour rows not folded into them yet (a
        # day not closed yet, late rows of a closed one). A rollup file compaction folded
        # once its day had closed (folded_until at the day's end) holds only rows already
        # in day rows: it is left out, so whole days open only day files. The filter keeps
        # the view exact whatever files it names.
        for kind in ("feature", "token"):
            paths = [p for p, _ in files[f"{kind}_daily"]] + [
                p for p, until in files[f"{kind}_rollups"] if not _day_folded_file(p, until)
            ]
            self._create_view(
                f"{kind}_days",
                f"{kind}_daily",
                paths,
                "period_minutes = 1440 OR NOT day_folded",
                temp=temp,
            )

    def _create_view(
        self, view: str, table_name: str, paths: list[str], where: str = "", temp: bool = False
    ) -> None:
        if paths:
            files = ", ".join(_sql_str(self.lake.url(p)) for p in paths)
            types = ", ".join(f"'{c}': {HIVE_TYPES[c]}" for c in PARTITION_COLUMNS[table_name])
            # Files written before a column was added lack it: matched by name, their
            # rows read NULL there (by position, DuckDB refuses the mix).
            by_name = ", union_by_name = true" if table_name in GROWN_TABLES else ""
            body = (
                f"SELECT * FROM read_parquet([{files}], hive_partitioning = true, "
                f"hive_types = {{{types}}}{by_name})"
            )
            if where:
                body += f" WHERE {where}"
        else:
            body = _empty_view_sql(table_name)
        kind = "TEMP VIEW" if temp else "VIEW"
        self.con.execute(f"CREATE OR REPLACE {kind} {view} AS {body}")

    # ---- versions

    def register_sae(
        self,
        sae_version: str,
        path: Path,
        *,
        architecture: str,
        model: str,
        layer: int,
        d_in: int,
        d_sae: int,
        k: int | None,
        metrics: dict,
        model_version: str | None = None,
        site: str | None = None,
        parent_version: str | None = None,
        data_window: tuple | None = None,
        lineage: dict | None = None,
    ) -> None:
        """Record an SAE version with its evaluation and lineage: the version it was
        refreshed from, the time window of its training data and how it was trained."""
        if (
            parent_version is not None
            and not self.con.execute(
                "SELECT 1 FROM sae_versions WHERE sae_version = ?", [parent_version]
            ).fetchone()
        ):
            raise CatalogError(f"parent SAE version {parent_version!r} is not in the catalog")
        start, end = data_window or (None, None)
        path = self.home_relative(path)
        self.con.execute(
            "INSERT OR REPLACE INTO sae_versions (sae_version, path, architecture, model, "
            "layer, d_in, d_sae, k, metrics, parent_version, model_version, site, "
            "data_start, data_end, lineage, featurewatch_version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [sae_version, str(path), architecture, model, layer, d_in, d_sae, k]
            + [json.dumps(metrics), parent_version, model_version, site, start, end]
            + [json.dumps(lineage or {}, default=str), __version__],
        )

    def record_matches(self, parent_version: str, child_version: str, matches) -> None:
        """The matching of a child's latents to its parent's ((parent_id, child_id,
        cosine, correlation or None) each), replacing any recorded before."""
        self.con.execute("DELETE FROM sae_matches WHERE child_version = ?", [child_version])
        if matches:
            self.con.executemany(
                "INSERT INTO sae_matches VALUES (?, ?, ?, ?, ?, ?)",
                [[parent_version, child_version, *m] for m in matches],
            )

    def home_relative(self, path: str | Path) -> str:
        """A folder as the catalog records it: `home:<path in the home>` when it is in
        the home (the catalog's folder), so a home copied or mounted elsewhere still
        finds it; anything else (another folder, a hub id) as given. `recorded_path`
        turns it back."""
        if not Path(path).is_absolute():
            return str(path)
        absolute, home = Path(path).resolve(), self.path.parent.resolve()
        return f"{HOME_PREFIX}{absolute.relative_to(home)}" if absolute.is_relative_to(
            home) else str(path)  # fmt: skip

    def update_sae_metrics(self, sae_version: str, metrics: dict) -> None:
        """Merge new evaluation figures into a version's metrics."""
        row = self.con.execute(
            "SELECT metrics FROM sae_versions WHERE sae_version = ?", [sae_version]
        ).fetchone()
        if row is None:
            raise CatalogError(f"SAE version {sae_version!r} is not in the catalog")
        merged = {**json.loads(row[0] or "{}"), **metrics}
        self.con.execute(
            "UPDATE sae_versions SET metrics = ? WHERE sae_version = ?",
            [json.dumps(merged), sae_version],
        )

    def register_model_version(self, model: str, model_version: str, path: str) -> None:
        path = self.home_relative(path)
        self.con.execute(
            "INSERT OR IGNORE INTO model_versions (model, model_version, path, "
            "featurewatch_version) VALUES (?, ?, ?, ?)",
            [model, model_version, path, __version__],
        )

    # ---- queries

    def query(
        self,
        sql: str,
        params: list | dict | None = None,
        *,
        limit: int | None = None,
        max_bytes: int | None = None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> pa.Table:
        """Run one statement and return its result as an Arrow table (with `limit`, its
        first rows only, without reading the rest; with `max_bytes`, reading stops once
        the rows read pass it). On a sandboxed connection the text may hold several
        queries; the last one's result returns. `con`: a cursor of this catalog's
        connection to run on instead (the same database and sandbox)."""
        con = con or self.con
        try:
            if self.sandboxed:
                *before, last = self.check_analyst_sql(sql)
                for statement in before:
                    con.execute(statement)
                sql = last
            if limit is None:
                return fetch_arrow(con, sql, params)
            reader = con.sql(sql, params=params).to_arrow_reader(limit)
            batches, rows, size = [], 0, 0
            while rows < limit and (max_bytes is None or size <= max_bytes):
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
                rows, size = rows + batches[-1].num_rows, size + batches[-1].nbytes
            return pa.Table.from_batches(batches, schema=reader.schema).slice(0, limit)
        except duckdb.Error as err:
            raise CatalogError(str(err)) from None


HOME_PREFIX = "home:"


def recorded_path(home: Path, recorded: str) -> Path:
    """A folder the catalog recorded (Catalog.home_relative), on this node's home."""
    if recorded.startswith(HOME_PREFIX):
        return Path(home) / recorded.removeprefix(HOME_PREFIX)
    return Path(recorded)


def fetch_arrow(con: duckdb.DuckDBPyConnection, sql: str, params=None) -> pa.Table:
    """Execute with parameters and return Arrow (the copy DuckDB warns about is tiny here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return con.execute(sql, params or []).to_arrow_table()
