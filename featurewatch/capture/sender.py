"""The replica side of transport: a bounded buffer drained to a collector by a thread.

`submit()` never blocks the caller (the model's generate loop). When the buffer is full
the oldest unsent batch is dropped and counted. A background thread keeps a
bidirectional gRPC stream open, numbers each batch (replica, epoch, seq), and forgets a
batch only when the collector acks it as durable; after a broken stream it reconnects
with backoff and resends every unacked batch (the collector drops duplicates).

With several collectors, each replica starts on the one its id hashes to (spreading
replicas across collectors) and moves to the next when its stream breaks. Given a
`resolve` callable, a broken stream also asks it for the collectors' current addresses
first: a collector restarted elsewhere (a new node, a new port) is found again.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
import zlib
from dataclasses import dataclass

import grpc

from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto import activations_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Codes that mean "this batch will never be accepted": drop it rather than resend forever.
_REJECTING = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
REJECTED_SEQ_KEY = "fw-rejected-seq"
IDLE_CLOSE_KEY = "fw-idle-close"  # trailer: the collector closed a stream that sent nothing


@dataclass
class SenderStats:
    submitted_batches: int = 0
    acked_batches: int = 0
    acked_vectors: int = 0
    acked_bytes: int = 0
    dropped_batches: int = 0
    dropped_vectors: int = 0
    rejected_batches: int = 0
    reconnects: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    last_error: str = ""


class ActivationSender:
    """Streams ActivationBatch messages to one collector; see the module docstring."""

    def __init__(
        self,
        addresses: str | list[str],
        token: str,
        replica_id: str,
        *,
        max_queue_batches: int = 1024,
        max_in_flight: int = 64,
        stream_epoch: int | None = None,
        root_certificates: bytes | None = None,
        resolve=None,
    ):
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("the sender needs at least one collector address")
        self._address_index = zlib.crc32(replica_id.encode()) % len(self.addresses)
        self._resolve = resolve
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates) if root_certificates else None
        )
        self.replica_id = replica_id
        self.stream_epoch = stream_epoch if stream_epoch is not None else secrets.randbits(63)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._max_queue = max_queue_batches
        self._max_in_flight = max_in_flight
        self._cond = threading.Condition()
        self._unsent: collections.deque[pb.ActivationBatch] = collections.deque()
        self._in_flight: collections.OrderedDict[int, pb.ActivationBatch] = (
            collections.OrderedDict()
        )
        self._next_seq = 1
        self._generation = 0  # bumps on every reconnect so a stale request iterator ends
        self._stopping = False
        self.stats = SenderStats()
        self._thread = threading.Thread(target=self._run, name="fw-sender", daemon=True)
        self._thread.start()

    # ---- producer side (called from the serving code; never blocks on the network)

    def submit(self, batch: pb.ActivationBatch) -> None:
        with self._cond:
            batch.replica_id = self.replica_id
            batch.stream_epoch = self.stream_epoch
            batch.seq = self._next_seq
            self._next_seq += 1
            if len(self._unsent) >= self._max_queue:
                dropped = self._unsent.popleft()
                self.stats.dropped_batches += 1
                self.stats.dropped_vectors += dropped.rows
            self._unsent.append(batch)
            self.stats.submitted_batches += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted batch is acked (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._unsent or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    @property
    def address(self) -> str:
        """The collector this sender streams to now."""
        addresses = self.addresses  # one read: a refresh may swap the list meanwhile
        return addresses[self._address_index % len(addresses)]

    def _channel(self) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.address, self._credentials)
        return grpc.insecure_channel(self.address)

    def snapshot(self) -> SenderStats:
        with self._cond:
            self.stats.queue_depth = len(self._unsent)
            self.stats.in_flight = len(self._in_flight)
            return SenderStats(**vars(self.stats))

    def close(self, flush_timeout: float = 10.0) -> None:
        self.flush(flush_timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ---- the background thread

    def _requests(self, generation: int):
        """Request iterator for one stream; ends when that stream is superseded."""
        while True:
            with self._cond:
                while (
                    not self._stopping
                    and generation == self._generation
                    and (not self._unsent or len(self._in_flight) >= self._max_in_flight)
                ):
                    self._cond.wait(0.5)
                if self._stopping or generation != self._generation:
                    return
                batch = self._unsent.popleft()
                self._in_flight[batch.seq] = batch
            yield batch

    def _on_ack(self, ack: pb.Ack) -> None:
        """An ack covers its seq and every earlier one of this stream (the collector
        sends one per group commit); in-flight batches are in seq order."""
        with self._cond:
            while self._in_flight:
                seq = next(iter(self._in_flight))
                if seq > ack.seq:
                    break
                batch = self._in_flight.pop(seq)
                self.stats.acked_batches += 1
                self.stats.acked_vectors += batch.rows
                self.stats.acked_bytes += len(batch.data)
            self._cond.notify_all()

    def _requeue_in_flight(self, rejected_seq: int | None) -> None:
        with self._cond:
            self._generation += 1
            if rejected_seq is not None and self._in_flight.pop(rejected_seq, None) is not None:
                self.stats.rejected_batches += 1
            # Resend in the original order, ahead of everything newer.
            self._unsent.extendleft(reversed(list(self._in_flight.values())))
            self._in_flight.clear()
            self._cond.notify_all()

    def _refresh_addresses(self) -> None:
        """Take the collectors' current addresses from `resolve`, if it answers."""
        if self._resolve is None:
            return
        try:
            fresh = list(self._resolve())
        except Exception as err:  # noqa: BLE001 - a failed lookup keeps the known list
            log.info("collector lookup failed (%s); keeping %s", err, self.addresses)
            return
        if fresh and fresh != self.addresses:
            log.warning("collectors now at %s (were %s)", fresh, self.addresses)
            # Stay on the same collector if it is still listed (the caller then moves on),
            # else start where this replica's id hashes to, so replicas stay spread.
            current = self.address
            if current in fresh:
                index = fresh.index(current)
            else:
                index = zlib.crc32(self.replica_id.encode()) % len(fresh) - 1
            self._address_index = index % len(fresh)
            self.addresses = fresh

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._stopping and not self._unsent and not self._in_flight:
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                generation = self._generation
            rejected_seq, idle = None, False
            try:
                with self._channel() as channel:
                    stub = pb_grpc.CollectorStub(channel)
                    responses = stub.Stream(self._requests(generation), metadata=self._metadata)
                    for ack in responses:
                        self._on_ack(ack)
                        backoff = 0.05
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                details = err.details() if hasattr(err, "details") else str(err)
                trailers = dict(err.trailing_metadata() or ()) if hasattr(
                    err, "trailing_metadata") else {}  # fmt: skip
                # An idle stream closed by the collector is no error: a new one opens,
                # on the same collector, when a batch comes.
                idle = trailers.get(IDLE_CLOSE_KEY) == "1"
                if not idle:
                    self.stats.last_error = f"{code}: {details}"
                if idle:
                    log.debug("collector closed an idle stream")
                elif code in _REJECTING and REJECTED_SEQ_KEY in trailers:
                    rejected_seq = int(trailers[REJECTED_SEQ_KEY])
                    log.warning("collector rejected a batch: %s", self.stats.last_error)
                elif code != grpc.StatusCode.CANCELLED:
                    log.info("collector stream broke (%s); reconnecting", self.stats.last_error)
            self._requeue_in_flight(rejected_seq)
            with self._cond:
                if self._stopping:
                    return
            if rejected_seq is None and not idle:
                self.stats.reconnects += 1
                self._refresh_addresses()
                # fail over: the next collector in the list (wraps around)
                self._address_index = (self._address_index + 1) % len(self.addresses)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
