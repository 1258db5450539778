"""Analysts' connections are sandboxed: each escape is tried and must be refused with a
clear error, while queries over the lake keep working."""

import pyarrow as pa
import pytest

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake_store import LakeStore
from tests.unit.test_lake_catalog import T0, commit, tables


@pytest.fixture
def analyst(tmp_path):
    lake = tmp_path / "lake"
    with Catalog(tmp_path / "catalog.duckdb", lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 4, T0))
    (tmp_path / "secret.txt").write_text("password\n")
    with Catalog.for_analyst(tmp_path / "catalog.duckdb", lake) as cat:
        yield cat, tmp_path


def test_queries_over_the_lake_still_work(analyst):
    cat, _ = analyst
    assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 10}]
    assert cat.query("FROM feature_acts SELECT count(*) AS n").to_pylist() == [{"n": 4}]
    assert cat.query("SELECT 1 AS a; SELECT 2 AS b").to_pylist() == [{"b": 2}]
    assert cat.query("EXPLAIN SELECT * FROM tokens").num_rows >= 1
    assert cat.query("EXPLAIN ANALYZE SELECT count(*) FROM tokens").num_rows >= 1
    assert cat.query("DESCRIBE tokens").num_rows > 5
    # the lake's own files may be read directly
    assert cat.query("SELECT count(*) AS n FROM glob(?)", [cat.lake.root + "/**"]).num_rows


ESCAPES = [
    # (statement, words the error must contain)
    ("COPY (SELECT 1) TO '{tmp}/out.csv'", "COPY"),
    ("COPY (SELECT 1) TO '{tmp}/lake/out.csv'", "COPY"),  # not even into the lake
    ("SELECT 1; COPY (SELECT 1) TO '{tmp}/out.csv'", "statement 2 is COPY"),
    # EXPLAIN ANALYZE runs the statement it explains
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/lake/out.csv'", "COPY"),
    ("EXPLAIN COPY (SELECT 1) TO '{tmp}/lake/out.csv'", "COPY"),
    ("EXPORT DATABASE '{tmp}/export'", "EXPORT"),
    ("ATTACH '{tmp}/other.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("SET threads = 1", "SET"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "SET"),
    ("PRAGMA threads = 1", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE"),
    ("DROP VIEW feature_acts", "DROP"),
    ("DELETE FROM segments", "DELETE"),
    ("CHECKPOINT", "CHECKPOINT"),
    # queries that try to read outside the lake: DuckDB's own sandbox refuses them
    ("SELECT * FROM read_csv('{tmp}/secret.txt')", "Permission Error"),
    ("SELECT * FROM read_text('{tmp}/lake/../secret.txt')", "Permission Error"),
    ("SELECT * FROM read_text('/etc/passwd')", "Permission Error"),
    ("SELECT * FROM glob('{tmp}/*')", "Permission Error"),
]


@pytest.mark.parametrize(("statement", "message"), ESCAPES)
def test_escapes_are_refused_by_name(analyst, statement, message):
    cat, tmp = analyst
    with pytest.raises(CatalogError, match=message):
        cat.query(statement.format(tmp=tmp))
    assert not (tmp / "out.csv").exists() and not (tmp / "lake" / "out.csv").exists()
    assert not (tmp / "export").exists() and not (tmp / "other.duckdb").exists()
    # the connection is still usable and unchanged
    assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 10}]
    assert cat.query("SELECT current_setting('enable_external_access') AS v").to_pylist() == [
        {"v": False}
    ]


def test_the_sandbox_cannot_be_undone_through_duckdb_itself(analyst):
    """Below the statement allow-list, DuckDB's configuration is locked."""
    cat, _ = analyst
    with pytest.raises(Exception, match="locked"):
        cat.con.execute("SET enable_external_access = true")


def test_on_an_s3_lake_the_sandbox_reads_that_lake_and_nothing_else(tmp_path, s3_server):
    """lake.uri on an S3-compatible server: the views read the lake through pyarrow's
    S3 filesystem; another prefix of the same bucket, and local files, are refused."""
    lake = LakeStore(s3_server.uri())
    with Catalog(tmp_path / "c.duckdb", lake) as cat:
        commit(cat, lake, "seg-1", *tables(10, 4, T0))
    other = LakeStore(s3_server.uri("other"))
    other.write_table("secret.parquet", pa.table({"password": ["hunter2"]}))
    (tmp_path / "secret.txt").write_text("password\n")
    with Catalog.for_analyst(tmp_path / "c.duckdb", lake.location) as cat:
        assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 10}]
        assert cat.query("FROM feature_acts SELECT count(*) AS n").to_pylist() == [{"n": 4}]
        escapes = [
            f"SELECT * FROM read_parquet('{other.url('secret.parquet')}')",
            # up and out of the lake's prefix
            f"SELECT * FROM read_parquet('{lake.url('..')}/{other.root.split('/')[-1]}"
            "/secret.parquet')",
            f"SELECT * FROM read_text('{tmp_path}/secret.txt')",
        ]
        for statement in escapes:
            with pytest.raises(CatalogError, match="Permission Error"):
                cat.query(statement)
        assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 10}]
