"""What the dashboard's pages show, as plain Python values, read from the catalog's
readers' copy and the audit log. The report (`featurewatch report`) reads the same."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from featurewatch.config import FeaturewatchConfig, parse_duration
from featurewatch.errors import CatalogError
from featurewatch.storage.audit import AuditLog
from featurewatch.storage.catalog import Catalog, readers_path
from featurewatch.storage.fleet import fleet_overview
from featurewatch.storage.registry import FeatureRegistry

SPARK_POINTS = 24
SQL_ROW_CAP = 1000
SQL_BYTE_CAP = 8 * 2**20  # and at most this much of them (a few wide rows can be large)
# A console query runs on a connection of its own, stopped after this long.
SQL_TIMEOUT_S = 15.0

# Rows of one side ('b' baseline, 'w' window) of the rollups, filtered by SAE version
# and optionally by model and model version ($model / $mv NULL: all).
_SIDES = """
SELECT 'b' AS side, * FROM {kind}_totals($base_start, $base_end)
UNION ALL BY NAME
SELECT 'w' AS side, * FROM {kind}_totals($win_start, $win_end)
"""
# The same from the raw rows (one row per token or firing), for windows that do not
# fall on whole minutes.
_SIDES_EXACT = """
SELECT CASE WHEN ts < $base_end THEN 'b' WHEN ts >= $win_start THEN 'w' END AS side,
       model, model_version,
       sae_version, {columns}
FROM {table} WHERE ts >= $base_start AND ts < $win_end
"""
_EXACT = {
    "token": {"table": "tokens", "columns": "1 AS tokens"},
    "feature": {"table": "feature_acts", "columns": "feature_id, 1 AS fired"},
}
_FILTER = """sae_version = $sae AND ($model IS NULL OR model = $model)
      AND ($mv IS NULL OR model_version = $mv)"""

# Top movers with the dashboard's filters (rate_change's statistics, same macros).
MOVERS_SQL = """
WITH t AS (
    SELECT (sum(tokens) FILTER (WHERE side = 'b'))::BIGINT AS base_tokens,
           (sum(tokens) FILTER (WHERE side = 'w'))::BIGINT AS win_tokens
    FROM ({token_sides}) WHERE {where}
), tagged AS (
    SELECT feature_id FROM features WHERE sae_version = $sae AND list_contains(tags, $tag)
), f AS (
    SELECT feature_id,
           coalesce(sum(fired) FILTER (WHERE side = 'b'), 0)::BIGINT AS base_fired,
           coalesce(sum(fired) FILTER (WHERE side = 'w'), 0)::BIGINT AS win_fired
    FROM ({feature_sides}) WHERE {where}
      AND ($tag IS NULL OR feature_id IN (SELECT feature_id FROM tagged))
    GROUP BY feature_id
)
SELECT f.feature_id, base_fired, base_tokens, win_fired, win_tokens,
       base_fired / base_tokens AS base_rate, win_fired / win_tokens AS win_rate,
       smoothed_ratio(base_fired, base_tokens, win_fired, win_tokens) AS rate_ratio,
       two_proportion_z(base_fired, base_tokens, win_fired, win_tokens) AS z,
       r.label, coalesce(r.tags, []) AS tags
FROM f CROSS JOIN t
LEFT JOIN (SELECT * FROM features WHERE sae_version = $sae) r USING (feature_id)
WHERE base_tokens > 0 AND win_tokens > 0
ORDER BY abs(z) DESC NULLS LAST, f.feature_id
LIMIT $limit
"""

# Each listed feature's rate per bucket of $width from $start to $end (0 where it did
# not fire, no point where no tokens were seen), with the same filters.
SERIES_SQL = f"""
WITH t AS (
    SELECT time_bucket($width, period_start, $start) AS bucket, sum(tokens) AS tokens
    FROM token_rows($start, $end) WHERE {_FILTER} GROUP BY ALL
), f AS (
    SELECT feature_id, time_bucket($width, period_start, $start) AS bucket,
           sum(fired) AS fired
    FROM feature_rows($start, $end)
    WHERE {_FILTER} AND list_contains($ids, feature_id) GROUP BY ALL
)
SELECT ids.feature_id, t.bucket, t.tokens, coalesce(f.fired, 0) AS fired,
       coalesce(f.fired, 0) / t.tokens AS rate
FROM (SELECT unnest($ids) AS feature_id) ids CROSS JOIN t
LEFT JOIN f USING (feature_id, bucket)
ORDER BY ids.feature_id, t.bucket
"""


def movers_sql(exact: bool) -> str:
    if exact:
        sides = {k: _SIDES_EXACT.format(**v) for k, v in _EXACT.items()}
    else:
        sides = {k: _SIDES.format(kind=k) for k in _EXACT}
    return MOVERS_SQL.format(
        token_sides=sides["token"], feature_sides=sides["feature"], where=_FILTER
    )


def parse_window(text: str, name: str) -> timedelta:
    try:
        span = parse_duration(text)
    except ValueError as err:
        raise CatalogError(f"{name} {err}") from None
    if span > timedelta(days=366):
        raise CatalogError(f"{name} must be at most 366 days, not {text!r}")
    return span


def parse_time(text: str, name: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CatalogError(
            f"{name} must be an ISO time like 2026-11-28T10:00:00Z, not {text!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class DashboardData:
    """One analyst connection to the readers' copy, reopened when the pipeline publishes
    a new copy. The pages' calls are serialised on it: DuckDB shares one database per
    file within a process, and the sandbox's locked settings forbid a second connection
    beside it. A SQL-console query runs on a cursor of it (DuckDB's own connection to the
    same database: its own state and interrupt), closed after the query, so a slow or
    odd query never holds up a page or leaves anything behind."""

    def __init__(self, cfg: FeaturewatchConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._opened: tuple | None = None
        # Console queries running per catalog; a replaced catalog with queries still
        # running is closed when the last one ends (closing it would end them).
        self._running: dict[int, int] = {}
        self._retired: dict[int, Catalog] = {}
        # One process may not open the audit file read-only and read-write at once.
        self._audit_lock = threading.Lock()

    def _published(self) -> tuple | None:
        for path in (readers_path(self.cfg.catalog_path), self.cfg.catalog_path):
            try:
                st = path.stat()
            except OSError:
                continue
            return (str(path), st.st_ino, st.st_mtime_ns)
        return None

    @contextmanager
    def catalog(self):
        with self._lock:
            current = self._published()
            if current is None:
                raise CatalogError(
                    f"no catalog at {self.cfg.catalog_path}: run the pipeline (or the demo)"
                )
            if current != self._opened:
                self.close_unlocked()
                self._catalog = Catalog.for_analyst(self.cfg.catalog_path, self.cfg.lake_location)
                self._opened = current
            yield self._catalog

    def close_unlocked(self) -> None:
        if self._catalog is not None:
            if self._running.get(id(self._catalog)):
                self._retired[id(self._catalog)] = self._catalog
            else:
                self._catalog.close()
        self._catalog, self._opened = None, None

    def close(self) -> None:
        with self._lock:
            self.close_unlocked()

    # ---- pages

    def overview(self) -> dict:
        with self.catalog() as catalog:
            return fleet_overview(self.cfg, catalog)

    def choices(self) -> dict:
        """What the filters can take: SAE versions (newest data first), models, model
        versions and tags."""
        with self.catalog() as catalog:

            def column(sql):
                return [r[0] for r in catalog.con.execute(sql).fetchall()]

            return {
                "sae_versions": column(
                    "SELECT sae_version FROM token_rollups GROUP BY ALL "
                    "ORDER BY max(period_start) DESC, sae_version"
                ),
                "models": column("SELECT DISTINCT model FROM token_rollups ORDER BY 1"),
                "model_versions": column(
                    "SELECT DISTINCT model_version FROM token_rollups ORDER BY 1"
                ),
                "tags": column("SELECT DISTINCT tag FROM feature_tags ORDER BY 1"),
            }

    def data_end(self, catalog: Catalog, sae_version: str) -> datetime:
        """The end of the newest minute with data for `sae_version`: windows end here,
        so a quiet lake still shows its last hour instead of an empty page."""
        row = catalog.con.execute(
            "SELECT max(period_start + to_minutes(period_minutes)) FROM token_rollups "
            "WHERE sae_version = ?",
            [sae_version],
        ).fetchone()  # a compacted hour row ends an hour after it starts
        if row is None or row[0] is None:
            raise CatalogError(f"SAE version {sae_version!r} has no data in the lake")
        return row[0].astimezone(UTC)

    def drift(
        self,
        sae_version: str | None = None,
        *,
        model: str | None = None,
        model_version: str | None = None,
        tag: str | None = None,
        window: str = "1h",
        baseline: str = "24h",
        limit: int = 20,
        end: str | None = None,
        exact: bool = False,
    ) -> dict:
        """Top movers of `window` (ending at `end`, an ISO time, else at the newest data)
        against the `baseline` just before it, with each mover's rate over both as a
        sparkline series. Over the per-minute rollups, or with `exact` the raw rows."""
        win, base = parse_window(window, "window"), parse_window(baseline, "baseline")
        until = parse_time(end, "end") if end else None
        if not 1 <= limit <= 200:
            raise CatalogError(f"limit must be 1-200, not {limit}")
        sae_version = sae_version or (self.choices()["sae_versions"] or [None])[0]
        if sae_version is None:
            raise CatalogError("the lake holds no encoded tokens yet: run the pipeline first")
        with self.catalog() as catalog:
            end = until or self.data_end(catalog, sae_version)
            try:
                start = end - win - base
            except OverflowError:
                raise CatalogError(
                    f"end {end:%Y-%m-%d} minus the windows is before year 1"
                ) from None
            params = {
                "base_start": start,
                "base_end": end - win,
                "win_start": end - win,
                "win_end": end,
                "sae": sae_version,
                "model": model or None,
                "mv": model_version or None,
                "tag": tag or None,
                "limit": limit,
            }
            movers = catalog.con.execute(movers_sql(exact), params).fetchall()
            names = [d[0] for d in catalog.con.description]
            movers = [dict(zip(names, row, strict=True)) for row in movers]
            series = self._series(
                catalog, sae_version, [m["feature_id"] for m in movers], start, end,
                (end - start) / SPARK_POINTS, model, model_version,
            )  # fmt: skip
        for mover in movers:
            mover["series"] = series.get(mover["feature_id"], {"bucket": [], "rate": []})
        return {
            "sae_version": sae_version,
            "model": model,
            "model_version": model_version,
            "tag": tag,
            "window": window,
            "baseline": baseline,
            "exact": exact,
            "baseline_start": start,
            "window_start": end - win,
            "end": end,
            "movers": movers,
        }

    def _series(self, catalog, sae_version, ids, start, end, width, model=None, mv=None):
        if not ids:
            return {}
        rows = catalog.con.execute(
            SERIES_SQL,
            {
                "sae": sae_version,
                "model": model or None,
                "mv": mv or None,
                "ids": ids,
                "start": start,
                "end": end,
                "width": width,
            },  # fmt: skip
        ).fetchall()
        series: dict[int, dict] = {}
        for feature_id, bucket, tokens, fired, rate in rows:
            s = series.setdefault(feature_id, {"bucket": [], "tokens": [], "fired": [], "rate": []})
            s["bucket"].append(bucket)
            s["tokens"].append(int(tokens))
            s["fired"].append(int(fired))
            s["rate"].append(float(rate))
        return series

    def feature(
        self, sae_version: str, feature_id: int, *, span: str = "24h", examples: int = 10
    ) -> dict:
        """One feature: its registry entry and history, its rate per bucket over `span`
        up to the newest data, and the tokens where it fired hardest, with context."""
        length = parse_window(span, "span")
        with self.catalog() as catalog:
            entry = FeatureRegistry(catalog).show(sae_version, feature_id)
            end = self.data_end(catalog, sae_version)
            width = max(length / 48, timedelta(minutes=1))
            trend = self._series(catalog, sae_version, [feature_id], end - length, end, width)
            top = catalog.con.execute(
                "SELECT * FROM top_examples(?, ?, ?, 8)", [sae_version, feature_id, examples]
            ).fetchall()
            names = [d[0] for d in catalog.con.description]
        return {
            **entry,
            "span": span,
            "end": end,
            "trend": trend.get(feature_id, {"bucket": [], "tokens": [], "fired": [], "rate": []}),
            "examples": [dict(zip(names, row, strict=True)) for row in top],
        }

    def timeline(self, limit: int = 200, everything: bool = False) -> dict:
        """The controller's audit: evaluations (all, or only those that did not come out
        `not_met`), decisions and action results, newest first; pending decisions apart."""
        path = self.cfg.audit_path
        if not path.exists():
            return {"events": [], "pending": [], "audit": False}
        with self._audit_lock:
            audit = AuditLog(path)
            evaluations = audit.table("policy_evaluations", limit=limit).to_pylist()
            decisions = audit.table("policy_decisions", limit=limit).to_pylist()
            results = audit.table("action_results", limit=limit).to_pylist()
        events = []
        for row in evaluations:
            if everything or row["outcome"] != "not_met":
                events.append(
                    {"at": row["evaluated_at"], "kind": "evaluation", "policy_id": row["policy_id"],
                     "status": row["outcome"], "detail": row["detail"] or "",
                     "values": row["window_values"], "id": None}
                )  # fmt: skip
        for row in decisions:
            events.append(
                {"at": row["decided_at"], "kind": "decision", "policy_id": row["policy_id"],
                 "status": row["status"], "detail": row["reason"], "values": None,
                 "id": row["decision_id"]}
            )  # fmt: skip
        for row in results:
            events.append(
                {"at": row["finished_at"], "kind": f"action: {row['action_type']}",
                 "policy_id": None, "status": row["status"], "detail": row["detail"],
                 "values": None, "id": row["decision_id"]}
            )  # fmt: skip
        events.sort(key=lambda e: e["at"], reverse=True)
        pending = [d for d in decisions if d["status"] == "pending"]
        return {"events": events[:limit], "pending": pending, "audit": True}

    def approve(self, decision_id: str, actor: str) -> dict:
        with self._audit_lock:
            audit = AuditLog(self.cfg.audit_path)
            audit.approve(decision_id, actor=actor)
            return audit.decision(decision_id)

    def sql(self, text: str) -> dict:
        """A query in the analyst sandbox, on a cursor of its own; at most SQL_ROW_CAP
        rows and about SQL_BYTE_CAP bytes come back, and a query still running after
        SQL_TIMEOUT_S is interrupted."""
        if not text.strip():
            raise CatalogError("empty query")
        with self.catalog() as catalog:
            con = catalog.con.cursor()
            self._running[id(catalog)] = self._running.get(id(catalog), 0) + 1
        timer = threading.Timer(SQL_TIMEOUT_S, con.interrupt)
        timer.start()
        try:
            # Refuses anything but queries; reads one row past the cap, never more.
            shown = catalog.query(text, limit=SQL_ROW_CAP + 1, max_bytes=SQL_BYTE_CAP, con=con)
        except CatalogError as err:
            if timer.finished.is_set():
                raise CatalogError(f"query stopped after {SQL_TIMEOUT_S:.0f} s") from None
            raise err
        finally:
            timer.cancel()
            con.close()
            with self._lock:
                self._running[id(catalog)] -= 1
                if not self._running[id(catalog)]:
                    del self._running[id(catalog)]
                    retired = self._retired.pop(id(catalog), None)
                    if retired is not None:
                        retired.close()
        truncated = shown.num_rows > SQL_ROW_CAP or shown.nbytes > SQL_BYTE_CAP
        shown = shown.slice(0, SQL_ROW_CAP)
        while shown.num_rows and shown.nbytes > SQL_BYTE_CAP:
            shown = shown.slice(0, shown.num_rows // 2)
        return {
            "columns": shown.column_names,
            "rows": [list(r.values()) for r in shown.to_pylist()],
            "shown_rows": shown.num_rows,
            "truncated": truncated,
        }
