"""Leader/follower reading of the peer's frames, for the primary's Stream.

Why: a synchronous write costs round trips to the secondary, and handing each ack from a
receiver thread to the thread that waits for it cost a thread switch per round trip (44-46 us
measured, docs/benchmarks.md). So the thread waiting for its op reads the peer's frames itself
when no other thread is reading (the leader); other waiters sleep until an ack or the leader
leaving wakes them (followers). A receiver thread per connection reads only what nobody waits
for: acks of ops sent by the sender thread, query replies, the peer closing an idle connection.
At most one thread reads at a time (`_reading` holds its connection number), and a connection's
socket is closed only once nobody reads it.

Stream (stream.py) owns the state used here and handles each frame (`_handle`) or loss
(`_fail`); this mixin only decides who reads, and when.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from hvha.replication import tls, wire
from hvha.replication.lane import Lane


class PeerReader:
    """Mixin for Stream: who reads the peer's frames, and when."""

    # state owned by Stream (declared here for the type checker)
    _cv: threading.Condition
    _rx_wake: threading.Condition
    _reading: int  # connection number of the thread reading now, 0: nobody
    _waiters: int  # threads sleeping in _await
    _sock: tls.Channel | Lane | None
    _reader: wire.FrameReader | Lane | None
    _conn: int
    _pending: dict[int, Any]
    _queries: dict[int, Future[bytes]]
    _progress_at: float
    timeout: float
    peer_alive: Callable[[], bool] | None
    _express_on: bool
    _express_watch: Callable[[tls.Channel | Lane], None]  # (streamexpress.py)

    def _handle(self, frame: wire.Frame, conn: int) -> None:
        raise NotImplementedError

    def _fail(self, conn: int, reason: str) -> None:
        raise NotImplementedError

    def _await(self, done: Callable[[], bool]) -> None:
        """Return once done() holds (evaluated under _cv). Meanwhile, if no other thread is
        reading the peer's frames, read them in this thread (leader); else sleep until woken
        by an ack or by the reader leaving (follower)."""
        while True:
            with self._cv:
                if done():
                    return
                sock, reader, conn = self._sock, self._reader, self._conn
                if self._reading or sock is None or reader is None:
                    self._waiters += 1
                    try:  # woken by an ack or the reader leaving; the timeout only bounds
                        self._cv.wait(1.0)  # the cost of a wake-up this code failed to send
                    finally:
                        self._waiters -= 1
                    continue
                self._reading = conn
            self._lead(sock, reader, conn)

    def _lead(self, sock: tls.Channel | Lane, reader: wire.FrameReader | Lane,
              conn: int) -> None:
        """Read and handle one frame (or one read timeout) as the only reader, then step
        down: wake a waiting thread to read next, or the receiver thread if work is left
        that nobody waits for."""
        try:
            self._read_one(reader, conn)
        except (OSError, wire.WireError) as exc:
            self._fail(conn, describe(exc))
        finally:
            with self._cv:
                self._reading = 0
                if self._waiters:
                    self._cv.notify_all()
                elif conn != self._conn:
                    self._rx_wake.notify_all()  # a receiver waiting to close its socket
                elif self._pending or self._queries:
                    self._rx_wake.notify()
                # else: nothing outstanding; the receiver goes back to watching the socket
                # within a second (waking it now would cost a thread switch per op)

    def _read_one(self, reader: wire.FrameReader | Lane, conn: int) -> None:
        """Read one frame and handle it; a read timeout (sock.timeout, at most 1 s) returns
        without a frame unless the peer is overdue or the heartbeats declare it dead."""
        try:
            frame = reader.read()
        except TimeoutError:
            with self._cv:
                if conn != self._conn:
                    return
                busy = self._pending or self._queries
                if busy and time.monotonic() - self._progress_at > self.timeout:
                    raise TimeoutError(f"no answer for {self.timeout:g} s") from None
            if self.peer_alive is not None and not self.peer_alive():
                raise TimeoutError("silent, and the heartbeats say the peer is dead or no "
                                   "longer hears this node") from None
            return
        self._handle(frame, conn)

    def _recv_loop(self, sock: tls.Channel | Lane, reader: wire.FrameReader | Lane,
                   conn: int) -> None:
        """The receiver thread of one connection: reads when no waiting thread does (acks
        of ops nobody waits for, query replies, the peer closing an idle connection)."""
        try:
            while True:
                with self._cv:
                    if conn != self._conn:
                        return
                    lent = self._express_on and self._reading == conn
                    if (self._reading or self._waiters) and not lent:  # a waiting thread reads
                        self._rx_wake.wait(1.0)
                        continue
                    busy = bool(self._pending or self._queries)
                if lent:  # the express path reads while it has ops in flight (streamexpress)
                    self._express_watch(sock)
                    continue
                if not busy and not readable(sock, 1.0):
                    continue  # idle: watch the socket without taking the reader's place
                with self._cv:
                    if conn != self._conn or self._reading or self._waiters:
                        continue
                    self._reading = conn
                self._lead(sock, reader, conn)
        except (OSError, wire.WireError) as exc:
            self._fail(conn, describe(exc))
        finally:
            with self._cv:  # never close the socket under a thread still reading it
                while self._reading == conn:
                    self._rx_wake.wait(1.0)
            sock.close()


def readable(sock: tls.Channel | Lane, timeout: float) -> bool:
    """Whether a read would find data (or the end of the stream) within `timeout` seconds."""
    if sock.pending():
        return True
    try:
        ready, _, _ = select.select([sock.raw], [], [], timeout)
    except (OSError, ValueError):  # closed under us: let the read report it
        return True
    return bool(ready)


def describe(exc: BaseException) -> str:
    """An exception as the reason a connection was lost."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
