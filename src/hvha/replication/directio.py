"""Large aligned writes go straight to the disk (O_DIRECT), past the backing page cache.

Why: a replicated byte is written twice, once into the primary's backing file and once into
the secondary's copy. Through the page cache, each 1 MiB costs a copy into freshly allocated
cache pages: 1.6-3.1 ms of CPU per MiB on the lab machine, against 0.1 ms with O_DIRECT
(docs/benchmarks.md, session 6). DRBD's secondary writes to its backing device the same way.
The caches that serve reads stay: the mount's own page cache on the primary (read-write
handles) and whatever the app keeps; only the backing file's second copy is skipped.

Only the 4 KiB-aligned middle of a write of at least `min_size` bytes goes direct; its
unaligned head and tail, and small writes, stay buffered. The kernel keeps the two coherent on
one inode (a direct write first writes back and drops the cached pages of its range). The
data is copied into an aligned per-thread buffer (the binding's and the frame's buffers are
not aligned); that copy goes to memory that stays mapped, so it is cheap. A file system that
refuses O_DIRECT (EINVAL at open or at the first write) is served buffered from then on.
Durability still comes from the fsync barriers: a direct write may sit in the disk's cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading

ALIGN = 4096
#: Writes shorter than this stay buffered (a direct write waits for the device)
DIRECT_MIN = 128 * 1024
_BOUNCE = 1 << 20


class DirectWriter:
    """pwrite() that sends the aligned middle of large writes through an O_DIRECT twin of the
    descriptor. The owner calls forget(fd) before it closes fd, and close() at the end."""

    def __init__(self, enabled: bool = True, min_size: int = DIRECT_MIN) -> None:
        self.enabled = enabled
        self.min_size = max(min_size, ALIGN)
        self._twins: dict[int, int] = {}  # fd -> its O_DIRECT twin, -1: refused
        self._lock = threading.Lock()
        self._local = threading.local()

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """os.pwrite(fd, data, offset), with the aligned middle of a large write sent direct.
        Same contract: returns how many bytes were written (short only where the disk fell
        short, e.g. ENOSPC part way), raises only when nothing was written."""
        view = memoryview(data)
        n = len(view)
        head = -offset % ALIGN
        body = (n - head) & ~(ALIGN - 1) if n > head else 0
        if not self.enabled or n < self.min_size or body == 0:
            return os.pwrite(fd, view, offset)
        twin = self._twin(fd)
        if twin < 0:
            return os.pwrite(fd, view, offset)
        done = 0
        try:
            if head:
                done = os.pwrite(fd, view[:head], offset)
                if done < head:
                    return done
            done += self._direct(fd, twin, view[head:head + body], offset + head)
            if done < head + body:  # refused or fell short: try the rest buffered
                return done + os.pwrite(fd, view[done:], offset + done)
            if done < n:
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError:
            if done == 0:
                raise
        return done

    def _direct(self, fd: int, twin: int, view: memoryview, offset: int) -> int:
        """Write the aligned view through twin, through the aligned bounce buffer; returns
        how much went (less than all if the file system refuses O_DIRECT, or a write fell
        short). An error after some progress ends the call with that progress."""
        buf = self._bounce()
        done = 0
        while done < len(view):
            k = min(len(view) - done, len(buf))
            buf[:k] = view[done:done + k]
            try:
                w = os.pwrite(twin, buf[:k], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    self._refuse(fd)
                elif done == 0:
                    raise
                return done
            done += w
            if w < k:
                return done
        return done

    def _bounce(self) -> memoryview:
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = memoryview(mmap.mmap(-1, _BOUNCE))
            self._local.buf = buf
        return buf

    def _twin(self, fd: int) -> int:
        twin = self._twins.get(fd)
        if twin is not None:
            return twin
        try:  # regular files only (reopening a FIFO for writing could block)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            twin = os.open(f"/proc/self/fd/{fd}",
                           os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:  # EINVAL: no O_DIRECT here; EPERM (append-only) and the like
            twin = -1
        with self._lock:
            old = self._twins.setdefault(fd, twin)
        if old != twin and twin >= 0:  # another thread was first
            os.close(twin)
        return old

    def _refuse(self, fd: int) -> None:
        with self._lock:
            twin = self._twins.get(fd, -1)
            self._twins[fd] = -1
        if twin >= 0:
            os.close(twin)

    def forget(self, fd: int) -> None:
        """fd is about to be closed: close its twin (the number will name another file)."""
        with self._lock:
            twin = self._twins.pop(fd, -1)
        if twin >= 0:
            os.close(twin)

    def close(self) -> None:
        with self._lock:
            twins, self._twins = list(self._twins.values()), {}
        for twin in twins:
            if twin >= 0:
                os.close(twin)
