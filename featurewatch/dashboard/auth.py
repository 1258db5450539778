"""Login tokens for the dashboard, each with a role.

Tokens live hashed (SHA-256) in `<home>/dashboard_tokens.json`; the token itself is
shown once, when it is made (`featurewatch token create`). A `viewer` may read every
page; an `operator` may also edit feature labels and tags and approve actions. The
platform's own bearer token (the collector token) is accepted as an operator named
`platform`, so a fresh home can be opened before anyone made tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from featurewatch.config import check_token
from featurewatch.errors import ConfigError

ROLES = ("viewer", "operator")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    @property
    def can_operate(self) -> bool:
        return self.role == "operator"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: Path, platform_token: str | None = None):
        self.path = Path(path)
        if platform_token is not None:
            try:
                check_token(platform_token, "the platform token (collector.token)")
            except ValueError as err:
                raise ConfigError(f"{err}: it would be an operator login") from None
        self.platform_token = platform_token

    def _load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            entries = json.loads(self.path.read_text())
        except ValueError as err:
            raise ConfigError(f"{self.path} is not valid JSON: {err}") from None
        if not isinstance(entries, list):
            raise ConfigError(f"{self.path} must hold a list of tokens")
        return entries

    def _save(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=2)
        os.replace(tmp, self.path)

    def create(self, name: str, role: str) -> str:
        """A new token for `name` with `role`; returns the token (stored only hashed)."""
        if not _NAME.match(name):
            raise ConfigError(
                f"token name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', "
                "starting with a letter or digit"
            )
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        entries = self._load()
        if name == "platform" or any(e["name"] == name for e in entries):
            raise ConfigError(f"a token named {name!r} exists: revoke it first")
        token = secrets.token_urlsafe(32)
        entries.append(
            {
                "name": name,
                "role": role,
                "sha256": _digest(token),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        self._save(entries)
        return token

    def revoke(self, name: str) -> None:
        entries = self._load()
        kept = [e for e in entries if e["name"] != name]
        if len(kept) == len(entries):
            raise ConfigError(f"no token named {name!r}")
        self._save(kept)

    def entries(self) -> list[dict]:
        return [{k: e[k] for k in ("name", "role", "created_at")} for e in self._load()]

    def identify(self, token: str | None) -> Identity | None:
        """Who holds `token`, or None. Compared in constant time."""
        if not token:
            return None
        # compare_digest takes str only when ASCII: compare the bytes.
        if self.platform_token and hmac.compare_digest(
            token.encode(), self.platform_token.encode()
        ):
            return Identity("platform", "operator")
        digest = _digest(token)
        for entry in self._load():
            if hmac.compare_digest(digest, entry.get("sha256", "")):
                return Identity(entry["name"], entry["role"])
        return None
