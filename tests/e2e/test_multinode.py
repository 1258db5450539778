"""Issue 9's multi-node test: a Ray head and two worker nodes, each its own `ray start`
process with its own resources, `featurewatch up` placing the platform across them by
role, and a worker node killed (its whole process group, SIGKILL) in the middle of the
traffic. The platform must recover (Serve replaces the replica, the collector restarts
elsewhere and replays its spool, the senders fail over, the pipeline retries) and the
lake must hold every batch the collectors stored, once, and every batch a surviving
replica was acked for.

The nodes share this machine's disk, as a cluster whose home is shared storage does;
the cluster runs beside the test session's own Ray (different ports, same host), which
is why nothing here may call `ray stop`.
"""

import contextlib
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import torch
import yaml
from ray._common.utils import get_ray_address_file

from featurewatch.proto import activations_pb2 as pb
from featurewatch.sae import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.heartbeats import read_heartbeats
from featurewatch.storage.spool import read_segment, sealed_segments
from tests.conftest import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
SERVING = {"fw_serving": 1, "fw_ingest": 1}


class Cluster:
    """A head and workers, each `ray start --block` in its own process group."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray 2.60 authenticates its own RPCs: every process of this cluster, and every
        # driver joining it, carries the same token.
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
        }
        self.tmp = tmp
        # `ray start --head` records its address for Ray's tools; killed nodes leave it
        # behind, and the session's own cluster then pays for it (Ray Train's cleaner
        # asks that dead address, 12 s a job): stop() puts the file back as it was.
        self.address_file = Path(get_ray_address_file(None))
        self.address_before = self.address_file.read_text() if self.address_file.is_file() else None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.args: dict[str, tuple] = {}
        self.killed: set[str] = set()
        self.restarted: set[str] = set()

    def start(self, name: str, cpus: int, resources: dict, head: bool = False) -> None:
        self.args[name] = (cpus, resources, head)
        cmd = [RAY, "start", "--block", f"--node-name={name}", f"--num-cpus={cpus}"]
        cmd += [f"--resources={json.dumps(resources)}", "--object-store-memory=200000000"]
        # Raylets on one host that pick their own ports can race for the same one: give
        # each node its own ports, and worker ports above the test session's own Ray's.
        first = 20000 + 1000 * list(self.args).index(name)
        cmd += [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        cmd += [f"--min-worker-port={first}", f"--max-worker-port={first + 999}"]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.tmp / f"{name}.log", "a")  # noqa: SIM115 - kept open for the node's life
        self.nodes[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_for(self, count: int, timeout: float = 120) -> None:
        probe = (
            f"import ray; ray.init(address={self.address!r}); "
            "print(len([n for n in ray.nodes() if n['Alive']]))"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.restart_exited()
            out = subprocess.run(
                [sys.executable, "-c", probe],
                env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        logs = {name: (self.tmp / f"{name}.log").read_text()[-2000:] for name in self.nodes}
        raise AssertionError(f"the cluster did not reach {count} live nodes: {logs}")

    def restart_exited(self) -> None:
        """A `ray start` that exited by itself (its raylet missed Ray's fixed 30 s
        registration deadline on a busy machine) is started again, once."""
        for name, proc in list(self.nodes.items()):
            if proc.poll() is not None and name not in self.killed | self.restarted:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
                self.restarted.add(name)
                self.start(name, *self.args[name])

    def kill(self, name: str) -> None:
        """The node's raylet, its workers and actors, all at once (no clean shutdown)."""
        self.killed.add(name)
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes[name].wait()

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            if self.nodes[name].poll() is None:
                os.killpg(self.nodes[name].pid, signal.SIGKILL)
                self.nodes[name].wait()
        if self.address_before is None:
            self.address_file.unlink(missing_ok=True)
        else:
            self.address_file.write_text(self.address_before)


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start("head", 1, {"fw_encoding": 1}, head=True)
        cluster.wait_for(1)
        cluster.start("worker-a", 2, SERVING)
        cluster.wait_for(2)
        cluster.start("worker-b", 2, SERVING)
        cluster.wait_for(3)
        yield cluster
    finally:
        cluster.stop()


def home_config(tmp_path, tiny_llama_dir, address) -> tuple[Path, Path]:
    """A home with a random SAE registered for the tiny model, and its config file."""
    home = tmp_path / "home"
    port = free_port()
    config = {
        "home": str(home),
        "ray": {"address": address, "place_by_role": True},
        "model": {
            "name": "tiny-llama", "path": str(tiny_llama_dir), "replica_cpus": 0.5,
            "torch_threads": 1, "num_replicas": 2, "max_tokens_limit": 32,
        },
        # Ray takes tens of seconds to declare the node dead and restart the collector: the
        # survivor's buffer must hold minutes of traffic (16 rows x 64 fp16: 2 KiB a batch),
        # or the oldest batches are dropped (counted, but then the test cannot demand 0).
        "capture": {"layers": [1], "sample_fraction": 1.0, "batch_rows": 16,
                    "queue_batches": 16384},
        "collector": {"count": 1, "segment_max_age_s": 1.0},
        "pipeline": {"encoder_cpus": 0.5},
        "serve": {"port": port, "app_name": "fw-multinode"},
        "demo": {"max_tokens": 8},
    }  # fmt: skip
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    sae = build("topk", 64, 128, k=8)
    with torch.no_grad():  # random directions: a fresh SAE is all zeros
        sae.W_enc.normal_()
        sae.W_dec.normal_()
    sae.save(home / "saes" / "random")
    with Catalog(home / "catalog.duckdb", home / "lake") as catalog:
        catalog.register_sae(
            "random", home / "saes" / "random", architecture="topk", model="tiny-llama",
            layer=1, d_in=64, d_sae=128, k=8, metrics={}, site="resid_post",
        )  # fmt: skip
    return home, path


class Up:
    """`featurewatch up` as a child process; its JSON events arrive on a queue."""

    def __init__(self, config: Path, env: dict, log: Path):
        cmd = [sys.executable, "-m", "featurewatch.platform.cli", "up", "-c", str(config)]
        self.stderr = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.events: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))

    def next(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = self.events.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"featurewatch up exited {self.proc.returncode}"
                continue
            if found["event"] == event:
                return found
        raise AssertionError(f"no {event!r} event from featurewatch up in {timeout} s")

    def stop(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)  # the last events
        self.stderr.close()
        return code


class Traffic:
    """Chat requests from two threads until stopped; (time, ok) of each."""

    def __init__(self, url: str):
        self.url, self.results, self.stopping = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]
        for t in self.threads:
            t.start()

    def _run(self, worker: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            body = {
                "messages": [{"role": "user", "content": f"request {worker}-{n}: hello"}],
                "max_tokens": 8,
            }
            try:
                ok = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=60).ok
            except requests.RequestException:
                ok = False
            self.results.append((time.monotonic(), ok))
            if not ok:
                time.sleep(0.5)

    def ok_since(self, t: float) -> int:
        return sum(1 for at, ok in self.results if ok and at >= t)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)


def stored_vectors(home: Path) -> Counter:
    """Vectors per replica over every batch in every spool, each batch key once."""
    seen, per_replica = set(), Counter()
    for spool in [home / "spool", *sorted((home / "spool").glob("collector-*"))]:
        for path in sealed_segments(spool):
            for payload in read_segment(path):
                b = pb.ActivationBatch.FromString(payload)
                key = (b.replica_id, b.stream_epoch, b.seq)
                if key not in seen:
                    seen.add(key)
                    per_replica[b.replica_id] += b.rows
    return per_replica


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_node_dies_mid_run_and_no_acked_batch_is_lost(cluster, tiny_llama_dir, tmp_path):
    home, config = home_config(tmp_path, tiny_llama_dir, cluster.address)
    up = Up(config, cluster.env, tmp_path / "up.log")
    try:
        ready = up.next("ready", timeout=300)
        nodes = {n["name"]: n["node_id"] for n in ready["nodes"]}
        assert set(nodes) == {"head", "worker-a", "worker-b"}
        traffic = Traffic(ready["url"])
        up.next("round", timeout=180)  # rows reach the lake

        # Placement by role: a replica on each serving node, the collector on one of
        # them, nothing of the platform's on the head.
        replicas = {b["name"]: b for b in read_heartbeats(home / "status", "replica")}
        (collector,) = read_heartbeats(home / "status", "collector")
        workers = {nodes["worker-a"], nodes["worker-b"]}
        assert {b["node_id"] for b in replicas.values()} == workers
        assert collector["node_id"] in workers
        # Kill the collector's node: its replica dies with it, and the other replica's
        # stream (every replica streams to the one collector) breaks.
        victim = next(n for n in ("worker-a", "worker-b") if nodes[n] == collector["node_id"])
        survivor_node = (workers - {collector["node_id"]}).pop()
        (survivor,) = [r for r, b in replicas.items() if b["node_id"] == survivor_node]
        (killed,) = [r for r, b in replicas.items() if b["node_id"] != survivor_node]
        assert replicas[survivor]["collector"] == collector["name"]

        killed_at = time.monotonic()
        cluster.kill(victim)
        last_beats = {b["name"]: b for b in read_heartbeats(home / "status", "replica")}

        def recovered() -> bool:
            beats = {b["name"]: b for b in read_heartbeats(home / "status", "replica") if b["live"]}
            moved = [
                b for b in read_heartbeats(home / "status", "collector")
                if b["spool"] == collector["spool"] and b["node_id"] == survivor_node
                and b["live"]
            ]  # fmt: skip
            replaced = [b for r, b in beats.items() if r not in replicas]
            return (
                len(moved) == 1
                and survivor in beats
                and beats[survivor]["collector"] == moved[0]["name"]
                and any(
                    b["node_id"] == survivor_node and b["counters"].get("acked_vectors", 0) > 0
                    for b in replaced
                )
                and traffic.ok_since(killed_at + 20) >= 4
            )

        # Serve replaced the dead replica, Ray restarted the collector on the surviving
        # node (it replayed its spool), the surviving replica's sender found it there,
        # the new replica has answered and streamed too (on a slow machine it can come
        # up just before the traffic stops), and chats are answered again.
        wait_until(recovered, timeout=240, what="the platform to recover from the node kill")
        traffic.stop()
        assert up.stop(timeout=240) == 0
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    stopped = [e for e in iter_events(up) if e["event"] == "stopped"]
    assert stopped and stopped[0]["drained"], stopped

    stored = stored_vectors(home)
    with Catalog.for_analyst(home / "catalog.duckdb", home / "lake") as catalog:
        in_lake = {
            r["replica"]: r["n"]
            for r in catalog.query(
                "SELECT replica, count(*) AS n FROM tokens GROUP BY replica"
            ).to_pylist()
        }
        doubled = catalog.query(
            "SELECT replica, request_id, token_pos, layer FROM tokens "
            "GROUP BY ALL HAVING count(*) > 1"
        ).num_rows
    # Every batch the collectors made durable (the dead one's replayed spool included)
    # is in the lake once.
    assert doubled == 0
    assert in_lake == dict(stored) and sum(in_lake.values()) > 0
    final = {b["name"]: b for b in read_heartbeats(home / "status", "replica")}
    for name, beat in final.items():
        acked = beat["counters"]["acked_vectors"]
        if name == killed:
            # Its last heartbeat came up to 2 s before the kill: at least that much.
            assert in_lake.get(name, 0) >= last_beats[name]["counters"]["acked_vectors"]
        else:
            # Replicas alive at the end drained before the platform stopped: exactly
            # their acks, and the survivor's went on after the failover.
            assert in_lake.get(name, 0) == acked > 0, (name, beat["counters"])
    survivor_acked = final[survivor]["counters"]["acked_vectors"]
    assert survivor_acked > last_beats[survivor]["counters"]["acked_vectors"]
    assert sum(b["counters"]["dropped_vectors"] for b in final.values()) == 0


def iter_events(up: Up):
    while True:
        try:
            yield up.events.get_nowait()
        except queue.Empty:
            return
