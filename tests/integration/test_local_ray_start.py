"""A local Ray node that misses Ray's startup deadline is cleaned up and started again."""

import json
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent(
    """
    import json, logging, re, sys
    import psutil, ray
    import ray._private.services as services
    from featurewatch.actors.runtime import start_local_ray

    real_get_node = services.get_node
    refused = []

    def get_node(gcs_address, node_id):
        # The first node never shows up in its GCS, so Ray's 30 s deadline passes.
        if not refused or refused[0] == node_id:
            refused[:1] = [node_id]
            raise RuntimeError("refused by the test")
        return real_get_node(gcs_address, node_id)

    services.get_node = get_node
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    start_local_ray(num_cpus=1, object_store_memory_mb=128, attempts=3)
    answer = ray.get(ray.remote(lambda: 41 + 1).remote())
    sessions = {
        session
        for child in psutil.Process().children(recursive=True)
        for session in re.findall(r"session_[0-9_-]+", " ".join(child.cmdline()))
    }
    print("RESULT " + json.dumps({"answer": answer, "sessions": sorted(sessions)}))
    ray.shutdown()
    """
)


def test_a_node_that_misses_the_startup_deadline_is_replaced():
    out = subprocess.run(
        [sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["answer"] == 42
    # only the second attempt's daemons are left: the first one's were killed
    assert len(result["sessions"]) == 1, result["sessions"]
    assert "missed its startup deadline (attempt 1 of 3)" in out.stderr
    assert "raylet.out" in out.stderr  # the failed attempt's log tails are shown


def test_a_stale_current_cluster_record_is_named(tmp_path, caplog):
    """Ray's current-cluster record naming a dead GCS (Ray Train would wait on it) is
    warned about; one naming a live address, or none, is not."""
    import socket

    from featurewatch.actors.runtime import warn_if_stale_ray_address

    record = tmp_path / "ray_current_cluster"
    assert not warn_if_stale_ray_address(record)  # no record
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert not warn_if_stale_ray_address(record)
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        record.write_text(f"127.0.0.1:{dead.getsockname()[1]}")
        assert warn_if_stale_ray_address(record)
        dead.close()
    assert "names a Ray cluster that is gone" in caplog.text and str(record) in caplog.text
    record.write_text("not an address")
    assert warn_if_stale_ray_address(record)
