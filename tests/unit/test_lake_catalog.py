"""Parquet lake + DuckDB catalog: round trip, exactly-once commit, the drift macro."""

from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import write_partitioned, write_segment
from tests.unit.lake_helpers import segment

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


def tables(n_tokens, fires, start, request="r"):
    """n_tokens sampled tokens one second apart; feature 1 fires (value 2.0) on the first
    `fires`."""
    return segment(start, n_tokens, {1: [2.0] * fires}, request=request)


def commit(catalog, lake, seg, tokens, feats):
    files = write_segment(lake, tokens, feats, f"{seg}__sae1")
    return catalog.commit_segment(
        seg, "sae1", files, tokens=tokens.num_rows, feature_rows=feats.num_rows
    )


def test_round_trip_with_hive_partitions(tmp_path):
    lake = tmp_path / "lake"
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        assert cat.query("SELECT count(*) AS n FROM feature_acts").to_pylist() == [{"n": 0}]
        tokens, feats = tables(10, 4, T0)
        assert commit(cat, lake, "seg-1", tokens, feats)
        rows = cat.query(
            "SELECT model, date, hour, feature_id, value, request_id FROM feature_acts"
        ).to_pylist()
    assert len(rows) == 4
    assert rows[0]["model"] == "tiny" and rows[0]["hour"] == 10
    assert str(rows[0]["date"]) == "2026-01-01"
    assert (rows[0]["feature_id"], rows[0]["value"]) == (1, 2.0)
    files = list((lake / "feature_acts" / "model=tiny" / "date=2026-01-01").rglob("*.parquet"))
    assert len(files) == 1
    assert pq.read_metadata(files[0]).row_group(0).column(0).compression == "ZSTD"


def test_commit_is_exactly_once_and_uncommitted_files_are_invisible(tmp_path):
    lake = tmp_path / "lake"
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        tokens, feats = tables(10, 4, T0)
        assert commit(cat, lake, "seg-1", tokens, feats)
        assert not commit(cat, lake, "seg-1", tokens, feats)  # a rerun adds nothing
        # a file written without a commit (a crash before the manifest) stays invisible
        write_partitioned(lake, "feature_acts", feats, "seg-2__sae1")
        assert cat.query("SELECT count(*) AS n FROM feature_acts").to_pylist() == [{"n": 4}]
        assert cat.committed_segments("sae1") == {"seg-1"}
        # the catalog reopens read-only after the writer is gone
    with Catalog(tmp_path / "c.duckdb", lake, read_only=True) as ro:
        assert ro.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 10}]
        with pytest.raises(CatalogError):
            ro.query("CREATE TABLE x (a INT)")


@pytest.mark.parametrize("macro", ["rate_change", "rate_change_exact"])
def test_rate_change_macro_matches_hand_computation(tmp_path, macro):
    """Baseline: 10 tokens, feature 1 fires on 2. Window: 10 tokens, fires on 6.
    base_rate 0.2, win_rate 0.6; pooled p = 8/20 = 0.4;
    z = (0.6 - 0.2) / sqrt(0.4 * 0.6 * (1/10 + 1/10)) = 0.4 / sqrt(0.048) = 1.825742;
    rate_ratio = ((6 + 0.5) / 11) / ((2 + 0.5) / 11) = 2.6. The rollups and the raw rows
    agree when the windows fall on whole minutes."""
    lake = tmp_path / "lake"
    base_start, win_start = T0, T0 + timedelta(hours=1)
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 2, base_start, "a"))
        commit(cat, lake, "seg-2", *tables(10, 6, win_start, "b"))
        (row,) = cat.query(
            f"SELECT * FROM {macro}(?, ?, ?, ?)",
            [base_start, win_start, win_start, win_start + timedelta(hours=1)],
        ).to_pylist()
    assert row["feature_id"] == 1
    assert (row["base_fired"], row["base_tokens"], row["win_fired"], row["win_tokens"]) == (
        2,
        10,
        6,
        10,
    )
    assert row["base_rate"] == pytest.approx(0.2)
    assert row["win_rate"] == pytest.approx(0.6)
    assert row["z"] == pytest.approx(1.825742, abs=1e-5)
    assert row["rate_ratio"] == pytest.approx(2.6)


def test_exact_rate_change_splits_a_minute(tmp_path):
    """Tokens at seconds 0..9 of one minute, feature 1 on the first 2. Split at second 5:
    the raw rows give 2 of 5 then 0 of 5; the rollups count the whole minute in the
    window where it starts (the baseline), and the comparison window has no tokens."""
    lake = tmp_path / "lake"
    split = T0 + timedelta(seconds=5)
    args = [T0, split, split, T0 + timedelta(minutes=1)]
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 2, T0))
        (exact,) = cat.query("SELECT * FROM rate_change_exact(?, ?, ?, ?)", args).to_pylist()
        minutes = cat.query("SELECT * FROM rate_change(?, ?, ?, ?)", args).to_pylist()
    assert (exact["base_fired"], exact["base_tokens"]) == (2, 5)
    assert (exact["win_fired"], exact["win_tokens"]) == (0, 5)
    assert minutes == []  # no tokens in the comparison window at minute resolution


def test_missing_catalog_read_only_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="no catalog"):
        Catalog(tmp_path / "none.duckdb", tmp_path, read_only=True)


def test_sae_versions_keep_lineage_and_merge_metrics(tmp_path):
    import json

    with Catalog(tmp_path / "c.duckdb", tmp_path / "lake") as cat:
        common = dict(architecture="topk", model="m", layer=3, d_in=8, d_sae=32, k=4)
        cat.register_sae("v1", tmp_path / "v1", metrics={"fvu": 0.3}, **common)
        with pytest.raises(CatalogError, match="parent SAE version 'v0' is not in the catalog"):
            cat.register_sae("v2", tmp_path / "v2", metrics={}, parent_version="v0", **common)
        window = (T0, T0 + timedelta(hours=2))
        cat.register_sae(
            "v2",
            tmp_path / "v2",
            metrics={"fvu": 0.2},
            parent_version="v1",
            data_window=window,
            lineage={"trained_tokens": 1000},
            **common,
        )
        cat.update_sae_metrics("v2", {"ce_loss_recovered": 0.9})
        row = cat.query(
            "SELECT parent_version, data_start, data_end, metrics, lineage FROM sae_versions "
            "WHERE sae_version = 'v2'"
        ).to_pylist()[0]
        assert row["parent_version"] == "v1"
        assert (row["data_start"], row["data_end"]) == window
        assert json.loads(row["metrics"]) == {"fvu": 0.2, "ce_loss_recovered": 0.9}
        assert json.loads(row["lineage"]) == {"trained_tokens": 1000}
        with pytest.raises(CatalogError, match="'v9' is not in the catalog"):
            cat.update_sae_metrics("v9", {})


def test_old_catalog_gains_lineage_columns(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE sae_versions (sae_version VARCHAR PRIMARY KEY, path VARCHAR NOT NULL, "
        "architecture VARCHAR NOT NULL, model VARCHAR NOT NULL, layer INTEGER NOT NULL, "
        "d_in INTEGER NOT NULL, d_sae INTEGER NOT NULL, k INTEGER, "
        "created_at TIMESTAMPTZ NOT NULL DEFAULT now(), metrics JSON)"
    )
    con.execute(
        "INSERT INTO sae_versions VALUES ('old', 'p', 'topk', 'm', 1, 8, 32, 4, now(), '{}')"
    )
    con.close()
    with Catalog(path, tmp_path / "lake") as cat:
        rows = cat.query("SELECT sae_version, parent_version, lineage FROM sae_versions")
        assert rows.to_pylist() == [{"sae_version": "old", "parent_version": None, "lineage": None}]


READER = """
import sys
from featurewatch.storage.catalog import Catalog
with Catalog.for_analyst(sys.argv[1], sys.argv[2]) as cat:
    count = "SELECT count(*) AS n FROM tokens"
    print(cat.query(count).to_pylist()[0]["n"], flush=True)
    sys.stdin.readline()  # the writer commits meanwhile
    print(cat.query(count).to_pylist()[0]["n"], flush=True)
"""


def test_readers_never_block_the_writer_and_see_one_state(tmp_path):
    """An analyst's connection stays open in another process while the pipeline
    commits: the commit goes through (DuckDB's file lock is never shared with readers),
    the open reader keeps the state it opened, and a new reader sees the new one."""
    import subprocess
    import sys

    lake, path = tmp_path / "lake", tmp_path / "c.duckdb"
    with Catalog(path, lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 2, T0, "a"))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), str(lake)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "10"
        with Catalog(path, lake) as cat:  # a read-only reader holds no lock on this file
            assert commit(cat, lake, "seg-2", *tables(10, 6, T0 + timedelta(hours=1), "b"))
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "10"  # its snapshot, whole
    finally:
        reader.stdin.close()
        assert reader.wait(timeout=60) == 0
    with Catalog.for_analyst(path, lake) as fresh:
        assert fresh.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 20}]


HOLD_WRITER = """
import sys, time
from featurewatch.storage.catalog import Catalog
with Catalog(sys.argv[1], sys.argv[2]) as cat:
    cat.publish()  # copies the file: the lock must survive it
    print("holding", flush=True)
    time.sleep(60)
"""


def test_the_writer_keeps_its_lock_after_publishing(tmp_path):
    """One process writes a catalog. Publishing the readers' copy reads the file, and
    a POSIX record lock is lost when its process closes any descriptor of the file:
    a second writer must still be refused while the first one runs."""
    import subprocess
    import sys

    lake, path = tmp_path / "lake", tmp_path / "c.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITER, str(path), str(lake)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(CatalogError, match="lock"):
            Catalog(path, lake)
    finally:
        holder.kill()
        holder.wait()
    with Catalog(path, lake) as cat:  # free again once the writer is gone
        assert cat.query("SELECT count(*) AS n FROM segments").to_pylist() == [{"n": 0}]


def test_empty_segments_are_recorded_once_and_add_no_rows(tmp_path):
    lake = tmp_path / "lake"
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 4, T0))
        assert cat.commit_empty_segments(["seg-2", "seg-3", "seg-2"], "sae1") == 2
        assert cat.commit_empty_segments(["seg-1", "seg-3", "seg-4"], "sae1") == 1
        assert cat.committed_segments("sae1") == {"seg-1", "seg-2", "seg-3", "seg-4"}
        assert cat.commit_empty_segments([], "sae1") == 0
        assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 10}]
