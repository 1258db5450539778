"""The record of the deployed model server application (`config.deployed_app_file`).

Written at each deployment with what the application was deployed with (its config,
the collector addresses, the steering and the canary), so another process can redeploy
the same application with one thing changed (`featurewatch steer`, the controller), and
read by the fleet overview from any machine that sees the home. The collector token is
never stored here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from featurewatch.errors import ConfigError


def write_deployed(path: Path, record: dict) -> None:
    """Replace the record whole (a reader never sees half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def read_deployed(path: Path) -> dict | None:
    """The last deployment's record; None when nothing was deployed from this home.
    ConfigError names the file when it is unreadable or not a deployment record."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"deployed application record {path} is unreadable: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"deployed application record {path} has no 'config' mapping")
    return record
