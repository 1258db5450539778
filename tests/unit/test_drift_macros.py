"""The catalog's drift macros, each against an answer computed by hand (in the
docstrings), over real Parquet rollups written through the lake writer."""

import math
from datetime import timedelta

import pytest

from tests.unit.lake_helpers import MINUTE, T0


def rows(cat, sql, params):
    return cat.query(sql, params).to_pylist()


def test_rollups_view_merges_segments_that_share_a_minute(lake):
    """Two segments in minute 0: 10 + 5 tokens; feature 1 fires [1, 2] and [3].
    tokens_seen 15, fired 3, sum 6, sum of squares 1 + 4 + 9 = 14, max 3."""
    cat, commit = lake
    commit(T0, 10, {1: [1.0, 2.0]})
    commit(T0 + timedelta(seconds=30), 5, {1: [3.0]})
    (row,) = rows(cat, "SELECT * FROM rollups", [])
    assert (row["tokens_seen"], row["fired"], row["sum_value"], row["sum_sq"]) == (15, 3, 6, 14)
    assert row["max_value"] == 3.0 and row["model"] == "tiny"
    assert (row["period_start"], row["period_minutes"]) == (T0, 1)


def test_firing_rate_per_window(lake):
    """Windows of 2 minutes from T0. Minute 0: 10 tokens, 2 fires; minute 1: 10 tokens,
    4 fires; minute 5: 20 tokens, 1 fire. Window T0: 6 / 20 = 0.3; window T0+4m:
    1 / 20 = 0.05; no row for the window T0+2m, which had no tokens."""
    cat, commit = lake
    commit(T0, 10, {1: [1.0] * 2})
    commit(T0 + MINUTE, 10, {1: [1.0] * 4})
    commit(T0 + 5 * MINUTE, 20, {1: [1.0]})
    got = rows(
        cat,
        "SELECT window_start, tokens, fired, rate FROM firing_rate(?, ?, INTERVAL 2 MINUTE) "
        "ORDER BY window_start",
        [T0, T0 + 10 * MINUTE],
    )
    assert [(r["window_start"], r["tokens"], r["fired"]) for r in got] == [
        (T0, 20, 6),
        (T0 + 4 * MINUTE, 20, 1),
    ]
    assert [r["rate"] for r in got] == pytest.approx([0.3, 0.05])


def test_top_movers_orders_by_absolute_z(lake):
    """Baseline (minute 0, 20 tokens): feature 1 fires 2, feature 2 fires 10.
    Window (minute 10, 20 tokens): feature 1 fires 10, feature 2 fires 9.
    z1 = (0.5 - 0.1) / sqrt(0.3 * 0.7 * (1/20 + 1/20)) = 2.760262;
    z2 = (0.45 - 0.5) / sqrt(0.475 * 0.525 * 0.1) = -0.316624.
    Mean activation of feature 1: baseline (1 + 3) / 2 = 2, window 5."""
    cat, commit = lake
    commit(T0, 20, {1: [1.0, 3.0], 2: [1.0] * 10})
    commit(T0 + 10 * MINUTE, 20, {1: [5.0] * 10, 2: [1.0] * 9})
    args = [T0, T0 + 10 * MINUTE, T0 + 10 * MINUTE, T0 + 20 * MINUTE]
    ranked = rows(cat, "SELECT * FROM top_movers(?, ?, ?, ?, 5)", args)
    assert [r["feature_id"] for r in ranked] == [1, 2]
    assert ranked[0]["z"] == pytest.approx(2.760262, abs=1e-6)
    assert ranked[1]["z"] == pytest.approx(-0.316624, abs=1e-6)
    assert ranked[0]["rate_ratio"] == pytest.approx((10.5 / 21) / (2.5 / 21))
    assert (ranked[0]["base_mean_value"], ranked[0]["win_mean_value"]) == (2.0, 5.0)
    (top,) = rows(cat, "SELECT feature_id FROM top_movers(?, ?, ?, ?, 1)", args)
    assert top["feature_id"] == 1


def test_model_diff_compares_two_versions_in_one_window(lake):
    """Same minute, v1: 10 tokens, feature 1 fires 1; v2: 10 tokens, fires 5.
    z = (0.5 - 0.1) / sqrt(0.3 * 0.7 * 0.2) = 1.951800; ratio (5.5/11) / (1.5/11) = 3.6667.
    Feature 2 fired only on v1 (3 times): z = (0 - 0.3) / sqrt(0.15 * 0.85 * 0.2)."""
    cat, commit = lake
    commit(T0, 10, {1: [1.0], 2: [1.0] * 3}, model_version="v1")
    commit(T0, 10, {1: [1.0] * 5}, model_version="v2")
    got = {
        r["feature_id"]: r
        for r in rows(cat, "SELECT * FROM model_diff('v1', 'v2', ?, ?)", [T0, T0 + MINUTE])
    }
    assert (got[1]["a_fired"], got[1]["a_tokens"], got[1]["b_fired"], got[1]["b_tokens"]) == (
        1,
        10,
        5,
        10,
    )
    assert got[1]["z"] == pytest.approx(1.951800, abs=1e-6)
    assert got[1]["rate_ratio"] == pytest.approx(5.5 / 1.5)
    assert got[2]["b_fired"] == 0
    assert got[2]["z"] == pytest.approx(-0.3 / math.sqrt(0.15 * 0.85 * 0.2))


def test_trend_slope_counts_windows_without_fires_as_zero(lake):
    """Four 1-minute windows of 10 tokens; feature 1 fires 1, 2, 3, 4 times: rates
    0.1..0.4, slope 0.1 per window, mean 0.25. Feature 2 fires once, in the last window:
    rates 0, 0, 0, 0.1; slope = sum((x - 1.5)(y - 0.025)) / sum((x - 1.5)^2) = 0.15 / 5."""
    cat, commit = lake
    for i in range(4):
        commit(T0 + i * MINUTE, 10, {1: [1.0] * (i + 1), **({2: [1.0]} if i == 3 else {})})
    got = {
        r["feature_id"]: r
        for r in rows(cat, "SELECT * FROM trend_slope(?, INTERVAL 1 MINUTE, 4)", [T0 + 4 * MINUTE])
    }
    assert got[1]["slope"] == pytest.approx(0.1)
    assert got[1]["mean_rate"] == pytest.approx(0.25)
    assert got[1]["windows"] == 4
    assert got[2]["slope"] == pytest.approx(0.03)


def test_change_points_cusum(lake):
    """1-minute windows of 50 tokens; the first 2 are the reference: feature 1 fires 5
    and 5, p0 = 0.1, sigma = sqrt(0.1 * 0.9 / 50) = 0.0424264. Then 5, 10, 10 fires:
    z = 0, 2.357023, 2.357023. With k = 0.5: C = -0.5, 1.857023 - 0.5 = 1.357023,
    3.214045; S = C - min(0, min C) = 0, 1.857023, 3.714045. With h = 3 the alarm is at
    window 4 (T0 + 4 min), statistic 3.714045. Downwards never alarms. Feature 2 fires
    steadily (3 in every window) and never alarms."""
    cat, commit = lake
    for i, fired in enumerate([5, 5, 5, 10, 10]):
        commit(T0 + i * MINUTE, 50, {1: [1.0] * fired, 2: [1.0] * 3})
    got = rows(
        cat,
        "SELECT * FROM change_points(?, ?, INTERVAL 1 MINUTE, 2, 0.5, 3.0)",
        [T0, T0 + 5 * MINUTE],
    )
    assert len(got) == 1
    (alarm,) = got
    assert (alarm["feature_id"], alarm["direction"]) == (1, "up")
    assert alarm["change_at"] == T0 + 4 * MINUTE
    assert alarm["statistic"] == pytest.approx(3.714045, abs=1e-5)
    assert alarm["reference_rate"] == pytest.approx(0.1)
    assert alarm["rate_at_change"] == pytest.approx(0.2)
    # a higher threshold sees no change at all
    assert not rows(
        cat,
        "SELECT * FROM change_points(?, ?, INTERVAL 1 MINUTE, 2, 0.5, 4.0)",
        [T0, T0 + 5 * MINUTE],
    )


def test_psi_of_activation_magnitude(lake):
    """Baseline values [1, 2, 3, 4] (max 4), 2 bins of width 2: shares 0.25, 0.75.
    Window values [1, 1, 5, 0.5] (5 is over the max: last bin): shares 0.75, 0.25.
    PSI = (0.75 - 0.25) ln 3 + (0.25 - 0.75) ln(1/3) = ln 3. A window with the
    baseline's own values has PSI 0."""
    cat, commit = lake
    commit(T0, 10, {1: [1.0, 2.0, 3.0, 4.0]})
    commit(T0 + MINUTE, 10, {1: [1.0, 1.0, 5.0, 0.5]})
    commit(T0 + 2 * MINUTE, 10, {1: [4.0, 3.0, 2.0, 1.0]})
    (row,) = rows(
        cat, "SELECT * FROM psi(?, ?, ?, ?, 2)", [T0, T0 + MINUTE, T0 + MINUTE, T0 + 2 * MINUTE]
    )
    assert row["psi"] == pytest.approx(math.log(3))
    assert (row["base_fired"], row["win_fired"]) == (4, 4)
    (same,) = rows(
        cat,
        "SELECT * FROM psi(?, ?, ?, ?, 2)",
        [T0, T0 + MINUTE, T0 + 2 * MINUTE, T0 + 3 * MINUTE],
    )
    assert same["psi"] == pytest.approx(0.0)


def test_rollups_of_one_segment_holding_two_model_versions():
    """The rollup keys are usually constant within a segment (a fast path); when they
    are not, each key still gets its own rows."""
    import pyarrow as pa

    from featurewatch.storage.rollups import feature_rollups, token_rollups
    from tests.unit.lake_helpers import segment

    a_tokens, a_feats = segment(T0, 10, {1: [1.0, 2.0]}, model_version="v1")
    b_tokens, b_feats = segment(T0, 4, {1: [5.0]}, model_version="v2")
    feats = feature_rollups(pa.concat_tables([a_feats, b_feats])).to_pylist()
    by_version = {r["model_version"]: r for r in feats}
    assert (by_version["v1"]["fired"], by_version["v1"]["sum_value"]) == (2, 3.0)
    assert (by_version["v2"]["fired"], by_version["v2"]["max_value"]) == (1, 5.0)
    assert {r["period_start"] for r in feats} == {T0}
    tokens = token_rollups(pa.concat_tables([a_tokens, b_tokens])).to_pylist()
    assert sorted((r["model_version"], r["tokens"]) for r in tokens) == [("v1", 10), ("v2", 4)]


def test_token_context_shows_the_text_around_a_token(lake):
    """Tokens "The", " cat", " sat", " down", "." at positions 0..4 (stored under two SAE
    versions would still print once): around position 2 with width 1, " cat⟦ sat⟧ down"."""
    import pyarrow as pa

    from featurewatch.storage.lake import write_segment
    from tests.unit.lake_helpers import segment

    cat, _ = lake
    tokens, feats = segment(T0, 5, {1: [1.0]})
    words = ["The", " cat", " sat", " down", "."]
    tokens = tokens.set_column(
        tokens.schema.get_field_index("token_text"), "token_text", pa.array(words)
    )
    files = write_segment(cat.lake, tokens, feats, "ctx__sae1")
    cat.commit_segment("ctx", "sae1", files, tokens=5, feature_rows=1)
    request = tokens.column("request_id")[0].as_py()
    (row,) = rows(cat, "SELECT token_context(?, 2, 1) AS c", [request])
    assert row["c"] == " cat⟦ sat⟧ down"
    (edge,) = rows(cat, "SELECT token_context(?, 0, 2) AS c", [request])
    assert edge["c"] == "⟦The⟧ cat sat"


def test_top_examples_with_context(lake):
    """Feature 1 fires 0.5, 3.0, 2.0 on tokens 0..2 of "a b c d": the top two are
    " b" (3.0) and " c" (2.0), each shown with one token either side."""
    import pyarrow as pa

    from featurewatch.storage.lake import write_segment
    from tests.unit.lake_helpers import segment

    cat, _ = lake
    tokens, feats = segment(T0, 4, {1: [0.5, 3.0, 2.0], 2: [9.0]})
    tokens = tokens.set_column(
        tokens.schema.get_field_index("token_text"), "token_text", pa.array(["a", " b", " c", " d"])
    )
    files = write_segment(cat.lake, tokens, feats, "ex__sae1")
    cat.commit_segment("ex", "sae1", files, tokens=4, feature_rows=4)
    got = rows(cat, "SELECT value, token_pos, context FROM top_examples('sae1', 1, 2, 1)", [])
    assert got == [
        {"value": 3.0, "token_pos": 1, "context": "a⟦ b⟧ c"},
        {"value": 2.0, "token_pos": 2, "context": " b⟦ c⟧ d"},
    ]
