"""Deploying the model server, and steering its live replicas.

The application is deployed the way `serve deploy` deploys a config file: by import
path (`featurewatch.actors.model_server:build_app`) with its arguments, plus a
user_config. Deployed that way, a changed user_config is a lightweight update: Serve
calls `reconfigure` on every running replica, none restarts. (`serve.run` of a bound
Python application replaces the replicas on every call in Ray 2.60, measured; and the
REST route `serve deploy` uses needs the dashboard, which a cluster may run without, so
the same request goes through the Serve client.)

The arguments of the last deployment (its config and the collector addresses) are kept
in the home's deployed-application record (storage/deployed_app.py), so steering from
another process (`featurewatch steer`, the controller) redeploys the same application
with only the steering changed, and a promotion changes only the model. The collector
token is not stored there: it is read from the config or the home, as at deployment."""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError
from ray import serve
from ray.serve.api import _get_global_client
from ray.serve.schema import ServeDeploySchema

from featurewatch.actors.runtime import collector_names, collector_token, init_ray
from featurewatch.analysis.probes import load_probe
from featurewatch.analysis.scoring import score_threshold
from featurewatch.analysis.verdicts import (
    InlineScorer,
    TagVerdict,
    VerdictSettings,
    verdict_summary,
)
from featurewatch.capture.models import model_dims, resolve_model_path
from featurewatch.capture.steering import Steer, check_steer, steer_from_sae
from featurewatch.config import FeaturewatchConfig, describe_errors
from featurewatch.errors import ConfigError
from featurewatch.sae import load
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.deployed_app import read_deployed, write_deployed
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.sae_store import registered_sae

# The replica of each engine, deployed by import path (vLLM is imported only by replicas
# that serve with it).
APP_IMPORT_PATHS = {
    "hf": "featurewatch.actors.model_server:build_app",
    "vllm": "featurewatch.actors.vllm_server:build_app",
}
DEPLOYMENT = "ModelServer"


def check_servable(cfg: FeaturewatchConfig) -> tuple[Path, int]:
    """(model folder, hidden width) once the model and its capture settings can be
    served; before any replica starts, a ConfigError naming the field otherwise. The
    engine's own module checks its options (vLLM validates them without loading weights)."""
    name = cfg.model.name
    folder = resolve_model_path(cfg.model.path, cfg.models_dir)
    width, layers = model_dims(folder)
    outside = [layer for layer in cfg.capture.layers if layer >= layers]
    if outside:
        raise ConfigError(
            f"{name}: capture.layers {outside} out of range: the model has {layers} layers "
            f"(0 to {layers - 1})"
        )
    module = importlib.import_module(APP_IMPORT_PATHS[cfg.model.engine].split(":")[0])
    module.check_settings(cfg, folder)
    return folder, width


def canary_app_name(cfg: FeaturewatchConfig) -> str:
    return f"{cfg.serve.app_name}-canary"


def _application(
    cfg: FeaturewatchConfig,
    name: str,
    route_prefix: str | None,
    addresses: list[str],
    token: str,
    user_config: dict,
) -> dict:
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": APP_IMPORT_PATHS[cfg.model.engine],
        "args": {
            "config": cfg.model_dump(mode="json"),
            "collector_addresses": list(addresses),
            "collector_names": collector_names(cfg),
            "token": token,
            "num_replicas": cfg.model.num_replicas,
            "replica_cpus": cfg.model.replica_cpus,
            "resources": cfg.role_resources("serving"),
        },
        "deployments": [{"name": DEPLOYMENT, "user_config": user_config}],
    }


def _deploy(
    cfg: FeaturewatchConfig,
    addresses: list[str],
    token: str,
    steers: list[Steer],
    canary: dict | None = None,
    timeout_s: float = 600.0,
    verdicts: dict | None = None,
):
    """Deploy the model server with these steers and in-line verdict settings; with
    `canary` ({"config": the candidate's config as JSON, "share": its traffic share,
    "routed": whether the main replicas send it traffic yet}), the candidate runs beside
    it as a second application without an HTTP route, with the same verdicts. The deploy
    is declarative: an application left out (a canary that ended) is deleted."""

    user_config: dict = {
        "steering": [asdict(s) for s in steers], "canary": None, "verdicts": verdicts
    }  # fmt: skip
    apps = []
    if canary is not None:
        candidate = FeaturewatchConfig.model_validate(canary["config"])
        check_servable(candidate)
        name = canary_app_name(cfg)
        canary_config = {"steering": [], "verdicts": verdicts}
        apps.append(_application(candidate, name, None, addresses, token, canary_config))
        if canary["routed"]:
            user_config["canary"] = {"app": name, "share": canary["share"]}
    main = _application(
        cfg, cfg.serve.app_name, cfg.serve.route_prefix, addresses, token, user_config
    )
    apps.insert(0, main)
    # The fleet's other models, each its own application (the deploy is declarative:
    # every redeploy names them all, or Serve would delete the ones left out).
    for member in cfg.fleet_configs()[1:]:
        s = member.serve
        apps.append(_application(member, s.app_name, s.route_prefix, addresses, token, {}))
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))
    # Serve's own blocking wait gives up after 60 s; loading a model on busy cores can
    # take longer, and a failed deployment should say why.
    deadline = time.monotonic() + timeout_s
    for app_name in [a["name"] for a in apps]:
        while True:
            app = serve.status().applications.get(app_name)
            status = str(app.status).rsplit(".", 1)[-1] if app else "NOT_STARTED"
            if status == "RUNNING":
                break
            if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
                message = app.message if app else ""
                raise ConfigError(f"deploying {app_name!r} ended {status}: {message}")
            time.sleep(0.25)
    client.wait_for_proxies_serving(wait_for_applications_running=True)
    deployed = {
        "config": cfg.model_dump(mode="json"),
        "collector_addresses": list(addresses),
        "steering": user_config["steering"],
        "canary": canary,
        "verdicts": verdicts,
    }
    write_deployed(cfg.deployed_app_file, deployed)
    return serve.get_app_handle(cfg.serve.app_name)


def _deployed(cfg: FeaturewatchConfig) -> tuple[FeaturewatchConfig, list[str], dict]:
    """The running application's config, collector addresses and the rest of what was
    deployed (steering, canary), as last deployed (the served model may have been
    promoted since `cfg` was read)."""

    deployed = read_deployed(cfg.deployed_app_file)
    if deployed is None:
        raise ConfigError(
            f"no deployed model server recorded in {cfg.deployed_app_file}: deploy it first"
        )
    running = serve.status().applications.get(cfg.serve.app_name)
    if running is None or str(running.status).rsplit(".", 1)[-1] != "RUNNING":
        # Redeploying here would start a new application, not change the running one.
        raise ConfigError(f"the model server application {cfg.serve.app_name!r} is not running")
    served = FeaturewatchConfig.model_validate(deployed["config"])
    return served, deployed["collector_addresses"], deployed


def deploy_model_server(cfg: FeaturewatchConfig, addresses: list[str], token: str):
    """Deploy (or update) the model server application; returns its handle. Serve must
    be started (`serve.start`) with the HTTP options wanted. Every model of the fleet is
    checked first (check_servable), so a bad setting fails here, naming its field."""
    for member in cfg.fleet_configs():
        check_servable(member)
    settings = configured_verdicts(cfg)
    verdicts = settings.model_dump(mode="json") if settings is not None else None
    return _deploy(cfg, addresses, token, [], verdicts=verdicts)


def configured_verdicts(cfg: FeaturewatchConfig) -> VerdictSettings | None:
    """The verdict settings `model.verdicts` asks for, built from the catalog's probes and
    checked against the model (None: none asked for); a ConfigError names the tag."""
    wanted = cfg.model.verdicts
    if not wanted.tags:
        return None
    tags = []
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
        for i, t in enumerate(wanted.tags):
            given = {"threshold": t.threshold} if t.fpr is None else {
                "fpr": t.fpr, "reference": t.reference}  # fmt: skip
            try:
                tags.append(tag_verdict(cfg, catalog, t.tag, gate=t.gate, scale=t.scale, **given))
            except ConfigError as err:
                raise ConfigError(f"model.verdicts.tags.{i}: {err}") from None
    settings = VerdictSettings(tags=tags, every=wanted.every)
    width, layers = model_dims(resolve_model_path(cfg.model.path, cfg.models_dir))
    try:
        InlineScorer(settings, width, layers)
    except ConfigError as err:
        raise ConfigError(f"model.verdicts: {err}") from None
    return settings


def steers_for(
    cfg: FeaturewatchConfig,
    catalog,
    feature_ids: list[int],
    *,
    sae_version: str | None = None,
    mode: str = "subtract",
    scale: float = 4.0,
) -> list[Steer]:
    """Steers for features of a registered SAE, at the SAE's layer and site."""

    choice = registered_sae(cfg, catalog, sae_version)
    sae = load(choice.path)
    try:
        return [
            steer_from_sae(
                sae,
                fid,
                layer=choice.layer,
                site=choice.site,
                mode=mode,
                scale=scale,
                sae_version=choice.version,
            )  # fmt: skip
            for fid in feature_ids
        ]
    except ValueError as err:
        raise ConfigError(f"{choice.version}: {err}") from None


def steer_by_hand(
    cfg: FeaturewatchConfig,
    feature_ids: list[int] | None,
    *,
    sae_version: str | None = None,
    mode: str = "subtract",
    scale: float = 4.0,
) -> dict:
    """`featurewatch steer`: push the features' decoder directions out of the live
    replicas' residual stream (None or []: steering off), joining the configured cluster."""
    steers = []
    if feature_ids:
        with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
            steers = steers_for(
                cfg, catalog, feature_ids, sae_version=sae_version, mode=mode, scale=scale
            )
    init_ray(cfg)
    return set_steering(cfg, steers)


def set_steering(cfg: FeaturewatchConfig, steers: list[Steer]) -> dict:
    """Replace the steering of every live replica (empty list: off), without a restart.
    Checked against the served model first, so a bad steer never reaches a replica.
    A running canary keeps running, unsteered (it is judged on its own).
    Returns a replica's report of its steering once it has taken the new one."""

    served, addresses, deployed = _deployed(cfg)
    width, layers = model_dims(resolve_model_path(served.model.path, served.models_dir))
    for steer in steers:
        try:
            check_steer(steer, width, layers)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    handle = _deploy(served, addresses, collector_token(served), steers, deployed["canary"],
                     verdicts=deployed.get("verdicts"))  # fmt: skip
    # Serve applies a user_config to the replicas shortly after accepting it.
    wanted = [s.summary() for s in steers]
    return _wait_for_replica(handle, lambda status: status["steers"] == wanted, "steering")


def _wait_for_replica(handle, taken, what: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = handle.steering_status.remote().result()
        if taken(status):
            return status
        if time.monotonic() > deadline:
            why = f": it refused them ({status['refused']})" if status.get("refused") else ""
            raise ConfigError(f"replica {status['replica_id']} did not take the {what}{why}")
        time.sleep(0.2)


def served_model(cfg: FeaturewatchConfig) -> tuple[str | None, str]:
    """(model path, model version) of the running model server."""
    served, _, _ = _deployed(cfg)
    return served.model.path, served.model.version


def canary_config(served: FeaturewatchConfig, path: Path, model_version: str):
    """The candidate's config: the served one with the new model, one replica, and every
    token of its requests captured (a canary takes little traffic and is watched whole:
    its live score pools each response's features as the offline evaluation does)."""
    candidate = served.model_copy(deep=True)
    candidate.model.path, candidate.model.version = str(path), model_version
    candidate.model.num_replicas = 1
    candidate.capture.sample_fraction = 1.0
    candidate.capture.request_fraction = 1.0
    candidate.capture.max_vectors_per_s = None
    return candidate


def _deployed_steers(deployed: dict) -> list[Steer]:
    return [Steer.from_dict(s) for s in deployed.get("steering", [])]


def start_canary(cfg: FeaturewatchConfig, path: Path, model_version: str, share: float) -> dict:
    """Run a candidate model version beside the served one and send it `share` of the
    chat requests. The candidate is started first and the main replicas begin routing
    to it only once it is up, so no request waits on a loading model. Steering of the
    main replicas stays as it is. Returns the canary's /v1/models entry."""

    if not 0 < share <= 1:
        raise ConfigError(f"canary share must be in (0, 1], not {share}")
    served, addresses, deployed = _deployed(cfg)
    steers = _deployed_steers(deployed)
    candidate = canary_config(served, path, model_version)
    canary = {"config": candidate.model_dump(mode="json"), "share": share, "routed": False}
    token, verdicts = collector_token(served), deployed.get("verdicts")
    _deploy(served, addresses, token, steers, canary, verdicts=verdicts)
    handle = _deploy(served, addresses, token, steers, {**canary, "routed": True},
                     verdicts=verdicts)  # fmt: skip
    _wait_for_replica(handle, lambda status: status["canary"] is not None, "canary route")
    canary_handle = serve.get_app_handle(canary_app_name(served))
    return canary_handle.models.remote().result()["data"][0]


def stop_canary(cfg: FeaturewatchConfig) -> None:
    """End a canary: the main replicas stop routing to it, then it is deleted. The
    served version and its steering are untouched."""

    served, addresses, deployed = _deployed(cfg)
    if deployed.get("canary") is None:
        return
    steers = _deployed_steers(deployed)
    token, verdicts = collector_token(served), deployed.get("verdicts")
    handle = _deploy(served, addresses, token, steers, {**deployed["canary"], "routed": False},
                     verdicts=verdicts)  # fmt: skip
    _wait_for_replica(handle, lambda status: status["canary"] is None, "end of the canary")
    _deploy(served, addresses, token, steers, verdicts=verdicts)
    _wait_until_deleted(canary_app_name(served))


def _wait_until_deleted(app: str, timeout_s: float = 120.0) -> None:
    """Serve deletes an application in the background: wait for it, so that a rollback
    is over when it returns and the next canary never meets the last one."""

    deadline = time.monotonic() + timeout_s
    while app in serve.status().applications:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve application {app} still exists {timeout_s:.0f} s on")
        time.sleep(0.5)


def promote_model(cfg: FeaturewatchConfig, path: Path, model_version: str) -> dict:
    """Serve another model version: Serve replaces the replicas one by one (a rolling
    update, no downtime), steering off (the new version is meant not to need it), any
    canary ended, in-line verdicts as they were. Returns the new replicas' /v1/models entry."""

    served, addresses, deployed = _deployed(cfg)
    promoted = served.model_copy(deep=True)
    promoted.model.path, promoted.model.version = str(path), model_version
    check_servable(promoted)
    # In-line verdicts go on: they count flagged answers per version.
    verdicts = deployed.get("verdicts")
    handle = _deploy(promoted, addresses, collector_token(promoted), [], verdicts=verdicts)
    return handle.models.remote().result()["data"][0]


def set_verdicts(cfg: FeaturewatchConfig, settings: VerdictSettings | None) -> dict:
    """Score every response of the live replicas in-line with these settings (None:
    off), without a restart; a running canary scores its answers the same way. Checked
    against the served model first (InlineScorer), so a bad probe never reaches a
    replica. Returns a replica's report once it has taken them."""

    served, addresses, deployed = _deployed(cfg)
    if settings is not None:
        width, layers = model_dims(resolve_model_path(served.model.path, served.models_dir))
        InlineScorer(settings, width, layers)
    verdicts = settings.model_dump(mode="json") if settings is not None else None
    handle = _deploy(served, addresses, collector_token(served), _deployed_steers(deployed),
                     deployed["canary"], verdicts=verdicts)  # fmt: skip
    wanted = verdict_summary(settings)
    return _wait_for_replica(handle, lambda status: status["verdicts"] == wanted, "verdicts")


def tag_verdict(
    cfg: FeaturewatchConfig,
    catalog,
    tag: str,
    *,
    gate: str = "flag",
    threshold: float | None = None,
    fpr: float | None = None,
    reference: str | None = None,
    sae_version: str | None = None,
    scale: float = 4.0,
) -> TagVerdict:
    """A tag's in-line verdict settings: its default probe (and SAE, for a group probe),
    a threshold given as a score or converted from a false-positive rate on a reference
    set (recorded with the probe), and for `regenerate` the tag group's steers."""

    choice = registered_sae(cfg, catalog, sae_version)
    probe = load_probe(choice.path, tag)
    if probe is None:
        raise ConfigError(
            f"no probe is fitted for tag {tag!r} on SAE {choice.version}: run featurewatch "
            "score --fit with labelled transcripts first"
        )
    if (threshold is None) == (fpr is None):
        raise ConfigError("give the threshold as a score (--threshold) or a rate (--fpr)")
    source = "score"
    if fpr is not None:
        if reference is None:
            raise ConfigError("--fpr needs --reference (a benign set: a file or bundled:NAME)")
        found = score_threshold(cfg, catalog, tag=tag, fpr=fpr, reference=reference,
                                sae_version=choice.version, family=probe.family)  # fmt: skip
        threshold, source = found["score"], f"fpr={fpr}@{reference}"
    steers = []
    if gate == "regenerate":
        ids = FeatureRegistry(catalog).group_ids(choice.version, tag)
        steers = steers_for(cfg, catalog, ids, sae_version=choice.version, scale=scale)
    sae = {"path": str(choice.path), "layer": choice.layer} if probe.family == "sae_group" else None
    try:
        return TagVerdict(
            tag=tag, gate=gate, threshold=min(1.0, float(threshold)), threshold_source=source,
            probe=asdict(probe), sae=sae, steering=[asdict(s) for s in steers],
        )  # fmt: skip
    except ValidationError as err:
        raise ConfigError(f"verdicts for tag {tag!r}: {describe_errors(err)}") from None


def deployed_verdicts(cfg: FeaturewatchConfig) -> VerdictSettings | None:
    """The in-line verdict settings of the running model server (None: off)."""
    _, _, deployed = _deployed(cfg)
    found = deployed.get("verdicts")
    return VerdictSettings.model_validate(found) if found else None


def verdicts_on(cfg: FeaturewatchConfig, wanted: TagVerdict, every: int | None = None) -> dict:
    """Score every response with this tag's settings too (replacing the tag's earlier
    ones; other tags stay on). Returns a replica's report once it has taken them."""
    current = deployed_verdicts(cfg)
    tags = [t for t in (current.tags if current else []) if t.tag != wanted.tag] + [wanted]
    kept = every or (current.every if current else VerdictSettings.model_fields["every"].default)
    return set_verdicts(cfg, VerdictSettings(tags=tags, every=kept))


def verdicts_off(cfg: FeaturewatchConfig, tag: str | None = None) -> dict:
    """Stop scoring one tag in-line (None: every tag)."""
    current = deployed_verdicts(cfg)
    if tag is not None and (current is None or tag not in [t.tag for t in current.tags]):
        raise ConfigError(f"tag {tag!r} is not scored in-line")
    tags = [t for t in current.tags if t.tag != tag] if current and tag else []
    return set_verdicts(cfg, VerdictSettings(tags=tags, every=current.every) if tags else None)


def steering_status(cfg: FeaturewatchConfig) -> dict:
    """A live replica's report: its version, steers, canary route and verdicts."""
    _deployed(cfg)
    return serve.get_app_handle(cfg.serve.app_name).steering_status.remote().result()
