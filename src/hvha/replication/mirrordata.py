"""The mirror's data path: read, write and the fsync barriers (a mixin of MirrorFS).

Why a module of its own: this is where the replication contract lives. A write returns once
the secondary has it; fsync sends a barrier, fsyncs locally while the secondary works and
returns once both disks have the data. Large writes go to the stream's sender thread while
this thread writes them here, straight to the disk (`_write_early`, directio). And the local
disk's own failures are judged here (localfault): the first failed fsync, or EIO, latches,
and every later fsync of the mount fails, never a late success. Where the kernel leaves it to
the file system, a write drops setuid, setgid and file capabilities first (killpriv). The
namespace handlers (create, rename, ...) stay in mirrorfs.py.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import mfusepy  # type: ignore[import-untyped]

from hvha.replication import killpriv
from hvha.replication import ops as o
from hvha.replication.directio import DirectWriter
from hvha.replication.express import Express
from hvha.replication.killpriv import Privileged
from hvha.replication.localfault import FaultLatch
from hvha.replication.ops import Op

log = logging.getLogger("hvha.replication.mirrorfs")

#: Writes at least this large are sent by the sender thread while written here (_write_early)
EARLY_SEND = 128 * 1024


class ReplicationSink(Protocol):
    """The stream as the file system sees it (implemented by replication/stream.py)."""

    def ordered(self) -> AbstractContextManager[None]: ...
    def enqueue(self, op: Op) -> int: ...
    def wait(self, seq: int) -> None: ...


def _fail(err: int) -> OSError:
    return mfusepy.FuseOSError(err)  # type: ignore[no-any-return]


class DataPath:
    """read / write / fsync of MirrorFS; needs the attributes and helpers declared below."""

    sink: ReplicationSink
    faults: FaultLatch
    direct: DirectWriter
    _early: tuple[Callable[[Op], int], Callable[[Op, int, str], None]] | None
    _sync_fhs: set[int]
    privs: Privileged
    express: Express | None
    root: int
    sync_on_close: bool
    #: lend the stream to the express path (mount.py sets it when the mount has one): called
    #: after the writes and fsyncs that path would have served
    lend: Callable[[], bool] | None = None

    def _enqueue(self, op: Op, *, decided: bool = False,
                 push: Callable[[Op], int] | None = None) -> int:
        raise NotImplementedError

    def _wait(self, seq: int) -> None:
        raise NotImplementedError

    def _name(self, path: str | None, fh: int) -> str | None:
        raise NotImplementedError

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        try:
            return os.pread(fi.fh, size, offset)
        except OSError as e:
            self.faults.note("read", path, e)
            raise

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        fh = fi.fh
        if fh in self.privs.flagged:  # setuid, setgid or file capabilities to drop first
            self._privileged_write(path, fh)
        if len(data) >= EARLY_SEND and self._early is not None:
            n = self._write_early(path, data, offset, fh, *self._early)
            if self.lend is not None:  # the next one may go to C (express.c's large_write)
                self.lend()
            return n
        with self.sink.ordered():
            n = self._pwrite(path, fh, data, offset)
            name = self._name(path, fh)
            if name is None:
                return n
            seq = self._enqueue(o.Write(name, offset, data if n == len(data) else data[:n]))
        self._written(name, fh, seq, n)
        if self.lend is not None:
            self.lend()
        return n

    # -- setuid, setgid and file capabilities (killpriv.py)
    def _track_writer(self, fd: int, flags: int) -> bool:
        """A direct-I/O handle opened: True if writes through it must drop privileges first
        (then C must not serve them)."""
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return False
        st = os.fstat(fd)
        privileged = killpriv.carries(st.st_mode, killpriv.has_caps(fd))
        self.privs.opened(fd, st.st_ino, privileged)
        return privileged

    def _drop_privileges(self, name: str | None, fd: int) -> list[Op]:
        """Before a write or with a truncation (hold the order lock): drop them here as the
        kernel would for this caller; the ops that replicate it."""
        return killpriv.drop(fd, name, mfusepy.fuse_get_context()[2])

    def _privileged_write(self, path: str | None, fh: int) -> None:
        """A write through a direct-I/O handle of a file that carries privileges: the kernel
        left dropping them to this file system."""
        with self.sink.ordered():
            seqs = [self._enqueue(op) for op in self._drop_privileges(self._name(path, fh), fh)]
            if not killpriv.carries(os.fstat(fh).st_mode, killpriv.has_caps(fh)):
                self.privs.cleared(fh)  # nothing left to drop: C may serve it again
                if self.express is not None:
                    self.express.fh(fh, fh not in self._sync_fhs)
        if seqs:
            self._wait(seqs[-1])

    def _gained_privileges(self, backing: str) -> None:
        """After a chmod or setxattr of `backing` (relative to the root descriptor): open
        direct-I/O handles of a file that now carries privileges check them before writes."""
        st = os.stat(backing, dir_fd=self.root, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return
        fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.root)
        try:
            if not killpriv.carries(st.st_mode, killpriv.has_caps(fd)):
                return
        finally:
            os.close(fd)
        for fh in self.privs.gained(st.st_ino):
            if self.express is not None:
                self.express.fh(fh, False)

    def _pwrite(self, path: str | None, fh: int, data: bytes, offset: int) -> int:
        try:
            return self.direct.pwrite(fh, data, offset)
        except OSError as e:
            self.faults.note("write", path, e)
            raise

    def _written(self, name: str | None, fh: int, seq: int, n: int) -> int:
        """A write's end: durable on both nodes for O_SYNC/O_DSYNC handles, else replicated."""
        if name is not None and fh in self._sync_fhs:
            self._fsync(name, fh, True)
        else:
            self._wait(seq)
        return n

    def _write_early(self, path: str | None, data: bytes, offset: int, fh: int,
                     send: Callable[[Op], int], diverged: Callable[[Op, int, str], None]
                     ) -> int:
        """A large write is handed to the stream's sender thread (`send` queues it and wakes
        that thread), which encrypts and sends it while this thread writes it here, straight
        to the disk (directio): the send, the peer's write and the local write overlap
        instead of adding up (measured in docs/benchmarks.md). Still under the order lock,
        so local order == stream order. If the local write then fails or is
        short, the peer may hold data this copy lacks: the sink records the op dirty and
        reconnects, and the resync puts the peer back to this copy; the app gets the local
        result, as it would without replication."""
        with self.sink.ordered():
            name = self._name(path, fh)
            op = o.Write(name, offset, data) if name is not None else None
            seq = self._enqueue(op, push=send) if op is not None else 0
            try:
                n = self._pwrite(path, fh, data, offset)
            except OSError as e:
                if op is not None and seq:
                    self._diverged(diverged, op, seq, e.strerror or str(e))
                raise
            if n < len(data) and op is not None and seq:
                self._diverged(diverged, op, seq, f"short write: {n} of {len(data)} bytes")
        return self._written(name, fh, seq, n)

    def diverged_write(self, op: Op, seq: int, why: str) -> None:
        """Op `seq`, a large write, was sent before it failed or fell short here (express.c's
        large writes come here too): record it dirty and resync, as _write_early does."""
        if self._early is None:
            raise _fail(errno.EIO)
        self._diverged(self._early[1], op, seq, why)

    @staticmethod
    def _diverged(diverged: Callable[[Op, int, str], None], op: Op, seq: int, why: str) -> None:
        log.warning("local write to %s failed after it was sent to the peer (%s): "
                    "recording it dirty for a resync", getattr(op, "path", "?"), why)
        try:
            diverged(op, seq, why)
        except Exception as e:
            log.error("replication: could not record the diverged write: %s; answering EIO", e)
            raise _fail(errno.EIO) from e

    def _fsync(self, name: str | None, fd: int, datasync: bool, what: str = "") -> None:
        """Barrier first, local fsync while the secondary works, then wait for both disks.
        After a fault of this disk, fail at once with its errno (never a late success)."""
        what = what or ("fdatasync" if datasync else "fsync")
        self.faults.check()
        with self.sink.ordered():
            seq = self._enqueue(o.Fsync(name, datasync))
        flush = getattr(self.sink, "flush", None)  # send the barrier now, not from a thread
        if flush is not None:
            try:
                flush()
            except Exception:  # the wait below reports a lost peer as usual
                log.debug("replication: sending the barrier early failed", exc_info=True)
        try:
            os.fdatasync(fd) if datasync else os.fsync(fd)
        except OSError as e:
            self.faults.note(what, name, e)
            raise
        self._wait(seq)

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        self._fsync(self._name(path, fi.fh), fi.fh, bool(datasync))
        if self.lend is not None:
            self.lend()
        return 0

    def flush(self, path: str | None, fi: Any) -> int:
        if self.sync_on_close:
            self._fsync(self._name(path, fi.fh), fi.fh, False)
        return 0
