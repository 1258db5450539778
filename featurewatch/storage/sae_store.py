"""A shared store of SAE folders (SAELens layout) on any pyarrow filesystem.

On one machine SAEs live in <home>/saes and the catalog records their folders. Past one
machine the node that trains an SAE is not the node that encodes with it or steers by
it, so with `sae.store_uri` set every trained SAE is also published to the store
(`<store>/<version>/cfg.json`, `sae_weights.safetensors`, ...), and a node that lacks a
version's folder fetches it into its own <home>/saes first.

A version is complete in the store once its `cfg.json` is there: publishing uploads
`cfg.json` last, and fetching downloads into a temporary folder renamed into place, so
neither side ever loads half a dictionary.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError, SAEFormatError
from featurewatch.storage.catalog import recorded_path
from featurewatch.storage.lake_store import LakeStore

MARKER = "cfg.json"  # written last: its presence means the version is whole


class SAEStore:
    def __init__(self, uri: str, cache_dir: Path):
        self.uri = uri
        self.cache_dir = Path(cache_dir)

    @cached_property
    def store(self) -> LakeStore:
        # The same filesystem handling as the lake's, made on first use: looking up a
        # registered SAE that this node has already costs no object-store client.
        return LakeStore(self.uri)

    def _files(self, version: str) -> list[pafs.FileInfo]:
        base = self.store.path(version)
        try:
            infos = self.store.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        except FileNotFoundError:
            return []
        return [i for i in infos if i.type == pafs.FileType.File]

    def has(self, version: str) -> bool:
        """Whether the store holds the version whole (SAEFormatError if it cannot tell)."""
        try:
            return self.store.exists(f"{version}/{MARKER}")
        except (OSError, pa.ArrowException) as err:
            raise SAEFormatError(f"cannot read the SAE store {self.uri}: {err}") from None

    def publish(self, folder: Path, version: str) -> None:
        """Upload every file of `folder` under `version`, the marker last."""
        folder = Path(folder)
        if not (folder / MARKER).is_file():
            raise SAEFormatError(f"{folder} is not an SAE folder (no {MARKER})")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == MARKER and p.parent == folder)
        try:
            for path in files:
                rel = path.relative_to(folder).as_posix()
                with self.store.writing(f"{version}/{rel}") as where:
                    pafs.copy_files(
                        str(path), where, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.store.fs,
                    )  # fmt: skip
        except (OSError, pa.ArrowException) as err:
            raise SAEFormatError(f"cannot publish SAE {version!r} to {self.uri}: {err}") from None

    def fetch(self, version: str) -> Path:
        """The version's folder under the cache, downloaded when missing there."""
        target = self.cache_dir / version
        if (target / MARKER).is_file():
            return target
        tmp = self.cache_dir / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
        base = self.store.path(version)
        try:
            if not self.has(version):
                raise SAEFormatError(f"SAE version {version!r} is not in the SAE store {self.uri}")
            for info in self._files(version):
                local = tmp / os.path.relpath(info.path, base)
                local.parent.mkdir(parents=True, exist_ok=True)
                with self.store.fs.open_input_stream(info.path) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            try:
                tmp.rename(target)
            except OSError:  # another process fetched it first
                if not (target / MARKER).is_file():
                    raise
        except (OSError, pa.ArrowException) as err:
            raise SAEFormatError(f"cannot fetch SAE {version!r} from {self.uri}: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def sae_folder(store: SAEStore | None, version: str | None, recorded: Path) -> Path:
    """Where to load a registered SAE from on this node: the folder the catalog recorded
    if this node has it, else the version fetched from the store."""
    recorded = Path(recorded)
    if (recorded / MARKER).is_file() or store is None or version is None:
        return recorded
    return store.fetch(version)


@dataclass
class SAEChoice:
    version: str
    path: Path
    layer: int
    site: str


def sae_store(cfg: FeaturewatchConfig) -> SAEStore | None:
    """The shared SAE store of `sae.store_uri`, cached in <home>/saes (None: no store)."""
    if cfg.sae.store_uri is None:
        return None
    return SAEStore(cfg.sae.store_uri, cfg.sae_dir)


def registered_sae(cfg: FeaturewatchConfig, catalog, version: str | None = None) -> SAEChoice:
    """A registered SAE version, or by default the newest one for the configured model."""
    sql = "SELECT sae_version, path, layer, site FROM sae_versions WHERE "
    if version is None:
        rows = catalog.query(
            sql + "model = ? ORDER BY created_at DESC LIMIT 1", [cfg.model.name]
        ).to_pylist()
        if not rows:
            raise ConfigError(f"no SAE version is registered for model {cfg.model.name!r}")
    else:
        rows = catalog.query(sql + "sae_version = ?", [version]).to_pylist()
        if not rows:
            raise ConfigError(f"SAE version {version!r} is not in the catalog")
    row = rows[0]
    # On a node other than the one that trained it, the folder comes from the store.
    recorded = recorded_path(cfg.home, row["path"])
    path = sae_folder(sae_store(cfg), row["sae_version"], recorded)
    return SAEChoice(row["sae_version"], path, row["layer"], row["site"] or "resid_post")


def sae_version_or_folder(cfg: FeaturewatchConfig, version_or_path: str) -> tuple[str | None, Path]:
    """(version, folder) of a registered version's folder in the home or the store, or
    (None, folder) for an SAE folder given by path."""
    path = Path(version_or_path)
    if path.is_dir():
        return None, path
    candidate = cfg.sae_dir / version_or_path
    if candidate.is_dir():
        return version_or_path, candidate
    store = sae_store(cfg)
    if store is not None and "/" not in version_or_path and store.has(version_or_path):
        return version_or_path, store.fetch(version_or_path)
    raise SAEFormatError(
        f"{version_or_path!r} is neither an SAE folder nor a version under {cfg.sae_dir}"
    )
