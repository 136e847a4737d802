"""The primary's mirror file system: a passthrough that applies each mutation and streams it.

Why it exists: a replicated directory must keep its path for the VM or app while every change
reaches the secondary before the caller is told it succeeded. Mounted over the directory itself,
it does backing I/O through a descriptor opened before the mount (`root_fd`); each mutating
handler runs `with sink.ordered(): apply locally; seq = sink.enqueue(op)` then `sink.wait(seq)`
outside the lock. A local failure returns its errno and enqueues nothing; a sink failure returns
EIO. The data path (write, fsync barriers, the local disk's faults) is in mirrordata.py, new
entries (create, mkdir, mknod, symlink: their owner and mode) in mirrornew.py.
Binding: mfusepy / libfuse3 high level (benchmarks/fuse_bindings.py says why); mount.py runs it.

O_DIRECT opens are served with FOPEN_DIRECT_IO (no kernel page cache for that open) while the
backing file is opened without O_DIRECT (the binding's buffers are unaligned); durability comes
from fsync, which qemu cache=none issues for every guest flush. Large aligned writes, from any
handle, reach the backing file through an O_DIRECT twin of its descriptor (directio.py).
Entries matching the directory's `exclude` patterns are served locally and never streamed
(hvha.replication.exclude); FIFOs and sockets may only be created there, devices nowhere.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

import mfusepy  # type: ignore[import-untyped]

from hvha.replication import exclude
from hvha.replication import ops as o
from hvha.replication.directio import DirectWriter
from hvha.replication.exclude import Excludes
from hvha.replication.express import Express
from hvha.replication.killpriv import CAPS, Privileged, carries
from hvha.replication.localfault import FaultLatch
from hvha.replication.mirrordata import DataPath, ReplicationSink, _fail
from hvha.replication.mirrornew import NewEntries
from hvha.replication.mirrorrules import (
    OpenPlan,
    backing_path,
    dirent_type,
    op_path,
    open_plan,
    stat_dict,
)
from hvha.replication.ops import Op

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
AT_SYMLINK_NOFOLLOW = 0x100
_STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                   "f_ffree", "f_favail", "f_namemax")
COPY_CHUNK = 16 << 20  # copy_file_range: largest range replicated per request (bounded memory)


# -- pure translation rules


def _ftruncate(fd: int, length: int) -> int:
    os.ftruncate(fd, length)
    return 0


def _check(ret: int) -> int:
    if ret < 0:
        raise _fail(ctypes.get_errno())
    return ret


# -- the file system


class MirrorFS(DataPath, NewEntries, mfusepy.Operations):  # type: ignore[misc]
    """Handlers called by the FUSE loop (see mount.py); `fi` is the raw fuse_file_info. The
    data path (read, write, fsync) is in mirrordata.py."""

    use_ns = True

    def __init__(self, root_fd: int, sink: ReplicationSink, *,
                 sync_on_close: bool = False, excludes: Excludes | None = None,
                 faults: FaultLatch | None = None) -> None:
        self.root = root_fd
        self.sink = sink
        self.faults = faults or FaultLatch()
        self.excludes = excludes or Excludes()
        # every op enqueued here is waited for (or flushed) by the same thread: a sink that can
        # skip waking its sender thread for such ops says so with this method
        self._push: Callable[[Op], int] = getattr(sink, "enqueue_flushed_by_caller",
                                                  sink.enqueue)
        # a sink with a sender thread that can repair a write that fails locally after it was
        # sent gets large writes while they are written here (_write_early)
        diverged = getattr(sink, "diverged", None)
        self._early = (sink.enqueue, diverged) if diverged is not None else None
        self.sync_on_close = sync_on_close
        self._proc = f"/proc/self/fd/{root_fd}"
        self._sync_fhs: set[int] = set()
        self.express: Express | None = None  # set by mount.py when small I/O is served in C
        self.direct = DirectWriter()
        self.privs = Privileged()
        self._euid, self._egid = os.geteuid(), os.getegid()

    def _enqueue(self, op: Op, *, decided: bool = False,
                 push: Callable[[Op], int] | None = None) -> int:
        """Stream op (0, nothing to wait for, when it touches only excluded entries)."""
        if self.excludes and not decided and self._excluded(op):
            return 0
        try:
            return (push or self._push)(op)
        except Exception as e:
            log.error("replication sink refused %s: %s; answering EIO", type(op).__name__, e)
            raise _fail(errno.EIO) from e

    def _excluded(self, op: Op) -> bool:
        if isinstance(op, o.Fsync) and op.path is None:
            return False
        path = o.paths_of(op)[0]
        is_dir = isinstance(op, o.Mkdir | o.Rmdir) or (
            isinstance(op, o.Chmod | o.Chown | o.Utimens | o.SetXattr | o.RemoveXattr | o.Fsync)
            and self._kind(path) is True)
        return self.excludes.excluded(path, is_dir)

    def _kind(self, path: str) -> bool | None:
        """True for a directory, False for anything else, None if there is nothing there."""
        try:
            return stat.S_ISDIR(os.stat(path or ".", dir_fd=self.root, follow_symlinks=False)
                                .st_mode)
        except FileNotFoundError:
            return None

    def _enqueue_decided(self, todo: Iterable[Op]) -> int:
        """Stream ops decided by hvha.replication.exclude (bounded memory: waits every 32 MiB
        of data, still in order)."""
        seq, held = 0, 0
        for op in todo:
            seq = self._enqueue(op, decided=True)
            held += len(op.data) if isinstance(op, o.Write) else 0
            if held >= 32 << 20:
                self._wait(seq)
                held = 0
        return seq

    def _wait(self, seq: int) -> None:
        if seq <= 0:
            return
        try:
            self.sink.wait(seq)
        except Exception as e:
            log.error("replication of op #%d failed: %s; answering EIO", seq, e)
            raise _fail(errno.EIO) from e

    def _name(self, path: str | None, fh: int) -> str | None:
        """Replicated name of an open file; None if it is unlinked (nothing to replicate)."""
        if path is not None or os.fstat(fh).st_nlink == 0:
            return None if path is None else op_path(path)
        log.error("open file (fh %d) has no path but still has links; refusing with EIO", fh)
        raise _fail(errno.EIO)

    def _xpath(self, path: str) -> str:
        return self._proc + path if path != "/" else self._proc

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if fh is not None:
            return stat_dict(os.fstat(fh.fh))
        return stat_dict(os.stat(backing_path(path), dir_fd=self.root, follow_symlinks=False))

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        fd = os.open(backing_path(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.root)
        try:  # libfuse uses only st_ino (non-zero, or readdir(3) hides the entry) and the type
            me = {"st_ino": os.fstat(fd).st_ino, "st_mode": stat.S_IFDIR}
            return [(".", me, 0), ("..", me, 0),
                    *((e.name, {"st_ino": e.inode(), "st_mode": dirent_type(e)}, 0)
                      for e in os.scandir(fd))]
        finally:
            os.close(fd)

    def readlink(self, path: str) -> str:
        return os.readlink(backing_path(path), dir_fd=self.root)

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.fstatvfs(self.root)
        return {k: getattr(sv, k) for k in _STATVFS_FIELDS}

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return os.getxattr(self._xpath(path), name, follow_symlinks=path == "/")

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._xpath(path), follow_symlinks=path == "/")

    def lseek(self, path: str | None, offset: int, whence: int, fi: Any) -> int:
        return os.lseek(fi.fh, offset, whence)

    def _setup_handle(self, fi: Any, fd: int, plan: OpenPlan) -> None:
        fi.fh, fi.direct_io, fi.noflush = fd, plan.direct_io, not self.sync_on_close
        if plan.sync_writes:
            self._sync_fhs.add(fd)
        privileged = plan.direct_io and self._track_writer(fd, fi.flags)
        if self.express is not None:  # (an fd number is reused: always say)
            self.express.fh(fd, not plan.sync_writes and not privileged)

    def open(self, path: str, fi: Any) -> int:
        plan = open_plan(fi.flags)
        if not plan.truncates:
            self._setup_handle(fi, os.open(backing_path(path), plan.flags, dir_fd=self.root), plan)
            return 0
        with self.sink.ordered():
            fd = os.open(backing_path(path), plan.flags, dir_fd=self.root)
            try:  # the truncation is done here: so is dropping privileges (killpriv.py)
                for op in (o.Truncate(op_path(path), 0),
                           *self._drop_privileges(op_path(path), fd)):
                    seq = self._enqueue(op)
            except OSError:
                os.close(fd)
                raise
        self._setup_handle(fi, fd, plan)
        self._wait(seq)
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        self._sync_fhs.discard(fi.fh)
        self.privs.closed(fi.fh)
        if self.express is not None:
            self.express.fh(fi.fh, False)
        self.direct.forget(fi.fh)
        os.close(fi.fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        fd = os.open(backing_path(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.root)
        try:
            self._fsync(op_path(path), fd, bool(datasync), "fsyncdir")
        finally:
            os.close(fd)
        return 0

    def _on_file(self, path: str | None, fh: int, local: Callable[[], int],
                 make: Callable[[str, int], Op | None]) -> int:
        """Apply `local` to an open file, then replicate make(name, result) unless None."""
        with self.sink.ordered():
            res = local()
            name = self._name(path, fh)
            op = None if name is None else make(name, res)
            if op is None:
                return res
            seq = self._enqueue(op)
        self._wait(seq)
        return res

    def truncate(self, path: str | None, length: int, fi: Any = None) -> int:
        if fi is not None:
            return self._on_file(path, fi.fh, lambda: _ftruncate(fi.fh, length),
                                 lambda name, _: o.Truncate(name, length))
        assert path is not None
        return self._simple(o.Truncate(op_path(path), length), os.truncate,
                            self._proc + path, length)

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fi: Any) -> int:
        return self._on_file(path, fi.fh, lambda: _check(_libc.fallocate(fi.fh, mode, offset,
                                                                          size)),
                             lambda name, _: o.Fallocate(name, mode, offset, size))

    def copy_file_range(self, path_in: str | None, fi_in: Any, off_in: int, path_out: str | None,
                        fi_out: Any, off_out: int, length: int, flags: int) -> int:
        out = fi_out.fh
        if out in self.privs.flagged:
            self._privileged_write(path_out, out)
        return self._on_file(path_out, out, lambda: os.copy_file_range(
            fi_in.fh, out, min(length, COPY_CHUNK), off_in, off_out),
            lambda name, n: o.Write(name, off_out, os.pread(out, n, off_out)) if n else None)

    def _simple(self, op: Op, fn: Any, *args: Any, **kw: Any) -> int:
        with self.sink.ordered():
            fn(*args, **kw)
            seq = self._enqueue(op)
        self._wait(seq)
        return 0

    def link(self, new: str, existing: str) -> int:
        if self.excludes:
            with self.sink.ordered():
                os.link(backing_path(existing), backing_path(new), src_dir_fd=self.root,
                        dst_dir_fd=self.root, follow_symlinks=False)
                seq = self._enqueue_decided(exclude.link_ops(self.root, self.excludes,
                                                             op_path(existing), op_path(new)))
            self._wait(seq)
            return 0
        return self._simple(o.Link(op_path(existing), op_path(new)), os.link,
                            backing_path(existing), backing_path(new), src_dir_fd=self.root,
                            dst_dir_fd=self.root, follow_symlinks=False)

    def unlink(self, path: str) -> int:
        return self._simple(o.Unlink(op_path(path)), os.unlink, backing_path(path),
                            dir_fd=self.root)

    def rmdir(self, path: str) -> int:
        return self._simple(o.Rmdir(op_path(path)), os.rmdir, backing_path(path), dir_fd=self.root)

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if self.excludes:  # crossing the exclude boundary is not a plain rename on the peer
            src, dst = op_path(old), op_path(new)
            with self.sink.ordered():
                moved, replaced = self._kind(src), self._kind(dst)
                self._rename_local(backing_path(old), backing_path(new), flags)
                seq = self._enqueue_decided(exclude.rename_ops(
                    self.root, self.excludes, src, dst, flags, bool(moved), replaced))
            self._wait(seq)
            return 0
        return self._simple(o.Rename(op_path(old), op_path(new), flags), self._rename_local,
                            backing_path(old), backing_path(new), flags)

    def _rename_local(self, old: str, new: str, flags: int) -> None:
        _check(_libc.renameat2(self.root, os.fsencode(old), self.root, os.fsencode(new), flags))

    def chmod(self, path: str, mode: int) -> int:
        self._simple(o.Chmod(op_path(path), mode & 0o7777), os.chmod, backing_path(path),
                     mode & 0o7777, dir_fd=self.root)
        if carries(mode, False):
            self._gained_privileges(backing_path(path))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return self._simple(o.Chown(op_path(path), uid, gid), os.chown, backing_path(path), uid,
                            gid, dir_fd=self.root, follow_symlinks=False)

    def utimens_raw(self, path: str, times: int | None) -> int:
        """`times` is the address of the kernel's timespec[2] (UTIME_NOW/OMIT kept) or None."""
        bp = backing_path(path)
        with self.sink.ordered():
            _check(_libc.utimensat(self.root, os.fsencode(bp), times, AT_SYMLINK_NOFOLLOW))
            st = os.stat(bp, dir_fd=self.root, follow_symlinks=False)
            seq = self._enqueue(o.Utimens(op_path(path), st.st_atime_ns, st.st_mtime_ns))
        self._wait(seq)
        return 0

    def setxattr(self, path: str, name: str, value: bytes, options: int, *args: Any) -> int:
        self._simple(o.SetXattr(op_path(path), name, value, options), os.setxattr,
                     self._xpath(path), name, value, options, follow_symlinks=path == "/")
        if name == CAPS:
            self._gained_privileges(backing_path(path))
        return 0

    def removexattr(self, path: str, name: str) -> int:
        return self._simple(o.RemoveXattr(op_path(path), name), os.removexattr, self._xpath(path),
                            name, follow_symlinks=path == "/")
