"""What the controller does when a policy fires. Each handler takes the action's config
(as the policy file gave it) and the decision from the audit log, does the work, and
returns one line saying what it did; raising marks the action failed in the audit.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta

import requests
from pydantic import TypeAdapter

from featurewatch.actors.runtime import init_ray
from featurewatch.actors.serving import (
    promote_model,
    served_model,
    set_steering,
    start_canary,
    steers_for,
    stop_canary,
    tag_verdict,
    verdicts_on,
)
from featurewatch.analysis.scoring import evaluate_model, live_model_score, score_threshold
from featurewatch.analysis.transcripts import read_prompts, read_transcripts
from featurewatch.platform.jobs.finetune import FinetuneSettings, run_finetune
from featurewatch.platform.jobs.refresh_sae import refresh_sae
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.inbox import ModelVersionRegistration, submit

log = logging.getLogger(__name__)


def alert_body(decision: dict) -> dict:
    """The JSON a webhook receives: which policy, why, and the numbers behind it."""
    numbers = decision["numbers"]
    return {
        "source": "featurewatch",
        "decision_id": decision["decision_id"],
        "policy_id": decision["policy_id"],
        "decided_at": decision["decided_at"].isoformat(),
        "status": decision["status"],
        "reason": decision["reason"],
        "sae_version": numbers.get("sae_version"),
        "values": numbers.get("values"),
        "top_features": numbers.get("top_features"),
    }


def send_alert(action: dict, decision: dict) -> str:
    """POST the alert to the webhook, retrying with backoff on errors and 5xx answers;
    every attempt is bounded by the action's timeout."""
    body = alert_body(decision)
    log.warning("ALERT %s: %s", decision["policy_id"], decision["reason"])
    attempts = action.get("retries", 3) + 1
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        try:
            answer = requests.post(action["url"], json=body, timeout=action.get("timeout_s", 5.0))
        except requests.RequestException as err:
            problem = f"{type(err).__name__}: {err}"
            continue
        if answer.status_code < 300:
            return f"posted to {action['url']} (HTTP {answer.status_code}, attempt {attempt + 1})"
        problem = f"HTTP {answer.status_code}"
        if answer.status_code < 500:
            break  # the receiver refused the request: sending it again will not help
    raise RuntimeError(f"webhook {action['url']} failed after {attempt + 1} attempt(s): {problem}")


def steer_handler(cfg):
    """The `steer` action: push down, in every live replica, the group's features that
    crossed the bar (through Serve's reconfigure, no restart)."""

    def steer(action: dict, decision: dict) -> str:

        numbers = decision["numbers"]
        ids = numbers.get("crossing") or [f["feature_id"] for f in numbers["top_features"][:1]]
        init_ray(cfg)
        with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
            steers = steers_for(
                cfg, catalog, ids, sae_version=numbers["sae_version"],
                mode=action.get("mode", "subtract"), scale=action["scale"],
            )  # fmt: skip
        status = set_steering(cfg, steers)
        return (
            f"steering features {ids} of {numbers['sae_version']} ({action.get('mode')}, "
            f"scale {action['scale']}) on replica {status['replica_id']}"
        )

    return steer


def verdicts_handler(cfg):
    """The `verdicts` action: score every live response in-line with the policy tag's
    probe from now on, with the action's gate and threshold (no restart)."""

    def verdicts(action: dict, decision: dict) -> str:
        numbers = decision["numbers"]
        tag = numbers.get("tag")
        if not tag:
            raise ValueError("verdicts score with a tag's probe: use a tag condition")
        bar = action["threshold"]
        given = {"fpr": bar["fpr"], "reference": bar["reference"]} if isinstance(bar, dict) \
            else {"threshold": bar}  # fmt: skip
        with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
            wanted = tag_verdict(cfg, catalog, tag, gate=action.get("gate", "flag"),
                                 sae_version=numbers.get("sae_version"),
                                 scale=action.get("scale", 4.0), **given)  # fmt: skip
        init_ray(cfg)
        status = verdicts_on(cfg, wanted)
        return (
            f"in-line verdicts on for tag {tag} (gate {wanted.gate}, threshold "
            f"{wanted.threshold:.4f} from {wanted.threshold_source}) on replica "
            f"{status['replica_id']}"
        )

    return verdicts


def refresh_sae_handler(cfg):
    """The `refresh_sae` action: measure the SAE in use on the newest spool segments of
    the action's window and, past the FVU threshold, train a child from it there (a Ray
    Train job) that replaces it in the pipeline only if it is not worse and its tagged
    features carry over (`platform/jobs/refresh_sae.py`). A refused child fails the
    action, naming why; the parent is kept."""

    def refresh(action: dict, decision: dict) -> str:
        result = refresh_sae(
            cfg, decision["numbers"]["sae_version"],
            window=TypeAdapter(timedelta).validate_python(action["data_window"]),
            fvu_threshold=action["fvu_threshold"], epochs=action.get("epochs", 3),
        )  # fmt: skip
        if result.refreshed and not result.kept:
            raise RuntimeError(result.summary())
        return result.summary()

    return refresh


def realign_handler(cfg, on_event=None, around_finetune=None):
    """The `realign` action: a LoRA fine-tune of the served model on safe examples (a Ray
    Train job); the candidate is scored on its own answers to the evaluation prompts by
    the policy's tag group; under the bar it becomes a canary taking a share of live
    traffic, scored the same way on the answers it gives there (from the lake); under
    the bar again, it is promoted (a rolling update of every replica). Otherwise it is
    rolled back, the serving version untouched, and the audit says why. `on_event`, when
    given, hears each step as one line (the realign demo's timeline); `around_finetune`,
    when given, makes the context the fine-tune runs in (the demo pauses its traffic)."""

    tell = on_event or (lambda text: log.info("realign: %s", text))
    around_finetune = around_finetune or nullcontext

    def realign(action: dict, decision: dict) -> str:

        tag = decision["numbers"].get("tag")
        if not tag:
            raise ValueError("realign scores the candidate with a tag group: use a tag condition")
        sae_version = decision["numbers"].get("sae_version")
        init_ray(cfg)
        base_path, base_version = served_model(cfg)
        candidate = f"{base_version}-realigned-{decision['decision_id'].rsplit('-', 1)[-1]}"
        tell(f"fine-tuning {candidate} from {base_version} on {action['examples']}")
        with around_finetune():
            result = run_finetune(
                cfg, base_path, read_transcripts(action["examples"]), candidate,
                FinetuneSettings(
                    steps=action["max_steps"], lr=action.get("lr", 2e-4),
                    torch_threads=action.get("cpus", 1),
                ),
            )  # fmt: skip
        tell(f"fine-tuned {candidate} ({result.steps} steps, {result.seconds:.0f} s)")
        with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
            report = evaluate_model(
                cfg, catalog, str(result.path), read_prompts(action["eval_prompts"]), tag=tag,
                sae_version=sae_version,
            )  # fmt: skip
            bar, bar_text = score_bar(cfg, catalog, action["score_bar"], tag, sae_version)
        score = report["mean_score"]
        judged = (
            f"candidate {candidate} (fine-tuned {result.steps} steps, loss "
            f"{result.first_loss:.3f} to {result.last_loss:.3f}) scored {score:.4f} on "
            f"{report['prompts']} prompts ({report['pooling']} of tag {tag}), bar {bar_text}"
        )
        tell(f"{candidate} scored {score:.4f} offline (bar {bar_text})")
        if score >= bar:
            raise RuntimeError(f"{judged}: rolled back, {base_version} keeps serving")
        # Live traffic is about to carry its version: the catalog's writer registers it.
        submit(
            cfg.inbox_dir,
            ModelVersionRegistration(
                model=cfg.model.name, model_version=candidate, path=str(result.path)
            ),
        )
        live = run_canary(cfg, action, result.path, candidate, tag, sae_version, tell)
        with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
            # Live scores come from the lake's features: the group probe's own bar.
            bar, bar_text = score_bar(
                cfg, catalog, action["score_bar"], tag, sae_version, family="sae_group"
            )
        judged += (
            f"; as a canary on {action['canary_share']:.0%} of traffic it scored "
            f"{live['mean_score']:.4f} on {live['requests']} live requests, bar {bar_text}"
        )
        if live["mean_score"] >= bar:
            raise RuntimeError(f"{judged}: rolled back, {base_version} keeps serving")
        served = promote_model(cfg, result.path, candidate)
        return f"{judged}: promoted, serving {served['version']}"

    return realign


def score_bar(
    cfg, catalog, bar, tag: str, sae_version, family: str | None = None
) -> tuple[float, str]:
    """(the bar as a score, how it reads in the audit): a probability as it is, or
    {fpr, reference} converted with the tag's probe (recorded with the probe)."""
    if not isinstance(bar, dict):
        return float(bar), f"{bar}"
    found = score_threshold(
        cfg, catalog, tag=tag, fpr=bar["fpr"], reference=bar["reference"],
        sae_version=sae_version, family=family,
    )  # fmt: skip
    return found["score"], (
        f"{found['score']:.4f} (flags {bar['fpr']:.1%} of {bar['reference']} with the "
        f"{found['probe']['family']} probe)"
    )


def run_canary(cfg, action: dict, path, candidate: str, tag: str, sae_version, tell) -> dict:
    """Serve the candidate to `canary_share` of the traffic until the lake holds
    `canary_requests` of its answers (every token of a canary request is captured), and
    score them. The canary is ended whatever happens (promotion starts the candidate
    afresh); too little traffic in `canary_timeout_s` is a failure."""

    since = datetime.now(UTC)
    start_canary(cfg, path, candidate, action["canary_share"])
    tell(f"canary {candidate} takes {action['canary_share']:.0%} of traffic")
    try:
        deadline = time.monotonic() + action["canary_timeout_s"]
        while True:
            with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
                live = live_model_score(
                    cfg, catalog, candidate, str(path), tag=tag, since=since,
                    sae_version=sae_version,
                )  # fmt: skip
            if live["requests"] >= action["canary_requests"]:
                tell(f"canary scored {live['mean_score']:.4f} on {live['requests']} live requests")
                return live
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"canary {candidate}: {live['requests']} of the "
                    f"{action['canary_requests']} live requests needed reached the lake in "
                    f"{action['canary_timeout_s']:.0f} s: rolled back"
                )
            time.sleep(2.0)
    finally:
        stop_canary(cfg)
