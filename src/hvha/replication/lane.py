"""Replication sessions through the native lane (native/lane.c), driven from Python.

Why: each synchronous write makes round trips to the secondary (two for a 4 KiB write+fsync),
and in Python every round trip paid about 80-130 us of interpreter on each side for TLS
records, frames and acks (docs/benchmarks.md). The lane does those in C, on both nodes:
- the secondary (Lane.accept): TLS, frames, Writes, Fsyncs and acks; the applier still owns
  the hello, namespace ops, queries, errors (NACK, SKIPPED, the disk's fault latch) and the
  session's end (applier.py);
- the primary (Lane.connect): TLS and frames under the stream, which keeps its logic
  (ordering, acks, going ALONE, the dirty map) in Python (stream.py, peerreader.py).
Calls through ctypes release the GIL, so other threads run while the lane waits for the
network or the disk. A Lane offers what tls.Channel and wire.FrameReader offered the stream
and the applier (sendall, read, pending, timeout, shutdown, close, getpeercert).

The lane is a shared library built with the package (hatch_build.py). Where it is missing (no
compiler when the wheel was built) `available()` says why and both nodes use the Python code,
as before; HVHA_NATIVE_LANE=0 asks for that too (tests run both).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from hvha.replication import wire
from hvha.replication.tls import NodeCreds
from hvha.replication.wire import FrameType

_PATH = Path(__file__).parent / "native" / "liblane.so"
_TIMEVAL = struct.Struct("@ll")
_EOF, _TIMEOUT = 0, -2
_E_PROTOCOL, _E_TIMEOUT = 2, 4
_TYPES = {int(t): t for t in FrameType}


def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(_PATH), use_errno=True)
    except OSError as exc:
        return None, f"{_PATH.name} not loadable ({exc}): reinstall hvha with gcc and libssl-dev"
    p, c, u32, i64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int64
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "lane_open": (p, [ctypes.c_int, ctypes.c_int, c, c, c, c, c, ctypes.c_size_t]),
        "lane_peer_cert": (ctypes.c_int, [p, c, ctypes.c_int]),
        "lane_shutdown": (None, [p]),
        "lane_close": (None, [p]),
        "lane_error": (c, [p, ctypes.POINTER(ctypes.c_int)]),
        "lane_send": (ctypes.c_int, [p, c, ctypes.c_size_t]),
        "lane_next": (ctypes.c_int, [p]),
        "lane_serve": (ctypes.c_int, [p, ctypes.c_int, ctypes.c_int]),
        "lane_frame": (ctypes.c_int, [p, ctypes.POINTER(ctypes.c_uint64),
                                      ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(u32)]),
        "lane_applied": (ctypes.c_int, [p, i64, u32]),
        "lane_flush_ack": (ctypes.c_int, [p]),
        "lane_pending": (ctypes.c_int, [p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib, ""


_lib, _why = _load()


def available() -> tuple[bool, str]:
    """(whether sessions can run through the native lane, why not)."""
    if os.environ.get("HVHA_NATIVE_LANE", "1") == "0":
        return False, "HVHA_NATIVE_LANE=0"
    return _lib is not None, _why


def creds_of(ctx: ssl.SSLContext) -> NodeCreds | None:
    """The node's credentials behind ctx if the lane can use them (else None: Python path)."""
    from hvha.replication.tls import NodeContext
    if not available()[0] or not isinstance(ctx, NodeContext):
        return None
    return ctx.creds


def _names(der: bytes) -> dict[str, Any]:
    """The peer certificate in ssl.SSLSocket.getpeercert()'s shape (what tls.check_peer reads)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(("DNS", n) for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns = ()
    cns = tuple((("commonName", str(a.value)),)
                for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return {"subjectAltName": dns, "subject": cns}


class Lane:
    """One TLS session (mutual, TLS 1.3, the cluster CA) through the native lane. Construct
    with accept() or connect(); the caller then checks the peer's name (tls.check_peer)."""

    def __init__(self, sock: socket.socket, creds: NodeCreds, timeout: float,
                 peer: str | None) -> None:
        assert _lib is not None, _why
        self.raw = sock  # for select() (peerreader.readable) and the socket options
        self._lock = threading.Lock()
        self._users = 0  # calls into the library in progress
        self._closing = False
        self._p: int | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(None)
        self.timeout = timeout
        err = ctypes.create_string_buffer(512)
        p = _lib.lane_open(os.dup(sock.fileno()), int(peer is not None),
                           str(creds.cert).encode(), str(creds.key).encode(),
                           str(creds.ca_cert).encode(), (peer or "").encode(), err, len(err))
        if not p:
            sock.close()
            raise ssl.SSLError(f"TLS handshake failed: {err.value.decode(errors='replace')}")
        self._p = p

    @classmethod
    def accept(cls, sock: socket.socket, creds: NodeCreds, timeout: float) -> Lane:
        """Server side (the secondary), on an accepted connection."""
        return cls(sock, creds, timeout, None)

    @classmethod
    def connect(cls, address: tuple[str, int], creds: NodeCreds, peer: str,
                timeout: float) -> Lane:
        """Client side (the primary): the server's certificate must name `peer`."""
        return cls(socket.create_connection(address, timeout=timeout), creds, timeout, peer)

    # --------------------------------------------------------------- lifetime of the handle
    @contextlib.contextmanager
    def _use(self) -> Iterator[int]:
        with self._lock:
            if self._p is None or self._closing:
                raise wire.ConnectionClosed("session closed")
            self._users += 1
            p = self._p
        try:
            yield p
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and not self._users
            if last:
                self._free()

    def hold(self) -> int | None:
        """The session's handle for the express path (express.py), which uses it until
        release(); None if the session is closing."""
        with self._lock:
            if self._p is None or self._closing:
                return None
            self._users += 1
            return self._p

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and not self._users
        if last:
            self._free()

    def _free(self) -> None:
        with self._lock:
            p, self._p = self._p, None
        if p is not None and _lib is not None:
            _lib.lane_close(p)
        self.raw.close()

    def shutdown(self) -> None:
        """Wake up threads blocked on this session (they then see its end)."""
        with self._lock, contextlib.suppress(OSError):
            if self._p is not None:
                self.raw.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Free the session now, or when the last call in progress returns."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            now = not self._users
            if not now:
                with contextlib.suppress(OSError):
                    self.raw.shutdown(socket.SHUT_RDWR)
        if now:
            self._free()

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- I/O
    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        """Reads wait at most this long (TimeoutError; nothing is lost), None: for ever.
        Sends wait for ever, as tls.Channel's."""
        usec = 0 if value is None else max(int(value * 1_000_000), 1)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            _TIMEVAL.pack(*divmod(usec, 1_000_000)))
        self._timeout = value

    def getpeercert(self) -> dict[str, Any]:
        assert _lib is not None
        buf = ctypes.create_string_buffer(16384)
        with self._use() as p:
            n = _lib.lane_peer_cert(p, buf, len(buf))
        return _names(buf.raw[:n]) if n > 0 else {}

    def _raise(self, p: int, rc: int) -> None:
        assert _lib is not None
        if rc == _EOF:
            raise wire.ConnectionClosed("peer closed the connection")
        if rc == _TIMEOUT:
            raise TimeoutError(f"no data from the peer for {self._timeout} s")
        kind = ctypes.c_int()
        msg = (_lib.lane_error(p, ctypes.byref(kind)) or b"").decode(errors="replace")
        if kind.value == _E_PROTOCOL:
            raise wire.WireError(msg)
        if kind.value == _E_TIMEOUT:
            raise TimeoutError(msg)
        raise ConnectionError(msg)

    def _frame(self, p: int, rc: int) -> tuple[wire.Frame, int]:
        assert _lib is not None
        if rc <= 0:
            self._raise(p, rc)
        seq, ptr, n = ctypes.c_uint64(), ctypes.c_void_p(), ctypes.c_uint32()
        failed = _lib.lane_frame(p, ctypes.byref(seq), ctypes.byref(ptr), ctypes.byref(n))
        payload = ctypes.string_at(ptr.value, n.value) if ptr.value and n.value else b""
        return wire.Frame(_TYPES[rc], seq.value, payload), failed

    def read(self) -> wire.Frame:
        """The next frame (TimeoutError after `timeout`: call again, nothing is lost)."""
        assert _lib is not None
        with self._use() as p:
            return self._frame(p, _lib.lane_next(p))[0]

    def pending(self) -> int:
        """Whether bytes are already received that the next read() starts from."""
        assert _lib is not None
        with self._use() as p:
            return int(_lib.lane_pending(p))

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        assert _lib is not None
        buf = data if isinstance(data, bytes) else bytes(data)
        with self._use() as p:
            if _lib.lane_send(p, buf, len(buf)) != 1:
                self._raise(p, -1)

    # ----------------------------------------------------------------- the secondary's
    def serve(self, root_fd: int, dirs_dirty: bool) -> tuple[wire.Frame, int]:
        """Apply Writes and Fsyncs natively until a frame is left for the caller: (that frame,
        errno of its failed native apply or 0). Raises wire.ConnectionClosed at the end."""
        assert _lib is not None
        with self._use() as p:
            return self._frame(p, _lib.lane_serve(p, root_fd, int(dirs_dirty)))

    def applied(self, seq: int, nbytes: int) -> None:
        """The caller applied op seq (or answered it SKIPPED): acknowledge when it is time."""
        assert _lib is not None
        with self._use() as p:
            if _lib.lane_applied(p, seq, nbytes) != 1:
                self._raise(p, -1)

    def flush_ack(self) -> None:
        assert _lib is not None
        with self._use() as p:
            if _lib.lane_flush_ack(p) != 1:
                self._raise(p, -1)
