"""Ray Train SAE training survives a killed worker: the group restarts and resumes from
the last checkpoint (not from step 0), and still finishes every step."""

import os
import signal
import threading
import time

import psutil

from featurewatch.platform.config import build_config
from featurewatch.platform.pipeline import segments_dataset
from featurewatch.platform.train_sae import train_sae
from featurewatch.sae import load
from tests.integration.test_ray_pipeline import WIDTH, fill_spool


def train_workers() -> list[psutil.Process]:
    """Ray Train worker processes (Ray titles them after the worker actor class)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


def test_killed_worker_resumes_from_checkpoint(ray_cluster, tmp_path):
    cfg = build_config(
        {
            "home": str(tmp_path / "home"),
            "capture": {"layers": [1]},
            "sae": {
                "d_sae": 32,
                "k": 4,
                "epochs": 60,
                "batch_size": 64,
                "checkpoint_every": 20,
                "max_failures": 2,
            },
        }
    )
    paths = fill_spool(cfg.spool_dir)
    result: dict = {}

    def run():
        try:
            result["trained"] = train_sae(cfg, segments_dataset(paths), WIDTH, version="resumed")
        except BaseException as err:  # reported by the assertion below
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    # Wait until a checkpoint is surely registered (a newer one has started), then kill
    # a worker for real.
    deadline = time.monotonic() + 240
    runs = cfg.home / "ray_train"
    while time.monotonic() < deadline and thread.is_alive():
        if len(list(runs.glob("*/checkpoint_*"))) >= 2 and train_workers():
            break
        time.sleep(0.2)
    victims = train_workers()
    assert victims, "no Ray Train worker process found to kill"
    victims[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish after the kill"
    assert "error" not in result, result.get("error")
    trained = result["trained"]
    steps_per_epoch = (3 * 4 * 64) // (64 * cfg.sae.num_workers)
    assert trained.metrics["steps"] == 60 * steps_per_epoch
    # resumed from a checkpoint, not from scratch
    assert trained.metrics["resumed_from_step"] >= 20, trained.metrics
    assert trained.metrics["resumed_from_step"] % 20 == 0
    assert time.monotonic() - killed_at > 0
    reloaded = load(trained.path, expected_d_in=WIDTH)
    assert reloaded.d_sae == 32
    assert trained.metrics["fvu"] < 0.5, trained.metrics
