"""Test doubles for the replication sink, a reference replay of ops, and a tree comparison.

Why it exists: the mirror fs tests need to prove that the op stream alone reproduces the backing
directory. `replay` is a deliberately simple, independent applier (plain syscalls on a second
directory); `tree_state` captures everything a user would call "the same files" so two trees can
be compared with one `==`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hvha.replication.mount import MirrorMount, is_mounted
from hvha.replication.ops import (
    Chmod,
    Chown,
    Create,
    Fallocate,
    Fsync,
    Link,
    Mkdir,
    Op,
    RemoveXattr,
    Rename,
    Rmdir,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
    check_path,
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def _ok(ret: int) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def replay(op: Op, root: str) -> None:
    """Apply one op to the plain directory `root` (as the secondary would)."""
    for p in (getattr(op, a) for a in ("path", "old", "new", "existing") if hasattr(op, a)):
        if p is not None:
            check_path(p)
    j = os.path.join
    if isinstance(op, Create):
        fd = os.open(j(root, op.path), os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        os.fchmod(fd, op.mode)
        os.close(fd)
    elif isinstance(op, Write):
        fd = os.open(j(root, op.path), os.O_WRONLY)
        try:
            os.pwrite(fd, op.data, op.offset)
        finally:
            os.close(fd)
    elif isinstance(op, Truncate):
        os.truncate(j(root, op.path), op.size)
    elif isinstance(op, Fallocate):
        fd = os.open(j(root, op.path), os.O_WRONLY)
        try:
            _ok(_libc.fallocate(fd, op.mode, op.offset, op.length))
        finally:
            os.close(fd)
    elif isinstance(op, Rename):
        if op.flags:
            _ok(_libc.renameat2(-100, os.fsencode(j(root, op.old)), -100,
                                os.fsencode(j(root, op.new)), op.flags))
        else:
            os.rename(j(root, op.old), j(root, op.new))
    elif isinstance(op, Unlink):
        os.unlink(j(root, op.path))
    elif isinstance(op, Mkdir):
        os.mkdir(j(root, op.path))
        os.chmod(j(root, op.path), op.mode)
    elif isinstance(op, Rmdir):
        os.rmdir(j(root, op.path))
    elif isinstance(op, Symlink):
        os.symlink(op.target, j(root, op.path))
    elif isinstance(op, Link):
        os.link(j(root, op.existing), j(root, op.new), follow_symlinks=False)
    elif isinstance(op, Chmod):
        os.chmod(j(root, op.path), op.mode)
    elif isinstance(op, Chown):
        os.chown(j(root, op.path), op.uid, op.gid, follow_symlinks=False)
    elif isinstance(op, Utimens):
        os.utime(j(root, op.path), ns=(op.atime_ns, op.mtime_ns), follow_symlinks=False)
    elif isinstance(op, SetXattr):
        os.setxattr(j(root, op.path), op.name, op.value, op.flags, follow_symlinks=False)
    elif isinstance(op, RemoveXattr):
        os.removexattr(j(root, op.path), op.name, follow_symlinks=False)
    elif isinstance(op, Fsync):
        pass
    else:  # pragma: no cover - a new op type must be taught here
        raise TypeError(f"unknown op {op!r}")


class ReplaySink:
    """Records every op and replays it onto `replica` in sequence order (under the order lock).

    `hold` blocks wait() until `release` is set; `fail_wait` makes wait() raise EIO."""

    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.waited: list[int] = []
        self.errors: list[str] = []
        self.hold = False
        self.release = threading.Event()
        self.fail_wait = False

    @contextmanager
    def ordered(self) -> Iterator[None]:
        with self.lock:
            yield

    def enqueue(self, op: Op) -> int:
        assert self.lock.locked(), "enqueue outside ordered()"
        self.ops.append(op)
        if self.replica is not None:
            try:
                replay(op, self.replica)
            except OSError as e:
                self.errors.append(f"{op!r}: {e}")
        return len(self.ops)

    def wait(self, seq: int) -> None:
        if self.hold:
            self.release.wait(30)
        if self.fail_wait:
            raise OSError(5, "peer lost")
        self.waited.append(seq)


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_state(root: str) -> dict[str, tuple[object, ...]]:
    """Everything that must match between primary and replica, per relative path: type, mode,
    owner, size, content hash / link target, link count, user xattrs, and which names share an
    inode (hard links)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                content: object = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                content = _file_hash(full)
                inodes.setdefault(st.st_ino, []).append(rel)
            else:
                content = None
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(
                (n, os.getxattr(full, n)) for n in os.listxattr(full) if n.startswith("user.")))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        size, content, st.st_nlink, xattrs)
    for names in inodes.values():
        for n in names:
            out[n] = (*out[n], tuple(sorted(names)))
    return out


@contextmanager
def serving(mount: MirrorMount) -> Iterator[MirrorMount]:
    """A started mirror mount, stopped (and lazily unmounted if it had to be) afterwards."""
    mount.start()
    try:
        yield mount
    finally:
        mount.stop()
        if is_mounted(mount.path):
            subprocess.run(["umount", "-l", mount.path], check=False)
    assert not is_mounted(mount.path)
