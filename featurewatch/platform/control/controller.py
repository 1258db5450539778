"""The policy controller: evaluates trigger policies over the catalog and acts.

One tick evaluates every policy that is due: its statistic over the last `consecutive`
windows (newest first, each against the `baseline` span just before it), aggregated over
the tag group's features. When every window crosses the threshold and the policy is out
of its cooldown, the policy fires: a decision goes to the audit log and its actions run
at once (`approval: automatic`), wait for `featurewatch approve ID` (`manual`), or only
get logged (`dry_run`). Every evaluation is logged too, with the numbers behind it.

The catalog is read through its published copy (`Catalog.for_analyst`, reopened each
tick), so the controller never blocks the pipeline and sees each commit on the next tick.
The cooldown lives in the audit log, so a restarted controller does not fire again.
Actions are handlers keyed by action type (`featurewatch/platform/control/actions.py`); a type
with no handler in this deployment is recorded as skipped, never silently dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from featurewatch.config import FeaturewatchConfig, format_duration
from featurewatch.errors import CatalogError, FeaturewatchError
from featurewatch.platform.control.actions import (
    realign_handler,
    refresh_sae_handler,
    send_alert,
    steer_handler,
    verdicts_handler,
)
from featurewatch.platform.control.policies import Condition, Policy, load_policies
from featurewatch.storage.audit import AuditLog, utc_now
from featurewatch.storage.catalog import Catalog, fetch_arrow
from featurewatch.storage.drift import latest_sae_version
from featurewatch.storage.registry import FeatureRegistry

log = logging.getLogger(__name__)

# Per group feature: fired and tokens in the baseline and the window, over the rollups
# (whole minutes), with the model filters; features that never fired count 0.
COUNTS_SQL = """
WITH ids AS (SELECT unnest($ids::INTEGER[]) AS feature_id),
tok AS (
    SELECT coalesce(sum(tokens) FILTER (WHERE side = 'b'), 0)::BIGINT AS base_tokens,
           coalesce(sum(tokens) FILTER (WHERE side = 'w'), 0)::BIGINT AS win_tokens
    FROM (SELECT 'b' AS side, * FROM token_totals($base_start, $base_end)
          UNION ALL BY NAME
          SELECT 'w' AS side, * FROM token_totals($win_start, $win_end))
    WHERE sae_version = $sae AND ($model IS NULL OR model = $model)
      AND ($model_version IS NULL OR model_version = $model_version)
),
fired AS (
    SELECT feature_id,
           coalesce(sum(fired) FILTER (WHERE side = 'b'), 0)::BIGINT AS base_fired,
           coalesce(sum(fired) FILTER (WHERE side = 'w'), 0)::BIGINT AS win_fired
    FROM (SELECT 'b' AS side, * FROM feature_totals($base_start, $base_end)
          UNION ALL BY NAME
          SELECT 'w' AS side, * FROM feature_totals($win_start, $win_end))
    WHERE sae_version = $sae AND ($model IS NULL OR model = $model)
      AND ($model_version IS NULL OR model_version = $model_version)
      AND feature_id IN (SELECT feature_id FROM ids)
    GROUP BY feature_id
)
SELECT ids.feature_id,
       CASE WHEN win_tokens > 0 THEN coalesce(win_fired, 0) / win_tokens END AS firing_rate,
       -- A feature silent on both sides has no ratio (smoothing would make one up).
       CASE WHEN base_tokens > 0 AND win_tokens > 0 AND fired.feature_id IS NOT NULL
            THEN smoothed_ratio(base_fired, base_tokens, win_fired, win_tokens) END
           AS rate_ratio,
       two_proportion_z(base_fired, base_tokens, win_fired, win_tokens) AS z_score
FROM ids CROSS JOIN tok LEFT JOIN fired USING (feature_id)
ORDER BY ids.feature_id
"""
PSI_SQL = """
SELECT feature_id, psi AS value FROM psi($base_start, $base_end, $win_start, $win_end, 10)
WHERE sae_version = $sae AND feature_id IN (SELECT unnest($ids::INTEGER[]))
"""
TREND_SQL = """
SELECT feature_id, slope AS value FROM trend_slope($win_end, $width, $n)
WHERE sae_version = $sae AND feature_id IN (SELECT unnest($ids::INTEGER[]))
"""
MODEL_FILTERED = ("rate_ratio", "z_score", "firing_rate", "flagged_share")
# Per model version: the share of its first answers that the tag's in-line verdicts
# flagged in the window (regenerated second answers are not counted again).
FLAGGED_SQL = """
SELECT model_version, count(*) AS responses, count(*) FILTER (WHERE flagged) AS flagged
FROM verdicts
WHERE tag = $tag AND attempt = 0 AND ts >= $win_start AND ts < $win_end
  AND ($model IS NULL OR model = $model)
  AND ($model_version IS NULL OR model_version = $model_version)
GROUP BY model_version ORDER BY model_version
"""


def flagged_shares(catalog: Catalog, condition: Condition, win_end: datetime) -> dict[str, float]:
    """model version -> share of its answers flagged in the window, for the versions with
    at least `min_responses` verdicts."""
    params = {
        "tag": condition.tag, "win_start": win_end - condition.window, "win_end": win_end,
        "model": condition.model, "model_version": condition.model_version,
    }  # fmt: skip
    rows = fetch_arrow(catalog.con, FLAGGED_SQL, params).to_pylist()
    return {
        r["model_version"]: r["flagged"] / r["responses"]
        for r in rows
        if r["responses"] >= condition.min_responses
    }


def window_value(
    catalog: Catalog, condition: Condition, sae_version: str, ids: list[int], win_end: datetime
) -> tuple[float | None, dict[int, float]]:
    """The statistic for the window ending at win_end: (aggregate over the group or None
    when there is no data, value per feature)."""
    win_start = win_end - condition.window
    params = {
        "ids": ids,
        "sae": sae_version,
        "base_start": win_start - condition.baseline,
        "base_end": win_start,
        "win_start": win_start,
        "win_end": win_end,
    }
    statistic = condition.statistic
    if statistic == "flagged_share":
        shares = flagged_shares(catalog, condition, win_end)
        if not shares:
            return None, {}
        values = list(shares.values())
        aggregate = max(values) if condition.aggregate == "max" else sum(values) / len(values)
        return float(aggregate), shares
    if statistic in MODEL_FILTERED:
        params |= {"model": condition.model, "model_version": condition.model_version}
        rows = fetch_arrow(catalog.con, COUNTS_SQL, params).to_pylist()
        per_feature = {r["feature_id"]: r[statistic] for r in rows if r[statistic] is not None}
    else:
        if statistic == "psi":
            sql = PSI_SQL
        else:
            sql = TREND_SQL
            params = {k: params[k] for k in ("ids", "sae", "win_end")}
            params |= {"width": condition.window, "n": condition.windows}
        rows = fetch_arrow(catalog.con, sql, params).to_pylist()
        per_feature = {r["feature_id"]: r["value"] for r in rows if r["value"] is not None}
    if not per_feature:
        return None, {}
    values = list(per_feature.values())
    aggregate = max(values) if condition.aggregate == "max" else sum(values) / len(values)
    return float(aggregate), per_feature


def crosses(condition: Condition, value: float | None) -> bool:
    if value is None:
        return False
    if condition.direction == "above":
        return value > condition.threshold
    return value < condition.threshold


def evaluate(catalog: Catalog, policy: Policy, now: datetime) -> dict:
    """The policy's condition at `now` (floored to the minute, as the rollups are):
    the value of each of the last `consecutive` windows, newest first, and whether
    all of them cross the threshold."""
    condition = policy.condition
    end = now.replace(second=0, microsecond=0)
    sae_version = condition.sae_version or latest_sae_version(catalog)
    features = None if condition.feature is None else [condition.feature]
    ids = FeatureRegistry(catalog).group_ids(sae_version, condition.tag, features)
    values, per_feature = [], {}
    for i in range(condition.consecutive):
        value, features = window_value(
            catalog, condition, sae_version, ids, end - i * condition.window
        )
        values.append(value)
        if i == 0:
            per_feature = features
    top = sorted(per_feature.items(), key=lambda kv: -abs(kv[1]))[:5]
    crossing = sorted(f for f, v in per_feature.items() if crosses(condition, v))
    if condition.statistic == "flagged_share":
        # The values are per model version: steering acts on the tag's whole group.
        versions = {"model_versions": [{"model_version": v, "value": x} for v, x in top]}
        top, crossing = [], ids if crossing else []
    else:
        versions = {}
    return {
        "sae_version": sae_version,
        "tag": condition.tag,
        "window_end": end.isoformat(),
        "values": values,
        "met": all(crosses(condition, v) for v in values),
        "no_data": all(v is None for v in values),
        "features": len(ids),
        "top_features": [{"feature_id": f, "value": v} for f, v in top],
        # the group's features that crossed the bar in the newest window: what `steer` acts on
        "crossing": crossing,
        **versions,
    }


def describe(policy: Policy, result: dict) -> str:
    """Why a policy fired, in words, with the numbers."""
    c = policy.condition
    target = f"tag {c.tag}" if c.tag else f"feature {c.feature}"
    shown = ", ".join("none" if v is None else f"{v:.4g}" for v in result["values"])
    return (
        f"{c.statistic} ({c.aggregate}) of {target} on {result['sae_version']} was {shown} "
        f"over the last {len(result['values'])} window(s) of {format_duration(c.window)} ending "
        f"{result['window_end']}, {c.direction} {c.threshold}"
    )


Handler = Callable[[dict, dict], str]  # (action config, decision) -> what was done


class PolicyController:
    """Evaluates policies and runs the decisions; `tick()` is one round."""

    def __init__(
        self,
        cfg: FeaturewatchConfig,
        policies: list[Policy],
        *,
        audit: AuditLog | None = None,
        handlers: dict[str, Handler] | None = None,
        metrics=None,
    ):

        self.cfg = cfg
        self.policies = policies
        self.audit = audit or AuditLog(cfg.audit_path)
        if handlers is None:
            handlers = {
                "alert": send_alert,
                "steer": steer_handler(cfg),
                "refresh_sae": refresh_sae_handler(cfg),
                "realign": realign_handler(cfg),
                "verdicts": verdicts_handler(cfg),
            }
        self.handlers = handlers
        # The Ray actor passes ControllerMetrics (featurewatch/actors/metrics.py); this
        # module stays free of Ray, so `featurewatch policy run` records none.
        self.metrics = metrics
        self.last_evaluated: dict[str, datetime] = {}
        for decision_id in self.audit.decisions_with_status("running"):
            # Cut off by a crash mid-action: recorded, not run again.
            log.warning("decision %s was interrupted by a restart", decision_id)
            self.audit.set_status(decision_id, "interrupted")

    def tick(self, now: datetime | None = None) -> list[dict]:
        """Evaluate every due policy, then run approved decisions. Returns what happened,
        one dict per policy evaluated. Never raises for one policy's trouble: the error
        is logged and audited and the other policies go on."""
        now = now or utc_now()
        report = []
        if not self.cfg.catalog_path.exists():
            log.warning("no catalog at %s yet: nothing to evaluate", self.cfg.catalog_path)
            return report
        with Catalog.for_analyst(self.cfg.catalog_path, self.cfg.lake_location) as catalog:
            for policy in self.policies:
                last = self.last_evaluated.get(policy.id)
                if last is not None and now - last < policy.every:
                    continue
                self.last_evaluated[policy.id] = now
                report.append(self._evaluate_one(catalog, policy, now))
        # Actions run once the catalog is closed: they may open it themselves (DuckDB
        # shares one instance per file in a process, and a sandboxed one is locked).
        for decision_id in self.audit.decisions_with_status("approved"):
            self.run_decision(decision_id)
        return report

    def _evaluate_one(self, catalog: Catalog, policy: Policy, now: datetime) -> dict:
        c = policy.condition
        started = time.perf_counter()
        try:
            result = evaluate(catalog, policy, now)
        except FeaturewatchError as err:
            self._count_evaluation(policy, "error", time.perf_counter() - started)
            # A tag with no features yet, no data at all, a bad feature id: audited.
            log.warning("policy %s: %s", policy.id, err)
            self.audit.record_evaluation(
                policy.id, sae_version=c.sae_version, statistic=c.statistic,
                threshold=c.threshold, values=[], met=False, outcome="error",
                detail=str(err), at=now,
            )  # fmt: skip
            return {"policy": policy.id, "outcome": "error", "detail": str(err)}
        seconds = time.perf_counter() - started  # the drift queries, not the audit writes
        outcome, decision_id = "not_met", None
        if result["no_data"]:
            outcome = "no_data"
        elif result["met"]:
            last = self.audit.last_fired(policy.id)
            if last is not None and now - last < policy.cooldown:
                outcome = "cooldown"
            else:
                outcome = "fired"
                decision_id = self._fire(policy, result, now)
        self._count_evaluation(policy, outcome, seconds)
        self.audit.record_evaluation(
            policy.id, sae_version=result["sae_version"], statistic=c.statistic,
            threshold=c.threshold, values=result["values"], met=result["met"],
            outcome=outcome, detail=decision_id, at=now,
        )  # fmt: skip
        return {"policy": policy.id, "outcome": outcome, "decision": decision_id, **result}

    def _count_evaluation(self, policy: Policy, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.evaluated(policy.id, policy.condition.statistic, outcome, seconds)

    def _fire(self, policy: Policy, result: dict, now: datetime) -> str:
        if policy.dry_run:
            status = "dry_run"
        elif policy.approval == "manual":
            status = "pending"
        else:
            status = "approved"
        reason = describe(policy, result)
        decision_id = self.audit.new_decision(
            policy.id,
            status=status,
            reason=reason,
            numbers=result,
            actions=[a.model_dump(mode="json") for a in policy.actions],
            at=now,
        )
        log.warning("policy %s fired (%s): %s", policy.id, status, reason)
        if self.metrics is not None:
            self.metrics.fired(policy.id, status)
        return decision_id

    def run_decision(self, decision_id: str) -> str:
        """Run an approved decision's actions in order; one failing action is recorded
        and the rest still run. Returns the decision's final status."""
        decision = self.audit.decision(decision_id)
        if decision["status"] != "approved":
            raise CatalogError(f"decision {decision_id} is {decision['status']}, not approved")
        self.audit.set_status(decision_id, "running")
        failed = False
        for index, action in enumerate(decision["actions"]):
            handler = self.handlers.get(action["type"])
            if handler is None:
                status, detail = "skipped", f"no {action['type']} handler in this deployment"
            else:
                try:
                    status, detail = "done", handler(action, decision)
                except Exception as err:  # noqa: BLE001 - any failing action is audited
                    status, detail, failed = "failed", f"{type(err).__name__}: {err}", True
            log.warning("decision %s: %s %s: %s", decision_id, action["type"], status, detail)
            self.audit.record_action(decision_id, index, action["type"], status, detail)
            if self.metrics is not None:
                self.metrics.action(decision["policy_id"], action["type"], status)
        final = "failed" if failed else "done"
        self.audit.set_status(decision_id, final)
        return final


def load_policy_list(path: Path) -> list[Policy]:

    return load_policies(path).policies


def run_forever(controller: PolicyController, every: timedelta, stop=None) -> None:
    """Tick until `stop` (a threading.Event) is set; a failing tick is logged, not fatal."""

    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            for row in controller.tick():
                log.info("policy %s: %s", row["policy"], row["outcome"])
        except Exception:  # noqa: BLE001 - the controller must outlive one bad tick
            log.exception("controller tick failed")
        stop.wait(every.total_seconds())
