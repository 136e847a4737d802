"""End-to-end replication benchmark: app -> FUSE mirror -> TLS stream -> applier in another node.

Why: the engine benchmark (replication_engine.py) runs both ends in one process without FUSE;
this one measures what an application sees. The primary (Stream + MirrorMount over directory A)
runs in lab node1, the secondary (Applier on directory B) in lab node2, each in its own process,
network and mount namespace, talking over the lab's repl network (``--loopback``: two processes
on 127.0.0.1 / 127.0.0.2 instead). The writer is a third process in node1's namespace (it sees
the mount); the raw baseline is the same writer on a plain directory of the same disk, run
alternately with the replicated one in the same run, medians over the rounds.

Figures: 1 MiB sequential writes + fsync (from a page-aligned buffer, as dd, fio and qemu
write; and from Python bytes, which the kernel hands to a FUSE mount as two requests per
write), 4 KiB write+fsync ops/s, incremental resync after 1%
of an image's 4 KiB blocks changed while the secondary was stopped (vs rsync --inplace
--no-whole-file of the same pair), full verify of an identical image pair, and the time to
confirm a tree of small files in sync after a clean restart (plus a full verify of that tree).
Data is seeded random, every 4 KiB block stamped with its index. Both nodes share one disk and
page cache here: a perfect replicator tops out near 0.5 of raw for large writes.

    sudo .venv/bin/python benchmarks/replication.py [--quick] [--loopback] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a file from a checkout; HVHA_BENCH_SRC points at another source tree (for A/B runs).
SRC = os.environ.get("HVHA_BENCH_SRC", str(ROOT / "src"))
if SRC not in sys.path:
    sys.path.insert(0, SRC)

MIB = 1 << 20
BLOCK = 4096
PORT = 7790
MODULE = "bench"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stamped(base: bytes, offset: int) -> bytearray:
    """`base` with each 4 KiB block's file offset written into its first 8 bytes."""
    buf = bytearray(base)
    for b in range(0, len(buf), BLOCK):
        buf[b:b + 8] = (offset + b).to_bytes(8, "little")
    return buf


def write_image(path: Path, size: int, seed: int) -> None:
    base = random.Random(seed).randbytes(MIB)
    with open(path, "wb") as f:
        for off in range(0, size, MIB):
            f.write(stamped(base, off))
        os.fsync(f.fileno())


# ------------------------------------------------------------------ child: the writer (an app)
def writer(argv: list[str]) -> None:
    kind, path = argv[0], Path(argv[1])
    # "-rw": open read-write (as a VM image or a database is), not write-only; the mirror serves
    # write-only handles without the page cache (one FUSE request per write), read-write with it
    access = os.O_RDWR if kind.endswith("-rw") else os.O_WRONLY
    kind = kind.removesuffix("-rw")
    n, seed = int(argv[2]), int(argv[3]) if len(argv) > 3 else 1
    rng = random.Random(seed)
    c0, t0 = cpu_s(), time.perf_counter()
    if kind in ("seq", "seqdirect", "sequnaligned"):  # n MiB of 1 MiB writes, fsync at the end
        base = rng.randbytes(MIB)
        direct = kind == "seqdirect"  # the disk's own speed: O_DIRECT, no page cache
        fd = os.open(path, access | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0),
                     0o644)
        # from a page-aligned buffer, as dd, fio and qemu write; "sequnaligned" writes Python
        # bytes (the kernel then passes each 1 MiB write to a FUSE mount as two requests)
        aligned = mmap.mmap(-1, MIB)
        t0 = time.perf_counter()
        for i in range(n):
            if kind == "sequnaligned":
                os.write(fd, stamped(base, i * MIB))
            else:
                aligned[:] = stamped(base, i * MIB)
                os.write(fd, aligned)
        os.fsync(fd)
        os.close(fd)
    elif kind == "small":  # n 4 KiB overwrites in a 1 MiB file, each followed by fsync
        base = rng.randbytes(BLOCK)
        fd = os.open(path, access | os.O_CREAT, 0o644)
        os.pwrite(fd, bytes(MIB), 0)
        os.fsync(fd)
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, stamped(base, i * BLOCK), (i % 256) * BLOCK)
            os.fsync(fd)
        os.close(fd)
    elif kind == "random":  # 1/n of the file's 4 KiB blocks rewritten at random, then fsync
        nblocks = os.stat(path).st_size // BLOCK
        picks = rng.sample(range(nblocks), nblocks // n)
        fd = os.open(path, os.O_WRONLY)
        t0 = time.perf_counter()
        for b in picks:
            os.pwrite(fd, stamped(rng.randbytes(BLOCK), b * BLOCK + (1 << 60)), b * BLOCK)
        os.fsync(fd)
        os.close(fd)
        n = len(picks)
    else:
        raise SystemExit(f"unknown writer kind {kind}")
    print(json.dumps({"s": time.perf_counter() - t0, "cpu": cpu_s() - c0, "n": n}), flush=True)


# ------------------------------------------------------------------ children: the two nodes
def _lines(inp: IO[str]) -> Iterator[dict[str, Any]]:
    for line in inp:
        yield json.loads(line)


def _answer(**kw: Any) -> None:
    print(json.dumps({"cpu": cpu_s(), **kw}), flush=True)


def secondary(a: argparse.Namespace) -> None:
    from hvha.replication import tls
    from hvha.replication.applier import Applier
    creds = tls.NodeCreds(a.tls / "ca.crt", a.tls / "node2.crt", a.tls / "node2.key", "node2")
    with Applier(a.dir, node="node2", peer="node1", module=MODULE,
                 ctx=tls.server_context(creds), host=a.addr, port=PORT):
        _answer(ready=True)
        for _ in _lines(sys.stdin):
            _answer()
    _answer(bye=True)


def primary(a: argparse.Namespace) -> None:
    from hvha.replication import blocks, tls
    from hvha.replication.dirty import DirtyStore
    from hvha.replication.mount import MirrorMount
    from hvha.replication.stream import Mode, Stream
    t0 = time.monotonic()
    creds = tls.NodeCreds(a.tls / "ca.crt", a.tls / "node1.crt", a.tls / "node1.key", "node1")
    backing = os.open(a.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dirty = DirtyStore(a.state, a.zone_size)
    stream = Stream(node="node1", peer="node2", module=MODULE, address=(a.peer, PORT),
                    ctx=tls.client_context(creds), dirty=dirty)
    mount = MirrorMount(str(a.dir), stream)
    mount.start()
    try:
        def sync() -> dict[str, Any]:
            t, b = time.monotonic(), stream.bytes_sent
            stream.connect()
            st = blocks.resync(stream, backing, dirty, full=False)
            return {"s": time.monotonic() - t, "sent": stream.bytes_sent - b,
                    "resync_sent": st.sent_bytes, "in_sync": stream.in_sync,
                    "queries": getattr(st, "queries", 0)}
        r = sync()
        _answer(ready=True, since_start=time.monotonic() - t0, **r)
        for cmd in _lines(sys.stdin):
            if cmd["cmd"] == "wait_alone":
                deadline = time.monotonic() + 30
                while stream.mode is not Mode.ALONE and time.monotonic() < deadline:
                    time.sleep(0.01)
                _answer(mode=stream.mode.value)
            elif cmd["cmd"] == "resync":
                _answer(**sync())
            elif cmd["cmd"] == "verify":
                t = time.monotonic()
                diffs = blocks.verify(stream, backing)
                _answer(s=time.monotonic() - t, diffs=len(diffs), first=[str(d) for d in diffs[:3]])
            else:
                _answer(mode=stream.mode.value, sent=stream.bytes_sent)
    finally:
        mount.stop()
        stream.close()
        dirty.close()
        os.close(backing)
    _answer(bye=True)


# ------------------------------------------------------------------ the orchestrator
class Proc:
    """A child speaking JSON lines on stdin/stdout."""

    def __init__(self, popen: subprocess.Popen[str], what: str) -> None:
        self.p, self.what = popen, what
        self.last: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.what} ended (exit {self.p.wait()}): see its log")
        self.last = json.loads(line)
        return self.last

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self.read()

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Clean stop (stdin closed); the child's last answer (its CPU seconds)."""
        with contextlib.suppress(OSError, ValueError):
            assert self.p.stdin is not None
            self.p.stdin.close()
        out = self.last
        with contextlib.suppress(RuntimeError, ValueError):
            out = self.read()
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        return out


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args, self.base = args, base
        self.a, self.b, self.raw = base / "A", base / "B", base / "raw"
        for d in (self.a, self.b, self.raw, base / "rsync", base / "logs"):
            d.mkdir()
        self.lab: Any = None
        self.addr = {"node1": "127.0.0.1", "node2": "127.0.0.2"}
        self.procs: list[Proc] = []
        self.cpu: dict[str, float] = {}

    # -- environment
    def lab_up(self) -> None:
        from hvha.lab import Lab, LabError
        from hvha.lab.topology import REPL
        for k in range(20):
            lab = Lab.open(self.args.name, self.base / "lab", lan=f"198.18.{180 + k // 2}."
                           f"{128 * (k % 2)}/25", repl=f"198.19.{180 + k // 2}.{128 * (k % 2)}/25")
            self.lab = lab
            try:
                lab.up()
                break
            except LabError as exc:
                if "clash" not in str(exc):
                    raise
        else:
            raise RuntimeError("every candidate subnet in 198.18.180-189.x is in use")
        self.addr = {n: str(self.lab.address(n, REPL)) for n in ("node1", "node2")}

    def lab_down(self) -> None:
        if self.lab is None:
            return
        from hvha.lab import LabError
        with contextlib.suppress(LabError):
            self.lab.down(purge=True, grace=0.5)
        for ifname in self.lab.topology.root_interfaces:
            subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)
        for ns in self.lab.topology.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def spawn(self, node: str, argv: list[str], log: str) -> subprocess.Popen[str]:
        full = [sys.executable, str(Path(__file__).resolve()), *argv]
        err = open(self.base / "logs" / log, "a")  # noqa: SIM115 - closed with the process
        kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                              "stderr": err, "text": True, "cwd": str(ROOT)}
        p = self.lab.exec(node, full, **kw) if self.lab else subprocess.Popen(full, **kw)
        err.close()
        return p

    def start_pair(self) -> tuple[Proc, Proc]:
        sec = self.start_secondary()
        return self.start_primary(), sec

    def start_secondary(self) -> Proc:
        sec = Proc(self.spawn("node2", ["_secondary", "--dir", str(self.b), "--tls",
                                        str(self.base / "tls"), "--addr", self.addr["node2"]],
                              "secondary.log"), "secondary")
        self.procs.append(sec)
        sec.read()
        return sec

    def start_primary(self, zone_size: int = MIB) -> Proc:
        prim = Proc(self.spawn("node1", ["_primary", "--dir", str(self.a), "--tls",
                                         str(self.base / "tls"), "--peer", self.addr["node2"],
                                         "--state", str(self.base / f"state-{zone_size}"),
                                         "--zone-size", str(zone_size)], "primary.log"),
                    "primary")
        self.procs.append(prim)
        prim.read()
        return prim

    def stop(self, *procs: Proc) -> None:
        for p in procs:
            last = p.stop()
            self.cpu[p.what] = self.cpu.get(p.what, 0.0) + float(last.get("cpu", 0.0))
            self.procs.remove(p)

    def write(self, *argv: str) -> dict[str, Any]:
        p = self.spawn("node1", ["_writer", *argv], "writer.log")
        out, _ = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"writer {argv} failed (exit {p.returncode}): see logs/writer.log")
        r: dict[str, Any] = json.loads(out)
        self.cpu["writer"] = self.cpu.get("writer", 0.0) + r["cpu"]
        return r

    def cleanup(self) -> None:
        for p in list(self.procs):
            with contextlib.suppress(Exception):
                p.p.kill()
                p.p.wait(10)
        if self.lab is None and _mounted(self.a):
            subprocess.run(["umount", "-l", str(self.a)], capture_output=True, check=False)
        self.lab_down()


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _clear(*dirs: Path) -> None:
    for d in dirs:
        for e in d.iterdir():
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()


def make_tree(root: Path, n: int, seed: int) -> None:
    """n small files (60-200 bytes, distinct), 1000 per directory."""
    rng = random.Random(seed)
    for i in range(n):
        d = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}").write_bytes(i.to_bytes(8, "little") + rng.randbytes(rng.randint(52, 192)))


Row = tuple[str, str, str, str, str]


def run(b: Bench, q: bool, rounds: int, phases: set[str], tree_verify: bool) -> list[Row]:
    rows: list[Row] = []
    if "writes" in phases:
        rows += phase_writes(b, q, rounds)
    if "image" in phases:
        rows += phase_image(b, q, rounds)
    if "tree" in phases:
        rows += phase_tree(b, q, tree_verify)
    return rows


def _mb(per_s: list[float]) -> list[float]:
    """MiB per second -> MB per second."""
    return [x * MIB / 1e6 for x in per_s]


def _rng(xs: list[float], fmt: str) -> str:
    lo, mid, hi = (fmt.format(x) for x in (min(xs), statistics.median(xs), max(xs)))
    return mid if len(xs) == 1 else f"{mid} ({lo}-{hi})"


def phase_writes(b: Bench, q: bool, rounds: int) -> list[Row]:
    """1 MiB sequential writes and 4 KiB write+fsync, alternating raw / replicated."""
    seq_mib, small_n = (64, 300) if q else (1024, 3000)
    seq_mib, small_n = b.args.seq_mib or seq_mib, b.args.small_n or small_n
    rows: list[Row] = []
    prim, sec = b.start_pair()
    for suffix, label in (("", "write-only open"), ("-rw", "read-write open")):
        rows += _writes(b, prim, sec, rounds, seq_mib, small_n, suffix, label)
    b.stop(prim, sec)
    _clear(b.a, b.b, b.raw)
    return rows


def _writes(b: Bench, prim: Proc, sec: Proc, rounds: int, seq_mib: int, small_n: int,
            suffix: str, label: str) -> list[Row]:
    med, rng_, rows = statistics.median, _rng, []
    raw_mb: list[float] = []
    rep_mb: list[float] = []
    raw_ops: list[float] = []
    rep_ops: list[float] = []
    cpu_mb: list[float] = []  # CPU seconds of all three processes per replicated MiB / op
    cpu_op: list[float] = []

    def once(kind: str, d: Path, n: int, out: list[float], cpu: list[float]) -> None:
        c0 = prim.ask(cmd="status")["cpu"] + sec.ask()["cpu"]
        r = b.write(kind, str(d / kind), str(n), "1")
        if d == b.a:
            cpu.append((prim.ask(cmd="status")["cpu"] + sec.ask()["cpu"] - c0 + r["cpu"]) / n)
        out.append(n / r["s"])

    direct_mb: list[float] = []
    raw_ua: list[float] = []  # from an unaligned buffer (write-only only)
    rep_ua: list[float] = []
    for r in range(rounds):
        for d, out in ((b.raw, raw_mb), (b.a, rep_mb))[::1 if r % 2 == 0 else -1]:
            once("seq" + suffix, d, seq_mib, out, cpu_mb)
        if not suffix:
            once("seqdirect", b.raw, seq_mib, direct_mb, [])
            for d, out in ((b.raw, raw_ua), (b.a, rep_ua))[::1 if r % 2 == 0 else -1]:
                once("sequnaligned", d, seq_mib, out, [])
    for r in range(rounds):
        for d, out in ((b.raw, raw_ops), (b.a, rep_ops))[::1 if r % 2 == 0 else -1]:
            once("small" + suffix, d, small_n, out, cpu_op)
    raw_mb, rep_mb, direct_mb = _mb(raw_mb), _mb(rep_mb), _mb(direct_mb)
    raw_ua, rep_ua = _mb(raw_ua), _mb(rep_ua)
    rows.append((f"{seq_mib} MiB of 1 MiB writes + fsync, {label}",
                 rng_(raw_mb, "{:,.0f}") + " MB/s",
                 rng_(rep_mb, "{:,.0f}") + " MB/s", f"{med(rep_mb) / med(raw_mb):.2f}",
                 ">= 0.5 (0.7); shared disk: ~0.5 max"))
    if direct_mb:
        rows.append(("  same, raw with O_DIRECT (the disk, no page cache)",
                     rng_(direct_mb, "{:,.0f}") + " MB/s", "",
                     f"{med(rep_mb) / med(direct_mb):.2f}",
                     "raw's buffered figure depends on this VM's memory state"))
    if rep_ua:
        rows.append(("  same, from an unaligned buffer (Python bytes)",
                     rng_(raw_ua, "{:,.0f}") + " MB/s", rng_(rep_ua, "{:,.0f}") + " MB/s",
                     f"{med(rep_ua) / med(raw_ua):.2f}",
                     "each write reaches FUSE as two requests"))
    rows.append((f"4 KiB write + fsync, {label}", rng_(raw_ops, "{:,.0f}") + " ops/s",
                 rng_(rep_ops, "{:,.0f}") + " ops/s", f"{med(rep_ops) / med(raw_ops):.2f}",
                 ">= 0.3"))
    rows.append(("CPU per replicated MiB / 4 KiB op", "", f"{med(cpu_mb) * 1e3:.2f} ms / "
                 f"{med(cpu_op) * 1e6:.0f} us", "", "(writer + primary + secondary)"))
    return rows


def phase_image(b: Bench, q: bool, rounds: int) -> list[Row]:
    """An image pair: verify; peer stopped, 1% random 4 KiB writes, peer back, resync; then
    rsync of the same pair (the pre-change copy kept aside)."""
    img, rows, rng_ = (128 * MIB if q else 2048 * MIB), [], _rng
    write_image(b.a / "img", img, 3)
    shutil.copyfile(b.a / "img", b.b / "img")
    prim, sec = b.start_pair()
    vs = [prim.ask(cmd="verify") for _ in range(max(1, rounds - 1))]
    rss: list[dict[str, Any]] = []
    for k in range(max(1, rounds)):  # each round: peer away, another 1% changed, resync
        b.stop(sec)
        assert prim.ask(cmd="wait_alone")["mode"] == "alone", "primary did not see the peer go"
        if k == max(1, rounds) - 1:  # rsync's copy: the peer's state before the last round
            shutil.copyfile(b.b / "img", b.base / "rsync" / "img")
        changed = b.write("random", str(b.a / "img"), "100", str(40 + k))["n"] * BLOCK
        sec = b.start_secondary()
        rss.append({**prim.ask(cmd="resync"), "changed": changed})
        vs.append(prim.ask(cmd="verify"))
        if vs[-1]["diffs"]:
            raise RuntimeError(f"copies differ after the resync: {vs[-1]['first']}")
    b.stop(sec)
    # the same again with the dirty map's zone_size at 64 KiB instead of the default 1 MiB
    b.stop(prim)
    sec = b.start_secondary()
    prim = b.start_primary(64 * 1024)
    b.stop(sec)
    assert prim.ask(cmd="wait_alone")["mode"] == "alone", "primary did not notice the peer left"
    changed64 = b.write("random", str(b.a / "img"), "100", "6")["n"] * BLOCK
    sec = b.start_secondary()
    rs64 = prim.ask(cmd="resync")
    if prim.ask(cmd="verify")["diffs"]:
        raise RuntimeError("copies differ after the resync with 64 KiB zones")
    b.stop(prim, sec)
    t = time.perf_counter()
    out = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats", str(b.b / "img"),
                          str(b.base / "rsync" / "img")], capture_output=True, text=True,
                         check=True).stdout
    rsync_s = time.perf_counter() - t
    rsync_sent = int(next(ln for ln in out.splitlines() if ln.startswith("Total bytes sent"))
                     .split(":")[1].strip().replace(",", ""))
    times = [r["s"] for r in rss]
    worst = max(r["sent"] / r["changed"] for r in rss)
    rows.append((f"resync, 1% of {img // MIB} MiB changed ({changed:,} B), {len(rss)} rounds",
                 f"rsync {rsync_s:.2f} s, {rsync_sent:,} B",
                 _rng(times, "{:.2f}") + f" s, {rss[-1]['sent']:,} B, "
                 f"{rss[-1].get('queries', 0)} queries",
                 f"{statistics.median(times) / rsync_s:.3f} time (worst "
                 f"{max(times) / rsync_s:.3f}), {worst:.2f}x bytes",
                 "<= 0.1 time, <= 1.2x bytes"))
    rows.append((f"  same, dirty zone_size 64 KiB ({changed64:,} B)", "(rsync time as above)",
                 f"{rs64['s']:.2f} s, {rs64['sent']:,} B",
                 f"{rs64['s'] / rsync_s:.3f} time, {rs64['sent'] / changed64:.2f}x bytes", ""))
    vr = [img / v["s"] / 1e6 for v in vs]
    rows.append((f"verify identical {img // MIB} MiB pair (warm)", "", rng_(vr, "{:,.0f}")
                 + " MB/s", "", ">= 500 MB/s"))

    _clear(b.a, b.b, b.base / "rsync")
    return rows


def phase_tree(b: Bench, q: bool, tree_verify: bool) -> list[Row]:
    """A tree of small files made identical on both sides, then a clean restart of both."""
    tree_n, rows = (2000 if q else 100_000), []
    t = time.perf_counter()
    make_tree(b.a / "tree", tree_n, 5)
    subprocess.run(["cp", "-a", str(b.a / "tree"), str(b.b / "tree")], check=True)
    setup = time.perf_counter() - t
    sec = b.start_secondary()
    t = time.perf_counter()
    prim = b.start_primary()
    restart = time.perf_counter() - t
    tv = prim.ask(cmd="verify") if tree_verify else {}
    if tv.get("diffs"):
        raise RuntimeError(f"tree copies differ: {tv['first']}")
    b.stop(prim, sec)
    _clear(b.a, b.b)
    rows.append((f"{tree_n:,} small files: clean restart -> in sync",
                 f"(tree made in {setup:.0f} s)", f"{restart:.2f} s (process start to in sync)",
                 "", "< 10 s"))
    if tv:
        rows.append((f"{tree_n:,} small files: full verify", "", f"{tv['s']:.2f} s", "", ""))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_writer":
        return writer(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] in ("_primary", "_secondary"):
        ap = argparse.ArgumentParser()
        for opt in ("--dir", "--tls", "--state"):
            ap.add_argument(opt, type=Path)
        ap.add_argument("--addr")
        ap.add_argument("--zone-size", type=int, default=MIB)
        ap.add_argument("--peer")
        a = ap.parse_args(sys.argv[2:])
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        return primary(a) if sys.argv[1] == "_primary" else secondary(a)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small sizes, one round (< 60 s)")
    ap.add_argument("--loopback", action="store_true",
                    help="two processes on 127.0.0.1/127.0.0.2 instead of two lab namespaces")
    ap.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3; 1 quick)")
    ap.add_argument("--dir", default="/var/tmp", help="where the test directories go (the disk)")
    ap.add_argument("--name", default=f"hvr{os.getpid() % 100000}", help="lab name")
    ap.add_argument("--keep", action="store_true", help="keep the directory (logs) afterwards")
    ap.add_argument("--seq-mib", type=int, default=0, help="override the sequential size")
    ap.add_argument("--small-n", type=int, default=0, help="override the 4 KiB+fsync count")
    ap.add_argument("--phases", default="writes,image,tree",
                    help="comma-separated subset of writes,image,tree")
    ap.add_argument("--tree-verify", choices=("auto", "yes", "no"), default="auto",
                    help="also run a full verify of the small-file tree (auto = yes: a few "
                         "seconds for 100k files since verify is batched)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("needs root and /dev/fuse (FUSE mount, network namespaces)")
    if shutil.which("rsync") is None:
        raise SystemExit("rsync missing: apt-get install rsync")
    from hvha.replication import tls
    rounds = args.rounds or (1 if args.quick else 3)
    base = Path(tempfile.mkdtemp(prefix="hvha-repl-bench-", dir=args.dir))
    b = Bench(args, base)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wall0, load = time.monotonic(), os.getloadavg()
    try:
        tls.create_ca(base / "ca")
        for n in ("node1", "node2"):
            tls.issue_node_cert(base / "ca", n, base / "tls")
        if not args.loopback:
            b.lab_up()
        rows = run(b, args.quick, rounds, set(args.phases.split(",")),
                   args.tree_verify != "no")
    finally:
        b.cleanup()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    hdr: Row = ("measure", "raw / baseline", "hvha", "ratio", "goal")
    w = [max(len(r[i]) for r in [hdr, *rows]) for i in range(5)]
    where = "loopback, 2 processes" if args.loopback else f"lab {args.name}: node1 -> node2 (repl)"
    print(f"\nreplication benchmark ({where}; {rounds} round(s), medians (min-max))")
    for r in [hdr, *rows]:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    print("CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(b.cpu.items()))
          + f"; wall {time.monotonic() - wall0:.0f} s; load average at start "
          + " ".join(f"{x:.2f}" for x in load))
    print("Both nodes share one disk and page cache here: a perfect replicator tops out near "
          "0.5 of raw for large sequential writes.")


if __name__ == "__main__":
    main()
