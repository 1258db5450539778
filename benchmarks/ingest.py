"""Ingest throughput: a real collector (durable, fsync + group commit) vs a bare gRPC echo.

Each client stream is its own process sending fp16 batches of width 576 (256 vectors per
message) as fast as gRPC flow control allows. The echo server parses each message and
acks it at once (the ceiling of Python gRPC here); the collector is the real `featurewatch
collect` process: validate, dedupe, append, fsync, ack. Prints vectors/s for one and two
streams and the ratio to the ceiling: each round measures the echo right before each
collector case, and the median ratio over the rounds is reported with every round's.

    .venv/bin/python benchmarks/ingest.py [--seconds 5] [--rounds 3]
    .venv/bin/python benchmarks/ingest.py --soak 600     # ten minutes, two senders

The soak runs two processes using the replica's ActivationSender at full rate (they wait
only when their send buffer holds 64 batches, so nothing is dropped for lack of room),
while a consumer reads and deletes sealed segments (as the pipeline would) and tallies
every stored seq. It samples resident memory of the collector and of each sender every
10 s and prints peak vs first-minute peak, and checks that every acked batch was stored.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import psutil
import torch

from featurewatch.actors.collector import start_collector_process
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import make_batch

WIDTH, ROWS, TOKEN = 576, 256, "bench-test-token-5f0c2e9b7d"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def template() -> pb.ActivationBatch:
    x = torch.randn(ROWS, WIDTH).half()
    return make_batch(
        x,
        model="bench",
        model_version="v1",
        layer=15,
        site="resid_post",
        request_ids=["r"],
        request_index=[0] * ROWS,
        token_pos=list(range(ROWS)),
        token_id=[1] * ROWS,
        ts_unix_nanos=[time.time_ns()] * ROWS,
    )


# ---- servers


def echo_server(ready: mp.Queue) -> None:
    def stream(request_iterator, context):
        for raw in request_iterator:
            batch = pb.ActivationBatch.FromString(raw)
            yield pb.Ack(replica_id=batch.replica_id, seq=batch.seq)

    handler = grpc.method_handlers_generic_handler(
        "featurewatch.v1.Collector",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=None, response_serializer=pb.Ack.SerializeToString
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.put(port)
    server.wait_for_termination()


def start_collector(spool: Path, token_file: Path) -> tuple[subprocess.Popen, str]:
    """The real `featurewatch collect` process, with durability on."""
    args = ("--width", str(WIDTH), "--segment-max-bytes", str(32 << 20))
    return start_collector_process(
        spool, token_file, extra_args=args + ("--segment-max-age-s", "2")
    )


# ---- clients


def raw_client(address: str, seconds: float, replica: str, out: mp.Queue) -> None:
    """Stream as fast as flow control allows for `seconds`; count acked vectors."""
    batch = template()
    batch.replica_id, batch.stream_epoch = replica, 1
    stop_at = time.perf_counter() + seconds

    def requests():
        seq = 0
        while time.perf_counter() < stop_at:
            seq += 1
            batch.seq = seq
            yield batch.SerializeToString()

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/featurewatch.v1.Collector/Stream",
            request_serializer=None,
            response_deserializer=pb.Ack.FromString,
        )
        start = time.perf_counter()
        acked = 0
        for ack in call(requests(), metadata=AUTH):
            acked = ack.seq  # an ack covers every earlier seq of the stream
        out.put((acked * ROWS, time.perf_counter() - start))


def measure(addresses: str | list[str], streams: int, seconds: float) -> float:
    """Vectors/s acked over `streams` client processes; stream i goes to addresses[i]
    when given a list (one collector per stream), else all to the one address."""
    if isinstance(addresses, str):
        addresses = [addresses] * streams
    out: mp.Queue = mp.Queue()
    procs = [
        mp.Process(target=raw_client, args=(addresses[i], seconds, f"bench-{streams}-{i}", out))
        for i in range(streams)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(v for v, _ in results) / max(t for _, t in results)


# ---- soak


def soak_sender(address: str, seconds: float, replica: str, out: mp.Queue) -> None:
    from featurewatch.capture.sender import ActivationSender

    sender = ActivationSender(address, TOKEN, replica, max_queue_batches=256)
    base = template()
    proc = psutil.Process()
    start = last_sample = time.monotonic()
    while time.monotonic() - start < seconds:
        if sender.snapshot().queue_depth >= 64:
            time.sleep(0.002)
        else:
            batch = pb.ActivationBatch()
            batch.CopyFrom(base)
            sender.submit(batch)
        if time.monotonic() - last_sample >= 10:
            last_sample = time.monotonic()
            out.put(("rss", replica, last_sample - start, proc.memory_info().rss))
    sender.flush(120)
    stats = sender.snapshot()
    sender.close()
    out.put(("done", replica, stats.acked_batches, stats.dropped_batches))


def soak(seconds: float) -> None:
    from featurewatch.proto.activations_pb2 import ActivationBatch
    from featurewatch.storage.spool import read_segment, sealed_segments

    with tempfile.TemporaryDirectory() as tmp:
        spool, token_file = Path(tmp) / "spool", Path(tmp) / "token"
        token_file.write_text(TOKEN)
        collector, address = start_collector(spool, token_file)
        collector_ps = psutil.Process(collector.pid)
        out: mp.Queue = mp.Queue()
        senders = [
            mp.Process(target=soak_sender, args=(address, seconds, f"soak-{i}", out))
            for i in range(2)
        ]
        for p in senders:
            p.start()
        stored: dict[str, set[int]] = {}
        duplicates = 0
        rss: dict[str, list[tuple[float, int]]] = {"collector": []}
        done: dict[str, tuple[int, int]] = {}
        start = last_sample = time.monotonic()

        def consume() -> None:
            nonlocal duplicates
            for path in sealed_segments(spool):
                for record in read_segment(path):
                    b = ActivationBatch.FromString(record)
                    seen = stored.setdefault(b.replica_id, set())
                    duplicates += b.seq in seen
                    seen.add(b.seq)
                path.unlink()  # the pipeline has it now

        while len(done) < 2:
            consume()
            while not out.empty():
                msg = out.get()
                if msg[0] == "rss":
                    rss.setdefault(msg[1], []).append((msg[2], msg[3]))
                else:
                    done[msg[1]] = (msg[2], msg[3])
            if time.monotonic() - last_sample >= 10:
                last_sample = time.monotonic()
                rss["collector"].append((last_sample - start, collector_ps.memory_info().rss))
            time.sleep(0.5)
        elapsed = time.monotonic() - start
        collector.terminate()
        collector.wait(30)
        consume()
        for p in senders:
            p.join()
    acked = sum(a for a, _ in done.values())
    stored_total = sum(len(s) for s in stored.values())
    print(f"soak {seconds:.0f}s: {acked * ROWS / elapsed:,.0f} vectors/s acked on average")
    print(
        f"acked batches {acked}, stored distinct {stored_total}, duplicates {duplicates}, "
        f"dropped {sum(d for _, d in done.values())}"
    )
    for name, samples in rss.items():
        first = max((r for t, r in samples if t <= 60), default=samples[0][1] if samples else 0)
        peak = max((r for _, r in samples), default=0)
        print(
            f"{name}: first-minute peak {first / 2**20:.0f} MiB, overall peak "
            f"{peak / 2**20:.0f} MiB, ratio {peak / first:.3f}"
        )
    ok = stored_total >= acked and duplicates == 0
    print("every acked batch stored once:", "yes" if ok else "NO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of echo/collector pairs (median)"
    )
    parser.add_argument("--soak", type=float, default=None, help="soak duration in seconds")
    args = parser.parse_args()
    mp.set_start_method("spawn")
    if args.soak:
        soak(args.soak)
        return
    ready: mp.Queue = mp.Queue()
    echo = mp.Process(target=echo_server, args=(ready,), daemon=True)
    echo.start()
    echo_address = f"127.0.0.1:{ready.get()}"
    cases = (
        (1, "collector", "one collector"),
        (2, "collector", "one collector"),
        # two streams as `collector.count: 2` deploys them: a collector process (and
        # spool) per stream
        (2, "collector pair", "one collector per stream"),
    )
    # Each round measures the echo ceiling right before each collector case, so a ratio
    # compares two figures taken moments apart; the median over rounds damps the noise
    # of a shared 2-core machine.
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        for r in range(args.rounds):
            results = {}
            for streams, kind, _ in cases:
                echo_rate = measure(echo_address, streams, args.seconds)
                count = 2 if kind == "collector pair" else 1
                collectors = [
                    start_collector(Path(tmp) / f"spool-{r}-{kind}-{streams}-{i}", token_file)
                    for i in range(count)
                ]
                addresses = [a for _, a in collectors] if count > 1 else collectors[0][1]
                results[(streams, kind)] = (echo_rate, measure(addresses, streams, args.seconds))
                for collector, _ in collectors:
                    collector.terminate()
                    collector.wait(30)
            rounds.append(results)
    echo.terminate()
    print(
        f"fp16 width {WIDTH}, {ROWS} vectors per message, {os.cpu_count()} cores, "
        f"{args.rounds} rounds of {args.seconds:g} s"
    )
    for streams, kind, label in cases:
        pairs = [r[(streams, kind)] for r in rounds]
        ratios = sorted(c / e for e, c in pairs)
        echo_rate, collector_rate = sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]
        print(
            f"{streams} stream(s), {label}: echo ceiling {echo_rate:,.0f} vectors/s, collector "
            f"(fsync) {collector_rate:,.0f} vectors/s, ratio {statistics.median(ratios):.2f} "
            f"(median; rounds {', '.join(f'{x:.2f}' for x in ratios)})"
        )


if __name__ == "__main__":
    main()
