"""The primary's sending side of the Stream: the sender thread, batching, global barriers,
and the repair of an op sent before it failed locally (`diverged`).

Why a module of its own: how ops leave (whoever waits first sends what is queued, else the
sender thread does; large buffers in pieces; a global barrier when the activity log's epoch
is due) is independent of how acks come back (peerreader.py) and of the ordering and ALONE
logic (stream.py). Stream owns the state used here; this mixin only sends it.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from concurrent.futures import Future

from hvha.replication import ops, tls, wire
from hvha.replication.activity import ActivityLog
from hvha.replication.dirty import DirtyStore
from hvha.replication.lane import Lane
from hvha.replication.streamtypes import Mode, NotPersisted
from hvha.replication.wire import FrameType

#: Large buffers are handed to TLS in pieces of this size, so the secondary decrypts and
#: parses the first piece while this side still encrypts the next (both cores busy).
SEND_PIECE = 256 * 1024


class StreamSender:
    """Mixin for Stream: the sender thread and the sending of queued ops and queries."""

    # state owned by Stream (declared here for the type checker)
    _cv: threading.Condition
    _kick: threading.Condition
    _rx_wake: threading.Condition
    _send_lock: threading.Lock
    _reading: int
    _waiters: int
    _sock: tls.Channel | Lane | None
    _conn: int
    _closed: bool
    _next: int
    _queue: deque[tuple[int, ops.Op | bytes]]
    _pending: dict[int, ops.Op]
    _order_q: deque[int]
    _queries: dict[int, Future[bytes]]
    _progress_at: float
    _activity: ActivityLog
    mode: Mode
    _express_on: bool
    _alone_seqs: set[int]
    _tickets: dict[int, int]
    dirty: DirtyStore
    bytes_sent: int

    def _fail(self, conn: int, reason: str) -> None:
        raise NotImplementedError

    def detach(self, reason: str = "detached by the operator") -> None:
        raise NotImplementedError

    def diverged(self, op: ops.Op, seq: int, why: str) -> None:
        """Op `seq` left for the peer before it was applied here, and applying it here failed
        or fell short (a large write sent early, then ENOSPC or EIO locally): the peer may hold
        data this copy lacks. Record the op dirty, durably, and drop the connection, so the
        incremental resync that follows the reconnect puts the peer's copy back to this one.
        Raises NotPersisted if the record cannot be made durable."""
        with self._cv:
            ticket = self.dirty.record(op)
        try:
            self.dirty.sync(ticket)
        except OSError as exc:
            raise NotPersisted(errno.EIO, f"op {seq} diverged and the dirty map could not be "
                               f"persisted ({exc}): check the state directory's disk") from exc
        self.detach(f"op {seq} was sent but failed locally ({why}): resync")
        with self._cv:  # the caller reports the local error and never waits for seq
            self._alone_seqs.discard(seq)
            self._tickets.pop(seq, None)

    def flush(self) -> None:
        """Send what is queued now, in the calling thread (e.g. a barrier before the caller's
        own fsync, so the secondary's fsync overlaps it)."""
        self._flush()

    def _queue_barrier(self) -> None:
        """Close the activity log's epoch with a global barrier (call holding _cv)."""
        seq = self._next
        self._next += 1
        op = ops.Fsync(None, False)
        self._pending[seq] = op
        self._order_q.append(seq)
        self._queue.append((seq, op))
        self._activity.close_epoch(seq)


    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (self._queue and self._sock is not None):
                    due = self._activity.seconds_to_barrier()
                    lent = self._express_on  # (streamexpress.py: then the C path's)
                    if due is not None and self.mode is not Mode.ALONE and not lent:
                        if self._activity.barrier_due():
                            self._queue_barrier()  # writes paused: make them durable there
                            continue
                        self._kick.wait(timeout=due + 0.001)
                    else:
                        self._kick.wait()
                if self._closed:
                    return
            self._flush()
            with self._cv:  # ops sent here may have nobody waiting to read their acks
                if not self._reading and not self._waiters:
                    self._rx_wake.notify()

    def _flush(self) -> None:
        with self._send_lock:
            with self._cv:
                if not self._queue or self._sock is None:
                    return
                batch = list(self._queue)
                self._queue.clear()
                sock, conn = self._sock, self._conn
                if len(self._pending) + len(self._queries) == len(batch):  # was idle
                    self._progress_at = time.monotonic()
            small: list[bytes] = []
            size = 0
            try:
                for key, item in batch:
                    if isinstance(item, bytes):
                        parts = [wire.header(FrameType.QUERY, key, len(item)), item]
                    else:
                        parts = wire.op_frame_parts(key, item)
                    for p in parts:
                        if len(p) >= 65536:
                            if small:
                                sock.sendall(b"".join(small))
                                small.clear()
                            if isinstance(sock, Lane):  # it sends in pieces itself
                                sock.sendall(p)
                                continue
                            view = memoryview(p)
                            for i in range(0, len(view), SEND_PIECE):
                                sock.sendall(view[i:i + SEND_PIECE])
                        else:
                            small.append(p)
                        size += len(p)
                    if len(small) > 256:
                        sock.sendall(b"".join(small))
                        small.clear()
                if small:
                    sock.sendall(b"".join(small))
            except (OSError, wire.WireError) as exc:
                self._fail(conn, f"send failed: {exc}")
                return
            with self._cv:
                self.bytes_sent += size

