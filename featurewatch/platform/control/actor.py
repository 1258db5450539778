"""The policy controller as a Ray actor: the same PolicyController that
`featurewatch policy run` drives in the foreground, ticking on a background thread.

It reads the catalog's published copy and writes only its own audit log, so it never
holds a lock the pipeline needs. Restarted (by Ray or by hand), it reads the cooldowns
from the audit log and does not fire again what it already fired.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import ray

from featurewatch.actors.metrics import ControllerMetrics
from featurewatch.config import FeaturewatchConfig
from featurewatch.platform.control.controller import PolicyController, run_forever
from featurewatch.platform.control.policies import Policy


@ray.remote(num_cpus=0, max_restarts=-1)
class ControllerActor:
    def __init__(self, cfg: FeaturewatchConfig, policies: list[Policy], every_s: float = 60.0):
        logging.basicConfig(level=logging.WARNING)
        # Only here, inside Ray, does the controller record metrics (see actors/metrics.py).
        self.controller = PolicyController(cfg, policies, metrics=ControllerMetrics())
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=run_forever,
            args=(self.controller, timedelta(seconds=every_s), self.stop_event),
            daemon=True,
        )
        self.thread.start()

    def ticking(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)


def start_controller(cfg: FeaturewatchConfig, policies: list[Policy], every_s: float = 60.0):
    """Start the controller actor (named `featurewatch-controller`, one per cluster)."""
    return ControllerActor.options(name="featurewatch-controller", get_if_exists=True).remote(
        cfg, policies, every_s
    )
