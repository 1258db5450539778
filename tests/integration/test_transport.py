"""Transport under stress: TLS, fail-over, seq order, fuzzed messages, killed collectors."""

import datetime
import ipaddress
import os
import signal
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurewatch.actors.collector import CollectorServer, start_collector_process
from featurewatch.capture.sender import ActivationSender
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto import activations_pb2_grpc as pb_grpc
from featurewatch.proto.codec import validate_batch
from featurewatch.storage.spool import read_segment, sealed_segments
from tests.conftest import fill_disk, free_port
from tests.integration.test_collector import AUTH, TOKEN, WIDTH, good, stored
from tests.unit.test_codec import batch_of


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls_collector(tmp_path):
    cert, key = self_signed(tmp_path)
    srv = CollectorServer(
        tmp_path / "spool", TOKEN, tls_cert_file=str(cert), tls_key_file=str(key)
    ).start()
    try:
        sender = ActivationSender(
            srv.address, TOKEN, "tls-replica", root_certificates=cert.read_bytes()
        )
        for _ in range(5):
            sender.submit(good(0))
        assert sender.flush(30)
        sender.close()
        # a plaintext client cannot talk to it
        with (
            grpc.insecure_channel(srv.address) as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            pb_grpc.CollectorStub(channel).Push(good(99), metadata=AUTH, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sorted(b.seq for b in stored(srv)) == [1, 2, 3, 4, 5]
    finally:
        srv.stop(grace=0)


def test_seq_going_backwards_within_a_stream_is_refused(tmp_path):
    srv = CollectorServer(tmp_path / "spool", TOKEN).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.CollectorStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Stream(iter([good(5), good(3)]), metadata=AUTH))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "seq: going backwards" in info.value.details()
        assert [b.seq for b in stored(srv)] == [5]
    finally:
        srv.stop(grace=0)


def test_one_ack_covers_a_group_commit(tmp_path):
    """A stream's acks come in seq order, each covers every earlier seq and comes only
    once all of those are durable: the collector sends one per group commit, so 200
    quickly sent batches get fewer acks and the last one names seq 200."""
    srv = CollectorServer(tmp_path / "spool", TOKEN).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            seen = []  # (acked seq, records durable when the ack arrived)
            for ack in pb_grpc.CollectorStub(channel).Stream(
                iter([good(seq) for seq in range(1, 201)]), metadata=AUTH
            ):
                seen.append((ack.seq, srv.spool.appended_records))
        seqs = [seq for seq, _ in seen]
        assert seqs == sorted(seqs) and seqs[-1] == 200
        assert all(durable >= seq for seq, durable in seen)
        assert len(seen) < 200
        assert sorted(b.seq for b in stored(srv)) == list(range(1, 201))
    finally:
        srv.stop(grace=0)


def test_a_batch_whose_write_failed_is_stored_when_resent(tmp_path, disk_fault):
    """Not durable means not seen: the resend is stored, not acked as a duplicate."""
    srv = CollectorServer(tmp_path / "spool", TOKEN).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.CollectorStub(channel)
            assert not stub.Push(good(1), metadata=AUTH).duplicate
            disk_fault("fdatasync")
            second = good(2)
            with pytest.raises(grpc.RpcError) as info:
                stub.Push(second, metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not stub.Push(second, metadata=AUTH).duplicate
            assert stub.Push(second, metadata=AUTH).duplicate  # now it is durable
        assert sorted(b.seq for b in stored(srv)) == [1, 2]
    finally:
        srv.stop(grace=0)


def test_a_sender_counts_every_batch_a_cumulative_ack_covers(tmp_path):
    srv = CollectorServer(tmp_path / "spool", TOKEN).start()
    try:
        sender = ActivationSender(srv.address, TOKEN, "cumulative-replica")
        for _ in range(150):
            sender.submit(good(0))
        assert sender.flush(30)
        stats = sender.snapshot()
        sender.close()
        assert stats.acked_batches == 150 and stats.acked_vectors == 150 * 4
        assert srv.stats()["accepted_batches"] == 150
    finally:
        srv.stop(grace=0)


def test_fail_over_between_collectors(tmp_path):
    a = CollectorServer(tmp_path / "a", TOKEN).start()
    b = CollectorServer(tmp_path / "b", TOKEN).start()
    sender = ActivationSender([a.address, b.address], TOKEN, "fo-replica")
    first = sender.address
    for _ in range(20):
        sender.submit(good(0))
    assert sender.flush(30)
    (a if first == a.address else b).stop(grace=0)  # the replica's collector dies
    for _ in range(20):
        sender.submit(good(0))
    assert sender.flush(60)
    assert sender.address != first
    sender.close()
    survivor = b if first == a.address else a
    seqs = [x.seq for x in stored(survivor)]
    dead_dir = tmp_path / ("a" if first == a.address else "b")
    seqs += [
        pb.ActivationBatch.FromString(r).seq
        for p in sealed_segments(dead_dir)
        for r in read_segment(p)
    ]
    assert set(seqs) == set(range(1, 41))  # nothing lost (a lost ack may duplicate:
    survivor.stop(grace=0)  # the pipeline drops those by batch key)


def test_a_sender_finds_its_collector_restarted_at_a_new_address(tmp_path):
    """The one collector dies and comes back elsewhere (a new port, the same spool):
    the sender asks `resolve` for the current addresses after the break, reconnects
    there and loses nothing. A lookup that fails keeps the known list."""
    a = CollectorServer(tmp_path / "spool", TOKEN).start()
    known = {"addresses": [a.address], "fail": False, "calls": 0}

    def resolve():
        known["calls"] += 1
        if known["fail"]:
            raise RuntimeError("the name service is down")
        return known["addresses"]

    sender = ActivationSender([a.address], TOKEN, "moving-replica", resolve=resolve)
    for _ in range(10):
        sender.submit(good(0))
    assert sender.flush(30)
    a.stop(grace=0)
    known["fail"] = True  # while it is down, lookups fail: the sender keeps retrying
    for _ in range(10):
        sender.submit(good(0))
    assert not sender.flush(2) and sender.address == a.address
    deadline = time.monotonic() + 60
    while known["calls"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert known["calls"] >= 1  # it asked after the break, and kept what it knew
    assert sender.address == a.address
    b = CollectorServer(tmp_path / "spool", TOKEN).start()  # replays, a new port
    known.update(addresses=[b.address], fail=False)
    assert sender.flush(60)
    assert sender.address == b.address != a.address
    sender.close()
    b.stop(grace=0)
    seqs = [
        pb.ActivationBatch.FromString(r).seq
        for p in sealed_segments(tmp_path / "spool")
        for r in read_segment(p)
    ]
    assert set(seqs) == set(range(1, 21))


def test_replicas_spread_across_collectors():
    addresses = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    starts = set()
    for i in range(30):
        sender = ActivationSender(addresses, TOKEN, f"replica-{i}")
        starts.add(sender.address)
        sender.close(flush_timeout=0)
    assert starts == set(addresses)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = CollectorServer(
        tmp_path_factory.mktemp("fuzz"), TOKEN, expected_width=WIDTH, max_batch_bytes=4096
    ).start()
    channel = grpc.insecure_channel(srv.address)
    raw_push = channel.unary_unary(
        "/featurewatch.v1.Collector/Push",
        request_serializer=None,
        response_deserializer=pb.Ack.FromString,
    )
    yield srv, raw_push
    channel.close()
    srv.stop(grace=0)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=600), cut=st.integers(min_value=0, max_value=400))
def test_fuzzed_and_truncated_messages(fuzz_server, data, cut):
    srv, raw_push = fuzz_server
    valid = good(1_000_000).SerializeToString()
    for payload in (data, valid[:cut]):
        try:
            raw_push(payload, metadata=AUTH, timeout=10)
        except grpc.RpcError as err:
            assert err.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ), err.details()
    # the server still answers, and everything it stored is a valid batch
    srv.seal()
    for path in sealed_segments(srv.spool.directory):
        for record in read_segment(path):
            validate_batch(pb.ActivationBatch.FromString(record), expected_width=WIDTH)


def stream_through_kills(spool, width, make_batch, rounds=3, per_round=60):
    """Stream batches from an ActivationSender into a `featurewatch collect` process that
    is SIGKILLed and restarted after each round. Returns (submitted batches, sender stats
    after a full flush)."""
    spool.parent.mkdir(parents=True, exist_ok=True)
    token_file = spool.parent / "kill-token"
    token_file.write_text(TOKEN)
    listen, args = f"127.0.0.1:{free_port()}", ("--width", str(width))
    proc, address = start_collector_process(spool, token_file, listen, args)
    sender = ActivationSender(address, TOKEN, "killed-replica")
    submitted = []
    try:
        for _round in range(rounds):
            for _ in range(per_round):
                batch = make_batch(len(submitted))
                submitted.append(batch)
                sender.submit(batch)
            time.sleep(0.05)  # let some of this round be in flight
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc, _ = start_collector_process(spool, token_file, listen, args)
        assert sender.flush(120)
        stats = sender.snapshot()
    finally:
        sender.close(flush_timeout=0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return submitted, stats


def test_collector_killed_mid_stream_loses_nothing_and_stores_no_duplicates(tmp_path):
    """SIGKILL the collector process three times while a replica streams; after it comes
    back each time, every batch the replica generated is stored exactly once."""
    spool = tmp_path / "spool"
    submitted, stats = stream_through_kills(
        spool, WIDTH, lambda n: batch_of(torch.randn(32, WIDTH, dtype=torch.float16))
    )
    total = len(submitted)
    seqs = [
        pb.ActivationBatch.FromString(r).seq
        for p in sealed_segments(spool)
        for r in read_segment(p)
    ]
    assert stats.dropped_batches == 0
    assert len(seqs) == len(set(seqs)) == total  # no duplicates, nothing lost
    assert stats.reconnects >= 3


def test_collect_cli_refuses_bad_arguments(tmp_path):
    from typer.testing import CliRunner

    from featurewatch.platform.cli import app

    runner = CliRunner()
    token = tmp_path / "token"
    token.write_text("")
    base = ["collect", "--spool", str(tmp_path / "s")]
    cases = [
        (["--listen", "nope", "--token-file", str(token)], "--listen must be HOST:PORT"),
        (["--listen", "127.0.0.1:1", "--token-file", str(tmp_path / "x")], "does not exist"),
        (["--listen", "127.0.0.1:1", "--token-file", str(token)], "is empty"),
        (
            ["--listen", "127.0.0.1:1", "--token-file", str(token), "--max-streams", "0"],
            "--max-streams",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(app, base + args)
        assert result.exit_code == 2 and message in result.output
    token.write_text("t")  # one character: refused as a token
    result = runner.invoke(app, base + ["--listen", "127.0.0.1:1", "--token-file", str(token)])
    assert result.exit_code == 2 and "is too weak: a token needs at least 24" in result.output
    token.write_text(TOKEN)
    result = runner.invoke(
        app, base + ["--listen", "127.0.0.1:1", "--token-file", str(token), "--tls-cert", "c"]
    )
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output


def test_a_full_disk_is_resource_exhausted_and_nothing_acked_is_lost(tmp_path, small_disk):
    """The spool on a real 8 MiB filesystem filled up mid-stream: the collector answers
    RESOURCE_EXHAUSTED (not the batch's fault: no rejected seq), the sender keeps its
    batches and backs off, and once space returns every batch is stored exactly once.
    Several batches of one stream are in flight when the disk fills: each failed write
    is forgotten as it fails, so its resend is stored, not acked as a duplicate."""
    srv = CollectorServer(small_disk / "spool", TOKEN, segment_max_age_s=0.2).start()
    sender = ActivationSender(srv.address, TOKEN, "full-disk-replica", max_queue_batches=4096)
    try:
        rows = 64  # 64 x WIDTH fp16: a few hundred bytes a batch
        for _ in range(200):
            sender.submit(batch_of(torch.randn(rows, WIDTH, dtype=torch.float16), seq=0))
        assert sender.flush(30)
        fill_disk(small_disk)
        for _ in range(400):
            sender.submit(batch_of(torch.randn(rows, WIDTH, dtype=torch.float16), seq=0))
        deadline = time.monotonic() + 30
        while srv.stats()["disk_full_refusals"] == 0:
            assert time.monotonic() < deadline, "the full disk was never reported"
            time.sleep(0.1)
        assert not sender.flush(1)  # nothing more can be stored while the disk is full
        assert "RESOURCE_EXHAUSTED" in sender.snapshot().last_error
        (small_disk / "filler").unlink()
        assert sender.flush(60)
        stats = sender.snapshot()
        assert stats.acked_batches == 600 and stats.dropped_batches == 0
    finally:
        sender.close()
        srv.stop(grace=0)
    batches = stored(srv)
    assert sorted(b.seq for b in batches) == list(range(1, 601))
