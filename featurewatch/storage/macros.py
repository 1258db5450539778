"""The drift questions safety teams ask, as DuckDB macros in the catalog.

Every window is half-open, [start, end), and counted in whole rollup periods: the
rollups (`feature_rollups`, `token_rollups`) hold one row per minute, or per hour once
compaction has folded a closed hour, and a period belongs to a window when it starts
inside it. Rates are per sampled token: times a feature fired over
tokens seen. Statistics are per SAE version and feature id, so feature ids of two
dictionaries never meet in one number. Each macro's comment is its documentation (the
SQL reference in the docs lists them); tests check each against a hand-computed answer.
"""

from __future__ import annotations

_MACROS_TEMPLATE = r"""
-- two_proportion_z(f1, n1, f2, n2): z-score of rate f2/n2 against f1/n1 with the pooled
-- rate; NULL when either count of tokens is 0 or the pooled rate is 0 or 1.
CREATE OR REPLACE MACRO two_proportion_z(f1, n1, f2, n2) AS
    CASE WHEN n1 = 0 OR n2 = 0 OR (f1 + f2) = 0 OR (f1 + f2) = (n1 + n2) THEN NULL
         ELSE (f2 / n2 - f1 / n1) / sqrt(
              ((f1 + f2) / (n1 + n2)) * (1 - (f1 + f2) / (n1 + n2)) * (1.0 / n1 + 1.0 / n2))
    END;

-- smoothed_ratio(f1, n1, f2, n2): ((f2 + 0.5) / (n2 + 1)) / ((f1 + 0.5) / (n1 + 1)),
-- a rate ratio that stays finite when a feature never fired on one side.
CREATE OR REPLACE MACRO smoothed_ratio(f1, n1, f2, n2) AS
    ((f2 + 0.5) / (n2 + 1)) / ((f1 + 0.5) / (n1 + 1));

-- utc_date(ts): the UTC calendar date of a timestamp, as the lake's `date` partitions
-- are cut (whatever the session's TimeZone).
CREATE OR REPLACE MACRO utc_date(ts) AS CAST(timezone('UTC', ts) AS DATE);

-- feature_rows(start, end) / token_rows(start, end): the rollup rows of periods that
-- start in [start, end). The `date` condition lets DuckDB skip other days' files
-- without opening them.
{rows_macros}

-- feature_totals(start, end) / token_totals(start, end): the same rows for questions
-- that only sum over the whole window: whole days inside it from `feature_days` /
-- `token_days` (the day rows compaction writes once a day closes, plus any minute and
-- hour rows not folded into them yet), the partial days at its edges from the minute
-- and hour rows. A week's baseline reads a few rows per feature per day. Every
-- condition is on `date` alone or on columns, so DuckDB skips the other files.
CREATE OR REPLACE MACRO first_full_day(ts) AS
    utc_date(ts) + CASE WHEN timezone('UTC', ts) = CAST(utc_date(ts) AS TIMESTAMP)
                        THEN 0 ELSE 1 END;
-- whole_day(d, start, end): the UTC day d lies wholly inside [start, end).
CREATE OR REPLACE MACRO whole_day(d, start_ts, end_ts) AS
    d >= first_full_day(start_ts) AND d < utc_date(end_ts);
{totals_macros}

-- window_counts(start, end): per model version, SAE version and feature, the tokens
-- seen and the times fired in [start, end), with the activation's sum, sum of squares
-- and max. Features that never fired in the window have no row.
CREATE OR REPLACE MACRO window_counts(start_ts, end_ts) AS TABLE
WITH t AS (
    SELECT model_version, sae_version, sum(tokens)::BIGINT AS tokens
    FROM token_totals(start_ts, end_ts) GROUP BY ALL
), f AS (
    SELECT model_version, sae_version, feature_id, sum(fired)::BIGINT AS fired,
           sum(sum_value) AS sum_value, sum(sum_sq) AS sum_sq, max(max_value) AS max_value
    FROM feature_totals(start_ts, end_ts) GROUP BY ALL
)
SELECT f.model_version, f.sae_version, f.feature_id, t.tokens, f.fired,
       f.sum_value, f.sum_sq, f.max_value
FROM f JOIN t USING (model_version, sae_version);

-- firing_rate(start, end, width): per SAE version, feature and window of `width`
-- (an INTERVAL; windows start at `start`), tokens seen, times fired and the rate.
-- Windows where a feature did not fire have no row for it.
CREATE OR REPLACE MACRO firing_rate(start_ts, end_ts, width) AS TABLE
WITH t AS (
    SELECT sae_version, time_bucket(width, period_start, start_ts) AS window_start,
           sum(tokens)::BIGINT AS tokens
    FROM token_rows(start_ts, end_ts) GROUP BY ALL
), f AS (
    SELECT sae_version, feature_id, time_bucket(width, period_start, start_ts) AS window_start,
           sum(fired)::BIGINT AS fired
    FROM feature_rows(start_ts, end_ts) GROUP BY ALL
)
SELECT f.sae_version, f.feature_id, f.window_start, t.tokens, f.fired,
       f.fired / t.tokens AS rate
FROM f JOIN t USING (sae_version, window_start);

-- rate_change(base_start, base_end, win_start, win_end): per SAE version and feature,
-- fired and tokens in a baseline and a comparison window, both rates, the smoothed
-- rate ratio (window over baseline), the two-proportion z-score, and the mean
-- activation when fired in each window.
CREATE OR REPLACE MACRO rate_change(base_start, base_end, win_start, win_end) AS TABLE
-- Each lake view is read once for both windows (planning costs about 1 ms per view
-- reference, as much as reading a week's rollups), every row tagged with the windows
-- it counts in (both, when windows overlap), and everything aggregated in one pass with
-- FILTER: the same rows as feature_totals and token_rows of each window.
WITH
  t AS (
    SELECT sae_version,
           (sum(tokens) FILTER (WHERE in_base))::BIGINT AS base_tokens,
           (sum(tokens) FILTER (WHERE in_win))::BIGINT AS win_tokens
    FROM (SELECT sae_version, tokens,
                 period_start >= base_start AND period_start < base_end AS in_base,
                 period_start >= win_start AND period_start < win_end AS in_win
          FROM token_rows(least(base_start, win_start), greatest(base_end, win_end)))
    GROUP BY ALL
  ),
  f AS (
    SELECT sae_version, feature_id,
           coalesce(sum(fired) FILTER (WHERE in_base), 0)::BIGINT AS base_fired,
           coalesce(sum(fired) FILTER (WHERE in_win), 0)::BIGINT AS win_fired,
           sum(sum_value) FILTER (WHERE in_base) AS base_total,
           sum(sum_value) FILTER (WHERE in_win) AS win_total
    FROM (
        -- whole days inside a window: each day's rows once (day rows and late rows)
        SELECT sae_version, feature_id, fired, sum_value,
               whole_day("date", base_start, base_end) AS in_base,
               whole_day("date", win_start, win_end) AS in_win
        FROM feature_days
        WHERE whole_day("date", base_start, base_end) OR whole_day("date", win_start, win_end)
        UNION ALL
        -- the partial days at the windows' edges (at most two per window): minute and
        -- hour rows; rows of the days in between carry neither tag
        SELECT sae_version, feature_id, fired, sum_value,
               period_start >= base_start AND period_start < base_end
                   AND NOT whole_day("date", base_start, base_end) AS in_base,
               period_start >= win_start AND period_start < win_end
                   AND NOT whole_day("date", win_start, win_end) AS in_win
        FROM feature_rollups
        WHERE period_start >= least(base_start, win_start)
          AND period_start < greatest(base_end, win_end)
          AND "date" IN (utc_date(base_start), utc_date(base_end),
                         utc_date(win_start), utc_date(win_end))
    )
    GROUP BY ALL
  )
SELECT sae_version, feature_id, base_fired, base_tokens, win_fired, win_tokens,
       base_fired / base_tokens AS base_rate,
       win_fired / win_tokens AS win_rate,
       smoothed_ratio(base_fired, base_tokens, win_fired, win_tokens) AS rate_ratio,
       two_proportion_z(base_fired, base_tokens, win_fired, win_tokens) AS z,
       base_total / nullif(base_fired, 0) AS base_mean_value,
       win_total / nullif(win_fired, 0) AS win_mean_value
FROM f JOIN t USING (sae_version)
-- (a feature with only untagged edge rows has 0 and 0: every rollup row fired at least once)
WHERE base_tokens > 0 AND win_tokens > 0 AND (base_fired > 0 OR win_fired > 0);

-- rate_change_exact(base_start, base_end, win_start, win_end): rate_change's columns
-- computed from the raw rows (`feature_acts`, `tokens`), so windows may start and end
-- at any microsecond; slower over long windows than the rollups.
CREATE OR REPLACE MACRO rate_change_exact(base_start, base_end, win_start, win_end) AS TABLE
WITH
  bt AS (SELECT sae_version, count(*) AS n FROM tokens
         WHERE ts >= base_start AND ts < base_end GROUP BY ALL),
  wt AS (SELECT sae_version, count(*) AS n FROM tokens
         WHERE ts >= win_start AND ts < win_end GROUP BY ALL),
  bf AS (SELECT sae_version, feature_id, count(*) AS fired, sum(value) AS total
         FROM feature_acts WHERE ts >= base_start AND ts < base_end GROUP BY ALL),
  wf AS (SELECT sae_version, feature_id, count(*) AS fired, sum(value) AS total
         FROM feature_acts WHERE ts >= win_start AND ts < win_end GROUP BY ALL),
  joined AS (
    SELECT sae_version, feature_id,
           coalesce(bf.fired, 0) AS base_fired, bt.n AS base_tokens,
           coalesce(wf.fired, 0) AS win_fired, wt.n AS win_tokens,
           bf.total / bf.fired AS base_mean_value, wf.total / wf.fired AS win_mean_value
    FROM bf FULL JOIN wf USING (sae_version, feature_id)
    JOIN bt USING (sae_version)
    JOIN wt USING (sae_version)
  )
SELECT sae_version, feature_id, base_fired, base_tokens, win_fired, win_tokens,
       base_fired / base_tokens AS base_rate,
       win_fired / win_tokens AS win_rate,
       smoothed_ratio(base_fired, base_tokens, win_fired, win_tokens) AS rate_ratio,
       two_proportion_z(base_fired, base_tokens, win_fired, win_tokens) AS z,
       base_mean_value, win_mean_value
FROM joined;

-- top_movers(base_start, base_end, win_start, win_end, n): the n features whose rate
-- moved most (largest |z|, ties by feature id) between the windows; rate_change's
-- columns.
CREATE OR REPLACE MACRO top_movers(base_start, base_end, win_start, win_end, n) AS TABLE
SELECT * FROM rate_change(base_start, base_end, win_start, win_end)
ORDER BY abs(z) DESC NULLS LAST, sae_version, feature_id
LIMIT n;

-- model_diff(version_a, version_b, start, end): model diffing. The same window on two
-- model versions: per SAE version and feature, each version's fired, tokens and rate,
-- the smoothed rate ratio b over a and the z-score of b against a. A feature that rose
-- on b (a fine-tune) has a large positive z.
CREATE OR REPLACE MACRO model_diff(version_a, version_b, start_ts, end_ts) AS TABLE
WITH t AS (
    SELECT sae_version,
           (sum(tokens) FILTER (WHERE model_version = version_a))::BIGINT AS a_n,
           (sum(tokens) FILTER (WHERE model_version = version_b))::BIGINT AS b_n
    FROM token_totals(start_ts, end_ts) GROUP BY ALL
), f AS (
    SELECT sae_version, feature_id,
           coalesce(sum(fired) FILTER (WHERE model_version = version_a), 0)::BIGINT AS a_fired,
           coalesce(sum(fired) FILTER (WHERE model_version = version_b), 0)::BIGINT AS b_fired
    FROM feature_totals(start_ts, end_ts)
    WHERE model_version IN (version_a, version_b)
    GROUP BY ALL
)
SELECT sae_version, feature_id, a_fired, a_n AS a_tokens, b_fired, b_n AS b_tokens,
       a_fired / a_n AS a_rate, b_fired / b_n AS b_rate,
       smoothed_ratio(a_fired, a_n, b_fired, b_n) AS rate_ratio,
       two_proportion_z(a_fired, a_n, b_fired, b_n) AS z
FROM f JOIN t USING (sae_version)
WHERE a_n > 0 AND b_n > 0;

-- rate_series(start, end, width): every (SAE version, feature, window) of `width` in
-- [start, end) that had tokens, with the feature's rate (0 where it did not fire) and
-- the window's index from 0. Features are those that fired at least once.
CREATE OR REPLACE MACRO rate_series(start_ts, end_ts, width) AS TABLE
WITH t AS (
    SELECT sae_version, time_bucket(width, period_start, start_ts) AS window_start,
           sum(tokens)::BIGINT AS tokens
    FROM token_rows(start_ts, end_ts) GROUP BY ALL
), f AS (
    SELECT sae_version, feature_id, time_bucket(width, period_start, start_ts) AS window_start,
           sum(fired)::BIGINT AS fired
    FROM feature_rows(start_ts, end_ts) GROUP BY ALL
), features AS (SELECT DISTINCT sae_version, feature_id FROM f)
SELECT sae_version, feature_id, t.window_start,
       (epoch(t.window_start) - epoch(start_ts)) // epoch(width) AS window_index,
       t.tokens, coalesce(f.fired, 0) AS fired, coalesce(f.fired, 0) / t.tokens AS rate
FROM features JOIN t USING (sae_version)
LEFT JOIN f USING (sae_version, feature_id, window_start);

-- trend_slope(end, width, n): over the last n windows of `width` before `end`, the
-- least-squares slope of each feature's rate against the window index (rate change per
-- window), with the mean rate and the number of windows that had tokens.
CREATE OR REPLACE MACRO trend_slope(end_ts, width, n) AS TABLE
SELECT sae_version, feature_id, regr_slope(rate, window_index) AS slope,
       avg(rate) AS mean_rate, count(*) AS windows
FROM rate_series(end_ts - width * n, end_ts, width)
GROUP BY ALL;

-- change_points(start, end, width, reference, k, h): two-sided tabular CUSUM on each
-- feature's rate per window. The first `reference` windows give the in-control rate
-- p0 (their fired over tokens); each window's rate is standardised with the binomial
-- error sqrt(p0 (1 - p0) / tokens), and S+ = max(0, S+ + z - k), S- = max(0, S- - z - k).
-- One row per feature and direction that crossed h: the first window where it did and
-- the statistic there. (S_t = C_t - min(0, min C) for C the running sum of z - k, which
-- is the recursion written with window functions.)
CREATE OR REPLACE MACRO change_points(start_ts, end_ts, width, reference, k, h) AS TABLE
WITH s AS (SELECT * FROM rate_series(start_ts, end_ts, width)),
ref AS (
    SELECT sae_version, feature_id, sum(fired) / sum(tokens) AS p0
    FROM s WHERE window_index < reference GROUP BY ALL
), z AS (
    SELECT s.*, ref.p0,
           CASE WHEN ref.p0 <= 0 OR ref.p0 >= 1 THEN NULL
                ELSE (s.rate - ref.p0) / sqrt(ref.p0 * (1 - ref.p0) / s.tokens) END AS z
    FROM s JOIN ref USING (sae_version, feature_id)
    WHERE s.window_index >= reference
), c AS (
    SELECT *,
        sum(z - k) OVER w AS c_up,
        sum(-z - k) OVER w AS c_down
    FROM z WHERE z IS NOT NULL
    WINDOW w AS (PARTITION BY sae_version, feature_id ORDER BY window_index
                 ROWS UNBOUNDED PRECEDING)
), cusum AS (
    SELECT *,
        c_up - least(0, min(c_up) OVER w) AS s_up,
        c_down - least(0, min(c_down) OVER w) AS s_down
    FROM c
    WINDOW w AS (PARTITION BY sae_version, feature_id ORDER BY window_index
                 ROWS UNBOUNDED PRECEDING)
), alarms AS (
    SELECT sae_version, feature_id, 'up' AS direction, window_start, s_up AS statistic,
           p0, rate FROM cusum WHERE s_up > h
    UNION ALL
    SELECT sae_version, feature_id, 'down', window_start, s_down, p0, rate
    FROM cusum WHERE s_down > h
)
SELECT sae_version, feature_id, direction,
       arg_min(window_start, window_start) AS change_at,
       arg_min(statistic, window_start) AS statistic,
       any_value(p0) AS reference_rate,
       arg_min(rate, window_start) AS rate_at_change
FROM alarms GROUP BY ALL;

-- token_context(request_id, token_pos, width): the text around one sampled token: the
-- request's sampled tokens from token_pos - width to token_pos + width in order, the
-- token itself in ⟦ ⟧. Shows what `pipeline.token_text` kept (hashes when `hashed`,
-- '?' when `none`).
CREATE OR REPLACE MACRO token_context(req, pos, width) AS (
    SELECT string_agg(
               CASE WHEN token_pos = pos THEN '⟦' || coalesce(token_text, '?') || '⟧'
                    ELSE coalesce(token_text, '?') END,
               '' ORDER BY token_pos)
    FROM (SELECT DISTINCT token_pos, token_text FROM tokens
          WHERE request_id = req AND token_pos BETWEEN pos - width AND pos + width)
);

-- top_examples(sae_version, feature_id, n, width): the n tokens where a feature fired
-- hardest (raw rows still kept), each with its text and `width` sampled tokens of
-- context either side, as the privacy switch stored them.
CREATE OR REPLACE MACRO top_examples(sae, fid, n, width) AS TABLE
SELECT fa.ts, fa.model_version, fa.request_id, fa.token_pos, fa.value,
       token_context(fa.request_id, fa.token_pos, width) AS context
FROM (SELECT * FROM feature_acts WHERE sae_version = sae AND feature_id = fid
      ORDER BY value DESC, ts, request_id, token_pos LIMIT n) fa
ORDER BY fa.value DESC, fa.ts, fa.request_id, fa.token_pos;

-- psi(base_start, base_end, win_start, win_end, bins): population stability index of
-- each feature's activation magnitude (over the tokens where it fired), window against
-- baseline. Bins are equal-width over [0, the baseline's max]; window values above it
-- fall in the last bin; empty bins count 1e-4 of a share. PSI = sum over bins of
-- (w - b) * ln(w / b); above 0.25 is the usual "shifted". Reads `feature_acts`, not the
-- rollups (a distribution needs the values).
CREATE OR REPLACE MACRO psi(base_start, base_end, win_start, win_end, bins) AS TABLE
WITH b AS (
    SELECT sae_version, feature_id, value FROM feature_acts
    WHERE ts >= base_start AND ts < base_end
), w AS (
    SELECT sae_version, feature_id, value FROM feature_acts
    WHERE ts >= win_start AND ts < win_end
), edges AS (
    SELECT sae_version, feature_id, max(value) AS top FROM b GROUP BY ALL
), binned AS (
    SELECT 'b' AS side, sae_version, feature_id,
           least(floor(value / top * bins), bins - 1)::INTEGER AS bin
    FROM b JOIN edges USING (sae_version, feature_id) WHERE top > 0
    UNION ALL
    SELECT 'w', sae_version, feature_id,
           least(floor(value / top * bins), bins - 1)::INTEGER
    FROM w JOIN edges USING (sae_version, feature_id) WHERE top > 0
), shares AS (
    SELECT sae_version, feature_id, bin,
           count(*) FILTER (WHERE side = 'b') AS b_count,
           count(*) FILTER (WHERE side = 'w') AS w_count
    FROM binned GROUP BY ALL
), totals AS (
    SELECT sae_version, feature_id, sum(b_count) AS b_total, sum(w_count) AS w_total
    FROM shares GROUP BY ALL
), grid AS (
    SELECT sae_version, feature_id, bin, b_total, w_total
    FROM totals, range(0, bins) r(bin)
    WHERE b_total > 0 AND w_total > 0
), p AS (
    SELECT g.sae_version, g.feature_id, g.b_total, g.w_total,
           greatest(coalesce(s.b_count, 0) / g.b_total, 1e-4) AS bs,
           greatest(coalesce(s.w_count, 0) / g.w_total, 1e-4) AS ws
    FROM grid g LEFT JOIN shares s USING (sae_version, feature_id, bin)
)
SELECT sae_version, feature_id, any_value(b_total) AS base_fired,
       any_value(w_total) AS win_fired, sum((ws - bs) * ln(ws / bs)) AS psi
FROM p GROUP BY ALL;
"""

# The row macros of the two rollup kinds differ only in their tables.
_ROWS_MACRO = """
CREATE OR REPLACE MACRO {kind}_rows(start_ts, end_ts) AS TABLE
SELECT * FROM {kind}_rollups
WHERE period_start >= start_ts AND period_start < end_ts
  AND "date" BETWEEN utc_date(start_ts) AND utc_date(end_ts);"""
_TOTALS_MACRO = """
CREATE OR REPLACE MACRO {kind}_totals(start_ts, end_ts) AS TABLE
SELECT * FROM {kind}_days WHERE whole_day("date", start_ts, end_ts)
UNION ALL BY NAME
SELECT * FROM {kind}_rollups
WHERE period_start >= start_ts AND period_start < end_ts
  AND "date" BETWEEN utc_date(start_ts) AND utc_date(end_ts)
  AND NOT whole_day("date", start_ts, end_ts);"""
MACROS_SQL = _MACROS_TEMPLATE.replace(
    "{rows_macros}", "".join(_ROWS_MACRO.format(kind=k) for k in ("feature", "token"))
).replace("{totals_macros}", "".join(_TOTALS_MACRO.format(kind=k) for k in ("feature", "token")))

# One row per period and feature, the partial rows of several segments summed, with
# the tokens seen in that period.
ROLLUPS_VIEW_SQL = """
CREATE OR REPLACE VIEW rollups AS
WITH f AS (
    SELECT period_start, period_minutes, model, model_version, sae_version, layer,
           feature_id, sum(fired)::BIGINT AS fired, sum(sum_value) AS sum_value,
           sum(sum_sq) AS sum_sq, max(max_value) AS max_value
    FROM feature_rollups GROUP BY ALL
), t AS (
    SELECT period_start, period_minutes, model, model_version, sae_version, layer,
           sum(tokens)::BIGINT AS tokens_seen
    FROM token_rollups GROUP BY ALL
)
SELECT period_start, period_minutes, model, model_version, sae_version, layer,
       feature_id, tokens_seen, fired, sum_value, sum_sq, max_value
FROM f JOIN t USING (period_start, period_minutes, model, model_version, sae_version, layer)
"""
