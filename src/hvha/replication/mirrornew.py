"""New entries of the mirror: create, mkdir, mknod, symlink (a mixin of MirrorFS).

Why a module of its own: who owns a new entry and which permission bits it gets decide what
an application may do with it on both nodes, and the rules are POSIX's: the creator's uid,
the parent's group under a setgid directory, the requested mode less the creator's umask,
unless the parent has a default ACL, which then decides instead (the kernel passes the mode
unmasked with the umask: FUSE_CAP_DONT_MASK, mount.py). The daemon's own umask must not leak
into that; `_own_new` repairs what it removed. Each entry is created here and streamed with
its mode and owner under the order lock, as every other change (mirrorfs.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import mfusepy  # type: ignore[import-untyped]

from hvha.replication import ops as o
from hvha.replication.exclude import Excludes
from hvha.replication.mirrordata import ReplicationSink, _fail
from hvha.replication.mirrorrules import (
    OpenPlan,
    backing_path,
    creation_mode,
    creation_owner,
    lost_mode_bits,
    op_path,
    open_plan,
)
from hvha.replication.ops import Op

log = logging.getLogger("hvha.replication.mirrorfs")
ACL_DEFAULT = "system.posix_acl_default"


def _caller_umask() -> int:
    """The umask of the process whose request this thread serves (libfuse's fuse_context)."""
    return int(mfusepy._libfuse.fuse_get_context().contents.umask)


class NewEntries:
    """create / mkdir / mknod / symlink of MirrorFS; needs the attributes and helpers below."""

    root: int
    sink: ReplicationSink
    excludes: Excludes
    _euid: int
    _egid: int

    def _xpath(self, path: str) -> str:
        raise NotImplementedError

    def _enqueue(self, op: Op, *, decided: bool = False,
                 push: Callable[[Op], int] | None = None) -> int:
        raise NotImplementedError

    def _wait(self, seq: int) -> None:
        raise NotImplementedError

    def _setup_handle(self, fi: Any, fd: int, plan: OpenPlan) -> None:
        raise NotImplementedError

    def _drop_privileges(self, name: str | None, fd: int) -> list[Op]:
        raise NotImplementedError

    def _requested(self, path: str, mode: int) -> tuple[int, bool]:
        """The mode to create `path` with, and whether its parent has a default ACL. The
        kernel passes the caller's mode unmasked (FUSE_CAP_DONT_MASK, mount.py) with its
        umask: as on a local file system, the umask applies unless the parent has a default
        ACL, which then decides (the backing file system applies it)."""
        parent = path.rsplit("/", 1)[0] or "/"
        try:
            inherits = bool(os.getxattr(self._xpath(parent), ACL_DEFAULT,
                                        follow_symlinks=parent == "/"))
        except OSError:
            inherits = False
        return creation_mode(mode, _caller_umask(), inherits), inherits

    def _own_new(self, path: str, st: os.stat_result, requested_mode: int,
                 inherits: bool = False) -> list[Op]:
        """Fix the daemon umask and ownership of a just-created entry; ops that replicate it.
        (Under a default ACL the daemon's umask was not applied: nothing to fix.)"""
        bp = backing_path(path)
        pending: list[Op] = []
        lost = 0 if inherits else lost_mode_bits(requested_mode, st.st_mode)
        if lost and not stat.S_ISLNK(st.st_mode):
            os.chmod(bp, (st.st_mode & 0o7777) | lost, dir_fd=self.root)
        uid, gid, _ = mfusepy.fuse_get_context()
        pst = os.stat(backing_path(path.rsplit("/", 1)[0] or "/"), dir_fd=self.root)
        uid, gid = creation_owner(uid, gid, pst.st_mode, pst.st_gid)
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.chown(bp, uid, gid, dir_fd=self.root, follow_symlinks=False)
        if (uid, gid) != (self._euid, self._egid):
            pending.append(o.Chown(op_path(path), uid, gid))
        return pending

    def create(self, path: str, mode: int, fi: Any) -> int:
        bp, plan = backing_path(path), open_plan(fi.flags)
        pending: list[Op] = []
        mode, inherits = self._requested(path, mode)
        with self.sink.ordered():
            try:
                fd = os.open(bp, plan.flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=self.root)
            except FileExistsError:
                if fi.flags & os.O_EXCL:
                    raise
                fd = os.open(bp, plan.flags, dir_fd=self.root)  # lost a race: plain open
                if plan.truncates:
                    pending += [o.Truncate(op_path(path), 0),
                                *self._drop_privileges(op_path(path), fd)]
            else:
                try:
                    st = os.fstat(fd)
                    own = self._own_new(path, st, mode, inherits)
                    pending = [o.Create(op_path(path), (st.st_mode & 0o7777) | (
                        0 if inherits else lost_mode_bits(mode, st.st_mode))), *own]
                except BaseException:
                    os.close(fd)
                    raise
            self._setup_handle(fi, fd, plan)
            seqs = [self._enqueue(op) for op in pending]
        if seqs:
            self._wait(seqs[-1])
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        """FIFOs and sockets where `exclude` says so (they live here only); nothing else."""
        if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and self.excludes.excluded(op_path(path)):
            perm, inherits = self._requested(path, mode)
            with self.sink.ordered():
                os.mknod(backing_path(path), stat.S_IFMT(mode) | perm, dir_fd=self.root)
                st = os.stat(backing_path(path), dir_fd=self.root, follow_symlinks=False)
                self._own_new(path, st, perm, inherits)  # the caller's; the ops stay here
            return 0
        log.warning("refusing to create special file %s (mode %o): devices cannot be replicated;"
                    " FIFOs and sockets can live here if an `exclude` pattern of the replicated "
                    "directory matches them (e.g. \"*.sock\")", path, mode)
        raise _fail(errno.EPERM)

    def _new_entry(self, path: str, mode: int, local: Callable[[str], None],
                   op_of: Callable[[os.stat_result], Op], inherits: bool = False) -> int:
        bp = backing_path(path)
        with self.sink.ordered():
            local(bp)
            st = os.stat(bp, dir_fd=self.root, follow_symlinks=False)
            seqs = [self._enqueue(op)
                    for op in (op_of(st), *self._own_new(path, st, mode, inherits))]
        self._wait(seqs[-1])
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        mode, inherits = self._requested(path, mode)
        return self._new_entry(path, mode, lambda bp: os.mkdir(bp, mode, dir_fd=self.root),
                               lambda st: o.Mkdir(op_path(path), (st.st_mode & 0o7777) | (
                                   0 if inherits else lost_mode_bits(mode, st.st_mode))),
                               inherits)

    def symlink(self, path: str, target: str) -> int:
        return self._new_entry(path, 0, lambda bp: os.symlink(target, bp, dir_fd=self.root),
                               lambda st: o.Symlink(target, op_path(path)))
