"""Heartbeats: the live figures of each long-lived part, as files in the home.

A model replica or a collector writes `<home>/status/<kind>-<name>.json` every few
seconds (renamed into place, so a reader sees a whole file): its identity, its
counters, and their rates over the last period. `featurewatch status` and the dashboard
read these without joining the Ray cluster; a heartbeat older than `STALE_S` is shown
as gone. On a fleet the home is shared storage, like the lake.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

STALE_S = 30.0
_NAME = re.compile(r"[^A-Za-z0-9._-]")


class Heartbeat:
    """Writes one part's heartbeat; rates are per second since the previous beat."""

    def __init__(self, folder: Path, kind: str, name: str):
        self.path = Path(folder) / f"{kind}-{_NAME.sub('_', name)}.json"
        self.kind, self.name = kind, name
        self._last: tuple[float, dict] | None = None

    def beat(self, fields: dict, counters: dict[str, int]) -> dict:
        now = time.time()
        rates = {}
        if self._last is not None and now > self._last[0]:
            then, before = self._last
            rates = {k: (v - before.get(k, 0)) / (now - then) for k, v in counters.items()}
        self._last = (now, dict(counters))
        record = {
            "kind": self.kind,
            "name": self.name,
            "updated_at": now,
            **fields,
            "counters": counters,
            "rates": rates,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)
        return record


def read_heartbeats(folder: Path, kind: str, now: float | None = None) -> list[dict]:
    """Every heartbeat of one kind, each with `age_s` and `live` (fresher than STALE_S).
    Unreadable files are skipped: a heartbeat is advice, not a record."""
    now = time.time() if now is None else now
    found = []
    folder = Path(folder)
    for path in sorted(folder.glob(f"{kind}-*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            age = now - float(record["updated_at"])
            if not (isinstance(record["counters"], dict) and isinstance(record["rates"], dict)):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append({**record, "age_s": round(age, 1), "live": age <= STALE_S})
    return found
