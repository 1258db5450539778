"""What both model replicas (transformers and vLLM) take from Serve's user_config: the
steers and the canary route, read and checked the same way, and the route that sends a
share of chat requests to a canary application."""

from __future__ import annotations

import logging
import random
import uuid

from ray import serve

from featurewatch.analysis.verdicts import VerdictSettings, read_verdicts
from featurewatch.capture.steering import Steer

log = logging.getLogger(__name__)


def replica_id() -> str:
    """Serve's id of the replica this runs in (a random one outside Serve, in tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - constructed outside Serve
        return uuid.uuid4().hex[:12]


def always_sampled(flag: str, headers, metadata) -> bool:
    """Whether a request asks for every token captured: the header `flag: always`, or
    the same key in the body's metadata."""
    in_metadata = isinstance(metadata, dict) and str(metadata.get(flag, "")).lower() == "always"
    return headers.get(flag, "").lower() == "always" or in_metadata


def read_user_config(
    user_config: dict | None,
) -> tuple[list[Steer], dict | None, VerdictSettings | None]:
    """(steers, canary, verdicts) from `{"steering": [Steer fields, ...], "canary":
    {"app": name, "share": fraction} or null, "verdicts": VerdictSettings fields or null}`
    (empty steering: off; null canary: none; null verdicts: off). TypeError, ValueError
    or KeyError name what is wrong; the caller keeps its old settings then (raising from
    reconfigure would make Serve stop the replica)."""
    user_config = user_config or {}
    unknown = set(user_config) - {"steering", "canary", "verdicts"}
    if unknown:
        raise ValueError(f"unknown user_config keys {sorted(unknown)}")
    verdicts = read_verdicts(user_config.get("verdicts"))
    steers = [Steer.from_dict(s) for s in user_config.get("steering", [])]
    canary = user_config.get("canary")
    if canary is not None:
        if not isinstance(canary, dict) or set(canary) != {"app", "share"}:
            raise ValueError(f"canary must be {{app, share}} or null, not {canary!r}")
        app, share = canary["app"], canary["share"]
        if not isinstance(app, str) or not app:
            raise ValueError(f"canary app must be a non-empty string, not {app!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ValueError(f"canary share must be a number in (0, 1], not {share!r}")
        canary = {"app": app, "share": float(share)}
    return steers, canary, verdicts


class CanaryRoute:
    """Which chat requests go to the canary (another model version, its own Serve
    application): a seeded draw per request against its share."""

    def __init__(self, seed: int):
        self.settings: dict | None = None
        self.handle = None
        self.random = random.Random(seed)
        self.forwarded = 0

    def set(self, canary: dict | None) -> None:
        if canary != self.settings:
            self.handle = (
                serve.get_deployment_handle("ModelServer", app_name=canary["app"])
                if canary
                else None
            )
            self.settings = canary

    def pick(self):
        """The canary's deployment handle for this request, or None (served here)."""
        if self.settings is not None and self.random.random() < self.settings["share"]:
            return self.handle
        return None

    async def forward(self, handle, *args):
        """`handle.canary_chat(*args)`; None when the canary did not answer (the caller
        serves the request itself: a canary going away must not fail a chat)."""
        try:
            answer = await handle.canary_chat.remote(*args)
        except Exception as err:  # noqa: BLE001 - any failure of the canary
            log.warning("canary %s did not answer (%s); serving here", self.settings, err)
            return None
        self.forwarded += 1
        return answer
