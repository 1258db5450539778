"""The feature registry: labels, descriptions, owners and tags per SAE version and
feature id, with the history of every change, in the catalog.

A dictionary of thousands of anonymous latents becomes useful once the few that matter
are named and grouped (`misalignment`, `sarcasm`, `insecure-code`...). Tags are what
scoring and the triggers select features by. Feature ids mean something only within
their SAE version, so every entry names both, and the version must be registered.
"""

from __future__ import annotations

import re

import pyarrow as pa

from featurewatch.errors import CatalogError, ConfigError
from featurewatch.storage.catalog import Catalog

TAG_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
MAX_TEXT = {"label": 200, "description": 4000, "owner": 200}


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag):
        raise CatalogError(
            f"tag {tag!r}: use 1-48 lower-case letters, digits, '-' or '_', starting with "
            "a letter or digit"
        )
    return tag


class FeatureRegistry:
    """Reads and writes the registry through an open catalog (read-write to change it)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.con = catalog.con

    def check_feature(self, sae_version: str, feature_id: int) -> None:
        row = self.con.execute(
            "SELECT d_sae FROM sae_versions WHERE sae_version = ?", [sae_version]
        ).fetchone()
        if row is None:
            raise CatalogError(f"SAE version {sae_version!r} is not in the catalog")
        if not 0 <= feature_id < row[0]:
            raise CatalogError(
                f"feature {feature_id} is not in SAE {sae_version!r} (ids 0..{row[0] - 1})"
            )

    def _record(self, sae_version, feature_id, actor, field, old, new) -> None:
        self.con.execute(
            "INSERT INTO feature_history (sae_version, feature_id, actor, field, old_value, "
            "new_value) VALUES (?, ?, ?, ?, ?, ?)",
            [sae_version, feature_id, actor, field, old, new],
        )

    def label(
        self,
        sae_version: str,
        feature_id: int,
        *,
        actor: str,
        label: str | None = None,
        description: str | None = None,
        owner: str | None = None,
    ) -> None:
        """Set any of label, description and owner (None leaves a field as it is)."""
        self.check_feature(sae_version, feature_id)
        changes = {"label": label, "description": description, "owner": owner}
        changes = {k: v.strip() for k, v in changes.items() if v is not None}
        if not changes:
            raise CatalogError("nothing to change: give a label, description or owner")
        for field, value in changes.items():
            if not value or len(value) > MAX_TEXT[field]:
                raise CatalogError(f"{field} must be 1-{MAX_TEXT[field]} characters")
        with self.catalog.transaction() as con:
            old = con.execute(
                "SELECT label, description, owner FROM feature_labels "
                "WHERE sae_version = ? AND feature_id = ?",
                [sae_version, feature_id],
            ).fetchone()
            before = dict(zip(("label", "description", "owner"), old or (None,) * 3, strict=True))
            after = {**before, **changes}
            con.execute(
                "INSERT OR REPLACE INTO feature_labels (sae_version, feature_id, label, "
                "description, owner, updated_at) VALUES (?, ?, ?, ?, ?, now())",
                [sae_version, feature_id, after["label"], after["description"], after["owner"]],
            )
            for field, value in changes.items():
                if before[field] != value:
                    self._record(sae_version, feature_id, actor, field, before[field], value)

    def tag(
        self,
        sae_version: str,
        feature_ids: list[int],
        tags: list[str],
        *,
        actor: str,
        remove: bool = False,
    ) -> int:
        """Add (or remove) tags on features; returns how many tags changed."""
        if not feature_ids or not tags:
            raise CatalogError("give at least one feature id and one tag")
        tags = [check_tag(t) for t in tags]
        for feature_id in feature_ids:
            self.check_feature(sae_version, feature_id)
        changed = 0
        with self.catalog.transaction() as con:
            for feature_id in feature_ids:
                for tag in tags:
                    key = [sae_version, feature_id, tag]
                    present = con.execute(
                        "SELECT 1 FROM feature_tags WHERE sae_version = ? AND feature_id = ? "
                        "AND tag = ?",
                        key,
                    ).fetchone()
                    if remove and present:
                        con.execute(
                            "DELETE FROM feature_tags WHERE sae_version = ? AND feature_id = ? "
                            "AND tag = ?",
                            key,
                        )
                        self._record(sae_version, feature_id, actor, "tag", tag, None)
                        changed += 1
                    elif not remove and not present:
                        con.execute("INSERT INTO feature_tags VALUES (?, ?, ?)", key)
                        self._record(sae_version, feature_id, actor, "tag", None, tag)
                        changed += 1
        return changed

    def inherit(self, child: str, parent: str, *, actor: str) -> int:
        """Copy the parent version's labels and tags to `child` (an SAE trained from the
        parent's weights, whose feature ids keep their meaning), recording each copy in
        the history. Runs inside the caller's transaction; returns the features copied."""
        con = self.con
        con.execute(
            "INSERT OR IGNORE INTO feature_labels (sae_version, feature_id, label, "
            "description, owner, updated_at) SELECT ?, feature_id, label, description, "
            "owner, now() FROM feature_labels WHERE sae_version = ?",
            [child, parent],
        )
        con.execute(
            "INSERT OR IGNORE INTO feature_tags SELECT ?, feature_id, tag FROM feature_tags "
            "WHERE sae_version = ?",
            [child, parent],
        )
        ids = [
            r[0]
            for r in con.execute(
                "SELECT feature_id FROM features WHERE sae_version = ? ORDER BY feature_id",
                [parent],
            ).fetchall()
        ]
        for feature_id in ids:
            self._record(child, feature_id, actor, "inherited", None, parent)
        return len(ids)

    def inherit_matched(self, child: str, parent: str, pairs: list, *, actor: str) -> int:
        """Copy labels and tags from each parent latent to the child latent matched to
        it: `pairs` of (parent id, child id, cosine, correlation or None), the pairs that
        hold (a parent latent without one passes nothing on). Each copy is recorded in
        the history, naming the parent latent and the match. Runs inside the caller's
        transaction; returns the features copied."""
        con, copied = self.con, 0
        for parent_id, child_id, cosine, correlation in pairs:
            labelled = con.execute(
                "INSERT OR IGNORE INTO feature_labels (sae_version, feature_id, label, "
                "description, owner, updated_at) SELECT ?, ?, label, description, owner, "
                "now() FROM feature_labels WHERE sae_version = ? AND feature_id = ? "
                "RETURNING feature_id",
                [child, child_id, parent, parent_id],
            ).fetchall()
            tagged = con.execute(
                "INSERT OR IGNORE INTO feature_tags SELECT ?, ?, tag FROM feature_tags "
                "WHERE sae_version = ? AND feature_id = ? RETURNING tag",
                [child, child_id, parent, parent_id],
            ).fetchall()
            if labelled or tagged:
                match = f"cosine {cosine:.3f}" + (
                    "" if correlation is None else f", correlation {correlation:.3f}"
                )
                self._record(
                    child, child_id, actor, "inherited", None, f"{parent}#{parent_id} ({match})"
                )
                copied += 1
        return copied

    def entries(self, sae_version: str | None = None, tag: str | None = None) -> pa.Table:
        """Registered features, optionally of one SAE version and/or with one tag."""
        sql = "SELECT * FROM features WHERE true"
        params: list = []
        if sae_version is not None:
            sql += " AND sae_version = ?"
            params.append(sae_version)
        if tag is not None:
            sql += " AND list_contains(tags, ?)"
            params.append(check_tag(tag))
        return self.catalog.query(sql + " ORDER BY sae_version, feature_id", params)

    def ids_with_tag(self, sae_version: str, tag: str) -> list[int]:
        """The feature ids of one SAE version that carry `tag` (what scoring selects)."""
        rows = self.entries(sae_version, tag).column("feature_id").to_pylist()
        return sorted(rows)

    def tagged_ids(self, sae_version: str) -> list[int]:
        """The feature ids of one SAE version that carry any tag."""
        rows = self.con.execute(
            "SELECT DISTINCT feature_id FROM feature_tags WHERE sae_version = ? ORDER BY 1",
            [sae_version],
        ).fetchall()
        return [r[0] for r in rows]

    def group_ids(
        self, sae_version: str, tag: str | None = None, features: list[int] | None = None
    ) -> list[int]:
        """The feature ids a score or a policy watches: a tag group, or ids given by hand
        (each checked against the SAE's width)."""
        if (tag is None) == (not features):
            raise ConfigError("give a tag or feature ids (not both)")
        if features:
            for feature_id in features:
                self.check_feature(sae_version, feature_id)
            return sorted(set(features))
        ids = self.ids_with_tag(sae_version, tag)
        if not ids:
            raise ConfigError(
                f"no feature of SAE {sae_version} is tagged {tag!r}: tag some first "
                "(featurewatch features discover ... --tag-top N --tag TAG)"
            )
        return ids

    def show(self, sae_version: str, feature_id: int) -> dict:
        """Everything known about one feature: its entry and its history, oldest first."""
        self.check_feature(sae_version, feature_id)
        entry = self.catalog.query(
            "SELECT * FROM features WHERE sae_version = ? AND feature_id = ?",
            [sae_version, feature_id],
        ).to_pylist()
        history = self.catalog.query(
            "SELECT changed_at, actor, field, old_value, new_value FROM feature_history "
            "WHERE sae_version = ? AND feature_id = ? ORDER BY changed_at, rowid",
            [sae_version, feature_id],
        ).to_pylist()
        base = {
            "sae_version": sae_version,
            "feature_id": feature_id,
            "label": None,
            "description": None,
            "owner": None,
            "tags": [],
            "updated_at": None,
        }
        return {**base, **(entry[0] if entry else {}), "history": history}
