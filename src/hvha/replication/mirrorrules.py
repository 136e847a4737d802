"""The mirror's pure translation rules: FUSE paths to replicated and backing paths, how an
open(2) is served, who owns a new entry, and the stat dicts the binding wants.

Why a module of its own: these decide what the peer receives and are tested without a mount;
mirrorfs.py keeps only the handlers with their side effects.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple


def op_path(path: str) -> str:
    """FUSE path ("/a/b", "/") -> replicated path ("a/b", "")."""
    return path[1:]


def backing_path(path: str) -> str:
    """FUSE path -> path relative to the root descriptor ("." for the root)."""
    return path[1:] or "."


_STRIPPED_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_APPEND


class OpenPlan(NamedTuple):
    """How to serve an open(2) the kernel passed with `flags`."""

    flags: int  # for the backing open: no O_DIRECT (unaligned buffers), no O_APPEND (the
    #             kernel puts the append offset in each write, the Write op must carry it)
    direct_io: bool  # FOPEN_DIRECT_IO: O_DIRECT callers, and write-only handles (see below)
    sync_writes: bool  # O_SYNC/O_DSYNC: each write durable on both nodes before it returns
    truncates: bool  # O_TRUNC on a writable open: replicate a Truncate to 0


def open_plan(flags: int) -> OpenPlan:
    """A write-only handle bypasses the kernel's page cache of the mount (FOPEN_DIRECT_IO):
    nothing can read or mmap(2) through it, and each write then costs one request instead of
    two (the cached path asks for security.capability before every write) and one copy less.
    Read-write handles stay cached: shared writable mmap (SQLite's -shm) needs the cache."""
    direct = bool(flags & os.O_DIRECT) or (flags & os.O_ACCMODE) == os.O_WRONLY
    return OpenPlan((flags & ~_STRIPPED_OPEN_FLAGS) | os.O_CLOEXEC, direct,
                    bool(flags & os.O_DSYNC),
                    bool(flags & os.O_TRUNC) and (flags & os.O_ACCMODE) != os.O_RDONLY)


def creation_owner(ctx_uid: int, ctx_gid: int, parent_mode: int,
                   parent_gid: int) -> tuple[int, int]:
    """Owner of a new entry: the caller, with the parent's group under a setgid directory."""
    return ctx_uid, (parent_gid if parent_mode & stat.S_ISGID else ctx_gid)


def creation_mode(mode: int, umask: int, inherits: bool) -> int:
    """Permission bits to create an entry with: the caller's umask applies unless the parent
    directory has a default ACL (`inherits`: POSIX lets the ACL decide instead)."""
    return mode & 0o7777 if inherits else mode & 0o7777 & ~umask


def lost_mode_bits(requested: int, actual: int) -> int:
    """Permission bits the caller asked for but the daemon's own umask removed."""
    return requested & 0o777 & ~actual


def dirent_type(e: os.DirEntry[str]) -> int:
    if e.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if e.is_symlink():
        return stat.S_IFLNK
    return stat.S_IFREG if e.is_file(follow_symlinks=False) else 0


def stat_dict(st: os.stat_result) -> dict[str, int]:
    return {"st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
            "st_blocks": st.st_blocks, "st_blksize": st.st_blksize, "st_rdev": st.st_rdev,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}
