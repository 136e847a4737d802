"""The stream's side of the express path (express.py): lending it the lane, taking it back.

Why a module of its own: the hand-over is where two owners of one sequence of ops meet, and
its rules are few but strict:
- The path is lent only while nothing of the stream's own is queued, in flight or being read,
  the pair is in sync on the native lane, and no thread is inside `ordered()` (its local
  change and its op must stay in one order with the C handlers' ones).
- Every op of the stream's own is numbered after taking the path back: `ordered()` takes it
  back before the caller applies anything locally; queries and failures take it back too.
- Taking back waits until no C thread uses the lane, then reads the ops in flight into
  `_pending` and the activity records into the activity log, so a lost peer records them in
  the dirty map exactly as if Python had sent them; C handlers still waiting then ask
  `wait()`.
A mixin of Stream (stream.py), like peerreader.py and streamsend.py.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from hvha.replication import ops
from hvha.replication.activity import ActivityLog
from hvha.replication.dirty import DirtyStore
from hvha.replication.express import KIND_FSYNC, KIND_WRITE, LARGE
from hvha.replication.lane import Lane
from hvha.replication.peerreader import readable
from hvha.replication.streamtypes import Mode

if TYPE_CHECKING:
    from hvha.replication.express import Express, Snapshot

log = logging.getLogger("hvha.replication.stream")
_ZERO = memoryview(bytes(LARGE))  # lengths for imported writes (records need no data)


class StreamExpress:
    """attach_express / express_try_on / express_take of Stream."""

    _order: threading.RLock
    _cv: threading.Condition
    _kick: threading.Condition
    _rx_wake: threading.Condition
    _in_order: int
    _reading: int
    _waiters: int
    _conn: int
    _sock: Any
    _closed: bool
    _next: int
    _queue: deque[Any]
    _pending: dict[int, ops.Op]
    _order_q: deque[int]
    _queries: dict[int, Any]
    _activity: ActivityLog
    dirty: DirtyStore
    mode: Mode
    in_sync: bool
    acked: int
    bytes_sent: int
    timeout: float
    _express: Express | None = None
    _express_on = False
    _express_sock: Lane | None = None

    def _ack(self, upto: int) -> None:
        raise NotImplementedError

    def _fail(self, conn: int, reason: str) -> None:
        raise NotImplementedError

    def attach_express(self, x: Express | None) -> None:
        """Use (or, None, stop using) a mount's express path."""
        self.express_take()
        with self._cv:
            self._express = x

    def express_try_on(self) -> bool:
        """Lend the path if the stream is idle and in sync (cheap when it is not)."""
        x = self._express
        if x is None or self._express_on or not self._order.acquire(blocking=False):
            return False
        try:
            with self._cv:
                sock = self._sock
                if (self._express_on or self._in_order or self.mode is not Mode.CONNECTED
                        or not self.in_sync or self._pending or self._queue or self._queries
                        or self._reading or self._waiters or self._closed
                        or not isinstance(sock, Lane) or not x.allowed()):
                    return False
                p = sock.hold()
                if p is None:
                    return False
                act = self._activity
                if not x.lend(p, self._next, self.acked, timeout=self.timeout,
                              max_age=act.max_age, max_bytes=act.max_bytes,
                              zone=self.dirty.zone_size, epoch_age=act.open_age()):
                    sock.release()
                    return False
                self._express_on, self._express_sock = True, sock
                self._reading = self._conn  # the C handlers read this connection now
                return True
        finally:
            self._order.release()

    def express_take(self, failing: str = "") -> None:
        """Take the path back (no-op if not lent). failing: the stream is failing for this
        reason: the lane is shut first (a send blocked on a silent peer returns), and the
        stream then fails with it."""
        if not self._express_on:
            return
        with self._cv:
            if not self._express_on or self._express is None:
                return
            sock = self._express_sock
            if failing and sock is not None:
                sock.shutdown()
            snap = self._express.take()
            self._express_on, self._express_sock = False, None
            if snap is not None:
                self._express_import(snap)
            self._reading = 0
            self._cv.notify_all()
            self._rx_wake.notify_all()
            self._kick.notify()  # barriers are the sender thread's again
            conn = self._conn
        if sock is not None:
            sock.release()
        reason = failing or (snap.reason if snap is not None else "")
        if reason:
            self._fail(conn, reason)

    def _express_watch(self, sock: Any) -> None:
        """The receiver thread's watch while the path is lent: the C handlers read only while
        they wait for an ack, so a frame arriving while none is in flight (a NACK of a write
        acknowledged on receipt, the peer closing) is nobody's: take the path back, and the
        stream reads it as before (peerreader.py)."""
        x = self._express
        if x is None or not x.idle():
            with self._cv:  # ops in flight: their handlers read; look again shortly
                self._rx_wake.wait(0.05)
            return
        if readable(sock, 1.0) and x.idle():
            self.express_take()

    def _express_import(self, s: Snapshot) -> None:
        """Put the C books into the stream's own (hold _cv)."""
        act = self._activity
        if s.last_barrier:  # everything before it, the stream's own ops too, is durable
            act.close_epoch(s.last_barrier)
        zone = self.dirty.zone_size
        for barrier, zones in s.epochs:
            for name, z in zones:
                act.note(ops.Write(name, z * zone, _ZERO[:1]))  # type: ignore[arg-type]
            if barrier:
                act.close_epoch(barrier)
        for seq, kind, datasync, off, length, name in s.fly:
            op: ops.Op
            if kind == KIND_WRITE:
                op = ops.Write(name, off, _ZERO[:length])  # type: ignore[arg-type]
            else:
                op = ops.Fsync(name if kind == KIND_FSYNC else None, datasync)
            self._pending[seq] = op
            self._order_q.append(seq)
        self._next = s.next
        self.bytes_sent += s.bytes_sent
        self._ack(s.acked)
        if s.fly or s.reason:
            log.debug("express path taken back: %d in flight, next %d, acked %d%s",
                      len(s.fly), s.next, s.acked, f" ({s.reason})" if s.reason else "")
