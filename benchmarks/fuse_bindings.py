"""Which Python FUSE binding should carry the mirror file system? Measure, don't guess.

Why this exists: the mirror fs sits in the write path of every VM disk, so the binding's per-request
cost, largest write request and threading model bound what replication can ever reach. This
benchmark mounts a trivial passthrough (no replication) with each installed binding in a child
process and compares it with the raw disk in the same run, alternating the order every round
(memory-state pitfalls: /work/shared/reference/BENCHMARKING.md) and reporting medians.

Variants: raw (backing dir directly), mfusepy (libfuse3 high level, ctypes, multithreaded loop),
mfusepy-st (same, single-threaded loop: -s), mfusepy-wb (multithreaded + kernel writeback cache),
pyfuse3 (libfuse3 low level, trio, pwrite inline in the event loop), pyfuse3-thr (same, but pwrite
and fsync through trio.to_thread as a blocking replication sink would require), mirrorfs (hvha's
MirrorFS mounted over the directory itself, with a sink that acknowledges at once).

Workloads: `seq` 1 MiB writes of a new file then fsync (MB/s, time includes the fsync);
`sync4k` 4 KiB pwrite+fsync on a preallocated file (ops/s, one writer); `par4k` the same from
4 threads on 4 files (total ops/s). The FS child records the largest write request it got.

    .venv/bin/python benchmarks/fuse_bindings.py --quick      # ~1 min smoke run
    .venv/bin/python benchmarks/fuse_bindings.py              # 1 GiB, 3 rounds (~5 min)
Needs root and /dev/fuse.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
BLOCK = 4096
VARIANTS = ("raw", "mfusepy", "mfusepy-st", "mfusepy-wb", "pyfuse3", "pyfuse3-thr", "mirrorfs")
FUSE_CAP_WRITEBACK_CACHE = 1 << 16


# ---------------------------------------------------------------------------- FS children


class _Stats:
    def __init__(self) -> None:
        self.writes = 0
        self.max_write = 0

    def note(self, n: int) -> None:
        self.writes += 1
        if n > self.max_write:
            self.max_write = n

    def dump(self, path: str) -> None:
        Path(path).write_text(json.dumps({"writes": self.writes, "max_write": self.max_write}))


def serve_mfusepy(backing: str, mnt: str, stats_path: str, threads: bool, wb: bool) -> None:
    import mfusepy

    root = os.open(backing, os.O_PATH | os.O_DIRECTORY)
    stats = _Stats()

    def rel(path: str) -> str:
        return path[1:] or "."

    def attrs(st: os.stat_result) -> dict[str, int]:
        return {"st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
                "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_ctime_ns, "st_blocks": st.st_blocks}

    class Passthrough(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            if wb and conn is not None:
                conn.want |= FUSE_CAP_WRITEBACK_CACHE

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            if fh is not None:
                return attrs(os.fstat(fh))
            return attrs(os.stat(rel(path), dir_fd=root, follow_symlinks=False))

        def readdir(self, path: str, fh: int) -> list[str]:
            fd = os.open(rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
            try:
                return [".", "..", *os.listdir(fd)]
            finally:
                os.close(fd)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(rel(path), os.O_CREAT | os.O_RDWR | os.O_TRUNC, mode, dir_fd=root)

        def open(self, path: str, flags: int) -> int:
            return os.open(rel(path), flags & ~(os.O_DIRECT | os.O_CREAT), dir_fd=root)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            stats.note(len(data))
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            os.truncate(rel(path), length) if fh is None else os.ftruncate(fh, length)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            os.fdatasync(fh) if datasync else os.fsync(fh)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(rel(path), dir_fd=root)
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            return 0

    mfusepy.FUSE(Passthrough(), mnt, foreground=True, nothreads=not threads,
                 allow_other=True, fsname="bench")
    stats.dump(stats_path)


def serve_pyfuse3(backing: str, mnt: str, stats_path: str, threaded: bool) -> None:
    import errno

    import pyfuse3
    import trio

    root = os.open(backing, os.O_PATH | os.O_DIRECTORY)
    stats = _Stats()
    names: dict[int, str] = {}  # flat directory: inode -> name
    root_ino = os.stat(backing).st_ino

    def entry(st: os.stat_result, ino: int) -> Any:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE if ino == root_ino else ino
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, f, getattr(st, f))
        e.st_blksize = 4096
        e.attr_timeout = e.entry_timeout = 1.0
        return e

    def path_of(inode: int) -> str:
        return "." if inode == pyfuse3.ROOT_INODE else names[inode]

    async def run(fn: Any, *a: Any) -> Any:
        if threaded:
            return await trio.to_thread.run_sync(fn, *a)
        return fn(*a)

    class Passthrough(pyfuse3.Operations):  # type: ignore[misc]
        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            try:
                st = os.stat(name, dir_fd=root, follow_symlinks=False)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            names[st.st_ino] = os.fsdecode(name)
            return entry(st, st.st_ino)

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            st = os.stat(path_of(inode), dir_fd=root, follow_symlinks=False)
            return entry(st, st.st_ino)

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            if fields.update_size:
                os.truncate(path_of(inode), attr.st_size) if fh is None else os.ftruncate(
                    fh, attr.st_size)
            return await self.getattr(inode)

        async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            fd = os.open(name, os.O_CREAT | os.O_RDWR | os.O_TRUNC, mode, dir_fd=root)
            st = os.fstat(fd)
            names[st.st_ino] = os.fsdecode(name)
            return pyfuse3.FileInfo(fh=fd), entry(st, st.st_ino)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            fd = os.open(path_of(inode), flags & ~(os.O_DIRECT | os.O_CREAT), dir_fd=root)
            return pyfuse3.FileInfo(fh=fd)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return os.pread(fh, size, off)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            stats.note(len(buf))
            n: int = await run(os.pwrite, fh, buf, off)
            return n

        async def fsync(self, fh: int, datasync: bool) -> None:
            await run(os.fdatasync if datasync else os.fsync, fh)

        async def flush(self, fh: int) -> None:
            return None

        async def release(self, fh: int) -> None:
            os.close(fh)

        async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
            os.unlink(name, dir_fd=root)

        async def forget(self, inode_list: Any) -> None:
            return None

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
            try:
                entries = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for i, n in enumerate(entries[start_id:], start_id):
                st = os.stat(n, dir_fd=root, follow_symlinks=False)
                names[st.st_ino] = n
                if not pyfuse3.readdir_reply(token, os.fsencode(n), entry(st, st.st_ino), i + 1):
                    break

        async def releasedir(self, fh: int) -> None:
            return None

    opts = set(pyfuse3.default_options)
    opts.add("fsname=bench")
    opts.add("allow_other")
    pyfuse3.init(Passthrough(), mnt, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
    stats.dump(stats_path)


def serve_mirrorfs(backing: str) -> None:
    """hvha's MirrorFS over `backing` itself, with a sink that acknowledges at once."""
    import contextlib

    from hvha.replication.mount import MirrorMount, is_mounted

    class NullSink:
        lock = threading.Lock()

        def ordered(self) -> threading.Lock:
            return self.lock

        def enqueue(self, op: object) -> int:
            return 0

        def wait(self, seq: int) -> None:
            return None

    m = MirrorMount(backing, NullSink())  # type: ignore[arg-type]
    m.start()
    with contextlib.suppress(KeyboardInterrupt):
        while is_mounted(backing):
            time.sleep(0.05)
    m.stop()


# ---------------------------------------------------------------------------- harness


def _is_mounted(mnt: str) -> bool:
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class Mounted:
    """One FS child serving `mnt` from `backing`; stop() unmounts and returns its stats."""

    def __init__(self, variant: str, backing: str, mnt: str, stats: str) -> None:
        self.mnt, self.stats = mnt, stats
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", variant, backing, mnt,
                                      stats])
        deadline = time.monotonic() + 15
        while not _is_mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{variant} did not mount {mnt}")
            time.sleep(0.02)

    def stop(self) -> tuple[dict[str, Any], float]:
        subprocess.run(["fusermount3", "-u", self.mnt], check=False)
        if _is_mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], check=False)
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        stats = json.loads(Path(self.stats).read_text()) if os.path.exists(self.stats) else {}
        Path(self.stats).unlink(missing_ok=True)
        return stats, ru.ru_utime + ru.ru_stime


def stamped_chunk(base: bytearray, chunk_index: int) -> bytearray:
    for b in range(0, len(base), BLOCK):
        struct.pack_into("<Q", base, b, chunk_index * (len(base) // BLOCK) + b // BLOCK)
    return base


def seq_write(path: str, total: int, base: bytearray) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(total // MiB):
            os.write(fd, stamped_chunk(base, i))
        os.fsync(fd)
    finally:
        os.close(fd)
    return total / MiB / (time.perf_counter() - t0)


def prepare(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        blob = os.urandom(MiB)
        for _ in range(size // MiB):
            os.write(fd, blob)
        os.fsync(fd)
    finally:
        os.close(fd)


def sync4k(path: str, seconds: float, counter: list[int], slot: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    blocks = os.fstat(fd).st_size // BLOCK
    buf = bytearray(os.urandom(BLOCK))
    n = 0
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            struct.pack_into("<QQ", buf, 0, slot, n)
            os.pwrite(fd, buf, (n * 7919 % blocks) * BLOCK)
            os.fsync(fd)
            n += 1
    finally:
        os.close(fd)
    counter[slot] = n


def run_variant(variant: str, work: str, total: int, seconds: float,
                base: bytearray) -> dict[str, Any]:
    backing, mnt = os.path.join(work, "backing"), os.path.join(work, "mnt")
    os.makedirs(backing, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    target = backing
    m = None
    if variant == "mirrorfs":
        m = Mounted(variant, backing, backing, os.path.join(work, "stats.json"))
    elif variant != "raw":
        m = Mounted(variant, backing, mnt, os.path.join(work, "stats.json"))
        target = mnt
    out: dict[str, Any] = {}
    try:
        for i in range(4):
            prepare(os.path.join(target, f"s{i}"), 16 * MiB)
        out["seq"] = seq_write(os.path.join(target, "big"), total, base)
        os.unlink(os.path.join(target, "big"))
        counter = [0]
        sync4k(os.path.join(target, "s0"), seconds, counter, 0)
        out["sync4k"] = counter[0] / seconds
        counter = [0] * 4
        ts = [threading.Thread(target=sync4k, args=(os.path.join(target, f"s{i}"), seconds,
                                                    counter, i)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out["par4k"] = sum(counter) / seconds
    finally:
        if m is not None:
            stats, cpu = m.stop()
            out["max_write"] = stats.get("max_write", 0)
            out["fs_cpu_s"] = cpu
        shutil.rmtree(backing, ignore_errors=True)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        variant, backing, mnt, stats = sys.argv[2:6]
        if variant == "mirrorfs":
            serve_mirrorfs(backing)
        elif variant.startswith("mfusepy"):
            serve_mfusepy(backing, mnt, stats, threads=variant != "mfusepy-st",
                          wb=variant == "mfusepy-wb")
        else:
            serve_pyfuse3(backing, mnt, stats, threaded=variant == "pyfuse3-thr")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB, 1 round, 1 s per 4k test")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dir", default="/var/tmp", help="where to put the test files (same disk)")
    a = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    total = 128 * MiB if a.quick else 1024 * MiB
    seconds = 1.0 if a.quick else 3.0
    rounds = a.rounds or (1 if a.quick else 3)
    variants = a.variants.split(",")
    base = bytearray(os.urandom(MiB))
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="fusebench-") as work:
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            if r % 2:
                order.reverse()
            for v in order:
                results[v].append(run_variant(v, work, total, seconds, base))
                print(f"round {r + 1} {v}: {results[v][-1]}", file=sys.stderr)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    raw = results.get("raw")

    def med(v: str, k: str) -> float:
        return statistics.median(x.get(k, 0) for x in results[v])

    print(f"{'variant':<12} {'seq MB/s':>9} {'x raw':>6} {'4k fsync/s':>11} {'x raw':>6} "
          f"{'4x4k/s':>8} {'x raw':>6} {'max write':>10} {'FS cpu s':>8}")
    for v in variants:
        row = f"{v:<12} {med(v, 'seq'):9.0f} "
        row += f"{med(v, 'seq') / med('raw', 'seq'):6.2f} " if raw else f"{'':6} "
        row += f"{med(v, 'sync4k'):11.0f} "
        row += f"{med(v, 'sync4k') / med('raw', 'sync4k'):6.2f} " if raw else f"{'':6} "
        row += f"{med(v, 'par4k'):8.0f} "
        row += f"{med(v, 'par4k') / med('raw', 'par4k'):6.2f} " if raw else f"{'':6} "
        row += f"{int(med(v, 'max_write')):>10} {med(v, 'fs_cpu_s'):8.1f}"
        print(row)
    print(f"medians of {rounds} round(s), {total // MiB} MiB sequential, {seconds:.0f} s per 4k "
          f"test; writer cpu {cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.1f}"
          " s; new-file writes, order rotated per round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
