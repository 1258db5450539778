"""Deploying the model server, and steering its live replicas.

The application is deployed the way `serve deploy` deploys a config file: by import
path (`featurewatch.actors.model_server:build_app`) with its arguments, plus a
user_config. Deployed that way, a changed user_config is a lightweight update: Serve
calls `reconfigure` on every running replica, none restarts. (`serve.run` of a bound
Python application replaces the replicas on every call in Ray 2.60, measured; and the
REST route `serve deploy` uses needs the dashboard, which featurewatch runs without, so
the same request goes through the Serve client.)

The arguments of the last deployment (its config and the collector addresses) are kept
in `<home>/serve_app.json`, so steering from another process (`featurewatch steer`, the
controller) redeploys the same application with only the steering changed, and a
promotion changes only the model. The collector token is not stored there: it
is read from the config or the home, as at deployment.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from featurewatch.capture.steering import Steer, check_steer, steer_from_sae
from featurewatch.errors import ConfigError
from featurewatch.platform.config import FeaturewatchConfig

APP_IMPORT_PATH = "featurewatch.actors.model_server:build_app"
DEPLOYED_FILE = "serve_app.json"
DEPLOYMENT = "ModelServer"


def _app_schema(cfg: FeaturewatchConfig, addresses: list[str], token: str, steers: list[Steer]):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(
        {
            "applications": [
                {
                    "name": cfg.serve.app_name,
                    "route_prefix": "/",
                    "import_path": APP_IMPORT_PATH,
                    "args": {
                        "config": cfg.model_dump(mode="json"),
                        "collector_addresses": list(addresses),
                        "token": token,
                        "num_replicas": cfg.model.num_replicas,
                        "replica_cpus": cfg.model.replica_cpus,
                    },
                    "deployments": [
                        {
                            "name": DEPLOYMENT,
                            "user_config": {"steering": [asdict(s) for s in steers]},
                        }
                    ],
                }
            ]
        }
    )


def _deploy(
    cfg: FeaturewatchConfig,
    addresses: list[str],
    token: str,
    steers: list[Steer],
    timeout_s: float = 600.0,
):
    from ray import serve
    from ray.serve.api import _get_global_client

    client = _get_global_client()
    client.deploy_apps(_app_schema(cfg, addresses, token, steers))
    # Serve's own blocking wait gives up after 60 s; loading a model on busy cores can
    # take longer, and a failed deployment should say why.
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(cfg.serve.app_name)
        status = str(app.status).rsplit(".", 1)[-1] if app else "NOT_STARTED"
        if status == "RUNNING":
            break
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            message = app.message if app else ""
            raise ConfigError(f"deploying {cfg.serve.app_name!r} ended {status}: {message}")
        time.sleep(0.25)
    client.wait_for_proxies_serving(wait_for_applications_running=True)
    deployed = {"config": cfg.model_dump(mode="json"), "collector_addresses": list(addresses)}
    (cfg.home / DEPLOYED_FILE).write_text(json.dumps(deployed, indent=2))
    return serve.get_app_handle(cfg.serve.app_name)


def _deployed(cfg: FeaturewatchConfig) -> tuple[FeaturewatchConfig, list[str]]:
    """The running application's config and collector addresses, as last deployed (the
    served model may have been promoted since `cfg` was read)."""
    from ray import serve

    saved = cfg.home / DEPLOYED_FILE
    if not saved.is_file():
        raise ConfigError(f"no deployed model server recorded in {saved}: deploy it first")
    running = serve.status().applications.get(cfg.serve.app_name)
    if running is None or str(running.status).rsplit(".", 1)[-1] != "RUNNING":
        # Redeploying here would start a new application, not change the running one.
        raise ConfigError(f"the model server application {cfg.serve.app_name!r} is not running")
    deployed = json.loads(saved.read_text())
    return FeaturewatchConfig.model_validate(deployed["config"]), deployed["collector_addresses"]


def deploy_model_server(cfg: FeaturewatchConfig, addresses: list[str], token: str):
    """Deploy (or update) the model server application; returns its handle. Serve must
    be started (`serve.start`) with the HTTP options wanted."""
    return _deploy(cfg, addresses, token, [])


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
    from featurewatch.platform.discover import registered_sae
    from featurewatch.sae import load

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


def set_steering(cfg: FeaturewatchConfig, steers: list[Steer]) -> dict:
    """Replace the steering of every live replica (empty list: off), without a restart.
    Checked against the served model first, so a bad steer never reaches a replica.
    Returns a replica's report of its steering once it has taken the new one."""
    from featurewatch.capture.models import model_dims, resolve_model_path
    from featurewatch.platform.runtime import collector_token

    served, addresses = _deployed(cfg)
    width, layers = model_dims(resolve_model_path(served.model.path, served.models_dir))
    for steer in steers:
        try:
            check_steer(steer, width, layers)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    handle = _deploy(served, addresses, collector_token(served), steers)
    # Serve applies a user_config to the replicas shortly after accepting it.
    wanted = [s.summary() for s in steers]
    deadline = time.monotonic() + 60
    while True:
        status = handle.steering_status.remote().result()
        if status["steers"] == wanted:
            return status
        if time.monotonic() > deadline:
            raise ConfigError(f"replica {status['replica_id']} did not take the steering")
        time.sleep(0.2)


def served_model(cfg: FeaturewatchConfig) -> tuple[str | None, str]:
    """(model path, model version) of the running model server."""
    served, _ = _deployed(cfg)
    return served.model.path, served.model.version


def promote_model(cfg: FeaturewatchConfig, path: Path, model_version: str) -> dict:
    """Serve another model version: Serve replaces the replicas one by one (a rolling
    update, no downtime), steering off (the new version is meant not to need it).
    Returns the new replicas' /v1/models entry."""
    from featurewatch.platform.runtime import collector_token

    served, addresses = _deployed(cfg)
    promoted = served.model_copy(deep=True)
    promoted.model.path, promoted.model.version = str(path), model_version
    handle = _deploy(promoted, addresses, collector_token(promoted), [])
    return handle.models.remote().result()["data"][0]
