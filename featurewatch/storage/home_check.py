"""`featurewatch lake check`: whether a home is whole. Every lake file the catalog names
exists, every Parquet file in the lake is named (or retired, awaiting deletion), every
registered SAE folder is there (or in the SAE store), and every sealed spool segment
reads back with its checksums. Run it on a home restored from a backup or mounted at
another path: the catalog records its folders relative to the home (Catalog.home_relative)
and readers build their own views when the lake moved, so such a home is usable as is."""

from __future__ import annotations

from pyarrow import fs as pafs

from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import SpoolError
from featurewatch.storage.catalog import Catalog, recorded_path
from featurewatch.storage.sae_store import MARKER
from featurewatch.storage.spool import read_segment, spool_segments


def check_home(cfg: FeaturewatchConfig, catalog: Catalog) -> dict:
    lake = catalog.lake
    named = {p for (p,) in catalog.con.execute("SELECT path FROM lake_files").fetchall()}
    retired = {p for (p,) in catalog.con.execute("SELECT path FROM retired_files").fetchall()}
    missing = sorted(p for p in named if not lake.exists(p))
    root = lake.root.rstrip("/") + "/"
    found = lake.fs.get_file_info(
        pafs.FileSelector(lake.root, recursive=True, allow_not_found=True)
    )
    on_disk = {
        info.path.removeprefix(root)
        for info in found
        if info.type == pafs.FileType.File and info.path.endswith(".parquet")
    }
    unnamed = sorted(on_disk - named - retired)
    saes = catalog.con.execute("SELECT sae_version, path FROM sae_versions").fetchall()
    missing_saes = sorted(
        version for version, path in saes
        if not (recorded_path(cfg.home, path) / MARKER).is_file() and cfg.sae.store_uri is None
    )  # fmt: skip
    sealed = spool_segments(cfg.spool_dir) if cfg.spool_dir.exists() else []
    damaged = []
    for path in sealed:
        try:
            for _ in read_segment(path):
                pass
        except SpoolError as err:
            damaged.append(str(err))
    return {
        "ok": not (missing or unnamed or missing_saes or damaged),
        "lake_files": len(named),
        "missing_files": missing,
        "unnamed_files": unnamed,
        "sae_versions": len(saes),
        "missing_sae_folders": missing_saes,
        "spool_segments": len(sealed),
        "damaged_segments": damaged,
    }
