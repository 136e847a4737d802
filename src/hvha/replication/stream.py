"""The primary's ordered stream of ops to the secondary (pipelined, over mutual TLS).

Why: a write may return to the application only once the secondary has it (or, when the peer
is away, once the dirty map that will resend it is on disk). The FUSE layer calls, from many
threads::

    with stream.ordered():          # one lock: local order == stream order
        apply locally
        seq = stream.enqueue(op)    # fast, never blocks on the network
    stream.wait(seq)                # outside the lock

Many ops are in flight at once: whoever waits first sends what is queued, else the sender
thread does (streamsend.py). The secondary's cumulative ACKs (ACK n: every op <= n applied,
or for a large Write on the native lane received and next to be applied; Fsyncs among them
durable, and every op before them applied) are read by a waiting thread itself when no other
thread is reading, else by a receiver thread (peerreader.py). On peer loss (connection
error, no ack for `timeout` seconds with ops in flight, NACK, or `detach()`), every op not yet
acknowledged, and every later op, is recorded in the DirtyStore, and wait() returns only
after that record is durable; if it cannot be persisted, wait() raises NotPersisted (an
OSError, EIO). Mode is then ALONE.
After `connect()` the mode is RESYNCING until `try_mark_in_sync()` succeeds (blocks.py runs
the resync through this same stream).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from hvha.replication import ops, tls, wire
from hvha.replication.activity import ActivityLog
from hvha.replication.dirty import DirtyStore
from hvha.replication.lane import Lane, creds_of
from hvha.replication.peerreader import PeerReader
from hvha.replication.streamexpress import StreamExpress
from hvha.replication.streamsend import StreamSender
from hvha.replication.streamtypes import (
    Mode,
    NotPersisted,
    PeerRefused,
    ResyncProgress,
    StreamDown,
    StreamStatus,
    unwrap,
)
from hvha.replication.wire import FrameType, Hello

__all__ = ["Mode", "NotPersisted", "PeerRefused", "ResyncProgress", "Stream", "StreamDown",
           "StreamStatus", "unwrap"]

log = logging.getLogger("hvha.replication.stream")
SPLIT = 4 * 1024 * 1024  # Writes larger than this are sent as several ops


class Stream(PeerReader, StreamSender, StreamExpress):
    """One module's replication stream to its peer; starts ALONE until connect()."""

    def __init__(self, *, node: str, peer: str, module: str, address: tuple[str, int],
                 ctx: ssl.SSLContext, dirty: DirtyStore,
                 generations: Callable[[], dict[str, Any]] = dict, timeout: float = 10.0,
                 on_mode: Callable[[Mode, str], None] | None = None,
                 fence_alone: bool = False, barrier_interval: float = 1.0,
                 peer_alive: Callable[[], bool] | None = None) -> None:
        self.node, self.peer, self.module = node, peer, module
        self.address, self.ctx, self.dirty = address, ctx, dirty
        self.generations, self.timeout, self.on_mode = generations, timeout, on_mode
        # the heartbeats' verdict: a silent connection to a peer they declare dead, or that no
        # longer hears this node (one-way partition), is given up within a second, not `timeout`
        self.peer_alive = peer_alive
        self._order = threading.RLock()
        self._in_order = 0  # threads inside ordered() (streamexpress.py)
        lock = threading.RLock()
        self._cv = threading.Condition(lock)  # state changes: acks, mode, queries
        # the sender thread waits on its own condition: an ack (one per op) must wake only
        # the thread waiting for it, not the sender too (a thread switch per op less)
        self._kick = threading.Condition(lock)
        # leader/follower reading of the peer's frames (_await, _recv_loop): at most one
        # thread reads at a time (_reading = its connection number, 0 = nobody); _rx_wake
        # wakes the receiver thread when work is left that no waiting thread will read
        self._rx_wake = threading.Condition(lock)
        self._reading = 0
        self._waiters = 0
        self._reader: wire.FrameReader | Lane | None = None
        self._send_lock = threading.Lock()
        self.mode = Mode.ALONE
        self.in_sync = False
        self.last_error = "not connected yet"
        self.bytes_sent = 0
        self.acked = 0
        self.resync_progress: ResyncProgress | None = None
        self._next = 1
        self._queue: deque[tuple[int, ops.Op | bytes]] = deque()  # (seq, op) or (qid, query)
        self._pending: dict[int, ops.Op] = {}  # enqueued, not acknowledged
        self._order_q: deque[int] = deque()  # keys of _pending in order
        self._tickets: dict[int, int] = {}  # seq -> dirty ticket to sync before returning
        self._queries: dict[int, Future[bytes]] = {}
        self._next_qid = 1
        self._sock: tls.Channel | Lane | None = None
        self._conn = 0
        self._progress_at = time.monotonic()
        self._closed = False
        # Ops recorded dirty while ALONE are acknowledged only once the peer's copy is fenced
        # (the witness knows this node writes alone: hvha.agent.fences); allow_alone() opens it
        self.fence_alone = fence_alone  # False: no witness to tell (tests, benchmarks)
        self._alone_ok = not fence_alone
        self._alone_seqs: set[int] = set()
        # what the peer applied but may not have on disk yet (hvha.replication.activity)
        self._activity = ActivityLog(dirty.zone_size, max_age=barrier_interval)
        self._sender = threading.Thread(target=self._send_loop, name="hvha-stream-send",
                                        daemon=True)
        self._sender.start()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- API for the FUSE layer
    @contextlib.contextmanager
    def ordered(self) -> Iterator[None]:
        with self._order:
            self._in_order += 1
            try:
                if self._express_on:  # numbered after the C handlers' ops, applied after too
                    self.express_take()
                yield
            finally:
                self._in_order -= 1

    def enqueue(self, op: ops.Op, *, kick: bool = True) -> int:
        """Queue op (call inside ordered()); return its sequence number. Large Writes become
        several ops: the number returned is the last one (acks are cumulative). kick=False:
        the caller will wait() or flush() itself, so the sender thread is not woken for it
        (a thread switch per op less on the FUSE path)."""
        if isinstance(op, ops.Write) and len(op.data) > SPLIT:
            seq = 0
            view = memoryview(op.data)
            for i in range(0, len(view), SPLIT):
                seq = self.enqueue(ops.Write(op.path, op.offset + i, bytes(view[i:i + SPLIT])),
                                   kick=kick)
            return seq
        if self._express_on:  # (ordered() took it back already; a safety net)
            self.express_take()
        with self._cv:
            seq = self._next
            self._next += 1
            if self.mode is Mode.ALONE:
                self._tickets[seq] = self.dirty.record(op)
                self._alone_seqs.add(seq)
                return seq
            ticket = self.dirty.observe(op)
            if ticket:
                self._tickets[seq] = ticket
            self._pending[seq] = op
            self._order_q.append(seq)
            self._queue.append((seq, op))
            self._activity.note(op)
            if self._activity.barrier_due():
                self._queue_barrier()
            if kick and len(self._queue) == 1:
                self._kick.notify()
            return seq

    def enqueue_flushed_by_caller(self, op: ops.Op) -> int:
        """enqueue(op, kick=False): for the FUSE layer, which always waits for its ops."""
        return self.enqueue(op, kick=False)

    def wait(self, seq: int) -> None:
        """Return once op `seq` is acknowledged by the peer or durably recorded as dirty."""
        self._flush()
        self._await(lambda: not (seq in self._pending or (
            seq in self._alone_seqs and not self._alone_ok and not self._closed)))
        with self._cv:
            ticket = self._tickets.pop(seq, 0)
            if seq in self._alone_seqs:
                self._alone_seqs.discard(seq)
                if not self._alone_ok:
                    raise NotPersisted(errno.EIO, f"op {seq} not replicated and the peer's "
                                       "copy could not be fenced before the stream closed")
        try:
            self.dirty.sync(ticket)
        except OSError as exc:
            raise NotPersisted(errno.EIO, f"op {seq} not replicated and the dirty map could not"
                               f" be persisted ({exc}): check the state directory's disk") from exc

    def settled(self, seq: int) -> bool:
        """Wait until op `seq` is acknowledged (True) or the peer is lost (False). For the
        resync: its ops are in the dirty map once the peer is lost, so unlike wait() there is
        no fence to wait for (a resync must never hang on an unreachable witness)."""
        self._flush()
        self._await(lambda: seq not in self._pending or self._closed)
        with self._cv:
            lost = seq in self._alone_seqs or seq in self._pending  # (pending: closed)
            if seq in self._alone_seqs:
                self._alone_seqs.discard(seq)
                self._tickets.pop(seq, None)
            return not lost

    # ---------------------------------------------------------------- connection management
    def connect(self, timeout: float | None = None) -> Hello:
        """Connect, authenticate and exchange hellos; return the peer's hello. The stream is then
        RESYNCING: run the resync the generations call for, then try_mark_in_sync()."""
        t = self.timeout if timeout is None else timeout
        creds = creds_of(self.ctx)
        sock: tls.Channel | Lane
        if creds is not None:  # the native lane (lane.py), else Python's TLS
            sock = Lane.connect(self.address, creds, self.peer, t)
            try:
                tls.check_peer(sock, self.peer)
            except BaseException:
                sock.close()
                raise
        else:
            sock = tls.connect(self.address, self.ctx, self.peer, t)
        try:
            hello = Hello(self.node, self.module, self.generations())
            sock.sendall(wire.encode_frame(FrameType.HELLO, 0, hello.encode()))
            reader = sock if isinstance(sock, Lane) else wire.FrameReader(sock)
            frame = reader.read()
            if frame.type != FrameType.HELLO:
                raise wire.WireError(f"expected HELLO, got {frame.type.name}")
            answer = wire.decode_hello(frame.payload)
            if answer.node != self.peer or answer.module != self.module:
                raise PeerRefused(f"peer says it is {answer.node}/{answer.module}")
            if not answer.accept:
                raise PeerRefused(f"peer refused the session: {answer.reason}")
        except wire.WireError as exc:
            sock.close()
            raise PeerRefused(f"peer {self.peer} ended the session before its hello ({exc}): "
                              "does it accept this node's certificate and name?") from exc
        except BaseException:
            sock.close()
            raise
        sock.timeout = min(1.0, self.timeout)
        with self._cv:
            if self._sock is not None:
                sock.close()
                raise StreamDown("already connected: detach() first")
            self._sock, self._conn, self._reader = sock, self._conn + 1, reader
            self.mode, self.in_sync, self.last_error = Mode.RESYNCING, False, ""
            self._alone_ok = True  # the peer is back: what was recorded reaches it by resync
            self._cv.notify_all()
            self._kick.notify()
            self._progress_at = time.monotonic()
            conn = self._conn
        log.info("replication %s: connected to %s (%s)", self.module, self.peer,
                 "native lane" if isinstance(sock, Lane) else "Python TLS")
        rx = threading.Thread(target=self._recv_loop, args=(sock, reader, conn), daemon=True,
                              name="hvha-stream-recv")
        self._threads = [t for t in self._threads if t.is_alive()] + [rx]
        rx.start()
        self._notify(Mode.RESYNCING, "connected")
        return answer

    def try_mark_in_sync(self) -> bool:
        """Switch the peer to strict mode; if nothing is dirty any more, the pair is in sync
        (CONNECTED) and True is returned; else the peer goes back to tolerant mode."""
        self.query({"q": "strict", "on": True})
        if self.dirty.is_clean():
            with self._cv:
                if self.mode is Mode.RESYNCING:
                    self.mode, self.in_sync = Mode.CONNECTED, True
            self._notify(Mode.CONNECTED, "in sync")
            return self.in_sync
        self.query({"q": "strict", "on": False})
        return False

    def detach(self, reason: str = "detached by the operator") -> None:
        with self._cv:
            conn = self._conn
        self._fail(conn, reason)

    def allow_alone(self, allowed: bool = True) -> None:
        """Let writes recorded while ALONE be acknowledged (after the fence is in place)."""
        with self._cv:
            self._alone_ok = allowed
            self._cv.notify_all()

    def close(self) -> None:
        self.detach("stream closed")
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            self._kick.notify()
        self._sender.join(timeout=10)
        for t in self._threads:
            t.join(timeout=10)

    def status(self) -> StreamStatus:
        with self._cv:
            prog = self.resync_progress
            return StreamStatus(self.mode, self.in_sync, self.bytes_sent, len(self._pending),
                                self.acked, self.last_error,
                                prog.snapshot() if prog is not None else None)

    # ---------------------------------------------------------------- queries (for the resync)
    def query_async(self, request: dict[str, Any]) -> Future[bytes]:
        fut: Future[bytes] = Future()
        self.express_take()
        with self._cv:
            if self.mode is Mode.ALONE:
                raise StreamDown(f"peer not connected: {self.last_error}")
            qid = self._next_qid
            self._next_qid += 1
            self._queries[qid] = fut
            self._queue.append((qid, wire.encode_json(request)))
            self._kick.notify()
            self._rx_wake.notify()  # nobody leads for a query: the receiver thread reads
        return fut

    def query(self, request: dict[str, Any]) -> bytes:
        """Send a query in order with the ops, return the answer's body (raises StreamDown,
        or OSError with the peer's message when the peer could not answer)."""
        fut = self.query_async(request)
        self._flush()
        return unwrap(fut.result(timeout=self.timeout * 6))

    # ---------------------------------------------------------------- internals
    def _notify(self, mode: Mode, why: str) -> None:
        if self.on_mode is not None:
            try:
                self.on_mode(mode, why)
            except Exception:  # a listener must never break the stream
                log.exception("replication: mode listener failed")

    def _fail(self, conn: int, reason: str) -> None:
        if self._express_on:
            with self._cv:
                current = conn == self._conn
            if current:  # take the path back (it then fails the stream with `reason`;
                self.express_take(failing=reason)  # below finds it done) or find it taken
        with self._cv:
            if conn != self._conn or self.mode is Mode.ALONE:
                return
            log.warning("replication %s: peer %s lost (%s): ALONE, recording dirty zones",
                        self.module, self.peer, reason)
            self.mode, self.in_sync, self.last_error = Mode.ALONE, False, reason
            self._alone_ok = not self.fence_alone
            # applied by the peer but maybe not on its disk: resend by the resync
            unsynced = self.dirty.record_records(self._activity.take())
            self._alone_seqs.update(self._order_q)
            for seq in self._order_q:
                self._tickets[seq] = max(self.dirty.record(self._pending[seq]),
                                         self._tickets.get(seq, 0))
            self._pending.clear()
            self._order_q.clear()
            self._queue.clear()
            for fut in self._queries.values():
                fut.set_exception(StreamDown(f"peer lost: {reason}"))
            self._queries.clear()
            sock, self._sock, self._reader = self._sock, None, None
            self._conn += 1
            self._cv.notify_all()
            self._rx_wake.notify_all()
        if sock is not None:
            sock.shutdown()
        try:  # writes the peer acknowledged before it was lost are known dirty from now on
            self.dirty.sync(unsynced)
        except OSError as exc:  # the next write's wait() fails with NotPersisted
            log.error("replication %s: dirty map not persisted after losing the peer: %s",
                      self.module, exc)
        self._notify(Mode.ALONE, reason)

    def _ack(self, upto: int) -> None:
        while self._order_q and self._order_q[0] <= upto:
            del self._pending[self._order_q.popleft()]
        self._activity.acked(upto)
        self.acked = max(self.acked, upto)
        self._progress_at = time.monotonic()
        self._cv.notify_all()

    def _handle(self, frame: wire.Frame, conn: int) -> None:
        with self._cv:
            if conn != self._conn:
                raise wire.ConnectionClosed("stale connection")
            if frame.type == FrameType.ACK:
                self._ack(frame.seq)
            elif frame.type == FrameType.REPLY:
                fut = self._queries.pop(frame.seq, None)
                self._progress_at = time.monotonic()
                if fut is not None:
                    fut.set_result(bytes(frame.payload))
            elif frame.type == FrameType.SKIPPED:
                op = self._pending.get(frame.seq)
                if op is not None:
                    self._tickets[frame.seq] = self.dirty.record(op)
            elif frame.type == FrameType.NACK:
                err, msg = wire.decode_nack(frame.payload)
                self._ack(frame.seq - 1)
                raise OSError(err, f"secondary failed op {frame.seq}: {msg}")
            elif frame.type == FrameType.ERROR:
                raise wire.WireError(f"secondary: {frame.payload.decode(errors='replace')}")
            else:
                raise wire.WireError(f"unexpected {frame.type.name} frame from the secondary")
