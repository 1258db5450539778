"""Compaction and retention over a real Parquet lake and catalog: fewer files, the same
answers, hourly rollups, old files kept for a grace period, ages enforced."""

from datetime import timedelta

import pyarrow.parquet as pq
import pytest

from featurewatch.storage.compaction import (
    _write_compacted,
    compact,
    delete_retired,
    partitions,
    retain,
    upkeep,
)
from featurewatch.storage.lake import VERDICT_LOG
from tests.unit.lake_helpers import MINUTE, T0, verdict_rows

HOUR = timedelta(hours=1)


def count(cat, sql, params=()):
    return cat.query(sql, list(params)).to_pylist()[0]["n"]


def files_of(cat, table):
    return [row[1] for row in cat.lake_file_list() if row[0] == table]


def fill(commit):
    """Hour 0: three segments (minutes 0, 1, 30); hour 1: one segment."""
    commit(T0, 10, {1: [1.0, 2.0], 2: [4.0]})
    commit(T0 + MINUTE, 10, {1: [3.0]})
    commit(T0 + 30 * MINUTE, 20, {1: [5.0] * 4, 2: [1.0] * 2})
    commit(T0 + HOUR, 10, {1: [1.0]})


def test_compaction_leaves_one_file_per_partition_and_the_same_answers(lake):
    cat, commit = lake
    fill(commit)
    windows = [T0, T0 + HOUR, T0 + HOUR, T0 + 2 * HOUR]
    before = cat.query("SELECT * FROM rate_change(?, ?, ?, ?) ORDER BY feature_id", windows)
    assert len(files_of(cat, "feature_acts")) == 4
    report = compact(cat, cat.lake, closed_before=T0 + 2 * HOUR)
    # hour 0's raw tables merged from 3 files each; the day's two rollup tables from 4
    assert report.partitions_compacted == 4 and report.files_compacted == 14
    assert len(files_of(cat, "feature_acts")) == 2 and len(files_of(cat, "tokens")) == 2
    assert count(cat, "SELECT count(*) AS n FROM feature_acts") == 11
    assert count(cat, "SELECT count(*) AS n FROM tokens") == 50
    after = cat.query("SELECT * FROM rate_change(?, ?, ?, ?) ORDER BY feature_id", windows)
    assert after.to_pylist() == before.to_pylist()
    # Hour 0's minutes folded into one 60-minute row per feature: feature 1 fired
    # 2 + 1 + 4 = 7 times, sum 1 + 2 + 3 + 20 = 26, sum of squares 1 + 4 + 9 + 100 = 114.
    (row,) = cat.query(
        "SELECT * FROM rollups WHERE feature_id = 1 AND period_start = ?", [T0]
    ).to_pylist()
    assert (row["period_minutes"], row["tokens_seen"], row["fired"]) == (60, 40, 7)
    assert (row["sum_value"], row["sum_sq"], row["max_value"]) == (26, 114, 5.0)
    # a second pass finds nothing to do
    assert compact(cat, cat.lake, closed_before=T0 + 2 * HOUR).partitions_compacted == 0


def test_open_hours_wait_and_late_segments_are_merged_later(lake):
    cat, commit = lake
    fill(commit)
    compact(cat, cat.lake, closed_before=T0 + HOUR + 30 * MINUTE)  # hour 1 still open
    assert len(files_of(cat, "feature_acts")) == 2  # hour 0 compacted, hour 1 untouched
    commit(T0 + 45 * MINUTE, 10, {1: [2.0] * 3})  # a late segment for hour 0
    assert len(files_of(cat, "feature_acts")) == 3
    compact(cat, cat.lake, closed_before=T0 + HOUR)
    assert len(files_of(cat, "feature_acts")) == 2
    (row,) = cat.query(
        "SELECT * FROM rollups WHERE feature_id = 1 AND period_start = ?", [T0]
    ).to_pylist()
    assert (row["period_minutes"], row["tokens_seen"], row["fired"]) == (60, 50, 10)


def test_retired_files_stay_for_the_grace_period(lake):
    cat, commit = lake
    fill(commit)
    old = files_of(cat, "feature_acts")
    compact(cat, cat.lake, closed_before=T0 + 2 * HOUR)
    # a reader that resolved the old views can still read every old file
    assert all(cat.lake.exists(p) for p in old)
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    assert delete_retired(cat, cat.lake, now - timedelta(minutes=10), timedelta(0)) == 0
    deleted = delete_retired(cat, cat.lake, now + timedelta(minutes=11), timedelta(minutes=10))
    assert deleted == 14
    assert not any(cat.lake.exists(p) for p in old[:3])  # hour 0's three segment files
    assert count(cat, "SELECT count(*) AS n FROM feature_acts") == 11


def test_a_crash_before_the_swap_leaves_the_compacted_file_invisible(lake):
    cat, commit = lake
    fill(commit)
    (part,) = [p for p in partitions(cat) if p.table_name == "feature_acts" and len(p.files) == 3]
    # compaction writes its file, and then the process dies before the catalog swap
    (written,) = _write_compacted(cat.lake, part, T0 + 2 * HOUR).values()
    assert cat.lake.exists(written)
    assert count(cat, "SELECT count(*) AS n FROM feature_acts") == 11  # not 11 + 9


def test_retention_drops_raw_rows_before_rollups(lake):
    cat, commit = lake
    fill(commit)
    day = timedelta(days=1)
    now = T0 + 3 * day
    assert retain(cat, now, raw_days=5, rollup_days=10).partitions_dropped == 0
    report = retain(cat, now, raw_days=2, rollup_days=10)
    assert report.partitions_dropped == 4  # feature_acts and tokens, two hours each
    assert count(cat, "SELECT count(*) AS n FROM feature_acts") == 0
    assert count(cat, "SELECT count(*) AS n FROM tokens") == 0
    # rollups still answer drift questions about those days
    windows = [T0, T0 + HOUR, T0 + HOUR, T0 + 2 * HOUR]
    (f1,) = cat.query(
        "SELECT * FROM rate_change(?, ?, ?, ?) WHERE feature_id = 1", windows
    ).to_pylist()
    assert (f1["base_fired"], f1["base_tokens"], f1["win_fired"]) == (7, 40, 1)
    retain(cat, now, raw_days=2, rollup_days=2)
    assert count(cat, "SELECT count(*) AS n FROM rollups") == 0


def test_upkeep_runs_all_three(lake):
    cat, commit = lake
    fill(commit)
    report = upkeep(
        cat,
        cat.lake,
        T0 + 2 * HOUR + 20 * MINUTE,
        compact_delay=timedelta(minutes=15),
        raw_days=30,
        rollup_days=400,
        grace=timedelta(minutes=10),
    )
    assert report.partitions_compacted == 4 and report.partitions_dropped == 0
    assert report.files_deleted == 0  # retired just now: within the grace period


@pytest.mark.parametrize("bad", [{"raw_retention_days": 0}, {"rollup_retention_days": 3}])
def test_lake_config_is_validated(bad):
    from featurewatch.config import build_config
    from featurewatch.errors import ConfigError

    with pytest.raises(ConfigError, match="lake"):
        build_config({"lake": {"raw_retention_days": 7, **bad}})


def test_whole_days_come_from_day_rows_and_agree_with_the_raw_rows(lake):
    """Days D, D+1, D+2. Once D and D+1 have closed, compaction writes one day row per
    feature for each; a baseline from D 03:00 to D+2 reads D's hours after 03:00 from
    the hour rows and all of D+1 from its day rows, and must count exactly what the raw
    rows count. A late segment for D is counted before the next compaction (its rows are
    not yet in the day row) and after it (they are), never twice."""
    cat, commit = lake
    day = timedelta(days=1)
    commit(T0, 10, {1: [1.0] * 2, 2: [1.0]})  # D 09:00, before the baseline starts
    commit(T0 + 5 * HOUR, 20, {1: [1.0] * 4})
    commit(T0 + day + 2 * HOUR, 30, {1: [1.0] * 3, 2: [2.0] * 5})
    commit(T0 + 2 * day + HOUR, 10, {1: [1.0] * 6})
    d0 = T0.replace(hour=0)
    args = [d0 + 10 * HOUR, d0 + 2 * day, d0 + 2 * day, d0 + 2 * day + 12 * HOUR]

    def agree():
        fields = ["feature_id", "base_fired", "base_tokens", "win_fired", "win_tokens"]
        sql = "SELECT {} FROM {}(?, ?, ?, ?) ORDER BY feature_id"
        exact = cat.query(sql.format(", ".join(fields), "rate_change_exact"), args)
        rolled = cat.query(sql.format(", ".join(fields), "rate_change"), args)
        assert rolled.to_pylist() == exact.to_pylist()
        return {r["feature_id"]: r for r in rolled.to_pylist()}

    compact(cat, cat.lake, closed_before=d0 + 2 * day + 12 * HOUR)
    assert len(files_of(cat, "feature_daily")) == 2  # D and D+1
    assert count(cat, "SELECT count(*) AS n FROM feature_daily") == 4
    got = agree()
    assert (got[1]["base_fired"], got[1]["base_tokens"]) == (4 + 3, 20 + 30)
    commit(T0 + 6 * HOUR, 10, {1: [1.0] * 7})  # late, for D 15:00
    assert agree()[1]["base_fired"] == 4 + 7 + 3
    compact(cat, cat.lake, closed_before=d0 + 2 * day + 12 * HOUR)
    assert len(files_of(cat, "feature_daily")) == 2  # D's day rows replaced, not added
    assert agree()[1]["base_fired"] == 4 + 7 + 3
    # windows that meet inside the folded day D+1 (at 01:00, before its 11:00 rows), and
    # windows that do not meet: both still agree with the raw rows
    args[:] = [d0 + 10 * HOUR, d0 + day + HOUR, d0 + day + HOUR, d0 + 2 * day + 12 * HOUR]
    split = agree()
    assert (split[1]["base_fired"], split[1]["win_fired"]) == (4 + 7, 3 + 6)
    args[:] = [d0, d0 + day, d0 + day + 3 * HOUR, d0 + 3 * day]
    apart = agree()
    assert (apart[1]["base_fired"], apart[1]["win_fired"]) == (2 + 4 + 7, 3 + 6)


def test_rate_change_with_windows_that_overlap_touch_or_end_inside_an_hour(lake):
    """rate_change reads each view once for both windows and tags every row with the
    windows it counts in. Segments (tokens; fires of features 1 and 2): a D 09:00 (10;
    2, 0), b D 15:00 (20; 4, 1), c D+1 02:00 (30; 3, 0), d D+1 20:30 (10; 1, 5), e D+2
    01:10 (10; 6, 0). Compaction before D+2 02:00 folds D and D+1 into day rows and e's
    hour; then f D+1 20:45 (10; 2, 0) arrives late, a minute row of a folded day.
    - overlapping, base [D 12:00, D+2) and window [D+1, D+2 12:00), sharing day D+1:
      base b + c + d + f = 70 tokens, fired 4 + 3 + 1 + 2 = 10 and 1 + 5 = 6; window
      c + d + f + e = 60 tokens, fired 12 and 5;
    - nested, base [D, D+3) (D+2 not folded yet: its rows are all late rows) and window
      [D+1 20:40, D+1 21:00), which holds only f: base 90 tokens, fired 18 and 6; window
      10 tokens, fired 2 and 0 (d's hour row starts at 20:00, before the window);
    - touching at D+1 21:00, base [D 12:00, D+1 21:00) and window [D+1 21:00, D+2 06:00):
      base b + c + d + f = 70, fired 10 and 6; window e = 10, fired 6 and 0.
    Each also agrees with rate_change_exact over the raw rows."""
    cat, commit = lake
    day = timedelta(days=1)
    d0 = T0.replace(hour=0)
    commit(T0, 10, {1: [1.0] * 2})
    commit(d0 + 15 * HOUR, 20, {1: [1.0] * 4, 2: [1.0]})
    commit(d0 + day + 2 * HOUR, 30, {1: [1.0] * 3})
    commit(d0 + day + 20 * HOUR + 30 * MINUTE, 10, {1: [1.0], 2: [1.0] * 5})
    commit(d0 + 2 * day + HOUR + 10 * MINUTE, 10, {1: [1.0] * 6})
    compact(cat, cat.lake, closed_before=d0 + 2 * day + 2 * HOUR)
    commit(d0 + day + 20 * HOUR + 45 * MINUTE, 10, {1: [1.0] * 2})  # late
    cases = {
        "overlap": [d0 + 12 * HOUR, d0 + 2 * day, d0 + day, d0 + 2 * day + 12 * HOUR],
        "nested": [d0, d0 + 3 * day, d0 + day + 20 * HOUR + 40 * MINUTE, d0 + day + 21 * HOUR],
        "touch": [
            d0 + 12 * HOUR,
            d0 + day + 21 * HOUR,
            d0 + day + 21 * HOUR,
            d0 + 2 * day + 6 * HOUR,
        ],
    }
    expected = {  # feature -> (base_fired, base_tokens, win_fired, win_tokens)
        "overlap": {1: (10, 70, 12, 60), 2: (6, 70, 5, 60)},
        "nested": {1: (18, 90, 2, 10), 2: (6, 90, 0, 10)},
        "touch": {1: (10, 70, 6, 10), 2: (6, 70, 0, 10)},
    }
    fields = "feature_id, base_fired, base_tokens, win_fired, win_tokens"
    for name, args in cases.items():
        sql = f"SELECT {fields} FROM {{}}(?, ?, ?, ?) ORDER BY feature_id"
        rolled = cat.query(sql.format("rate_change"), args).to_pylist()
        got = {r["feature_id"]: tuple(r.values())[1:] for r in rolled}
        assert got == expected[name], name
        assert rolled == cat.query(sql.format("rate_change_exact"), args).to_pylist(), name


def test_days_view_counts_each_day_once_and_skips_folded_hour_files(lake):
    """Day D: 10 tokens firing feature 1 twice at 09:00, 20 tokens firing it 4 times at
    15:00; compaction after D closed writes D's day row and marks its hour rows folded.
    A late segment (5 tokens, 1 fire) for D 16:00 follows. feature_days holds D's day
    row (fired 6) and the late minute row (1): 7 in all, 35 tokens in token_days; and it
    does not name D's compacted hour file, whose rows are all in the day row."""
    cat, commit = lake
    d0 = T0.replace(hour=0)
    commit(T0, 10, {1: [1.0] * 2})
    commit(d0 + 15 * HOUR, 20, {1: [1.0] * 4})
    compact(cat, cat.lake, closed_before=d0 + timedelta(days=1, hours=1))
    commit(d0 + 16 * HOUR, 5, {1: [1.0]})
    got = cat.query("SELECT period_minutes, sum(fired) AS n FROM feature_days GROUP BY ALL")
    assert sorted(tuple(r.values()) for r in got.to_pylist()) == [(1, 1), (1440, 6)]
    assert count(cat, "SELECT sum(tokens) AS n FROM token_days") == 35
    (view_sql,) = cat.con.execute(
        "SELECT sql FROM duckdb_views() WHERE view_name = 'feature_days'"
    ).fetchone()
    (hour_file,) = [p for p in files_of(cat, "feature_rollups") if "compacted" in p]
    assert hour_file not in view_sql


def test_files_from_before_the_engine_column_read_null_and_compact_with_new_ones(lake):
    cat, commit = lake
    if not cat.lake.local:
        pytest.skip("rewrites a file in place to make it old: a local lake is enough")
    commit(T0, 10, {1: [1.0]})
    (old,) = files_of(cat, "tokens")
    path = cat.lake.path(old)
    pq.write_table(pq.read_table(path).drop_columns(["engine"]), path)  # as written before
    commit(T0 + MINUTE, 5, {1: [2.0]})
    engines = "SELECT engine, count(*) AS n FROM tokens GROUP BY engine ORDER BY engine"
    assert cat.query(engines).to_pylist() == [{"engine": "hf", "n": 5}, {"engine": None, "n": 10}]
    compact(cat, cat.lake, closed_before=T0 + HOUR)
    assert len(files_of(cat, "tokens")) == 1
    assert cat.query(engines).to_pylist() == [{"engine": "hf", "n": 5}, {"engine": None, "n": 10}]


def test_verdict_files_of_a_closed_hour_compact_into_one(lake):
    cat, _ = lake
    verdict_rows(cat, T0, "v1", 2, 10, "vs1")
    verdict_rows(cat, T0 + 20 * MINUTE, "v1", 1, 10, "vs2")
    count = "SELECT count(*) AS n, count(*) FILTER (WHERE flagged) AS f FROM verdicts"
    before = cat.query(count).to_pylist()
    compact(cat, cat.lake, closed_before=T0 + 2 * HOUR)
    files = [f for f in cat.lake_file_list() if f[0] == "verdicts"]
    assert len(files) == 1 and files[0][3] == VERDICT_LOG
    assert cat.query(count).to_pylist() == before == [{"n": 20, "f": 3}]
