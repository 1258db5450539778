"""Append-only spool segments with group commit.

A segment is a file of framed records: MAGIC | length u32 | checksum u32 | payload. The
magic names the checksum: FWS2 is CRC-32C (hardware-accelerated; zlib's CRC-32 cost 70 us
per 300 KB batch, 7x more), FWS1 (zlib CRC-32, older spools) is still read. The
open segment is `seg-N.open`; sealing fsyncs it and renames it to `seg-N.seg`
atomically, so readers only ever list complete segments. `append()` returns only after
the record is fsynced: one writer thread collects every append waiting at that moment,
writes them all and fsyncs once (group commit), so durability costs one fsync per
group, not per batch.

Where the filesystem allows it, groups are written with O_DIRECT from one reused,
page-aligned buffer (see `_SegmentFile`): no copy into freshly allocated page cache, which
was the largest single cost of a busy collector on a small VM.

After a crash the open segment may end in a partial record or zero padding: recovery
keeps every complete record (all acked ones are complete, since ack follows fsync),
truncates the rest and seals the segment.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import google_crc32c

from featurewatch.errors import SpoolError

log = logging.getLogger(__name__)
MAGIC = b"FWS2"
_CHECKSUMS = {MAGIC: google_crc32c.value, b"FWS1": zlib.crc32}
_checksum = _CHECKSUMS[MAGIC]
_HEADER = struct.Struct("<4sII")
_NAME = re.compile(r"^seg-(\d{12})\.(open|seg)$")
# O_DIRECT transfers whole blocks at block-aligned offsets from aligned memory; 4 KiB
# satisfies both 512-byte and 4 KiB sector devices.
_BLOCK = 4096


def segment_id(path: Path) -> str:
    """A sealed segment's id, unique across the spools of one home: the spool folder's
    name and the segment number, e.g. 'spool.seg-000000000007'."""
    path = Path(path)
    return f"{path.parent.name}.{path.name.split('.')[0]}"


def sealed_segments(directory: Path) -> list[Path]:
    """Sealed segments in write order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(".seg") and _NAME.match(p.name))


def collector_spool_dir(spool_root: Path, index: int) -> Path:
    """Collector 0 writes to the spool root, collector i > 0 to <root>/collector-i/."""
    return Path(spool_root) if index == 0 else Path(spool_root) / f"collector-{index}"


def spool_segments(spool_root: Path) -> list[Path]:
    """Sealed segments of every collector's spool under the spool root."""
    spool_root = Path(spool_root)
    dirs = [spool_root] + sorted(spool_root.glob("collector-*"))
    return [p for d in dirs for p in sealed_segments(d)]


def waiting_segments(
    spool_root: Path, sae_version: str, catalog, paths=None, since=None
) -> tuple[list[Path], list[Path]]:
    """(the sealed segments considered, those of them the catalog has not committed for
    sae_version). By default every collector's segments; with `since` (a Unix time),
    only those sealed since."""
    all_paths = spool_segments(spool_root) if paths is None else list(paths)
    if since is not None:
        all_paths = [p for p in all_paths if p.stat().st_mtime >= since]
    done = catalog.committed_segments(sae_version)
    return all_paths, [p for p in all_paths if segment_id(p) not in done]


def oldest_waiting(spool_root: Path, sae_version: str, catalog, since=None) -> float | None:
    """When the oldest sealed segment not yet committed for sae_version was sealed (its
    last write, as a Unix time); None when every segment is in the lake."""
    _, todo = waiting_segments(spool_root, sae_version, catalog, since=since)
    return min((p.stat().st_mtime for p in todo), default=None)


def _scan(path: Path) -> tuple[list[bytes], int]:
    """Complete records of a segment file and the byte offset where they end."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        checksum = _CHECKSUMS.get(magic)
        if checksum is None or end > len(data):
            break
        payload = data[start:end]
        if checksum(payload) != crc:
            break
        records.append(payload)
        offset = end
    return records, offset


def read_segment(path: Path) -> Iterator[bytes]:
    """Payloads of a sealed segment. A sealed segment is whole; damage is an error."""
    records, end = _scan(Path(path))
    if end != Path(path).stat().st_size:
        raise SpoolError(f"segment {path} is damaged at byte {end}")
    yield from records


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _StagingBuffer:
    """Page-aligned memory for O_DIRECT writes, reused across groups and segments so
    its pages stay mapped; grows to the largest group seen."""

    def __init__(self, size: int = 1 << 20):
        self.memory = mmap.mmap(-1, size)

    def ensure(self, size: int, keep: int) -> None:
        if size <= len(self.memory):
            return
        grown = mmap.mmap(-1, _round_up(size, 1 << 20))
        grown[:keep] = self.memory[:keep]
        self.memory.close()
        self.memory = grown


class _SegmentFile:
    """The open segment: appends groups of framed records, durable when `write` returns.

    With O_DIRECT every write covers whole blocks, so the last partial block of the
    previous group is kept at the start of the staging buffer and written again,
    followed by the new records and zero padding up to a block boundary. The acked bytes
    of that block are rewritten unchanged, so a torn write cannot damage them; the
    padding is cut off at seal (and by recovery after a crash).
    """

    def __init__(self, path: Path, staging: _StagingBuffer | None):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self.path = path
        self.staging = None
        if staging is not None:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
                self.staging = staging
            except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
                pass
        if self.staging is None:
            self.fd = os.open(path, flags, 0o644)
        self.size = 0  # bytes of complete records
        self._tail = 0  # bytes past the last block boundary, also held in staging

    def write(self, payloads: list[bytes]) -> None:
        records: list[bytes] = []
        for payload in payloads:
            records.append(_HEADER.pack(MAGIC, len(payload), _checksum(payload)))
            records.append(payload)
        added = sum(len(r) for r in records)
        # Nothing moves until the sync succeeds: after a failed write or sync the next
        # group is written over this one (whose appends were reported failed).
        if self.staging is not None:
            try:
                self._write_direct(records, added)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._stop_direct_io(err)
        if self.staging is None:
            _write_all(self.fd, records, self.size)
        os.fdatasync(self.fd)
        if self.staging is not None:
            self._keep_last_partial_block(self._tail + added)
        self.size += added

    def _stop_direct_io(self, err: OSError) -> None:
        """Some filesystems (FUSE, network ones) accept O_DIRECT at open and refuse the
        writes: go on buffered, from the end of the complete records."""
        log.warning("spool %s: O_DIRECT writes refused (%s); writing buffered", self.path, err)
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.staging = None
        self._tail = 0

    def _write_direct(self, records: list[bytes], added: int) -> None:
        assert self.staging is not None
        block_start = self.size - self._tail
        end = self._tail + added
        padded = _round_up(end, _BLOCK)
        self.staging.ensure(padded, keep=self._tail)
        memory = self.staging.memory
        at = self._tail
        for record in records:
            memory[at : at + len(record)] = record
            at += len(record)
        memory[end:padded] = bytes(padded - end)
        with memoryview(memory) as view, view[:padded] as blocks:
            _write_all(self.fd, [blocks], block_start)

    def _keep_last_partial_block(self, end: int) -> None:
        """Move the bytes past the last block boundary to the front of the staging
        buffer: the next group starts by writing that block again."""
        assert self.staging is not None
        keep_from = end // _BLOCK * _BLOCK
        self._tail = end - keep_from
        memory = self.staging.memory
        memory[: self._tail] = memory[keep_from:end]

    def seal(self) -> None:
        """Cut any padding, make it durable, close and rename to `.seg`. The descriptor
        is closed even when this fails; the spool then starts a new segment and this
        `.open` one is recovered (and sealed) at the next start."""
        try:
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        os.replace(self.path, self.path.with_suffix(".seg"))
        _fsync_dir(self.path.parent)


def _write_all(fd: int, chunks: list, offset: int) -> None:
    """pwritev until every byte is written (a regular file may take fewer at once)."""
    views = [memoryview(c) for c in chunks]
    try:
        while views:
            written = os.pwritev(fd, views, offset)
            offset += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0).release()
            if written:
                views[0] = views[0][written:]
    finally:
        # A traceback keeps this frame alive: views left here would pin the staging
        # mmap, which could then not grow.
        for view in views:
            view.release()


class _Pending:
    """A queued append; wait() returns once it is durable, or raises SpoolError."""

    __slots__ = ("payload", "done", "error", "on_done")

    def __init__(self, payload: bytes, on_done=None):
        self.payload = payload
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.on_done = on_done

    def finish(self, error: BaseException | None = None) -> None:
        """Durable (error None) or failed; on_done(error) runs before any waiter wakes."""
        self.error = error
        if self.on_done is not None:
            try:
                self.on_done(error)
            except Exception:  # noqa: BLE001 - a waiter must still wake
                log.exception("spool: an append's completion callback failed")
        self.done.set()

    def ready(self) -> bool:
        """Finished (durable or failed): wait() will not block."""
        return self.done.is_set()

    @property
    def disk_full(self) -> bool:
        """Failed because the filesystem is out of space (or quota)."""
        return isinstance(self.error, OSError) and self.error.errno in (errno.ENOSPC, errno.EDQUOT)

    def wait(self, timeout: float = 60.0) -> None:
        if not self.done.wait(timeout):
            raise SpoolError("spool write timed out")
        if self.error is not None:
            reason = "the disk is full" if self.disk_full else str(self.error)
            raise SpoolError(f"spool write failed: {reason}") from self.error


class Spool:
    """A directory of segments; `append()` is durable when it returns."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_max_bytes: int = 64 * 1024 * 1024,
        segment_max_age_s: float = 30.0,
        direct_io: bool = True,
        group_wait_s: float = 0.0,
        group_min_bytes: int = 1 << 20,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age_s = segment_max_age_s
        self.recovered_records = self._recover()
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        # Group commit window: a group smaller than group_min_bytes waits up to
        # group_wait_s for more appends, so a busy spool makes fewer, larger writes,
        # fsyncs and acks.
        self.group_wait_s = group_wait_s
        self.group_min_bytes = group_min_bytes
        self._seal_requested = False
        self._sealed_event = threading.Event()
        self._closed = False
        self._staging = _StagingBuffer() if direct_io and hasattr(os, "O_DIRECT") else None
        self._file: _SegmentFile | None = None
        self._opened_at = 0.0
        self._next_number = self._highest_number() + 1
        self.appended_records = 0
        self.fsyncs = 0
        self.write_errors = 0
        self._writer = threading.Thread(target=self._write_loop, name="fw-spool", daemon=True)
        self._writer.start()

    # ---- public API

    def append(self, payload: bytes, timeout: float = 60.0) -> None:
        """Write one record; return once it is fsynced. Thread-safe."""
        self.append_async(payload).wait(timeout)

    def append_async(self, payload: bytes, on_done=None) -> _Pending:
        """Queue one record; `.wait()` on the result returns once it is fsynced.

        Lets one stream keep several records in the same group commit instead of
        waiting for each fsync in turn. `on_done(error)` runs on the writer thread once
        the record is durable (error None) or has failed, whether or not anyone waits.
        """
        item = _Pending(payload, on_done)
        with self._cond:
            if self._closed:
                raise SpoolError("spool is closed")
            self._pending.append(item)
            self._pending_bytes += len(payload)
            # Wake the writer for the first record of a group, or once the group is
            # full; in between it is either writing or waiting out the window.
            if len(self._pending) == 1 or self._pending_bytes >= self.group_min_bytes:
                self._cond.notify_all()
        return item

    def seal(self, timeout: float = 30.0) -> None:
        """Seal the open segment now (if it holds anything) and wait until it is sealed."""
        with self._cond:
            if self._closed:
                return
            self._sealed_event.clear()
            self._seal_requested = True
            self._cond.notify_all()
        self._sealed_event.wait(timeout)

    def close(self) -> None:
        """Flush pending appends, seal the open segment and stop the writer."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()

    # ---- recovery

    def _highest_number(self) -> int:
        numbers = [int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return max(numbers, default=0)

    def _recover(self) -> int:
        recovered = 0
        for path in sorted(self.directory.glob("seg-*.open")):
            records, end = _scan(path)
            if not records:
                path.unlink()
                continue
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path, path.with_suffix(".seg"))
            recovered += len(records)
        _fsync_dir(self.directory)
        return recovered

    # ---- the writer thread

    @property
    def direct_io(self) -> bool | None:
        """Whether the open segment is written with O_DIRECT (None: no open segment)."""
        return None if self._file is None else self._file.staging is not None

    def _open_segment(self) -> None:
        path = self.directory / f"seg-{self._next_number:012d}.open"
        self._next_number += 1
        self._file = _SegmentFile(path, self._staging)
        _fsync_dir(self.directory)  # the new name itself must survive a crash
        self._opened_at = time.monotonic()

    def _seal_segment(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None  # never write to a closed descriptor
        file.seal()

    # One write takes at most this much (at least one record): it bounds the O_DIRECT
    # staging buffer, which keeps the size of the largest group.
    max_group_bytes = 16 << 20

    def _take_group(self) -> list[_Pending]:
        """Pop the oldest pending appends, up to max_group_bytes. Holds self._cond."""
        taken, size = 0, 0
        for item in self._pending:
            if taken and size + len(item.payload) > self.max_group_bytes:
                break
            taken += 1
            size += len(item.payload)
        group, self._pending = self._pending[:taken], self._pending[taken:]
        self._pending_bytes -= size
        return group

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._seal_requested and not self._closed:
                    timeout = None
                    if self._file is not None:
                        age = time.monotonic() - self._opened_at
                        timeout = max(0.0, self.segment_max_age_s - age)
                        if timeout == 0.0:
                            break
                    self._cond.wait(timeout)
                window_ends = time.monotonic() + self.group_wait_s
                while (
                    self._pending
                    and self._pending_bytes < self.group_min_bytes
                    and not self._seal_requested
                    and not self._closed
                ):
                    remaining = window_ends - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take_group()
                seal_now = self._seal_requested
                self._seal_requested = False
                closing = self._closed and not self._pending  # else write the rest first
            durable = False
            try:
                if batch:
                    if self._file is None:
                        self._open_segment()
                    assert self._file is not None
                    self._file.write([item.payload for item in batch])
                    if self._file.staging is None:
                        self._staging = None  # O_DIRECT refused here: stop trying
                    self.fsyncs += 1
                    self.appended_records += len(batch)
                durable = True
                for item in batch:
                    item.finish()
                aged = (
                    self._file is not None
                    and time.monotonic() - self._opened_at >= self.segment_max_age_s
                )
                if self._file is not None and (
                    seal_now or closing or aged or self._file.size >= self.segment_max_bytes
                ):
                    self._seal_segment()
            except BaseException as err:  # report to every waiter, keep the thread alive
                if not durable:  # a failed seal leaves the written group durable
                    for item in batch:
                        item.finish(err)
                self.write_errors += 1
                log.error("spool %s: write or seal failed: %s", self.directory, err)
                time.sleep(0.5)  # a persistent failure (disk gone) must not spin a core
            finally:
                if seal_now:
                    self._sealed_event.set()
            if closing:
                with self._cond:
                    leftover, self._pending = self._pending, []
                    self._pending_bytes = 0
                for item in leftover:
                    item.finish(SpoolError("spool closed"))
                return
