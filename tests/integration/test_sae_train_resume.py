"""Ray Train SAE training survives a killed worker: the group restarts and resumes from
the last checkpoint (not from step 0), and still finishes every step.

The training runs in its own driver process, as `featurewatch sae train` does. (In a
driver that had already run another TorchTrainer, a restarted group was seen to start
from step 0; see the docs' state page.)
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from featurewatch.sae import load
from tests.integration.test_ray_pipeline import WIDTH

EPOCHS, CHECKPOINT_EVERY = 80, 20
DRIVER = textwrap.dedent(
    """
    import json, sys
    from featurewatch.config import build_config
    from featurewatch.actors.pipeline import segments_dataset
    from featurewatch.actors.runtime import quiet_ray_logs, start_local_ray
    from featurewatch.platform.jobs.train_sae import train_sae
    from tests.integration.test_ray_pipeline import WIDTH, fill_spool

    cfg = build_config(json.loads(sys.argv[1]))
    quiet_ray_logs()
    start_local_ray(num_cpus=2, object_store_memory_mb=512)
    paths = fill_spool(cfg.spool_dir)
    trained = train_sae(cfg, segments_dataset(paths), WIDTH, version="resumed")
    print("RESULT " + json.dumps({"metrics": trained.metrics, "path": str(trained.path)}))
    """
)


def train_workers(since: float) -> list[psutil.Process]:
    """Ray Train worker processes started after `since` (Ray titles them after the
    worker actor class)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline and proc.info["create_time"] >= since:
            found.append(proc)
    return found


def registered_step(home) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered."""
    for snapshot in (home / "ray_train").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        if latest:
            return int(latest["metrics"]["step"])
    return 0


def test_killed_worker_resumes_from_checkpoint(tmp_path):
    home = tmp_path / "home"
    config = {
        "home": str(home),
        "capture": {"layers": [1]},
        "sae": {
            "d_sae": 32,
            "k": 4,
            "epochs": EPOCHS,
            "batch_size": 64,
            "checkpoint_every": CHECKPOINT_EVERY,
            "max_failures": 2,
        },
    }
    started = time.time() - 1  # process create_time has a coarse clock
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        # Wait until Ray Train's controller has registered a checkpoint (a folder on
        # disk is not enough: the controller takes it in when it next polls the
        # workers), then kill a worker for real.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            if registered_step(home) >= CHECKPOINT_EVERY and train_workers(started):
                break
            time.sleep(0.2)
        victims = train_workers(started)
        assert victims, "no Ray Train worker process found to kill"
        victims[0].send_signal(signal.SIGKILL)
        assert driver.poll() is None, "the run ended before the kill"
        out, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    metrics = result["metrics"]
    steps_per_epoch = (3 * 4 * 64) // (64 * 2)
    assert metrics["steps"] == EPOCHS * steps_per_epoch
    # resumed from a checkpoint, not from scratch
    assert metrics["resumed_from_step"] >= CHECKPOINT_EVERY, metrics
    assert metrics["resumed_from_step"] % CHECKPOINT_EVERY == 0
    assert load(result["path"], expected_d_in=WIDTH).d_sae == 32
    assert metrics["fvu"] < 0.5, metrics
