"""Chaos: the whole data path under faults, and nothing acked lost.

`featurewatch up` runs on a three-node Ray cluster on this machine (a head that encodes,
two workers that serve and ingest, each its own `ray start` process group) with the
policy controller, under steady chat traffic on a tiny random-weight Llama. A seeded
schedule SIGKILLs, at random times and in a random order: a collector, a model replica,
an SAE encoder, the pipeline (the `featurewatch up` process itself, which a supervisor
here starts again, as systemd would), the controller and a whole worker node (started
again after --node-down-s); and once it fills the spool's disk (a tmpfs of --spool-mb
this script mounts: root only) for --disk-full-s.

At the end it stops the traffic, stops `featurewatch up` (which drains) and checks:
every batch a collector made durable is in the lake exactly once; every replica's acked
vectors are in the lake (exactly, for a replica alive at the end); drops are counted
(and must be 0); every controller decision ran at most once (one webhook call, one
result per action, none left running); the catalog and the readers' published copy
agree; `featurewatch lake check` passes. It prints the faults with their recovery times
(until every collector accepts again, a pipeline round commits and a chat is answered),
the figures and the checks as JSON, and exits 1 if a check failed.

    .venv/bin/python benchmarks/chaos.py [--seconds 1200] [--seed 1] [--json-out F]

The README's figure is a 20-minute run; tests/e2e/test_chaos.py runs a short one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import requests
import torch
import yaml
from ray._common.utils import get_ray_address_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model and the small disk are the tests' own

from featurewatch.proto import activations_pb2 as pb  # noqa: E402
from featurewatch.sae import build  # noqa: E402
from featurewatch.storage.audit import AuditLog  # noqa: E402
from featurewatch.storage.catalog import Catalog  # noqa: E402
from featurewatch.storage.heartbeats import read_heartbeats  # noqa: E402
from featurewatch.storage.spool import read_segment, sealed_segments  # noqa: E402
from tests.conftest import build_tiny_model, fill_disk, mount_small_disk  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
CLI = [sys.executable, "-m", "featurewatch.platform.cli"]
SERVING = {"fw_serving": 1, "fw_ingest": 1}
WORKERS = ("worker-a", "worker-b")
KINDS = ("collector", "replica", "encoder", "pipeline", "controller", "node", "disk_full")
# Process titles Ray gives each part's worker (`ray::<class>...`).
TITLES = {
    "collector": ("ray::CollectorActor",),
    "replica": ("ray::ServeReplica:",),
    "encoder": ("SAEEncoder", "EncodeShard"),
    "controller": ("ray::ControllerActor",),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head and workers, each `ray start --block` in its own process group (session)."""

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
        # behind, and any other Ray on this machine then pays for it (Ray Train's cleaner
        # asks that dead address, 12 s a job): stop() puts the file back as it was.
        self.address_file = Path(get_ray_address_file(None))
        self.address_before = self.address_file.read_text() if self.address_file.is_file() else None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.args: dict[str, tuple] = {}
        self.down: set[str] = set()  # killed on purpose: not restarted by restart_exited
        self.restarted: set[str] = set()

    def start(self, name: str, cpus: int, resources: dict, head: bool = False) -> None:
        self.args[name] = (cpus, resources, head)
        cmd = [RAY, "start", "--block", f"--node-name={name}", f"--num-cpus={cpus}"]
        cmd += [f"--resources={json.dumps(resources)}", "--object-store-memory=200000000"]
        # Raylets on one host that pick their own ports can race for the same one: give
        # each node its own ports, and worker ports apart from any other Ray's here.
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
        self.down.discard(name)

    def alive_count(self) -> int | None:
        probe = (
            f"import ray; ray.init(address={self.address!r}); "
            "print(len([n for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        lines = out.stdout.strip().splitlines()
        return int(lines[-1]) if out.returncode == 0 and lines else None

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.restart_exited()
            if self.alive_count() == count:
                return
            time.sleep(1)
        logs = {name: (self.tmp / f"{name}.log").read_text()[-2000:] for name in self.nodes}
        raise RuntimeError(f"the cluster did not reach {count} live nodes: {logs}")

    def restart_exited(self) -> None:
        """A `ray start` that exited by itself (its raylet missed Ray's fixed 30 s
        registration deadline on a busy machine) is started again, once."""
        for name, proc in list(self.nodes.items()):
            if proc.poll() is not None and name not in self.down | self.restarted:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
                self.restarted.add(name)
                self.start(name, *self.args[name])

    def sessions(self) -> set[int]:
        """Session ids of the live nodes: every Ray process of a node is in its session."""
        return {p.pid for name, p in self.nodes.items() if p.poll() is None}

    def kill(self, name: str) -> None:
        """The node's raylet, its workers and actors, all at once (no clean shutdown)."""
        self.down.add(name)
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


class Up:
    """`featurewatch up`, supervised: started again when it dies. Its JSON events (and
    the time each arrived) go to one queue across restarts."""

    def __init__(self, config: Path, env: dict, logs: Path):
        self.config, self.env, self.logs = config, env, logs
        self.events: queue.Queue = queue.Queue()
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        log = open(self.logs / f"up-{self.starts}.log", "w")  # noqa: SIM115 - its life long
        self.proc = subprocess.Popen(
            [*CLI, "up", "-c", str(self.config)],
            env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                self.events.put((time.monotonic(), json.loads(line)))

    def next(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, found = self.events.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"featurewatch up exited {self.proc.returncode}") from None
                continue
            if found["event"] == event:
                return found
        raise RuntimeError(f"no {event!r} event from featurewatch up in {timeout} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


class Traffic:
    """Chat requests from two threads until stopped; (start, end, ok) of each."""

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
            began = time.monotonic()
            try:
                ok = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=60).ok
            except requests.RequestException:
                ok = False
            self.results.append((began, time.monotonic(), ok))
            if not ok:
                time.sleep(0.5)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)


class Webhook:
    """The controller's alert target: records each decision id it is sent."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append(body["decision_id"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


class Monitor:
    """Samples the collectors' heartbeats every half second, and keeps the rounds."""

    def __init__(self, home: Path, up: Up):
        self.home, self.up = home, up
        self.samples: list[tuple[float, dict]] = []  # (t, spool -> (updated_at, accepted))
        self.rounds: list[tuple[float, int]] = []  # (t, tokens committed)
        self.disk_full_refusals: Counter = Counter()  # most seen per collector name
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(0.5):
            status = self.home / "status"
            now = time.monotonic()
            collectors = {}
            for beat in read_heartbeats(status, "collector"):
                if beat["live"]:
                    c = beat["counters"]
                    collectors[beat["spool"]] = (beat["updated_at"], c["accepted_batches"])
                    name = beat["name"] + "@" + beat["node_id"]
                    refusals = c.get("disk_full_refusals", 0)
                    self.disk_full_refusals[name] = max(self.disk_full_refusals[name], refusals)
            self.samples.append((now, collectors))
            while True:
                try:
                    at, event = self.up.events.get_nowait()
                except queue.Empty:
                    break
                if event["event"] == "round":
                    self.rounds.append((at, event.get("tokens", 0)))

    def accepting_since(self, t0: float, spools: set[str]) -> float | None:
        """When every spool's collector had accepted a batch after t0 (heartbeat time)."""
        first: dict[str, int] = {}
        wall0 = time.time() - (time.monotonic() - t0)
        done: set[str] = set()
        for t, collectors in self.samples:
            if t < t0:
                continue
            for spool, (updated, accepted) in collectors.items():
                if updated <= wall0 + 2.5:  # a beat from before the fault (or its last)
                    continue
                first.setdefault(spool, accepted)
                if accepted > first[spool]:
                    done.add(spool)
            if spools <= done:
                return t
        return None

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def processes(cluster: Cluster, kind: str) -> list[psutil.Process]:
    """This cluster's live Ray workers of one part, found by their process titles."""
    sessions, found = cluster.sessions(), []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            if any(t in title for t in TITLES[kind]) and os.getsid(proc.pid) in sessions:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def make_home(tmp: Path, model_dir: Path, address: str, webhook: str, spool_mb: int):
    """A home with a random SAE registered for the tiny model, the spool on a small
    filesystem of its own, a policy that fires every half minute, and the config."""
    home = tmp / "home"
    config = {
        "home": str(home),
        "ray": {"address": address, "place_by_role": True},
        "model": {
            "name": "tiny-llama", "path": str(model_dir), "replica_cpus": 0.5,
            "torch_threads": 1, "num_replicas": 2, "max_tokens_limit": 32,
        },
        # Ray takes tens of seconds to declare a node dead and restart its collector: the
        # senders' buffers hold minutes of traffic (16 rows x 64 fp16: 2 KiB a batch).
        "capture": {"layers": [1], "sample_fraction": 1.0, "batch_rows": 16,
                    "queue_batches": 16384},
        "collector": {"count": 1, "segment_max_age_s": 1.0},
        "pipeline": {"encoder_cpus": 0.5},
        "serve": {"port": free_port(), "app_name": "fw-chaos"},
        "control": {"policies": str(tmp / "policies.yaml"), "every_s": 2.0},
        "demo": {"max_tokens": 8},
    }  # fmt: skip
    policy = {
        "id": "chaos-watch",
        "condition": {
            "feature": 0, "statistic": "firing_rate", "window": "1h", "baseline": "1h",
            "threshold": 0.0, "consecutive": 1,
        },
        "actions": [{"type": "alert", "url": webhook, "retries": 0, "timeout_s": 10}],
        "cooldown": "30s",
        "every": "5s",
    }  # fmt: skip
    (tmp / "policies.yaml").write_text(yaml.safe_dump({"policies": [policy]}))
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    mount_small_disk(home / "spool", spool_mb)
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


def schedule(seed: int, seconds: float, warmup: float) -> list[tuple[float, str]]:
    """Every kind at least once (more in a long run), in a seeded random order, spread
    over the run with jitter; the last quarter-minute is left for recovery."""
    rng = random.Random(seed)
    rounds = max(1, int(seconds // 600))
    kinds = [k for _ in range(rounds) for k in rng.sample(KINDS, len(KINDS))]
    span = max(seconds - warmup - 30.0, 1.0)
    gap = span / len(kinds)
    return [(warmup + gap * (i + rng.uniform(0.1, 0.9)), k) for i, k in enumerate(kinds)]


def stored_batches(home: Path) -> Counter:
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


class Chaos:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.cluster = Cluster(tmp)
        self.webhook = Webhook()
        self.faults: list[dict] = []
        self.refill_stop: threading.Event | None = None

    def refusals(self) -> int:
        return sum(self.monitor.disk_full_refusals.values())

    def inflict(self, kind: str, up: Up) -> dict:
        """One fault; returns what was hit and when (t0: when the fault ended for a full
        disk, when the kill happened otherwise)."""
        fault = {"kind": kind}
        if kind == "pipeline":
            fault["target"] = f"featurewatch up (pid {up.proc.pid})"
            up.kill()
            fault["t0"] = time.monotonic()
            time.sleep(2.0)  # a supervisor's restart delay
            up.start()
        elif kind == "node":
            name = random.Random(self.args.seed + len(self.faults)).choice(WORKERS)
            fault["target"] = name
            self.cluster.kill(name)
            fault["t0"] = time.monotonic()
            threading.Timer(
                self.args.node_down_s, self.cluster.start, args=(name, 2, SERVING)
            ).start()
        elif kind == "disk_full":
            spool = self.home / "spool"
            fault["target"] = f"{spool} ({fill_disk(spool) >> 20} MiB written to fill it)"
            fault["full_at"] = time.monotonic()
            time.sleep(self.args.disk_full_s)
            # Full until a collector has met it (one may be restarting meanwhile).
            deadline = time.monotonic() + 90
            while not self.refusals() and time.monotonic() < deadline:
                time.sleep(0.5)
            fault["full_s"] = round(time.monotonic() - fault["full_at"], 1)
            (spool / "filler").unlink()
            fault["t0"] = time.monotonic()
        else:
            deadline = time.monotonic() + 60
            while not (found := processes(self.cluster, kind)):
                if time.monotonic() > deadline:
                    fault["target"] = "none found in 60 s"
                    fault["t0"] = time.monotonic()
                    return fault
                time.sleep(0.05)
            victim = random.Random(self.args.seed + len(self.faults)).choice(found)
            fault["target"] = " ".join(victim.cmdline()).strip() + f" (pid {victim.pid})"
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
            fault["t0"] = time.monotonic()
        return fault

    def run(self) -> dict:
        args = self.args
        model = build_tiny_model("llama", self.tmp / "tiny-llama")
        home, config = make_home(
            self.tmp, model, self.cluster.address, self.webhook.url, args.spool_mb
        )
        self.home = home
        cluster, began = self.cluster, time.monotonic()
        cluster.start("head", 1, {"fw_encoding": 1}, head=True)
        cluster.wait_for(1)
        for i, name in enumerate(WORKERS):
            cluster.start(name, 2, SERVING)
            cluster.wait_for(2 + i)
        up = Up(config, cluster.env, self.tmp)
        traffic = monitor = None
        try:
            ready = up.next("ready", timeout=300)
            traffic = Traffic(ready["url"])
            up.next("round", timeout=180)  # rows reach the lake
            monitor = self.monitor = Monitor(home, up)
            start, started_after = time.monotonic(), round(time.monotonic() - began, 1)
            plan = schedule(args.seed, args.seconds, warmup=10.0)
            print(f"ready after {started_after} s; faults: {plan}", file=sys.stderr)
            for at, kind in plan:
                time.sleep(max(0.0, start + at - time.monotonic()))
                fault = self.inflict(kind, up)
                fault["at_s"] = round(fault["t0"] - start, 1)
                self.faults.append(fault)
                print(f"{fault['at_s']:7.1f} s  {kind}: {fault['target']}", file=sys.stderr)
            time.sleep(max(0.0, start + args.seconds - time.monotonic()))
            # Every node up again before the end, so that the last checks see them all.
            cluster.wait_for(3, timeout=180)
            self.await_recovery(monitor, traffic, timeout=240)
            traffic.stop()
            monitor.stop()
            ran_s = time.monotonic() - start
            code = up.stop(timeout=240)
        finally:
            if traffic is not None:
                traffic.stop()
            if monitor is not None:
                monitor.stop()
            if up.proc.poll() is None:
                up.kill()
        stopped = [e for _, e in drain(up.events) if e["event"] == "stopped"]
        return self.report(monitor, traffic, up, code, stopped, ran_s, started_after)

    def await_recovery(self, monitor: Monitor, traffic: Traffic, timeout: float) -> None:
        """Fill in each fault's recovery time: until every collector accepts again, a
        round has committed tokens and a chat started after it was answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spools = {s for _, c in monitor.samples[-4:] for s in c}
            pending = False
            for fault in self.faults:
                if "recovered_s" in fault:
                    continue
                t0 = fault["t0"]
                accepting = monitor.accepting_since(t0, spools or {"?"})
                committed = next((t for t, n in monitor.rounds if t > t0 and n > 0), None)
                answered = min((end for began, end, ok in traffic.results if ok and began > t0),
                               default=None)  # fmt: skip
                if None in (accepting, committed, answered):
                    pending = True
                    continue
                fault["recovered_s"] = round(max(accepting, committed, answered) - t0, 1)
            if not pending:
                return
            time.sleep(1)

    def report(self, monitor, traffic, up, code, stopped, ran_s, started_after) -> dict:
        home = self.home
        stored = stored_batches(home)
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
            readers = (
                catalog.query("SELECT segment_id FROM segments ORDER BY segment_id")
                .column(0)
                .to_pylist()
            )
        with Catalog(home / "catalog.duckdb", home / "lake") as catalog:
            writers = (
                catalog.query("SELECT segment_id FROM segments ORDER BY segment_id")
                .column(0)
                .to_pylist()
            )
        lake_check = subprocess.run(
            [*CLI, "lake", "check", "--home", str(home)], capture_output=True, text=True
        )
        # Each replica's last heartbeat: a killed one's came up to 2 s before the kill
        # (its acks since are unknown), one alive at the end beat after the drain.
        final = read_heartbeats(home / "status", "replica")
        short = {}  # replicas whose acked vectors are not all in the lake
        for beat in final:
            acked, have = beat["counters"]["acked_vectors"], in_lake.get(beat["name"], 0)
            if have < acked or (beat["live"] and have != acked):
                short[beat["name"]] = {"acked": acked, "in_lake": have, "live": beat["live"]}
        dropped = sum(b["counters"]["dropped_vectors"] for b in final)
        audit = AuditLog(home / "audit.duckdb")
        decisions = audit.table("policy_decisions", limit=100000).to_pylist()
        results = audit.table("action_results", limit=100000).to_pylist()
        per_action = Counter((r["decision_id"], r["action_index"]) for r in results)
        calls = Counter(self.webhook.received)
        killed = Counter(f["kind"] for f in self.faults if "none found" not in f["target"])
        checks = {
            "every_kind_of_fault_happened": set(killed) == set(KINDS),
            "stopped_cleanly": code == 0 and bool(stopped) and stopped[0]["drained"],
            "stored_equals_lake": dict(stored) == in_lake and sum(in_lake.values()) > 0,
            "no_row_twice": doubled == 0,
            "every_ack_in_lake": not short,
            "no_drops": dropped == 0,
            "full_disk_refused": self.refusals() > 0,
            "decisions_ran_at_most_once": bool(decisions)
            and max(calls.values(), default=0) <= 1
            and max(per_action.values(), default=0) <= 1
            and not [d for d in decisions if d["status"] in ("running", "approved")],
            "readers_copy_consistent": readers == writers,
            "lake_check_passes": lake_check.returncode == 0,
            "every_fault_recovered": all("recovered_s" in f for f in self.faults),
        }
        answered = [ok for _, _, ok in traffic.results]
        return {
            "seed": self.args.seed,
            "seconds": round(ran_s, 1),
            "started_after_s": started_after,
            "faults": [
                {k: v for k, v in f.items() if k not in ("t0", "full_at")} for f in self.faults
            ],
            "kills_survived": dict(killed),
            "up_starts": up.starts,
            "chats": {"answered": sum(answered), "failed": len(answered) - sum(answered)},
            "vectors_acked": sum(b["counters"]["acked_vectors"] for b in final),
            "vectors_stored": sum(stored.values()),
            "vectors_in_lake": sum(in_lake.values()),
            "vectors_dropped": dropped,
            "replicas": len(final),
            "disk_full_refusals": self.refusals(),
            "decisions": Counter(d["status"] for d in decisions),
            "webhook_calls": sum(calls.values()),
            "short": short,
            "lake_check": lake_check.stdout[-500:] + lake_check.stderr[-500:],
            "checks": checks,
            "ok": all(checks.values()),
        }


def drain(events: queue.Queue):
    while True:
        try:
            yield events.get_nowait()
        except queue.Empty:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1200.0, help="the faulted run")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's seed")
    parser.add_argument("--spool-mb", type=int, default=256, help="the spool's filesystem")
    parser.add_argument("--disk-full-s", type=float, default=15.0, help="how long it is full")
    parser.add_argument("--node-down-s", type=float, default=30.0, help="before a restart")
    parser.add_argument("--json-out", type=Path, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("chaos.py mounts a small tmpfs for the spool: run it as root")
    tmp = Path(tempfile.mkdtemp(prefix="fw-chaos-"))
    chaos = Chaos(args, tmp)
    try:
        report = chaos.run()
    finally:
        chaos.cluster.stop()
        subprocess.run(["umount", "-l", str(tmp / "home" / "spool")], check=False)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    print(f"chaos: {'all checks passed' if report['ok'] else 'FAILED'} (work folder {tmp})")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
