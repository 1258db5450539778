"""Spool segments: durable appends, group commit, sealing, crash recovery."""

import subprocess
import sys
import threading

import pytest

from featurewatch.errors import SpoolError
from featurewatch.storage.spool import MAGIC, Spool, read_segment, sealed_segments


def all_records(directory):
    return [r for p in sealed_segments(directory) for r in read_segment(p)]


def test_round_trip_and_seal(tmp_path):
    spool = Spool(tmp_path)
    payloads = [f"record-{i}".encode() * (i + 1) for i in range(20)]
    for p in payloads:
        spool.append(p)
    assert sealed_segments(tmp_path) == []  # nothing visible until sealed
    spool.seal()
    assert all_records(tmp_path) == payloads
    spool.close()


@pytest.mark.parametrize("direct_io", [True, False])
def test_records_across_block_boundaries(tmp_path, direct_io):
    """O_DIRECT writes whole 4 KiB blocks and rewrites the last partial one with the
    next group; buffered writes append. Both must give back exactly what was appended,
    and a sealed segment carries no padding."""
    spool = Spool(tmp_path, direct_io=direct_io)
    sizes = [1, 4095, 4096, 4097, 12, 300_000, 8192 - 12, 7, 65_536, 3_000_001, 5]
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    for p in payloads:
        spool.append(p)
    assert spool.direct_io is direct_io
    spool.close()
    (segment,) = sealed_segments(tmp_path)
    assert list(read_segment(segment)) == payloads
    assert segment.stat().st_size == sum(12 + n for n in sizes)  # header is 12 bytes


def test_crash_with_direct_io_recovers_records_and_cuts_padding(tmp_path):
    code = (
        "import os, sys; from featurewatch.storage.spool import Spool; "
        "s = Spool(sys.argv[1]); s.append(b'a' * 5000); s.append(b'b' * 3); "
        "assert s.direct_io; os._exit(9)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert proc.returncode == 9
    (open_file,) = list(tmp_path.glob("*.open"))
    assert open_file.stat().st_size % 4096 == 0  # zero padding after the last record
    spool = Spool(tmp_path)
    assert spool.recovered_records == 2
    spool.close()
    assert all_records(tmp_path) == [b"a" * 5000, b"b" * 3]
    assert sealed_segments(tmp_path)[0].stat().st_size == 5012 + 15


def test_older_crc32_records_are_still_read(tmp_path):
    import struct
    import zlib

    old = tmp_path / "seg-000000000001.seg"
    old.write_bytes(struct.pack("<4sII", b"FWS1", 3, zlib.crc32(b"abc")) + b"abc")
    assert list(read_segment(old)) == [b"abc"]
    spool = Spool(tmp_path)  # appends next to it in the current format
    spool.append(b"new")
    spool.close()
    assert all_records(tmp_path) == [b"abc", b"new"]


def test_group_commit_batches_fsyncs(tmp_path):
    spool = Spool(tmp_path)
    n_threads, per_thread = 8, 50

    def writer(t):
        for i in range(per_thread):
            spool.append(f"{t}:{i}".encode())

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spool.close()
    records = all_records(tmp_path)
    assert sorted(records) == sorted(
        f"{t}:{i}".encode() for t in range(n_threads) for i in range(per_thread)
    )
    # each thread's own records stay in order
    for t in range(n_threads):
        mine = [r for r in records if r.startswith(f"{t}:".encode())]
        assert mine == [f"{t}:{i}".encode() for i in range(per_thread)]
    assert spool.fsyncs < n_threads * per_thread


def test_seals_by_size_and_age(tmp_path):
    spool = Spool(tmp_path / "size", segment_max_bytes=2048)
    for _ in range(10):
        spool.append(b"x" * 1000)
    spool.close()
    assert len(sealed_segments(tmp_path / "size")) >= 4

    aged = Spool(tmp_path / "age", segment_max_age_s=0.2)
    aged.append(b"hello")
    import time

    deadline = time.time() + 30
    while not sealed_segments(tmp_path / "age") and time.time() < deadline:
        time.sleep(0.05)
    assert all_records(tmp_path / "age") == [b"hello"]
    aged.close()


def test_crash_recovery_keeps_complete_records_only(tmp_path):
    # A real crash: a process appends two records and dies without sealing.
    code = (
        "import os, sys; from featurewatch.storage.spool import Spool; "
        "s = Spool(sys.argv[1]); s.append(b'first'); s.append(b'second'); os._exit(9)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert proc.returncode == 9
    (open_file,) = list(tmp_path.glob("*.open"))
    with open(open_file, "ab") as f:  # and a torn record the crash left behind
        f.write(MAGIC + b"\xff\x00\x00\x00" + b"torn")
    spool2 = Spool(tmp_path)
    assert spool2.recovered_records == 2
    assert all_records(tmp_path) == [b"first", b"second"]
    spool2.append(b"third")
    spool2.close()
    assert all_records(tmp_path) == [b"first", b"second", b"third"]


def test_damaged_sealed_segment_is_an_error(tmp_path):
    spool = Spool(tmp_path)
    spool.append(b"payload")
    spool.close()
    (seg,) = sealed_segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="damaged"):
        list(read_segment(seg))


def test_append_after_close_fails(tmp_path):
    spool = Spool(tmp_path)
    spool.close()
    with pytest.raises(SpoolError):
        spool.append(b"late")


def test_a_vanished_directory_fails_appends_without_spinning(tmp_path):
    import shutil
    import time

    spool = Spool(tmp_path / "s")
    spool.append(b"one")
    shutil.rmtree(tmp_path / "s")  # the disk or folder goes away under the collector
    spool.seal()  # the rename fails
    assert spool.write_errors == 1
    # Every later group fails to open a segment. The writer pauses 0.5 s after each
    # failure; a hot loop would fail about once per append (10 ms apart).
    started, pending = time.monotonic(), []
    while time.monotonic() - started < 1.2:
        pending.append(spool.append_async(b"x"))
        time.sleep(0.01)
    for item in pending:
        with pytest.raises(SpoolError, match="write failed"):
            item.wait(60)
    assert 2 <= spool.write_errors <= 2 + (time.monotonic() - started) / 0.5
    spool._closed = True


def test_a_group_commit_window_gathers_appends_into_fewer_fsyncs(tmp_path):
    """Appends arriving one by one within the window share one write and fsync; a full
    group (group_min_bytes) does not wait out the window."""
    import time

    spool = Spool(tmp_path, group_wait_s=0.5, group_min_bytes=10_000)
    pending = []
    for _ in range(5):
        pending.append(spool.append_async(b"x" * 100))
        time.sleep(0.02)  # each arrives after the writer has woken for the first
    for p in pending:
        p.wait()
    assert spool.fsyncs == 1
    spool.close()
    assert len(all_records(tmp_path)) == 5

    # A window far longer than any write: a full group that waited it out would show.
    spool = Spool(tmp_path / "long", group_wait_s=60, group_min_bytes=10_000)
    started = time.monotonic()
    spool.append(b"y" * 20_000)  # over group_min_bytes: written at once
    assert time.monotonic() - started < 30
    assert spool.fsyncs == 1
    spool.close()
    assert len(all_records(tmp_path / "long")) == 1


def test_a_group_is_capped_and_the_rest_follows_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(Spool, "max_group_bytes", 10_000)
    spool = Spool(tmp_path, group_wait_s=0.2, group_min_bytes=1 << 20)
    pending = [spool.append_async(bytes([i]) * 3000) for i in range(10)]
    for p in pending:
        p.wait()
    assert spool.fsyncs >= 4  # at most 3 records of 3,000 bytes per write
    more = [spool.append_async(b"L" * 3000) for _ in range(10)]
    spool.close()  # writes every pending group before it stops
    assert all(p.ready() and p.error is None for p in more)
    assert all_records(tmp_path) == [bytes([i]) * 3000 for i in range(10)] + [b"L" * 3000] * 10


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_failed_sync_fails_its_group_and_the_next_group_writes_over_it(
    tmp_path, disk_fault, direct_io
):
    spool = Spool(tmp_path, direct_io=direct_io)
    spool.append(b"a" * 5000)  # leaves a partial block for the next group
    assert spool.direct_io is direct_io
    disk_fault("fdatasync")
    with pytest.raises(SpoolError, match="Input/output error"):
        spool.append(b"lost" * 3000)
    spool.append(b"c" * 3)
    spool.close()
    (segment,) = sealed_segments(tmp_path)
    assert list(read_segment(segment)) == [b"a" * 5000, b"c" * 3]
    assert segment.stat().st_size == 5012 + 15


def test_o_direct_refused_at_write_goes_on_buffered(tmp_path, monkeypatch):
    """A filesystem may accept O_DIRECT at open and refuse the writes (EINVAL): the
    segment continues buffered on the same descriptor and the spool stops trying."""
    import errno

    from featurewatch.storage import spool as spool_module

    spool = Spool(tmp_path)
    spool.append(b"a" * 5000)  # a real O_DIRECT write first
    assert spool.direct_io

    def refuse(self, records, added):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(spool_module._SegmentFile, "_write_direct", refuse)
    spool.append(b"b" * 3)  # unaligned: only works once O_DIRECT is off the descriptor
    assert spool.direct_io is False
    spool.close()
    assert all_records(tmp_path) == [b"a" * 5000, b"b" * 3]
    assert spool._staging is None


def test_the_staging_buffer_grows_after_a_failed_write(tmp_path, disk_fault):
    """A failed write's error (kept by its waiter, with its traceback) must not pin the
    staging memory: a later, larger group still needs to grow it."""
    disk_fault("pwritev")
    spool = Spool(tmp_path)
    failed = spool.append_async(b"x" * 1000)
    assert failed.done.wait(60)
    assert failed.error is not None  # still referenced, traceback and all
    big = b"y" * (3 << 20)  # past the 1 MiB the staging buffer starts with
    spool.append(big)
    assert spool.direct_io
    spool.close()
    assert all_records(tmp_path) == [big]


def test_a_failed_seal_starts_a_new_segment_and_recovery_seals_the_old(tmp_path, disk_fault):
    spool = Spool(tmp_path)
    spool.append(b"one")
    disk_fault("replace")
    spool.seal()  # the rename fails; the writer logs it and drops the segment
    spool.append(b"two")  # a new segment, never the closed descriptor
    spool.close()
    assert all_records(tmp_path) == [b"two"]  # "one" is durable in the .open file
    Spool(tmp_path).close()  # and recovery seals it at the next start
    assert all_records(tmp_path) == [b"one", b"two"]
