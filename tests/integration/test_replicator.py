"""Two MirrorReplicators (node1 on 127.0.0.1, node2 on 127.0.0.2) in one process, as two agents
would run them: writes through the primary's FUSE mount reach the secondary's copy, which apps
cannot write; losing the secondary puts the primary ALONE with dirty tracking, and its return
resyncs the trees to equality; a swap of roles replicates the other way; an abrupt teardown of
the primary never loses a write the application saw acknowledged."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvha.replication import tls
from hvha.replication.build import build_replicator, init_tls, module_port, replication_network
from hvha.replication.generations import Decision, Generations, start_alone
from hvha.replication.mount import is_mounted
from hvha.replication.plan import plan
from hvha.replication.replicator import MirrorReplicator

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="the replicator mounts FUSE and read-only bind mounts: needs root and /dev/fuse")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tls.create_ca(tmp / "ca")
        for n in ("node1", "node2"):
            tls.issue_node_cert(tmp / "ca", n, tmp / n / "tls")
        self.a, self.b = tmp / "A", tmp / "B"
        self.a.mkdir()
        self.b.mkdir()
        self.port = free_port()
        self.reps: dict[str, MirrorReplicator] = {}

    def start(self, node: str, **extra: Any) -> MirrorReplicator:
        me, peer = ("node1", "node2") if node == "node1" else ("node2", "node1")
        addr = {"node1": "127.0.0.1", "node2": "127.0.0.2"}
        rep = MirrorReplicator("m", [self.a if node == "node1" else self.b], node=me, peer=peer,
                               my_address=addr[me], peer_address=addr[peer], port=self.port,
                               tls_dir=self.tmp / me / "tls", state_dir=self.tmp / me / "state",
                               zone_size=64 * 1024, timeout=3.0, retry=0.2, **extra)
        self.reps[node] = rep
        return rep

    def close(self) -> None:
        for rep in self.reps.values():
            rep.close()
        for d in (self.a, self.b):
            for _ in range(5):  # guard bind mounts and FUSE mounts, whatever is left
                if not (is_mounted(str(d)) or _bind_mounted(d)):
                    break
                subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


def _bind_mounted(d: Path) -> bool:
    real = os.path.realpath(d)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
    assert not _bind_mounted(lab.a) and not _bind_mounted(lab.b)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)


def write_file(path: Path, data: bytes) -> None:
    """An application write, acknowledged only after fsync (in another thread, as an app)."""
    err: list[BaseException] = []

    def w() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported in the test's thread
            err.append(exc)
    t = threading.Thread(target=w)
    t.start()
    t.join(30)
    assert not t.is_alive() and not err, err


def digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_plan_rules() -> None:
    base = Generations(5)
    assert plan(base, base, initial=5) is Decision.IN_SYNC
    assert plan(start_alone(base), base, initial=7) is Decision.RESYNC_TO_PEER
    # a copy that was never compared with its peer gets a full resync, not an incremental one
    assert plan(start_alone(base), base, initial=5) is Decision.FULL_RESYNC_TO_PEER
    assert plan(base, start_alone(base), initial=5) is Decision.FULL_RESYNC_FROM_PEER


@needs_root
def test_primary_secondary_alone_resync_and_swap(lab: Lab) -> None:
    r1, r2 = lab.start("node1"), lab.start("node2")
    assert r1.data_ok() and r2.data_ok() and not r1.in_sync()
    with pytest.raises(OSError) as info:  # apps cannot write the secondary's copy
        (lab.b / "app").write_text("no")
    assert info.value.errno == errno.EROFS

    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync after the first (full) resync")
    write_file(lab.a / "one", os.urandom(200_000))
    (lab.a / "sub").mkdir()
    write_file(lab.a / "sub" / "two", b"two" * 1000)
    assert digest(lab.a) == digest(lab.b) and len(digest(lab.b)) == 2
    with pytest.raises(OSError):  # still read-only for writers on node2
        (lab.b / "one").write_bytes(b"x")

    r2.close()  # node2 goes away
    write_file(lab.a / "alone", os.urandom(300_000))
    write_file(lab.a / "one", b"rewritten while alone")
    st = r1.status()["dirs"][0]
    assert st["mode"] == "alone" and not r1.in_sync() and st["dirty_bytes"] > 0
    assert "alone" not in digest(lab.b)

    r2 = lab.start("node2")  # node2 back: node1 resyncs it in the background
    until(r1.in_sync, "node1 in sync again after the resync")
    assert digest(lab.a) == digest(lab.b)
    assert r2.data_ok()
    assert r1.generation() == r2.generation()

    run(r1.become_secondary())
    run(r2.become_primary())
    until(r2.in_sync, "node2 in sync as the new primary")
    write_file(lab.b / "from-node2", b"hello node1")
    assert (lab.a / "from-node2").read_bytes() == b"hello node1"
    with pytest.raises(OSError) as info:
        (lab.a / "app").write_text("no")
    assert info.value.errno == errno.EROFS
    assert digest(lab.a) == digest(lab.b)


RECORD = struct.Struct(">QI")  # number, crc32 of the payload; then the payload
TRIALS = int(os.environ.get("HVHA_LEDGER_TRIALS", "20"))  # soak: HVHA_LEDGER_TRIALS=500

PRIMARY = """
import asyncio, sys, time
from pathlib import Path
from hvha.replication.replicator import MirrorReplicator
tmp, port = Path(sys.argv[1]), int(sys.argv[2])
rep = MirrorReplicator("m", [tmp / "A"], node="node1", peer="node2", my_address="127.0.0.1",
                       peer_address="127.0.0.2", port=port, tls_dir=tmp / "node1" / "tls",
                       state_dir=tmp / "node1" / "state", zone_size=65536, timeout=10.0,
                       retry=0.2, fence=lambda gen: False)
# fence never granted: if the secondary drops out (a slow ack on a loaded machine), writes wait
# instead of being acknowledged alone; in the agent the witness's fence makes the same promise
asyncio.run(rep.become_primary())
while not rep.in_sync():
    time.sleep(0.02)
print("ready", flush=True)
time.sleep(3600)
"""

WRITER = """
import os, struct, sys, zlib
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
size = int(sys.argv[2])
n = 0
while True:
    payload = (n.to_bytes(8, "big") * (size // 8 + 1))[:size]
    os.write(fd, struct.pack(">QI", n, zlib.crc32(payload)) + payload)
    os.fsync(fd)
    print(n, flush=True)  # acknowledged: fsync returned
    n += 1
"""


@needs_root
@pytest.mark.parametrize(("payload", "trials", "express"), [
    # 4 KiB records: writes and fsyncs served in C once in sync (express.py)
    (4096, TRIALS, "1"),
    # the same through the Python handlers (HVHA_EXPRESS=0)
    (4096, max(TRIALS // 2, 1), "0"),
    # 256 KiB records: each one is a large write, so it takes the direct path on both nodes
    # and is sent while written locally: from C (express.c's large_write) once in sync...
    (256 * 1024 - RECORD.size, max(TRIALS // 2, 1), "1"),
    # ... and by the stream's sender thread (mirrordata._write_early)
    (256 * 1024 - RECORD.size, max(TRIALS // 4, 1), "0"),
], ids=["4k-records", "4k-records-python-handlers", "256k-direct-records",
        "256k-records-python-handlers"])
def test_acknowledged_records_survive_kill_9_of_the_primary(lab: Lab, payload: int,
                                                            trials: int, express: str) -> None:
    """The ack-ledger oracle: the primary's process (mirror + stream) is killed with SIGKILL at
    a seeded random moment while an application appends fsynced records; every record whose
    fsync returned is intact in the secondary's copy. Repeated `trials` times."""
    import random
    import sys

    lab.start("node2")
    rng = random.Random(4242)
    env = {**os.environ, "HVHA_EXPRESS": express}
    for trial in range(trials):
        primary = subprocess.Popen([sys.executable, "-c", PRIMARY, str(lab.tmp), str(lab.port)],
                                   stdout=subprocess.PIPE, text=True, env=env)
        writer = None
        try:
            assert primary.stdout is not None and primary.stdout.readline() == "ready\n"
            ledger = lab.a / f"ledger-{trial}"
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ledger), str(payload)],
                                      stdout=subprocess.PIPE, text=True)
            assert writer.stdout is not None
            first = writer.stdout.readline()
            assert first.strip() == "0", f"trial {trial}: the writer made no progress"
            time.sleep(rng.uniform(0.0, 0.4))
            primary.kill()  # SIGKILL: nothing in it runs again, nothing is flushed
            primary.wait()
            out, _ = writer.communicate(timeout=30)  # it fails on the dead mount and exits
            acked = [0, *(int(x) for x in out.split())]
        finally:
            for proc in (primary, writer):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc is not None and proc.stdout is not None:
                    proc.stdout.close()
            subprocess.run(["umount", "-l", str(lab.a)], check=False, capture_output=True)
        data = (lab.b / f"ledger-{trial}").read_bytes()
        size = RECORD.size + payload
        got = set()
        for off in range(0, len(data) - size + 1, size):
            n, crc = RECORD.unpack_from(data, off)
            if zlib.crc32(data[off + RECORD.size:off + size]) == crc:
                got.add(n)
        missing = [n for n in acked if n not in got]
        assert not missing, (f"trial {trial}: {len(missing)} acknowledged records missing, "
                             f"first {missing[:5]} (acked {len(acked)})")


def _config() -> dict[str, Any]:
    return {"node": {"name": "node1", "heartbeat": {"lan": "10.9.0.1", "repl": "127.0.0.1"}},
            "peer": {"name": "node2", "heartbeat": {"lan": "10.9.0.2", "repl": "127.0.0.2"}},
            "heartbeat": {"networks": [{"name": "lan"}, {"name": "repl", "replication": True}]},
            "replication": {"port": 4802, "streams": 2, "zone_size": 65536},
            "modules": [{"name": "a", "replicated": [{"path": "/x"}, {"path": "/y"}],
                         "replication_port": 4802},
                        {"name": "b", "replicated": [], "replication_port": 4802},
                        {"name": "c", "replicated": [{"path": "/z"}], "replication_port": 4802},
                        {"name": "d", "replicated": [{"path": "/w"}], "replication_port": 5000}]}


def test_build_picks_network_and_distinct_ports(tmp_path: Path) -> None:
    config = _config()
    assert replication_network(config) == "repl"
    ports = {m["name"]: module_port(m, config) for m in config["modules"]}
    assert ports["a"] == 4802 and ports["c"] == 4804 and ports["d"] == 5000  # a uses 4802, 4803
    # no TLS files yet: no replicator (the agent falls back to PendingReplication)
    assert build_replicator(config["modules"][0], config, tmp_path) is None
    assert build_replicator(config["modules"][1], config, tmp_path) is None


@needs_root
def test_build_replicator_from_agent_config(tmp_path: Path) -> None:
    init_tls(tmp_path / "ca", ["node1", "node2"], tmp_path / "out")
    state = tmp_path / "state"
    state.mkdir()
    os.rename(tmp_path / "out" / "node1", state / "tls")
    data = tmp_path / "data"
    data.mkdir()
    config = _config()
    config["replication"]["port"] = port = free_port()
    module = {"name": "a", "replicated": [{"path": str(data), "exclude": []}],
              "replication_port": port}
    config["modules"] = [module]
    rep = build_replicator(module, config, state)
    assert rep is not None
    try:
        assert rep.data_ok() and not rep.in_sync()
        st = rep.status()["dirs"][0]
        assert st["role"] == "secondary" and st["port"] == port
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass  # the applier listens on this node's replication address
        with pytest.raises(OSError):
            (data / "f").write_text("read-only while secondary")
    finally:
        rep.close()
    (data / "f").write_text("writable once closed")


@needs_root
def test_writes_alone_wait_until_the_peer_copy_is_fenced(lab: Lab) -> None:
    """When the secondary goes away, no write made without it is acknowledged before the
    witness has recorded that its copy is outdated (hvha.agent.fences)."""
    import threading

    gate, calls = threading.Event(), []

    def fence(gen: str) -> bool:
        calls.append(gen)
        return gate.is_set()

    r1 = lab.start("node1", fence=fence)
    lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync")
    lab.reps.pop("node2").close()  # the secondary is gone
    done = threading.Event()

    def app() -> None:
        fd = os.open(lab.a / "alone", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"written without the peer")
            os.fsync(fd)
        finally:
            os.close(fd)
        done.set()

    threading.Thread(target=app, daemon=True).start()
    until(lambda: bool(calls), "the fence asked")
    assert not done.wait(1.0), "a write alone was acknowledged before the fence"
    gens = r1._dirs[0].state / "generations.json"
    # on disk: nothing of this period acknowledged yet (a split brain against it is not one)
    assert json.loads(gens.read_text())["unfenced"] is True
    gate.set()
    assert done.wait(10), "the write was not released once fenced"
    assert calls[-1] == r1.generation()  # the new generation of the writes alone
    assert json.loads(gens.read_text())["unfenced"] is False  # written before the ack


@needs_root
def test_excluded_entries_stay_local_through_mirror_resync_and_verify(lab: Lab) -> None:
    """`exclude: ["*.tmp", "cache/"]`: never sent by the first resync, the mirror or the resync
    after an outage; never reported by verify; the secondary's own excluded files are kept."""
    ex = [["*.tmp", "cache/"]]

    def replicated(root: Path) -> dict[str, str]:
        return {p: h for p, h in digest(root).items()
                if not p.endswith(".tmp") and not p.startswith("cache/")}

    (lab.a / "keep").write_bytes(os.urandom(100_000))
    (lab.a / "big.tmp").write_bytes(os.urandom(300_000))
    (lab.a / "cache").mkdir()
    (lab.a / "cache" / "x").write_bytes(b"primary's cache")
    (lab.b / "cache").mkdir()
    (lab.b / "cache" / "own").write_bytes(b"node2's own cache")
    r1, r2 = lab.start("node1", excludes=ex), lab.start("node2", excludes=ex)
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync after the first (full) resync")
    assert replicated(lab.a) == replicated(lab.b) == {"keep": digest(lab.a)["keep"]}
    assert not (lab.b / "big.tmp").exists() and (lab.b / "cache" / "own").exists()

    write_file(lab.a / "report.tmp", b"atomic write" * 1000)
    os.rename(lab.a / "report.tmp", lab.a / "report")  # the idiom the pattern exists for
    assert (lab.b / "report").read_bytes() == b"atomic write" * 1000

    r2.close()  # an outage: writes alone, excluded and not
    write_file(lab.a / "alone.tmp", os.urandom(50_000))
    write_file(lab.a / "alone", os.urandom(50_000))
    write_file(lab.a / "cache" / "y", b"more cache")
    r2 = lab.start("node2", excludes=ex)
    until(r1.in_sync, "node1 in sync after the resync")
    assert replicated(lab.a) == replicated(lab.b) and "alone" in replicated(lab.b)
    assert not (lab.b / "alone.tmp").exists() and not (lab.b / "cache" / "y").exists()
    assert (lab.b / "cache" / "own").read_bytes() == b"node2's own cache"
    report = r1.verify()
    assert [d["differences"] for d in report["dirs"]] == [[]], report


@needs_root
def test_a_resync_cut_half_way_refuses_promotion_then_resumes(lab: Lab) -> None:
    """Fault-matrix row 17: the resync source goes away half way through a full resync. The
    half-synced copy refuses the primary role; when the source returns, the resync resumes
    from its checkpoint instead of starting over, and the copies end up equal."""
    for i in range(12):
        (lab.a / f"img{i}").write_bytes(os.urandom(8 << 20))  # 96 MiB, at most 16 MB/s
    r1, r2 = lab.start("node1", bandwidth=16 << 20), lab.start("node2")
    run(r1.become_primary())

    def percent() -> float:
        return float((r1.status()["dirs"][0].get("resync") or {}).get("percent", 0.0))
    until(lambda: percent() > 0, "the full resync under way")  # progress comes per 16 MiB
    cut = percent()
    lab.reps.pop("node1").close()  # the source goes away
    assert cut < 100 and not r2.data_ok(), "a half-synced copy must refuse the primary role"

    r1 = lab.start("node1", bandwidth=16 << 20)
    run(r1.become_primary())
    seen: list[float] = []

    def done() -> bool:
        if percent() > 0 and not seen:
            seen.append(percent())
        return r1.in_sync()
    until(done, "in sync after the resumed resync", timeout=60)
    # started over, its first report would be the first 16 MiB again (= cut)
    assert seen and seen[0] > cut, f"the resync started over: {seen} after a cut at {cut}%"
    assert digest(lab.a) == digest(lab.b) and r2.data_ok()


@needs_root
def test_a_crashed_primarys_unsent_local_writes_are_resynced_either_way(lab: Lab) -> None:
    """A primary that dies between applying a write locally and sending it leaves its copy
    with data the peer never got, named by no dirty map. Found at restart ("primary.active"
    still there), the next resync compares everything, in whichever direction it runs."""
    r1, r2 = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync")
    write_file(lab.a / "ledger", os.urandom(300_000))
    time.sleep(1.5)  # the activity log's barrier: the peer has it all on disk, nothing dirty
    r1.close()
    r2.close()
    lab.reps.clear()

    def crash_aftermath(node: str, root: Path) -> None:
        """What a crash leaves: the primary's marker, and a write applied but never sent."""
        state = next((lab.tmp / node / "state").rglob("generations.json")).parent
        (state / "primary.active").touch()
        with open(root / "ledger", "ab") as f:
            f.write(b"applied here, never sent" * 100_000)

    # 1. the crashed primary comes back first and is primary again: it sends what it has
    crash_aftermath("node1", lab.a)
    r1, r2 = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync after its restart")
    assert digest(lab.a) == digest(lab.b)
    r1.close()
    r2.close()
    lab.reps.clear()
    # 2. the other node took over; the crashed one returns as its secondary: it is corrected
    crash_aftermath("node2", lab.b)
    r1, r2 = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync with the returning node2")
    assert digest(lab.a) == digest(lab.b)
    assert not list((lab.tmp / "node2" / "state").rglob("primary.active")), \
        "the returning copy is still marked after its resync"
