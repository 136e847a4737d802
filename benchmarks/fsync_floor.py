"""The floor for replicated 4 KiB write+fsync on a machine where both copies share one disk.

Why: the lab's two nodes write to the same virtual disk, so each replicated fsync is two
fsyncs of that disk at about the same moment. This measures what the disk alone allows: one
thread doing 4 KiB pwrite + fsync (the raw baseline of benchmarks/replication.py), against
two threads doing the same to two files in lockstep (a barrier before each pair, as the
primary's and the secondary's fsyncs of one replicated fsync). The ratio of the two is the
best a perfect replicator could reach on this machine (docs/benchmarks.md, session 10).

Run: `.venv/bin/python benchmarks/fsync_floor.py [--n 3000] [--dir /var/tmp]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

BLOCK = 4096


def _file(d: str, name: str) -> int:
    fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, bytes(256 * BLOCK), 0)
    os.fsync(fd)
    return fd


def single(d: str, n: int, sync: Callable[[int], None]) -> float:
    fd, buf = _file(d, "a"), os.urandom(BLOCK)
    t = time.perf_counter()
    for i in range(n):
        os.pwrite(fd, buf, (i % 256) * BLOCK)
        sync(fd)
    os.close(fd)
    return n / (time.perf_counter() - t)


def pairs(d: str, n: int) -> float:
    fds, buf, bar = (_file(d, "a"), _file(d, "b")), os.urandom(BLOCK), threading.Barrier(2)

    def run(fd: int) -> None:
        for i in range(n):
            bar.wait()
            os.pwrite(fd, buf, (i % 256) * BLOCK)
            os.fsync(fd)
    t = time.perf_counter()
    other = threading.Thread(target=run, args=(fds[1],))
    other.start()
    run(fds[0])
    other.join()
    for fd in fds:
        os.close(fd)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="writes per measurement")
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="hvha-fsync-floor-", dir=a.dir)
    try:
        for r in range(a.rounds):
            one = single(d, a.n, os.fsync)
            data = single(d, a.n, os.fdatasync)
            two = pairs(d, a.n)
            print(f"round {r + 1}: one writer {one:,.0f} ops/s (fdatasync {data:,.0f}); "
                  f"two in lockstep {two:,.0f} pairs/s; ceiling for a replicated fsync "
                  f"{two / one:.2f} of raw")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
