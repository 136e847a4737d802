"""The secondary's session through the native lane (native/lane.c), driven from Python.

Why: the applier's hot loop (read an op, write it, acknowledge) costs about 80-130 us of
interpreter per round trip in Python, and a synchronous 4 KiB write+fsync makes two round
trips (docs/benchmarks.md). The lane does TLS, frames, Writes, Fsyncs and acks in C; the
applier still owns everything else: the hello, namespace ops, queries, errors (NACK,
SKIPPED, the disk's fault latch) and when the session ends. Calls through ctypes release the
GIL, so other threads run while the lane waits for the network or the disk.

The lane is a shared library built with the package (hatch_build.py). Where it is missing
(no compiler when the wheel was built) `available()` says why and the applier serves the
session in Python, as before; HVHA_NATIVE_LANE=0 asks for that too (tests of both paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from hvha.replication import wire
from hvha.replication.tls import NodeCreds
from hvha.replication.wire import FrameType

_PATH = Path(__file__).parent / "native" / "liblane.so"
_TIMEVAL = struct.Struct("@ll")
_E_PROTOCOL = 2


def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(_PATH), use_errno=True)
    except OSError as exc:
        return None, f"{_PATH.name} not loadable ({exc}): reinstall hvha with gcc and libssl-dev"
    p, c, u32, i64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int64
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "lane_open": (p, [ctypes.c_int, c, c, c, c, ctypes.c_size_t]),
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
    """(whether sessions can be served natively, why not)."""
    if os.environ.get("HVHA_NATIVE_LANE", "1") == "0":
        return False, "HVHA_NATIVE_LANE=0"
    return _lib is not None, _why


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
    """One accepted session: the TLS handshake (mutual, TLS 1.3, the cluster CA) happens here,
    waiting at most `timeout` seconds; the caller then checks the peer's name."""

    def __init__(self, sock: socket.socket, creds: NodeCreds, timeout: float) -> None:
        assert _lib is not None, _why
        self._sock = sock
        self._lock = threading.Lock()  # shutdown() from other threads vs close()
        self._p: int | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(None)
        self.timeout = timeout  # reads and writes wait at most this (None: for ever)
        err = ctypes.create_string_buffer(512)
        p = _lib.lane_open(os.dup(sock.fileno()), str(creds.cert).encode(),
                           str(creds.key).encode(), str(creds.ca_cert).encode(), err, len(err))
        if not p:
            sock.close()
            raise ssl.SSLError(f"TLS handshake with the primary failed: {err.value.decode()}")
        self._p = p

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        usec = 0 if value is None else max(int(value * 1_000_000), 1)
        tv = _TIMEVAL.pack(*divmod(usec, 1_000_000))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._timeout = value

    def getpeercert(self) -> dict[str, Any]:
        buf = ctypes.create_string_buffer(16384)
        n = _lib.lane_peer_cert(self._live(), buf, len(buf)) if _lib else 0
        return _names(buf.raw[:n]) if n > 0 else {}

    def _live(self) -> int:
        if self._p is None:
            raise wire.ConnectionClosed("session closed")
        return self._p

    def _raise(self) -> None:
        assert _lib is not None
        kind = ctypes.c_int()
        msg = (_lib.lane_error(self._live(), ctypes.byref(kind)) or b"").decode(errors="replace")
        if kind.value == _E_PROTOCOL:
            raise wire.WireError(msg)
        raise ConnectionError(msg)

    def _frame(self, rc: int) -> tuple[wire.Frame, int]:
        assert _lib is not None
        if rc == 0:
            raise wire.ConnectionClosed("peer closed the connection")
        if rc < 0:
            self._raise()
        seq, ptr, n = ctypes.c_uint64(), ctypes.c_void_p(), ctypes.c_uint32()
        failed = _lib.lane_frame(self._live(), ctypes.byref(seq), ctypes.byref(ptr),
                                 ctypes.byref(n))
        payload = ctypes.string_at(ptr.value, n.value) if ptr.value and n.value else b""
        return wire.Frame(FrameType(rc), seq.value, payload), failed

    def read(self) -> wire.Frame:
        """The next frame, whatever it is (the hello)."""
        assert _lib is not None
        return self._frame(_lib.lane_next(self._live()))[0]

    def serve(self, root_fd: int, dirs_dirty: bool) -> tuple[wire.Frame, int]:
        """Apply Writes and Fsyncs natively until a frame is left for the caller: (that frame,
        errno of its failed native apply or 0). Raises wire.ConnectionClosed at the end."""
        assert _lib is not None
        return self._frame(_lib.lane_serve(self._live(), root_fd, int(dirs_dirty)))

    def applied(self, seq: int, nbytes: int) -> None:
        """The caller applied op seq (or answered it SKIPPED): acknowledge when it is time."""
        assert _lib is not None
        if _lib.lane_applied(self._live(), seq, nbytes) != 1:
            self._raise()

    def flush_ack(self) -> None:
        assert _lib is not None
        if _lib.lane_flush_ack(self._live()) != 1:
            self._raise()

    def sendall(self, data: bytes) -> None:
        assert _lib is not None
        if _lib.lane_send(self._live(), data, len(data)) != 1:
            self._raise()

    def shutdown(self) -> None:
        """Wake up the thread serving the session (it then sees the end of the stream)."""
        with self._lock:
            if self._p is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            p, self._p = self._p, None
        if p is not None and _lib is not None:
            _lib.lane_close(p)
        self._sock.close()

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
