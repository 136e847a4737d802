"""The primary's own disk failing: sticky fsync errors, and the fault the agent fails over on.

Why: after a failed writeback the kernel marks the pages clean and reports the error to one
fsync only; a later fsync of the same file returns 0 although the data never reached the disk
(PostgreSQL's "fsyncgate"). An application that retries would take that 0 for durability. And
a primary whose disk fails should hand the module to an in-sync peer, whose copy holds every
acknowledged write. So the first local I/O failure of a mirror (any failed fsync, or EIO from
a read or write) latches: every later fsync of that mount fails with the same errno, and the
replicated directory reports the fault (its data is then not OK: the agent hands over, see
agent/fsm.py, and the next resync into this copy compares everything). The secondary's applier
latches its own disk's failures the same way: a resync into a disk that drops writes could
otherwise end "in sync" on fsyncs that returned 0.

Failures that say nothing about the device stay ordinary errors for the caller: ENOSPC or
EDQUOT from a write (a full file system), EBADF, EINVAL, and so on. Pure bookkeeping; the
handlers in mirrordata.py call it around their local I/O.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("hvha.replication")

#: local operations whose every failure means data may be lost (writeback errors surface here)
_FLUSHES = frozenset({"fsync", "fdatasync", "fsyncdir", "syncfs"})


def is_device_fault(what: str, err: int) -> bool:
    """Whether the failure of local operation `what` with `err` means the disk failed."""
    if what in _FLUSHES:
        return err != errno.EINTR
    return err == errno.EIO


class FaultLatch:
    """The first device fault of a mirror mount or an applier; `on_fault(text)` is told once
    (any thread) until `reset`."""

    def __init__(self, on_fault: Callable[[str], None] | None = None) -> None:
        self._on_fault = on_fault
        self._lock = threading.Lock()
        self.listeners: list[Callable[[], None]] = []  # also told when it latches (express.py)
        self.errno = 0
        self.text = ""

    def note(self, what: str, path: str | None, exc: OSError) -> None:
        """Local operation `what` on `path` failed with `exc`: latch it if it is a fault."""
        err = exc.errno or errno.EIO
        if not is_device_fault(what, err):
            return
        with self._lock:
            if self.errno:
                return
            self.errno = err
            self.text = (f"local {what} of {path or '?'} failed: {errno.errorcode.get(err, err)}"
                         f" ({exc.strerror or exc})")
        log.error("replication: %s; this copy is suspect until an operator says the disk is "
                  "repaired (a primary's later fsyncs fail, it hands over to an in-sync peer)",
                  self.text)
        for fn in self.listeners:
            fn()
        if self._on_fault is not None:
            self._on_fault(self.text)

    def reset(self) -> None:
        """The operator repaired the disk (dirops.clear_fault): latch the next fault again."""
        with self._lock:
            self.errno, self.text = 0, ""

    def check(self) -> None:
        """Raise the latched error: a flush after a fault never reports success."""
        if self.errno:
            raise OSError(self.errno, f"the disk under this mirror failed earlier ({self.text})")


def load(path: Path) -> str:
    """The fault recorded in `path` by `persist` ("" if none)."""
    try:
        return path.read_text(errors="replace").strip() or "local disk failed"
    except FileNotFoundError:
        return ""


def persist(path: Path, text: str) -> None:
    """Record a fault (0600, fsynced) so that a restart still knows this copy is suspect. The
    state directory may sit on the failing disk: a failure here is logged, and the fault then
    lives in memory only (the primary.active marker still makes the next resync compare
    everything)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("replication: could not record the local fault in %s: %s", path, exc)


def drop_cached(root: Path) -> int:
    """Drop the page cache of every file under `root`; the number of files. After a failed
    writeback the kernel keeps the unwritten data in cache pages marked clean: reads return it,
    the disk does not hold it. Dropped, reads come from the disk, so the full compare of the
    next resync sees what this copy really holds (and rewrites what was lost)."""
    os.sync()  # dirty pages cannot be dropped: written (or failed, then clean) first
    count = 0
    for dirpath, _dirs, files, dfd in os.fwalk(root):
        for name in files:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:  # a symlink, a FIFO, gone: nothing cached to drop
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            except OSError as exc:
                log.warning("replication: could not drop the cache of %s/%s: %s", dirpath, name,
                            exc)
            finally:
                os.close(fd)
    return count
