"""A home copied or restored to another path works there (issue 24, point 6: the
catalog's views and registered folders were absolute), and `featurewatch lake check`
says whether a home is whole."""

import json
import shutil

from typer.testing import CliRunner

from featurewatch.config import build_config
from featurewatch.platform.cli import app
from featurewatch.sae import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.sae_store import registered_sae
from featurewatch.storage.spool import Spool, spool_segments
from tests.unit.lake_helpers import fill_home


def check(home):
    result = CliRunner().invoke(app, ["lake", "check", "--home", str(home)])
    assert result.stdout.startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout)


def test_a_home_copied_elsewhere_is_usable_and_checked(tmp_path):
    cfg = fill_home(build_config({"home": str(tmp_path / "first")}), tmp_path / "s")
    build("topk", 8, 16, k=2).save(cfg.sae_dir / "sae-home")
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        cat.register_sae(
            "sae-home", cfg.sae_dir / "sae-home", architecture="topk", model=cfg.model.name,
            layer=1, d_in=8, d_sae=16, k=2, metrics={},
        )  # fmt: skip
        recorded = cat.query(
            "SELECT path FROM sae_versions WHERE sae_version = 'sae-home'").to_pylist()  # fmt: skip
    assert recorded == [{"path": "home:saes/sae-home"}]
    spool = Spool(cfg.spool_dir)
    spool.append(b"a batch")
    spool.seal()
    spool.close()
    # fill_home's SAE row names a folder outside the home, which a copy does not carry.
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        cat.con.execute("DELETE FROM sae_versions WHERE sae_version = 'sae1'")

    moved = build_config({"home": str(tmp_path / "restored")})
    shutil.copytree(cfg.home, moved.home)
    shutil.rmtree(cfg.home)
    # A reader (the sandboxed analyst connection) queries the lake where it now is.
    with Catalog.for_analyst(moved.catalog_path, moved.lake_location) as cat:
        assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 1440}]
        assert cat.query("SELECT count(*) AS n FROM token_rollups").to_pylist()[0]["n"] > 0
        assert registered_sae(moved, cat, "sae-home").path == moved.sae_dir / "sae-home"
    code, report = check(moved.home)
    assert code == 0 and report["ok"], report
    assert report["spool_segments"] == 1 and report["lake_files"] > 0

    # What the check finds: a missing lake file, one nobody named, a damaged segment,
    # a missing SAE folder.
    with Catalog.for_analyst(moved.catalog_path, moved.lake_location) as cat:
        (gone,) = cat.query("SELECT path FROM lake_files LIMIT 1").to_pylist()
    (moved.lake_dir / gone["path"]).unlink()
    (moved.lake_dir / "tokens" / "stray.parquet").write_bytes(b"PAR1")
    (segment,) = spool_segments(moved.spool_dir)
    segment.write_bytes(segment.read_bytes()[:-3] + b"xyz")
    shutil.rmtree(moved.sae_dir / "sae-home")
    code, report = check(moved.home)
    assert code == 1 and not report["ok"]
    assert report["missing_files"] == [gone["path"]]
    assert report["unnamed_files"] == ["tokens/stray.parquet"]
    assert report["missing_sae_folders"] == ["sae-home"]
    assert len(report["damaged_segments"]) == 1 and segment.name in report["damaged_segments"][0]
