"""The secondary's side: a mutual-TLS server that replays the primary's ops in order.

Why: the secondary's copy must only ever change through the ordered stream (apps on the
secondary are kept out by `read_only_guard`), each op must be applied before it is
acknowledged, and an Fsync is acknowledged only once the data is on this disk. A peer that
passed authentication still cannot write outside the replicated directory: every path goes
through ops.check_path and is resolved below a directory descriptor opened at start
(treewriter.py).

A session is served by the native lane (lane.py, native/lane.c: TLS, frames, Writes, Fsyncs
and acks in C) when it was built, else in Python (`_serve`); either way this class owns the
hello, namespace ops, queries, errors and the session's end.

Acks are cumulative and coalesced: after an op is applied, an ACK is sent when no further
frame is already buffered (or every 64 ops / 4 MiB / 5 ms), so a burst costs few acks and a
lone op is acknowledged at once. A failed op (ENOSPC, EIO, anything) is NACKed with its errno
and the connection is closed: the primary then goes ALONE and records the op as dirty.
Queries (stat, list, block hashes for the resync) travel in the same ordered stream, so their
answers reflect every op sent before them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hvha.replication import lane, ops, tls, wire
from hvha.replication.lane import Lane, creds_of
from hvha.replication.localfault import FaultLatch
from hvha.replication.treewriter import TreeWriter
from hvha.replication.wire import FrameType, Hello

log = logging.getLogger("hvha.replication.applier")
#: Seconds a session that failed an op waits for the primary to read the NACK and close
NACK_LINGER = 5.0


class Applier:
    """Accepts the expected peer on (host, port) and applies its ops to `root`.

    generations() is called for each hello (the answer carries this node's data generations);
    on_hello(peer_hello) may return a reason string to refuse the session (e.g. split brain)."""

    def __init__(self, root: str | Path, *, node: str, peer: str, module: str,
                 ctx: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0,
                 generations: Callable[[], dict[str, Any]] = dict,
                 on_hello: Callable[[Hello], str | None] | None = None,
                 handshake_timeout: float = 10.0, faults: FaultLatch | None = None) -> None:
        self.tree = TreeWriter(root)
        self.node, self.peer, self.module = node, peer, module
        self.ctx = ctx
        self.generations = generations
        self.on_hello = on_hello
        self.handshake_timeout = handshake_timeout
        self.faults = faults or FaultLatch()  # this disk's failures (localfault)
        self._listen = socket.create_server((host, port), reuse_port=False)
        self._listen.settimeout(0.2)
        self.address: tuple[str, int] = self._listen.getsockname()[:2]
        self._stop = threading.Event()
        self._apply_lock = threading.Lock()
        self._lock = threading.Lock()
        self._active: tls.Channel | Lane | None = None
        self._epoch = 0  # bumped by drop_session: sessions accepted before it never serve
        self._threads: list[threading.Thread] = []
        self.last_error: str = ""
        self.sessions = 0
        self.served_by = ""  # the last session's implementation (lane.py), for logs and tests
        self.skipped = 0

    def start(self) -> tuple[str, int]:
        t = threading.Thread(target=self._accept_loop, name="hvha-applier-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self.address

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            active = self._active
        if active is not None:
            active.shutdown()
        for t in self._threads:
            t.join(timeout=10)
        self._listen.close()
        with self._apply_lock:
            self.tree.close()

    def drop_session(self, timeout: float = 10.0) -> None:
        """End the session being served, if any, and return once it applies nothing more;
        a session accepted before this call (its hello already answered) never starts.

        For a node that becomes primary: its guard is released and its mirror mounted only
        after this, so ops of a former primary that still holds its connection (a node that
        was paused, not dead) can no longer reach the directory the new primary serves. The
        caller refuses later hellos first (on_hello). Raises TimeoutError if the session did
        not end within `timeout` seconds (an op stuck in the disk)."""
        with self._lock:
            self._epoch += 1
            active = self._active
        if active is not None:
            active.shutdown()
        if not self._apply_lock.acquire(timeout=timeout):
            raise TimeoutError(f"the former primary's session did not end within {timeout:g} s")
        self._apply_lock.release()

    def __enter__(self) -> Applier:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._listen.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._session, args=(conn, addr), daemon=True,
                                 name="hvha-applier-session")
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _session(self, conn: socket.socket, addr: Any) -> None:
        with self._lock:
            epoch = self._epoch  # before the hello is judged: see drop_session
        creds = creds_of(self.ctx)
        chan: tls.Channel | Lane
        try:
            if creds is not None:
                chan = Lane.accept(conn, creds, self.handshake_timeout)
                try:
                    tls.check_peer(chan, self.peer)
                except BaseException:
                    chan.close()
                    raise
            else:
                chan = tls.accept(conn, self.ctx, self.peer, self.handshake_timeout)
        except (OSError, ssl.SSLError) as exc:
            log.warning("replication: refused connection from %s: %s", addr, exc)
            self.last_error = f"refused {addr}: {exc}"
            return
        with chan:
            try:
                reader = chan if isinstance(chan, Lane) else wire.FrameReader(chan, zero_copy=True)
                if not self._handshake(chan, reader):
                    return
            except (OSError, wire.WireError) as exc:
                log.warning("replication: refused %s: %s", addr, exc)
                self.last_error = str(exc)
                return
            with self._lock:
                old, self._active = self._active, chan
            if old is not None:
                old.shutdown()
            chan.timeout = None
            with self._apply_lock:
                if self._stop.is_set() or epoch != self._epoch:
                    return
                self.sessions += 1
                self.served_by = ("native lane" if isinstance(chan, Lane) else
                                  f"Python applier: {lane.available()[1] or 'no credentials'}")
                log.info("replication: serving %s's session (%s)", self.peer, self.served_by)
                if isinstance(chan, Lane):
                    self._serve_native(chan)
                elif isinstance(reader, wire.FrameReader):
                    self._serve(chan, reader)
            with self._lock:
                if self._active is chan:
                    self._active = None

    @property
    def connected(self) -> bool:
        """A primary's session is being served right now."""
        with self._lock:
            return self._active is not None

    def _handshake(self, sock: tls.Channel | Lane, reader: wire.FrameReader | Lane) -> bool:
        frame = reader.read()
        if frame.type != FrameType.HELLO:
            raise wire.WireError(f"expected HELLO, got {frame.type.name}")
        hello = wire.decode_hello(frame.payload)
        reason = ""
        if hello.module != self.module:
            reason = f"this port serves module {self.module!r}, not {hello.module!r}"
        elif hello.node != self.peer:
            reason = f"expected node {self.peer!r}, hello says {hello.node!r}"
        elif self.on_hello is not None:
            reason = self.on_hello(hello) or ""
        answer = Hello(self.node, self.module, self.generations(), not reason, reason)
        sock.sendall(wire.encode_frame(FrameType.HELLO, 0, answer.encode()))
        if reason:
            log.warning("replication: refused session: %s", reason)
            self.last_error = reason
        return not reason

    def _apply(self, op: ops.Op | tuple[str, int, memoryview]) -> OSError | None:
        try:
            if isinstance(op, tuple):
                self.tree.write_at(*op)
            else:
                self.tree.apply(op)
        except OSError as exc:
            return exc
        except ValueError as exc:  # an unsafe path: never applied
            return OSError(errno.EINVAL, str(exc))
        return None

    def _note_fault(self, op: ops.Op | tuple[str, int, memoryview], error: OSError) -> None:
        if isinstance(op, tuple):
            self.faults.note("write", op[0], error)
        elif isinstance(op, ops.Fsync):
            self.faults.note("syncfs" if op.path is None else "fsync", op.path, error)
        else:
            self.faults.note(type(op).__name__.lower(), ops.paths_of(op)[0], error)

    def _answer_op(self, sock: tls.Channel | Lane, seq: int,
                   op: ops.Op | tuple[str, int, memoryview], error: OSError | None,
                   strict: bool) -> bool:
        """Report op seq's failure, if any, to the primary; False if the session ends."""
        if error is None:
            return True
        self._note_fault(op, error)
        if strict or error.errno not in _DIVERGENCE:
            self.last_error = f"op {seq} {op!r:.200}: {error}"
            log.error("replication: %s", self.last_error)
            sock.sendall(wire.encode_frame(FrameType.NACK, seq, wire.encode_nack(
                error.errno or errno.EIO, str(error))))
            return False
        self.skipped += 1
        log.info("replication: op %d skipped while resyncing: %s", seq, error)
        nack = wire.encode_nack(error.errno or 0, str(error))
        sock.sendall(wire.encode_frame(FrameType.SKIPPED, seq, nack))
        return True

    def _query(self, payload: bytes | bytearray) -> tuple[bytes, bool | None]:
        """(reply, the new strict mode if the query set it)."""
        if payload.startswith(b'{"on":'):  # {"on":bool,"q":"strict"}
            return b"\0true", wire.decode_json(payload).get("on") is True
        return self.tree.query(bytes(payload)), None

    def _serve_native(self, sock: Lane) -> None:
        """The session through the native lane: it applies Writes and Fsyncs itself and
        hands every other frame here (lane.py)."""
        strict = False
        with self._session_errors(sock):
            while True:
                frame, failed = sock.serve(self.tree.root_fd, self.tree.names_pending)
                if frame.type == FrameType.OP:
                    op = wire.decode_write(frame.payload) or wire.decode_op(frame.payload)
                    error = OSError(failed, os.strerror(failed)) if failed else self._apply(op)
                    # a native apply failed on a file it had open: never a resync's divergence
                    # to skip, and a large Write may already be acknowledged (lane.c): NACK
                    if not self._answer_op(sock, frame.seq, op, error, strict or bool(failed)):
                        self._linger(sock, sock)
                        return
                    sock.applied(frame.seq, len(frame.payload))
                elif frame.type == FrameType.QUERY:
                    reply, mode = self._query(frame.payload)
                    strict = strict if mode is None else mode
                    sock.flush_ack()
                    sock.sendall(wire.encode_frame(FrameType.REPLY, frame.seq, reply))
                else:
                    raise wire.WireError(f"unexpected {frame.type.name} frame")

    def _linger(self, sock: tls.Channel | Lane, reader: wire.FrameReader | Lane) -> None:
        """After a NACK, drop what the primary still sends until it closes the session, for at
        most NACK_LINGER seconds. The primary may be sending later ops when one fails (the
        lane acknowledges large Writes on receipt, lane.c; several FUSE threads write at
        once): closing at once would fail its send (EPIPE) before it reads the NACK, and its
        status would say "Broken pipe" instead of why (a full disk)."""
        sock.timeout = 0.2
        end = time.monotonic() + NACK_LINGER
        while time.monotonic() < end and not self._stop.is_set():
            try:
                reader.read()
            except TimeoutError:
                continue
            except (OSError, wire.WireError):
                return

    def _serve(self, sock: tls.Channel, reader: wire.FrameReader) -> None:
        expected = -1
        strict = False
        acked = applied = 0  # this session's own numbers: a new primary counts from 1 again
        unacked_bytes, since = 0, time.monotonic()
        with self._session_errors(sock):
            while True:
                frame = reader.read()
                if frame.type == FrameType.OP:
                    if expected >= 0 and frame.seq != expected:
                        raise wire.WireError(f"op {frame.seq} out of order, {expected} expected")
                    expected = frame.seq + 1
                    op = wire.decode_write(frame.payload) or wire.decode_op(frame.payload)
                    if not self._answer_op(sock, frame.seq, op, self._apply(op), strict):
                        self._linger(sock, reader)
                        return
                    applied = frame.seq
                    unacked_bytes += len(frame.payload)
                elif frame.type == FrameType.QUERY:
                    reply, mode = self._query(frame.payload)
                    strict = strict if mode is None else mode
                    if applied > acked:
                        sock.sendall(wire.encode_frame(FrameType.ACK, applied))
                        acked, unacked_bytes, since = applied, 0, time.monotonic()
                    sock.sendall(wire.encode_frame(FrameType.REPLY, frame.seq, reply))
                else:
                    raise wire.WireError(f"unexpected {frame.type.name} frame")
                if applied > acked and (not reader.pending() or applied - acked >= 64
                                        or unacked_bytes >= 4 << 20
                                        or time.monotonic() - since > 0.005):
                    sock.sendall(wire.encode_frame(FrameType.ACK, applied))
                    acked, unacked_bytes, since = applied, 0, time.monotonic()

    @contextlib.contextmanager
    def _session_errors(self, sock: tls.Channel | Lane) -> Iterator[None]:
        """How a served session ends: the primary closed it, a protocol error (told to the
        primary), or the connection was lost."""
        try:
            yield
        except wire.ConnectionClosed:
            log.info("replication: primary closed the connection")
        except wire.WireError as exc:
            self.last_error = str(exc)
            log.error("replication: protocol error, closing: %s", exc)
            with contextlib.suppress(OSError):
                sock.sendall(wire.encode_frame(FrameType.ERROR, 0, str(exc).encode()))
        except OSError as exc:
            log.info("replication: connection lost: %s", exc)


_DIVERGENCE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                         errno.ENOTEMPTY, errno.ELOOP})


class ReadOnlyGuard:
    """A read-only bind mount of a directory over itself: apps on the secondary see the copy
    but cannot change it, while the applier writes through the descriptor it opened before."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        subprocess.run(["mount", "--bind", self.path, self.path], check=True,
                       capture_output=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", self.path], check=True,
                           capture_output=True)
        except subprocess.CalledProcessError:
            subprocess.run(["umount", "-l", self.path], check=False, capture_output=True)
            raise

    def release(self) -> None:
        subprocess.run(["umount", "-l", self.path], check=True, capture_output=True)

    def __enter__(self) -> ReadOnlyGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_only_guard(path: str | Path) -> ReadOnlyGuard:
    """Bind-mount `path` read-only over itself (root only). Open the Applier (its directory
    descriptor) BEFORE calling this; call .release() (or use `with`) when leaving SECOND."""
    return ReadOnlyGuard(path)
