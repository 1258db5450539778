"""The controller as a Ray actor on a real local cluster: it fires once, and after Ray
restarts the killed actor it reads the cooldown from the audit log and does not fire
again."""

import time

import ray

from featurewatch.platform.control.actor import start_controller
from featurewatch.storage.audit import AuditLog
from tests.unit.test_controller import platform, policies, webhook  # noqa: F401 (fixtures)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_controller_actor_fires_once_across_a_restart(ray_cluster, platform, webhook):  # noqa: F811
    url, received, _ = webhook
    # A window of 1,000 days ending at the real now takes in the lake's March data.
    policy = policies(
        url, feature=7, statistic="firing_rate", window="1000d", baseline="1000d",
        threshold=0.0, consecutive=1, every="1s", cooldown="1d",
    )  # fmt: skip
    actor = start_controller(platform, policy, every_s=0.3)
    audit = AuditLog(platform.home / "audit.duckdb")
    wait_for(lambda: _statuses(audit) == ["done"])
    assert len(received) == 1 and received[0]["policy_id"] == "rising"

    ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1)
    wait_for(lambda: _alive(actor))
    # The killed actor's rows are all written once its replacement answers: two more
    # rounds are the restarted actor's, which found the cooldown in the audit log.
    before = _outcomes(audit).count("cooldown")
    wait_for(lambda: _outcomes(audit).count("cooldown") >= before + 2)
    assert len(received) == 1
    decisions = audit.table("policy_decisions").to_pylist()
    assert [(d["policy_id"], d["status"]) for d in decisions] == [("rising", "done")]
    ray.get(actor.stop.remote())
    ray.kill(actor, no_restart=True)


def _alive(actor) -> bool:
    try:
        return ray.get(actor.ticking.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _outcomes(audit) -> list[str]:
    return [r["outcome"] for r in audit.table("policy_evaluations").to_pylist()]


def _statuses(audit) -> list[str]:
    return [r["status"] for r in audit.table("policy_decisions").to_pylist()]
