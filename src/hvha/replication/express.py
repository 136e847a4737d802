"""The express path: a mirror mount's writes and fsyncs served in C (native/express.c).

Why: with the Python data path a 4 KiB write + fsync cost about 100 us of interpreter on the
primary per pair, most of the gap to the disk (docs/benchmarks.md). While the stream is in
sync and has nothing of its own in flight, it lends the C handlers its lane and numbering
(Stream.express_try_on); they then apply locally, number, send and read the cumulative acks
without the interpreter. The stream takes the path back before any op of its own and on any
failure (Stream.express_take), reading the ops in flight and the activity records into its
books (`Snapshot`), so going ALONE, the dirty map and the activity log work as before.

Served in C: writes up to 4 MiB and fsync/fdatasync, on handles that are not O_SYNC, of a
mount without exclude patterns, while no local fault is latched. Writes of 128 KiB or more
are sent from FUSE's buffer while a C thread writes them locally (direct, as directio.py
does); if that local write fails after the send, `diverged` repairs it as the Python early
send does. Everything else (and every request while the path is not lent) goes to the Python
handlers, unchanged. HVHA_EXPRESS=0 turns it off (tests run both ways).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hvha.replication import lane

log = logging.getLogger(__name__)

_u64, _p, _c = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p
_SIGS: dict[str, tuple[Any, list[Any]]] = {
    "exp_new": (_p, [_p, _p, ctypes.c_size_t, _p, _p, _p, _p, _p, _p, _p]),
    "exp_bind": (None, [_p, _p, ctypes.c_int]),
    "exp_free": (None, [_p]),
    "exp_fh": (ctypes.c_int, [_p, _u64, ctypes.c_int]),
    "exp_fault": (None, [_p]),
    "exp_on": (ctypes.c_int, [_p, _p, _u64, _u64, ctypes.c_double, ctypes.c_double, _u64, _u64,
                              ctypes.c_double]),
    "exp_take": (ctypes.c_int, [_p]),
    "exp_idle": (ctypes.c_int, [_p]),
    "exp_state": (None, [_p, ctypes.POINTER(_u64), _c, ctypes.c_size_t]),
    "exp_fly": (_c, [_p, ctypes.c_uint32, ctypes.POINTER(_u64)]),
    "exp_epoch": (ctypes.POINTER(_u64), [_p, ctypes.c_uint32, ctypes.POINTER(_u64),
                                         ctypes.POINTER(_u64)]),
    "exp_name": (_c, [_p, ctypes.c_uint32]),
}
WAIT = ctypes.CFUNCTYPE(ctypes.c_int, _u64)
HANDOVER = ctypes.CFUNCTYPE(None)
ALIVE = ctypes.CFUNCTYPE(ctypes.c_int)
FAULT = ctypes.CFUNCTYPE(None, _c, ctypes.c_int, ctypes.c_int)
#: a large write's local part failed (n < 0: errno err) or fell short (n bytes) after it was
#: sent: (path, offset, length, seq, n, err) -> 0 (answer the local result) or an errno
DIVERGED = ctypes.CFUNCTYPE(ctypes.c_int, _c, _u64, _u64, _u64, ctypes.c_int64, ctypes.c_int)
#: the largest write served in C (express.c LARGE; the kernel's FUSE writes are <= 1 MiB)
LARGE = 4 << 20
KIND_WRITE, KIND_FSYNC, KIND_BARRIER = 1, 2, 3


def _lib() -> ctypes.CDLL | None:
    lib = lane._lib
    if lib is None or not hasattr(lib, "exp_new"):
        return None
    for name, (res, args) in _SIGS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_LIB = _lib()


def available() -> tuple[bool, str]:
    """Whether mounts get the express path, and if not, why."""
    if os.environ.get("HVHA_EXPRESS", "1") == "0":
        return False, "HVHA_EXPRESS=0"
    if _LIB is None:
        return False, lane.available()[1] or "the native lane has no express path"
    return True, ""


@dataclass
class Snapshot:
    """The express path's books when the stream took it back."""

    next: int
    acked: int
    last_barrier: int  # the last barrier the peer acknowledged (0: none)
    bytes_sent: int
    reason: str  # the failure seen in C ("": none)
    #: ops sent and not acknowledged: (seq, kind, datasync, offset, length, name)
    fly: list[tuple[int, int, bool, int, int, str]] = field(default_factory=list)
    #: activity epochs in order: (closing barrier or 0, [(name, zone)])
    epochs: list[tuple[int, list[tuple[str, int]]]] = field(default_factory=list)


class Express:
    """One mount's express path. Construct before fuse_new (it puts the C handlers in the
    operations table), bind() once fuse_new returned, free() once the loop has ended."""

    def __init__(self, table: Any, callbacks: dict[str, Any], fh_offset: int, context_fn: int, *,
                 wait: Callable[[int], int], handover: Callable[[], None],
                 alive: Callable[[], bool], fault: Callable[[str, bool, int], None],
                 allowed: Callable[[], bool],
                 diverged: Callable[[str, int, int, int, int, int], int] | None = None) -> None:
        assert _LIB is not None
        self._lib = _LIB
        self.allowed = allowed
        # the Python handlers stay the fallback: C calls them for whatever it does not serve
        # (the callback objects themselves: the table only points at them)
        self._py_write, self._py_fsync = callbacks["write"], callbacks["fsync"]
        self._cbs = (WAIT(self._guard(wait, 5)), HANDOVER(self._guard(handover, None)),
                     ALIVE(self._guard(lambda: int(alive()), 1)),
                     FAULT(self._guard(lambda p, d, e: fault(os.fsdecode(p), bool(d), e),
                                       None)))
        # without it, large writes stay in Python (their early send needs the same repair)
        self._diverged = DIVERGED(self._guard(
            lambda p, *rest: diverged(os.fsdecode(p), *rest), 5)) if diverged else None
        ptrs = [ctypes.cast(f, _p).value
                for f in (self._py_write, self._py_fsync, *self._cbs)]
        ptrs.append(ctypes.cast(self._diverged, _p).value if self._diverged else None)
        p = self._lib.exp_new(None, context_fn, fh_offset, *ptrs)
        if not p:
            raise RuntimeError("express path: too many mounts in this process")
        self._p: int | None = p
        table.write = type(table.write)(ctypes.cast(self._lib.exp_write, _p).value)
        table.fsync = type(table.fsync)(ctypes.cast(self._lib.exp_fsync, _p).value)
        if "getxattr" in callbacks:  # a local read, the same at any time: always in C
            table.getxattr = type(table.getxattr)(ctypes.cast(self._lib.exp_getxattr,
                                                              _p).value)

    @staticmethod
    def _guard(fn: Callable[..., Any], on_error: Any) -> Callable[..., Any]:
        """A callback from C must never raise (ctypes would print it and return garbage)."""
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException:  # reported; C gets a safe answer
                log.exception("express path: callback %s failed", getattr(fn, "__name__", fn))
                return on_error
        return call

    def bind(self, fuse: int, root_fd: int) -> None:
        self._lib.exp_bind(self._p, fuse, root_fd)

    def free(self) -> None:
        p, self._p = self._p, None
        if p:
            self._lib.exp_free(p)

    def fh(self, fd: int, ok: bool) -> None:
        """Handle `fd` may (ok) or may not be served in C; call before it is used or closed."""
        if self._p:
            self._lib.exp_fh(self._p, fd, int(ok))

    def _state(self, reason_size: int = 8) -> tuple[Any, str]:
        """exp_state: (next, acked, last barrier, bytes sent, in flight, epochs, served),
        and the failure seen in C."""
        st = (_u64 * 7)()
        why = ctypes.create_string_buffer(reason_size)
        self._lib.exp_state(self._p, st, why, len(why))
        return st, why.value.decode(errors="replace")

    def served(self) -> int:
        """Ops served in C since the mount started (for status and tests)."""
        return int(self._state()[0][6]) if self._p else 0

    def fault(self) -> None:
        """The mount's fault latch latched: fsyncs go to Python (which fails them)."""
        if self._p:
            self._lib.exp_fault(self._p)

    def lend(self, lane_p: int, next_seq: int, acked: int, *, timeout: float, max_age: float,
             max_bytes: int, zone: int, epoch_age: float | None) -> bool:
        return bool(self._p) and self._lib.exp_on(
            self._p, lane_p, next_seq, acked, timeout, max_age, max_bytes, zone,
            -1.0 if epoch_age is None else epoch_age) == 1

    def idle(self) -> bool:
        """Lent, with nothing in flight or being read."""
        return bool(self._p) and self._lib.exp_idle(self._p) == 1

    def take(self) -> Snapshot | None:
        """Take the lane back (returns once no C thread uses it) and read the books; None
        if it was not lent."""
        if not self._p or self._lib.exp_take(self._p) != 1:
            return None
        p, lib = self._p, self._lib
        st, why = self._state(600)
        snap = Snapshot(st[0], st[1], st[2], st[3], why)
        row = (_u64 * 5)()
        for i in range(st[4]):
            name = lib.exp_fly(p, i, row) or b""
            snap.fly.append((row[0], row[1], bool(row[2]), row[3], row[4], os.fsdecode(name)))
        names: dict[int, str] = {}
        barrier, n = _u64(), _u64()
        for i in range(st[5]):
            keys = lib.exp_epoch(p, i, ctypes.byref(barrier), ctypes.byref(n))
            zones = []
            for k in keys[:n.value] if n.value else ():
                nid = k >> 40
                if nid not in names:
                    names[nid] = os.fsdecode(lib.exp_name(p, nid) or b"")
                zones.append((names[nid], k & ((1 << 40) - 1)))
            snap.epochs.append((barrier.value, zones))
        return snap
