"""Applies replicated ops to the secondary's copy, below one directory descriptor.

Why a module of its own: the applier (applier.py) serves sessions; this is what it does to
the disk for each op, and what the resync and the benchmarks use to apply ops directly. Every
path goes through ops.check_path and is resolved component by component with O_NOFOLLOW below
the directory descriptor (blocks.TreeReader), so an authenticated peer still cannot write
outside the replicated directory. Large writes go direct (directio.py). The native lane
(native/lane.c) applies Writes and Fsyncs of files it has open itself, to the same rules.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from pathlib import Path

from hvha.replication import ops
from hvha.replication.blocks import TreeReader
from hvha.replication.directio import DirectWriter
from hvha.replication.ops import check_path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


class TreeWriter(TreeReader):
    """Applies ops below the directory descriptor; remembers the directories whose entries
    changed since the last barrier so an Fsync also makes those names durable."""

    def __init__(self, root: str | Path | int) -> None:
        super().__init__(root, writable=True)
        self._dirty_dirs: set[str] = set()
        self.direct = DirectWriter()  # large aligned writes skip the page cache

    @property
    def names_pending(self) -> bool:
        """Directories whose entries changed since the last barrier (it must fsync them)."""
        return bool(self._dirty_dirs)

    def _close_file(self, fd: int) -> None:
        self.direct.forget(fd)
        os.close(fd)

    def _touch(self, path: str) -> None:
        self._dirty_dirs.add(path.rpartition("/")[0])

    def _meta_fd(self, path: str) -> int:
        if check_path(path) == "":
            return os.dup(self.root_fd)
        pfd, name = self.parent(path)
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)

    def _remove(self, pfd: int, name: str) -> None:
        s = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(s.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{name}: a directory is in the way")
        os.unlink(name, dir_fd=pfd)

    def write_at(self, path: str, offset: int, data: bytes | memoryview) -> None:
        """A Write, from any buffer (the applier passes a view of the received frame)."""
        fd, view = self.file_fd(check_path(path)), memoryview(data)
        while view:
            n = self.direct.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def apply(self, op: ops.Op) -> None:
        for p in ops.paths_of(op):
            check_path(p)
        if isinstance(op, ops.Write):
            self.write_at(op.path, op.offset, op.data)
        elif isinstance(op, ops.Fsync):
            self._barrier(op)
        elif isinstance(op, ops.Truncate):
            os.ftruncate(self.file_fd(op.path), op.size)
        elif isinstance(op, ops.Fallocate):
            fd = self.file_fd(op.path)
            _check(_libc.fallocate(fd, op.mode, op.offset, op.length), f"fallocate {op.path}")
        elif isinstance(op, ops.Create):
            pfd, name = self.parent(op.path)
            self.forget(op.path)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, 0o600, dir_fd=pfd)
            except FileExistsError:
                self._remove(pfd, name)
                fd = os.open(name, flags, 0o600, dir_fd=pfd)
            os.fchmod(fd, op.mode & 0o7777)
            self._files[op.path] = fd
            self._touch(op.path)
        elif isinstance(op, ops.Rename):
            po, old = self.parent(op.old)
            pn, new = self.parent(op.new)
            self.forget(op.old)
            self.forget(op.new)
            if op.flags:
                _check(_libc.renameat2(po, os.fsencode(old), pn, os.fsencode(new), op.flags),
                       f"rename {op.old} -> {op.new}")
            else:
                os.rename(old, new, src_dir_fd=po, dst_dir_fd=pn)
            self._touch(op.old)
            self._touch(op.new)
        elif isinstance(op, ops.Unlink | ops.Rmdir):
            pfd, name = self.parent(op.path)
            self.forget(op.path)
            with contextlib.suppress(FileNotFoundError):
                if isinstance(op, ops.Unlink):
                    os.unlink(name, dir_fd=pfd)
                else:
                    os.rmdir(name, dir_fd=pfd)
            self._touch(op.path)
        elif isinstance(op, ops.Mkdir):
            pfd, name = self.parent(op.path)
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                    raise
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                os.fchmod(fd, op.mode & 0o7777)
            finally:
                os.close(fd)
            self._touch(op.path)
        elif isinstance(op, ops.Symlink):
            pfd, name = self.parent(op.path)
            self.forget(op.path)
            try:
                os.symlink(op.target, name, dir_fd=pfd)
            except FileExistsError:
                self._remove(pfd, name)
                os.symlink(op.target, name, dir_fd=pfd)
            self._touch(op.path)
        elif isinstance(op, ops.Link):
            pe, old = self.parent(op.existing)
            pn, new = self.parent(op.new)
            self.forget(op.new)
            try:
                os.link(old, new, src_dir_fd=pe, dst_dir_fd=pn, follow_symlinks=False)
            except FileExistsError:
                a = os.stat(old, dir_fd=pe, follow_symlinks=False)
                b = os.stat(new, dir_fd=pn, follow_symlinks=False)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    self._remove(pn, new)
                    os.link(old, new, src_dir_fd=pe, dst_dir_fd=pn, follow_symlinks=False)
            self._touch(op.new)
        elif isinstance(op, ops.Chown):
            if op.path == "":
                os.fchown(self.root_fd, op.uid, op.gid)
            else:
                pfd, name = self.parent(op.path)
                os.chown(name, op.uid, op.gid, dir_fd=pfd, follow_symlinks=False)
        elif isinstance(op, ops.Utimens):
            ns = (op.atime_ns, op.mtime_ns)
            if op.path == "":
                os.utime(self.root_fd, ns=ns)
            else:
                pfd, name = self.parent(op.path)
                os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
        else:
            self._meta(op)

    def _meta(self, op: ops.Op) -> None:
        """chmod and xattrs, through /proc/self/fd of an O_PATH descriptor (never a symlink's
        target: symlinks have no mode of their own and no user xattrs)."""
        fd = self._meta_fd(ops.paths_of(op)[0])
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return
            proc = f"/proc/self/fd/{fd}"
            if isinstance(op, ops.Chmod):
                os.chmod(proc, op.mode & 0o7777)
            elif isinstance(op, ops.SetXattr):
                os.setxattr(proc, op.name, op.value, op.flags)
            elif isinstance(op, ops.RemoveXattr):
                os.removexattr(proc, op.name)
            else:  # pragma: no cover - every op kind is handled above
                raise ValueError(f"unknown op {op!r}")
        finally:
            os.close(fd)

    def _barrier(self, op: ops.Fsync) -> None:
        if op.path is None:
            _check(_libc.syncfs(self.root_fd), "syncfs")
        else:
            cached = self._files.get(op.path)  # the file its writes just went to: no stat
            e = None if cached is not None else self.stat(op.path)
            if cached is not None or (e is not None and e.kind == "f"):
                fd = cached if cached is not None else self.file_fd(op.path)
                (os.fdatasync if op.datasync else os.fsync)(fd)
            elif e is not None and e.kind == "d":
                os.fsync(self.dir_fd(op.path))
            for d in sorted(self._dirty_dirs):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    os.fsync(self.dir_fd(d))
        self._dirty_dirs.clear()
