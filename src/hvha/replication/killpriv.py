"""Setuid, setgid and file capabilities dropped where FUSE leaves it to the file system.

Why: on a local file system, a write or a truncation by a process without CAP_FSETID clears
the file's setuid bit, and its setgid bit when group-execute is set; any write or truncation
clears its file capabilities (security.capability). Through FUSE the kernel does that for
cached handles, but not for direct-I/O handles (the mirror's write-only and O_DIRECT opens)
nor for an open with O_TRUNC (the truncation is the server's): the server must.
FUSE_HANDLE_KILLPRIV_V2 would say when, but libfuse 3.14 does not pass it on. Without this, a
user allowed to write a setuid file could change it and keep the bit, on both copies.

The rules are pure functions; `drop` applies them to an open file; `Privileged` keeps which open
direct-I/O handles need the check, so the common handle (a file with none of these) costs
nothing and stays on the express path. The data path (mirrordata.py) streams what `drop` did
(Chmod, RemoveXattr) like any other change.
"""

from __future__ import annotations

import os
import stat
import threading

from hvha.replication import ops as o

CAP_FSETID = 4  # capability(7) number
CAPS = "security.capability"


def dropped_mode(mode: int, may_keep: bool) -> int | None:
    """The permission bits a regular file keeps after a write or truncation by a caller that
    has CAP_FSETID (may_keep) or not, as the kernel's should_remove_suid decides: setuid goes,
    setgid goes where group-execute is set (without it, setgid marks mandatory locking).
    None: nothing to drop."""
    if may_keep or not stat.S_ISREG(mode):
        return None
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    return mode & 0o7777 & ~kill if kill else None


def carries(mode: int, has_caps: bool) -> bool:
    """Whether a file has something a write may have to drop."""
    return bool(has_caps or mode & stat.S_ISUID
                or (mode & stat.S_ISGID and mode & stat.S_IXGRP))


def has_fsetid(status: str) -> bool:
    """CAP_FSETID in the effective set of a /proc/PID/status text (False if it is not there)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
            except (IndexError, ValueError):
                return False
    return False


def caller_may_keep(pid: int) -> bool:
    """Whether process `pid` (the FUSE request's caller) has CAP_FSETID; False when it cannot
    be told (gone already): then the bits go, the safe side."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            return has_fsetid(f.read())
    except OSError:
        return False


def has_caps(fd: int) -> bool:
    try:
        return bool(os.getxattr(fd, CAPS))
    except OSError:
        return False


def drop(fd: int, name: str | None, caller_pid: int) -> list[o.Op]:
    """Drop what a write or truncation by process `caller_pid` drops from the open file `fd`;
    the ops that replicate it (none for an unlinked file: `name` None)."""
    mode = dropped_mode(os.fstat(fd).st_mode, caller_may_keep(caller_pid))
    if mode is not None:
        os.fchmod(fd, mode)
    caps = has_caps(fd)
    if caps:
        os.removexattr(fd, CAPS)
    done: list[o.Op] = []
    if name is not None and mode is not None:
        done.append(o.Chmod(name, mode))
    if name is not None and caps:
        done.append(o.RemoveXattr(name, CAPS))
    return done


class Privileged:
    """Open direct-I/O handles that may write (fd -> inode), and those whose file carries
    setuid, setgid with group-execute, or file capabilities: their writes go through Python,
    which drops them first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # FUSE handlers run in several threads
        self._ino: dict[int, int] = {}
        self.flagged: set[int] = set()  # read without the lock: `fd in flagged` is atomic

    def opened(self, fd: int, ino: int, privileged: bool) -> None:
        with self._lock:
            self._ino[fd] = ino
            if privileged:
                self.flagged.add(fd)
            else:
                self.flagged.discard(fd)

    def closed(self, fd: int) -> None:
        with self._lock:
            self._ino.pop(fd, None)
            self.flagged.discard(fd)

    def gained(self, ino: int) -> list[int]:
        """A file gained privileges (chmod, setxattr): its open handles, now flagged."""
        with self._lock:
            fds = [fd for fd, i in self._ino.items() if i == ino and fd not in self.flagged]
            self.flagged.update(fds)
        return fds

    def cleared(self, fd: int) -> None:
        with self._lock:
            self.flagged.discard(fd)
