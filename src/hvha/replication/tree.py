"""Safe read access to a replicated tree below one directory descriptor (TreeReader).

Why: both nodes read their copy through it (the secondary's applier extends it with the
ops, TreeWriter): every path is checked and resolved one component at a time with O_NOFOLLOW
below a directory descriptor, so a symlink inside the tree never leads outside it. It also
answers the resync's queries (protocol.serve) from that tree.
"""

from __future__ import annotations

import contextlib
import os
import stat as st
from collections import OrderedDict
from pathlib import Path

from hvha.replication import protocol
from hvha.replication.hashing import hash_ranges
from hvha.replication.ops import check_path
from hvha.replication.protocol import Entry, HashResult, Ranges, kind_of_mode

_O_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class TreeReader:
    """Read access to a tree below one directory descriptor (not thread-safe: one per thread)."""

    MAX_DIRS = 512
    MAX_FILES = 256

    def __init__(self, root: str | Path | int, writable: bool = False) -> None:
        if isinstance(root, int):
            self.root_fd = os.dup(root)
        else:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.writable = writable
        self._dirs: OrderedDict[str, int] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        for fd in self._files.values():
            self._close_file(fd)
        self._dirs.clear()
        self._files.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> TreeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dir_fd(self, dpath: str) -> int:
        if dpath == "":
            return self.root_fd
        fd = self._dirs.get(dpath)
        if fd is not None:
            self._dirs.move_to_end(dpath)
            return fd
        parent, _, name = dpath.rpartition("/")
        pfd = self.dir_fd(parent)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _O_FLAGS, dir_fd=pfd)
        self._dirs[dpath] = fd
        if len(self._dirs) > self.MAX_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of a non-root path."""
        if check_path(path) == "":
            raise ValueError("the replicated root itself has no parent")
        d, _, name = path.rpartition("/")
        return self.dir_fd(d), name

    def file_fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is not None:
            self._files.move_to_end(path)
            return fd
        pfd, name = self.parent(path)
        fd = os.open(name, (os.O_RDWR if self.writable else os.O_RDONLY) | _O_FLAGS, dir_fd=pfd)
        self._files[path] = fd
        if len(self._files) > self.MAX_FILES:
            self._close_file(self._files.popitem(last=False)[1])
        return fd

    def _close_file(self, fd: int) -> None:
        os.close(fd)

    def current_fd(self, path: str) -> int:
        """file_fd(path), checked to still be the file that path names now (it may have been
        renamed or replaced since it was opened): a stat, not a close and an open."""
        fd = self._files.get(path)
        if fd is not None:
            pfd, name = self.parent(path)
            now, cached = os.stat(name, dir_fd=pfd, follow_symlinks=False), os.fstat(fd)
            if (now.st_ino, now.st_dev) == (cached.st_ino, cached.st_dev):
                self._files.move_to_end(path)
                return fd
            self.forget(path)
        return self.file_fd(path)

    def forget(self, path: str) -> None:
        """Drop cached descriptors of path and everything below it (after rename/unlink)."""
        prefix = path + "/"
        for cache, close in ((self._files, self._close_file), (self._dirs, os.close)):
            for p in [p for p in cache if p == path or p.startswith(prefix) or path == ""]:
                close(cache.pop(p))

    def _entry(self, dfd: int, name: str) -> Entry:
        s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        kind = kind_of_mode(s.st_mode)
        target = os.readlink(name, dir_fd=dfd) if kind == "l" else ""
        return Entry(name, kind, st.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                     s.st_size if kind == "f" else 0, s.st_mtime_ns, s.st_ino, s.st_nlink,
                     target)

    def stat(self, path: str) -> Entry | None:
        try:
            if check_path(path) == "":
                return self._entry(self.root_fd, ".")
            pfd, name = self.parent(path)
            return self._entry(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_dir(self, path: str, start: int = 0, limit: int = 20000) -> tuple[list[Entry], bool]:
        """Entries of a directory, sorted by name, from index start; (entries, more?)."""
        dfd = self.dir_fd(check_path(path))
        names = sorted(os.listdir(dfd))
        out = []
        for name in names[start:start + limit]:
            with contextlib.suppress(FileNotFoundError):
                out.append(self._entry(dfd, name))
        return out, start + limit < len(names)

    def hashes(self, path: str, ranges: Ranges, bs: int) -> bytes:
        """16 bytes per block of `bs` bytes over each (offset, length) range, ZERO for holes,
        zero-filled blocks and blocks beyond the end of the file (see hashing)."""
        fd = self.file_fd(path)
        return hash_ranges(fd, ranges, bs, os.fstat(fd).st_size)

    def hash_many(self, items: list[tuple[str, Ranges]], bs: int) -> list[HashResult]:
        """hashes() of many files: per item its digests, or why it has none (a message).
        Each file is opened for this call only (O_NONBLOCK: a fifo put in a file's place
        cannot hang the caller) and must be a regular file."""
        out: list[HashResult] = []
        for path, ranges in items:
            try:
                pfd, name = self.parent(path)
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _O_FLAGS, dir_fd=pfd)
                try:
                    s = os.fstat(fd)
                    if not st.S_ISREG(s.st_mode):
                        raise ValueError(f"{path}: not a regular file")
                    out.append(hash_ranges(fd, ranges, bs, s.st_size))
                finally:
                    os.close(fd)
            except (OSError, ValueError) as exc:
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    def query(self, payload: bytes) -> bytes:
        """Serve one QUERY payload (JSON) and return the REPLY payload: status byte 0 + body,
        or 1 + UTF-8 error message (see protocol)."""
        return protocol.serve(self, payload)
