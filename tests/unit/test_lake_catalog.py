"""Parquet lake + DuckDB catalog: round trip, exactly-once commit, the drift macro."""

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import write_partitioned

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


def tables(n_tokens, fires, start, request="r"):
    """n_tokens sampled tokens one second apart; feature 1 fires on the first `fires`."""
    ts = [start + timedelta(seconds=i) for i in range(n_tokens)]
    common = {
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "model": ["tiny"] * n_tokens,
        "model_version": ["v1"] * n_tokens,
        "replica": ["rep"] * n_tokens,
        "request_id": [request] * n_tokens,
        "token_pos": pa.array(range(n_tokens), pa.int32()),
        "layer": pa.array([1] * n_tokens, pa.int16()),
        "sae_version": ["sae1"] * n_tokens,
    }
    tokens = pa.table(
        {
            **common,
            "token_id": pa.array([7] * n_tokens, pa.int32()),
            "token_text": ["tok"] * n_tokens,
            "recon_error": pa.array([0.1] * n_tokens, pa.float32()),
            "segment_id": ["s"] * n_tokens,
        }
    )
    idx = pa.array(range(fires))
    feats = pa.table(
        {
            **{
                k: (v.take(idx) if isinstance(v, pa.Array) else v[:fires])
                for k, v in common.items()
            },
            "feature_id": pa.array([1] * fires, pa.int32()),
            "value": pa.array([2.0] * fires, pa.float32()),
        }
    )
    return tokens, feats


def commit(catalog, lake, seg, tokens, feats):
    files = {
        "tokens": write_partitioned(lake, "tokens", tokens, f"{seg}__sae1"),
        "feature_acts": write_partitioned(lake, "feature_acts", feats, f"{seg}__sae1"),
    }
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


def test_rate_change_macro_matches_hand_computation(tmp_path):
    """Baseline: 10 tokens, feature 1 fires on 2. Window: 10 tokens, fires on 6.
    base_rate 0.2, win_rate 0.6; pooled p = 8/20 = 0.4;
    z = (0.6 - 0.2) / sqrt(0.4 * 0.6 * (1/10 + 1/10)) = 0.4 / sqrt(0.048) = 1.825742;
    rate_ratio = ((6 + 0.5) / 11) / ((2 + 0.5) / 11) = 2.6."""
    lake = tmp_path / "lake"
    base_start, win_start = T0, T0 + timedelta(hours=1)
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 2, base_start, "a"))
        commit(cat, lake, "seg-2", *tables(10, 6, win_start, "b"))
        (row,) = cat.query(
            "SELECT * FROM rate_change(?, ?, ?, ?)",
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


def test_missing_catalog_read_only_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="no catalog"):
        Catalog(tmp_path / "none.duckdb", tmp_path, read_only=True)
