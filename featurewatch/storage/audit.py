"""The controller's audit log: every policy evaluation and every decision, in DuckDB.

Its own file (`<home>/audit.duckdb`), not the catalog: the pipeline holds the catalog
read-write, and the controller only reads the catalog's published copy. Connections are
short (open, write, close), so `featurewatch approve` and `featurewatch audit` can open
the file between two controller ticks; a connection that finds the file locked retries
for a few seconds.

A decision is one firing of a policy: its status goes `pending` (waiting for
`featurewatch approve ID`) -> `approved` -> `running` -> `done` or `failed`, or is
`dry_run`. A decision still `running` when a controller starts was cut off by a crash and
becomes `interrupted`: actions run at most once (a second fine-tune is worse than none).
The cooldown is read from here, so a restarted controller does not fire again what it
already fired.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import fetch_arrow

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS policy_evaluations (
    evaluated_at TIMESTAMPTZ NOT NULL,
    policy_id    VARCHAR NOT NULL,
    sae_version  VARCHAR,
    statistic    VARCHAR NOT NULL,
    threshold    DOUBLE NOT NULL,
    window_values JSON NOT NULL,   -- the statistic per window, newest first (null: no data)
    met          BOOLEAN NOT NULL,
    outcome      VARCHAR NOT NULL, -- not_met, fired, cooldown, no_data, error
    detail       VARCHAR
);
CREATE TABLE IF NOT EXISTS policy_decisions (
    decision_id  VARCHAR PRIMARY KEY,
    policy_id    VARCHAR NOT NULL,
    decided_at   TIMESTAMPTZ NOT NULL,
    status       VARCHAR NOT NULL, -- pending, approved, running, done, failed, dry_run,
                                   -- interrupted
    actor        VARCHAR NOT NULL, -- who decided: the controller, or who approved
    reason       VARCHAR NOT NULL, -- why, in words, with the numbers
    numbers      JSON NOT NULL,    -- the evaluation behind it
    actions      JSON NOT NULL,    -- the policy's actions as configured
    updated_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS action_results (
    decision_id  VARCHAR NOT NULL,
    action_index INTEGER NOT NULL,
    action_type  VARCHAR NOT NULL,
    status       VARCHAR NOT NULL, -- done, failed, skipped
    detail       VARCHAR NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL
);
"""

DECISION_STATES = ("pending", "approved", "running", "done", "failed", "dry_run", "interrupted")
LOCK_WAIT_S = 10.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """The audit file; every method opens, works and closes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(_SCHEMA_SQL)

    @contextmanager
    def _connect(self, read_only: bool = False):
        if read_only and not self.path.exists():
            raise CatalogError(f"no audit log at {self.path}: the controller has not run")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as err:
                # Another process holds the file for a moment (a controller tick).
                if "lock" not in str(err).lower() or time.monotonic() > deadline:
                    raise CatalogError(f"cannot open audit log {self.path}: {err}") from None
                time.sleep(0.1)
        try:
            yield con
        finally:
            con.close()

    def record_evaluation(
        self,
        policy_id: str,
        *,
        sae_version: str | None,
        statistic: str,
        threshold: float,
        values: list[float | None],
        met: bool,
        outcome: str,
        detail: str | None = None,
        at: datetime | None = None,
    ) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT INTO policy_evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    at or utc_now(),
                    policy_id,
                    sae_version,
                    statistic,
                    threshold,
                    json.dumps(values),
                    met,
                    outcome,
                    detail,
                ],
            )

    def last_fired(self, policy_id: str) -> datetime | None:
        """When the policy last fired (any decision, whatever became of it)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT max(decided_at) FROM policy_decisions WHERE policy_id = ?", [policy_id]
            ).fetchone()
        return row[0]

    def new_decision(
        self,
        policy_id: str,
        *,
        status: str,
        reason: str,
        numbers: dict,
        actions: list[dict],
        at: datetime | None = None,
    ) -> str:
        decision_id = f"{policy_id}-{uuid.uuid4().hex[:8]}"
        at = at or utc_now()
        with self._connect() as con:
            con.execute(
                "INSERT INTO policy_decisions VALUES (?, ?, ?, ?, 'controller', ?, ?, ?, ?)",
                [
                    decision_id,
                    policy_id,
                    at,
                    status,
                    reason,
                    json.dumps(numbers),
                    json.dumps(actions),
                    at,
                ],
            )
        return decision_id

    def decision(self, decision_id: str) -> dict:
        with self._connect(read_only=True) as con:
            cursor = con.execute(
                "SELECT * FROM policy_decisions WHERE decision_id = ?", [decision_id]
            )
            row = cursor.fetchone()
            if row is None:
                raise CatalogError(f"no decision {decision_id!r} in the audit log")
            names = [d[0] for d in cursor.description]
        found = dict(zip(names, row, strict=True))
        for key in ("numbers", "actions"):
            found[key] = json.loads(found[key])
        return found

    def set_status(self, decision_id: str, status: str, *, actor: str | None = None) -> None:
        if status not in DECISION_STATES:
            raise CatalogError(f"unknown decision status {status!r}")
        with self._connect() as con:
            con.execute(
                "UPDATE policy_decisions SET status = ?, actor = coalesce(?, actor), "
                "updated_at = ? WHERE decision_id = ?",
                [status, actor, utc_now(), decision_id],
            )

    def approve(self, decision_id: str, actor: str) -> None:
        """Mark a pending decision approved; the controller runs it on its next tick.
        The status is checked in the same UPDATE, so a late second approval never
        moves a decision the controller already took back to `approved`."""
        status = self.decision(decision_id)["status"]
        if status != "pending":
            raise CatalogError(f"decision {decision_id} is {status}, not pending")
        with self._connect() as con:
            changed = con.execute(
                "UPDATE policy_decisions SET status = 'approved', actor = ?, updated_at = ? "
                "WHERE decision_id = ? AND status = 'pending' RETURNING decision_id",
                [actor, utc_now(), decision_id],
            ).fetchall()
        if not changed:
            now = self.decision(decision_id)["status"]
            raise CatalogError(f"decision {decision_id} is {now}, not pending")

    def decisions_with_status(self, status: str) -> list[str]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT decision_id FROM policy_decisions WHERE status = ? ORDER BY decided_at",
                [status],
            ).fetchall()
        return [r[0] for r in rows]

    def record_action(
        self, decision_id: str, index: int, action_type: str, status: str, detail: str
    ) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT INTO action_results VALUES (?, ?, ?, ?, ?, ?)",
                [decision_id, index, action_type, status, detail, utc_now()],
            )

    def table(self, name: str, *, policy_id: str | None = None, limit: int = 100):
        """Newest rows of one audit table as a pyarrow Table (for the CLI)."""
        order = {
            "policy_evaluations": "evaluated_at",
            "policy_decisions": "decided_at",
            "action_results": "finished_at",
        }
        if name not in order:
            raise CatalogError(f"unknown audit table {name!r}: use {', '.join(order)}")
        where, params = "", []
        if policy_id is not None:
            params = [policy_id]
            where = "WHERE policy_id = ?"
            if name == "action_results":
                where = (
                    "WHERE decision_id IN "
                    "(SELECT decision_id FROM policy_decisions WHERE policy_id = ?)"
                )
        sql = f"SELECT * FROM {name} {where} ORDER BY {order[name]} DESC LIMIT {int(limit)}"
        with self._connect(read_only=True) as con:
            return fetch_arrow(con, sql, params)
