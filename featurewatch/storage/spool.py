"""Append-only spool segments with group commit.

A segment is a file of framed records: MAGIC | length u32 | crc32 u32 | payload. The
open segment is `seg-N.open`; sealing fsyncs it and renames it to `seg-N.seg`
atomically, so readers only ever list complete segments. `append()` returns only after
the record is fsynced: one writer thread collects every append waiting at that moment,
writes them all and fsyncs once (group commit), so durability costs one fsync per
group, not per batch.

After a crash the open segment may end in a partial record: recovery keeps every
complete record (all acked ones are complete, since ack follows fsync), truncates the
rest and seals the segment.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from featurewatch.errors import SpoolError

log = logging.getLogger(__name__)
MAGIC = b"FWS1"
_HEADER = struct.Struct("<4sII")
_NAME = re.compile(r"^seg-(\d{12})\.(open|seg)$")


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


def _scan(path: Path) -> tuple[list[bytes], int]:
    """Complete records of a segment file and the byte offset where they end."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if magic != MAGIC or end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        records.append(data[start:end])
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


class _Pending:
    """A queued append; wait() returns once it is durable, or raises SpoolError."""

    __slots__ = ("payload", "done", "error")

    def __init__(self, payload: bytes):
        self.payload = payload
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self, timeout: float = 60.0) -> None:
        if not self.done.wait(timeout):
            raise SpoolError("spool write timed out")
        if self.error is not None:
            raise SpoolError(f"spool write failed: {self.error}") from self.error


class Spool:
    """A directory of segments; `append()` is durable when it returns."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_max_bytes: int = 64 * 1024 * 1024,
        segment_max_age_s: float = 30.0,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age_s = segment_max_age_s
        self.recovered_records = self._recover()
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._seal_requested = False
        self._sealed_event = threading.Event()
        self._closed = False
        self._file = None
        self._file_path: Path | None = None
        self._file_size = 0
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

    def append_async(self, payload: bytes) -> _Pending:
        """Queue one record; `.wait()` on the result returns once it is fsynced.

        Lets one stream keep several records in the same group commit instead of
        waiting for each fsync in turn.
        """
        item = _Pending(payload)
        with self._cond:
            if self._closed:
                raise SpoolError("spool is closed")
            self._pending.append(item)
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

    def _open_segment(self) -> None:
        self._file_path = self.directory / f"seg-{self._next_number:012d}.open"
        self._next_number += 1
        self._file = open(self._file_path, "ab")  # noqa: SIM115 (lives across calls)
        _fsync_dir(self.directory)  # the new name itself must survive a crash
        self._file_size = 0
        self._opened_at = time.monotonic()

    def _seal_segment(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        assert self._file_path is not None
        os.replace(self._file_path, self._file_path.with_suffix(".seg"))
        _fsync_dir(self.directory)
        self._file = None
        self._file_path = None

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
                batch, self._pending = self._pending, []
                seal_now = self._seal_requested
                self._seal_requested = False
                closing = self._closed
            try:
                if batch:
                    if self._file is None:
                        self._open_segment()
                    assert self._file is not None
                    for item in batch:
                        header = _HEADER.pack(MAGIC, len(item.payload), zlib.crc32(item.payload))
                        self._file.write(header)
                        self._file.write(item.payload)
                        self._file_size += len(header) + len(item.payload)
                    self._file.flush()
                    os.fsync(self._file.fileno())
                    self.fsyncs += 1
                    self.appended_records += len(batch)
                aged = (
                    self._file is not None
                    and time.monotonic() - self._opened_at >= self.segment_max_age_s
                )
                if self._file is not None and (
                    seal_now or closing or aged or self._file_size >= self.segment_max_bytes
                ):
                    self._seal_segment()
            except BaseException as err:  # report to every waiter, keep the thread alive
                for item in batch:
                    item.error = err
                self.write_errors += 1
                log.error("spool %s: write or seal failed: %s", self.directory, err)
                time.sleep(0.5)  # a persistent failure (disk gone) must not spin a core
            finally:
                for item in batch:
                    item.done.set()
                if seal_now:
                    self._sealed_event.set()
            if closing:
                with self._cond:
                    leftover, self._pending = self._pending, []
                for item in leftover:
                    item.error = SpoolError("spool closed")
                    item.done.set()
                return
