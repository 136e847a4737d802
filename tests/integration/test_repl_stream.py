"""The replication engine over real mutual TLS on loopback: a Stream (primary) and an Applier
(secondary) replicating one directory into another in this process.

Covers: random op sequences (renames over existing files, hard links, truncate, punch hole,
100 files) leave byte-equal trees after a barrier; losing the applier mid-stream puts the
primary ALONE with every unacknowledged op in the dirty map, and the resync after reconnecting
makes the trees equal again; a full disk on the secondary makes the primary go ALONE and never
report the failed op as replicated; wrong CA, wrong node name and plaintext are refused; the
read-only guard keeps apps on the secondary from writing its copy.

Every test runs twice: both nodes through the native lane (lane.c, the default) and both in
Python (the fallback where the lane was not built); test_repl_lane.py mixes the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvha.replication import applier as applier_mod
from hvha.replication import blocks, lane, ops, tls
from hvha.replication import stream as stream_mod
from hvha.replication.applier import Applier, read_only_guard
from hvha.replication.dirty import DirtyStore
from hvha.replication.stream import Mode, ResyncProgress, Stream
from hvha.replication.treewriter import TreeWriter

PUNCH = blocks.FALLOC_FL_PUNCH_HOLE | blocks.FALLOC_FL_KEEP_SIZE


def use_data_path(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which implementation carries each node's side of the sessions: "native", "python",
    "native-primary" or "native-secondary" (the other node in Python)."""
    if which == "python":
        monkeypatch.setenv("HVHA_NATIVE_LANE", "0")
        return
    ok, why = lane.available()
    assert ok, f"the native lane must be built for these tests: {why}"
    python_side = {"native-primary": applier_mod, "native-secondary": stream_mod}
    if which in python_side:
        monkeypatch.setattr(python_side[which], "creds_of", lambda ctx: None)


@pytest.fixture(autouse=True, params=["native", "python"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_data_path(str(request.param), monkeypatch)
    return str(request.param)


@dataclass
class Pair:
    """A primary directory with its Stream and local applier, a secondary with its Applier."""

    prim: Path
    sec: Path
    state: Path
    certs: dict[str, tls.NodeCreds]
    stream: Stream
    applier: Applier
    local: TreeWriter
    dirty: DirtyStore

    def do(self, op: ops.Op) -> int:
        """What the FUSE layer does: apply locally and enqueue under the lock, then wait."""
        with self.stream.ordered():
            self.local.apply(op)
            seq = self.stream.enqueue(op)
        self.stream.wait(seq)
        return seq

    def new_applier(self) -> Applier:
        self.applier = Applier(self.sec, node="node2", peer="node1", module="m",
                               ctx=tls.server_context(self.certs["node2"]))
        self.applier.start()
        self.stream.address = self.applier.address
        return self.applier

    def close(self) -> None:
        self.stream.close()
        self.applier.close()
        self.local.close()
        self.dirty.close()


@contextlib.contextmanager
def make_pair(tmp: Path, certs: dict[str, tls.NodeCreds], sec: Path | None = None,
              timeout: float = 5.0, barrier_interval: float = 1.0,
              prim: Path | None = None) -> Iterator[Pair]:
    if prim is None:
        prim = tmp / "prim"
        prim.mkdir()
    if sec is None:
        sec = tmp / "sec"
        sec.mkdir()
    applier = Applier(sec, node="node2", peer="node1", module="m",
                      ctx=tls.server_context(certs["node2"]))
    applier.start()
    dirty = DirtyStore(tmp / "state", zone_size=64 * 1024)
    stream = Stream(node="node1", peer="node2", module="m", address=applier.address,
                    ctx=tls.client_context(certs["node1"]), dirty=dirty, timeout=timeout,
                    barrier_interval=barrier_interval)
    pair = Pair(prim, sec, tmp / "state", certs, stream, applier, TreeWriter(prim), dirty)
    try:
        yield pair
    finally:
        pair.close()


def tree_digest(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything replication must preserve: kind, mode, owner, content, link target, and
    which names share an inode."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            s = p.lstat()
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(s.st_mode):
                out[rel] = ("d", stat.S_IMODE(s.st_mode), s.st_uid)
            else:
                first = inodes.setdefault(s.st_ino, rel) if s.st_nlink > 1 else rel
                out[rel] = ("f", stat.S_IMODE(s.st_mode), s.st_uid, s.st_size,
                            hashlib.sha256(p.read_bytes()).hexdigest(), first)
    return out


def interrupted_full_resync(pair: Pair, files: int, size: int) -> None:
    """`files` random files of `size` bytes, then a full resync that loses the peer half way
    (a checkpoint is left in pair.state); the stream is ALONE afterwards."""
    for i in range(files):
        (pair.prim / f"f{i}").write_bytes(os.urandom(size))
    pair.stream.connect()

    def stop_at_half(p: ResyncProgress) -> None:
        if p.done_bytes >= p.total_bytes // 2:
            pair.stream.detach("test: interrupted")
    with pytest.raises(blocks.ResyncAborted):
        blocks.resync(pair.stream, pair.prim, pair.dirty, full=True, state_dir=pair.state,
                      checkpoint_key="k", streams=1, progress=stop_at_half,
                      checkpoint_interval=0)
    assert (pair.state / "resync.checkpoint").exists()


def random_ops(pair: Pair, rng: random.Random, n: int, files: int = 100) -> None:
    names = [f"d{i % 5}/f{i}" for i in range(files)]
    for d in range(5):
        pair.do(ops.Mkdir(f"d{d}", 0o755))
    existing: set[str] = set()
    for name in names:
        pair.do(ops.Create(name, 0o644))
        pair.do(ops.Write(name, 0, rng.randbytes(rng.randrange(1, 200_000))))
        existing.add(name)
    for _ in range(n):
        live = sorted(existing)
        a = rng.choice(live)
        k = rng.random()
        if k < 0.35:
            data = rng.randbytes(rng.randrange(1, 70_000))
            pair.do(ops.Write(a, rng.randrange(0, 300_000), data))
        elif k < 0.45:
            pair.do(ops.Truncate(a, rng.randrange(0, 250_000)))
        elif k < 0.55:
            pair.do(ops.Fallocate(a, PUNCH, rng.randrange(0, 100_000), rng.randrange(1, 100_000)))
        elif k < 0.65:  # rename over an existing file
            b = rng.choice(live)
            if a != b:
                pair.do(ops.Rename(a, b))
                existing.discard(a)
        elif k < 0.72:
            new = f"d{rng.randrange(5)}/l{rng.randrange(10**6)}"
            pair.do(ops.Link(a, new))
            existing.add(new)
        elif k < 0.78:
            pair.do(ops.Unlink(a))
            existing.discard(a)
        elif k < 0.85:
            pair.do(ops.Chmod(a, rng.choice([0o600, 0o640, 0o755])))
        elif k < 0.9:
            pair.do(ops.Symlink(f"../{a}", f"d{rng.randrange(5)}/s{rng.randrange(100)}"))
        else:
            new = f"d{rng.randrange(5)}/n{rng.randrange(10**6)}"
            pair.do(ops.Create(new, 0o600))
            pair.do(ops.Write(new, 4096, b"x" * 5000))
            existing.add(new)
        if len(existing) < 10:
            break


def test_random_ops_leave_equal_trees(tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        pair.stream.connect()
        assert pair.stream.try_mark_in_sync()
        random_ops(pair, random.Random(7), 400)
        pair.do(ops.Fsync(None))
        st = pair.stream.status()
        assert st.mode is Mode.CONNECTED and st.in_sync and st.ops_in_flight == 0
        assert pair.dirty.is_clean(), "nothing may be recorded dirty while connected"
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        assert len(tree_digest(pair.sec)) > 100


def test_concurrent_writers_keep_local_and_remote_order(tmp_path: Path,
                                                        certs: dict[str, tls.NodeCreds]) -> None:
    import threading
    with make_pair(tmp_path, certs) as pair:
        pair.stream.connect()
        pair.stream.try_mark_in_sync()
        pair.do(ops.Create("shared", 0o644))

        def writer(k: int) -> None:
            rng = random.Random(k)
            for _ in range(200):  # overlapping writes: the last one must win on both sides
                pair.do(ops.Write("shared", rng.randrange(0, 64) * 1000, bytes([k]) * 3000))
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pair.do(ops.Fsync("shared"))
        assert (pair.prim / "shared").read_bytes() == (pair.sec / "shared").read_bytes()


def test_losing_the_applier_goes_alone_records_dirty_and_resyncs(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs, timeout=2.0) as pair:
        pair.stream.connect()
        pair.stream.try_mark_in_sync()
        rng = random.Random(3)
        random_ops(pair, rng, 50, files=30)
        pair.applier.close()  # the secondary dies mid-stream
        data = rng.randbytes(300_000)
        pair.do(ops.Write("d1/f1" if (pair.prim / "d1/f1").exists() else "d0/f0", 10, data))
        pair.do(ops.Mkdir("alone", 0o700))
        pair.do(ops.Create("alone/new", 0o600))
        pair.do(ops.Write("alone/new", 0, data))
        st = pair.stream.status()
        assert st.mode is Mode.ALONE and not st.in_sync
        assert not pair.dirty.is_clean()
        # the record survives a crash of the primary: reload it from disk
        reloaded = DirtyStore(pair.state, zone_size=64 * 1024)
        assert "alone" in reloaded.snapshot().paths
        reloaded.close()
        assert tree_digest(pair.prim) != tree_digest(pair.sec)
        pair.new_applier()
        pair.stream.connect()
        assert pair.stream.mode is Mode.RESYNCING
        stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=False)
        pair.do(ops.Fsync(None))
        assert pair.stream.status().in_sync and pair.dirty.is_clean()
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        assert stats.sent_bytes < 3 * len(data) + 200_000, "incremental resync sent too much"


def assert_lacking_zones_dirty(prim: Path, sec: Path, name: str, dirty: DirtyStore) -> None:
    """Some 64 KiB zone of `name` differs between the copies (the secondary's disk refused
    it), and every zone that differs is in the primary's dirty map (zone_size 64 KiB)."""
    ours, theirs = (prim / name).read_bytes(), (sec / name).read_bytes()
    lacking = {z for z in range(len(ours) // 65536)
               if ours[z * 65536:(z + 1) * 65536] != theirs[z * 65536:(z + 1) * 65536]}
    assert lacking, "the secondary stored everything on a 1 MiB file system?"
    zones = set(dirty.snapshot().zones[name])
    assert lacking <= zones, f"zones {sorted(lacking - zones)} lost: not in the dirty map"


def _wait_alone(pair: Pair) -> None:
    deadline = time.monotonic() + 10
    while pair.stream.mode is not Mode.ALONE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pair.stream.mode is Mode.ALONE


def test_power_loss_of_the_secondary_loses_nothing_it_acknowledged(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    """The secondary acknowledges a write once applied (in its page cache), a large one on
    the native lane once received; a power loss before its next barrier takes it off its
    disk. The primary knew it as replicated: its activity log must put it in the dirty map,
    so the resync resends it."""
    with make_pair(tmp_path, certs, timeout=2.0, barrier_interval=3600) as pair:
        pair.stream.connect()
        assert pair.stream.try_mark_in_sync()
        pair.do(ops.Create("vm.img", 0o600))
        pair.do(ops.Write("vm.img", 0, bytes(1 << 20)))
        pair.do(ops.Fsync(None))  # on both disks
        on_disk = (pair.sec / "vm.img").read_bytes()
        pair.do(ops.Write("vm.img", 200_000, b"x" * 70_000))  # acknowledged, not yet durable
        pair.do(ops.Write("vm.img", 1 << 19, os.urandom(256 << 10)))  # (received: lane.c)
        pair.do(ops.Create("log", 0o600))
        pair.do(ops.Write("log", 0, b"entry 1\n"))
        assert pair.stream.status().ops_in_flight == 0
        pair.applier.close()  # the secondary loses power: its page cache is gone
        (pair.sec / "vm.img").write_bytes(on_disk)
        (pair.sec / "log").unlink()
        _wait_alone(pair)
        assert not pair.dirty.is_clean(), "acknowledged but not durable: must be resent"
        pair.new_applier()
        pair.stream.connect()
        blocks.resync(pair.stream, pair.prim, pair.dirty, full=False)
        pair.do(ops.Fsync(None))
        assert pair.stream.status().in_sync and pair.dirty.is_clean()
        assert tree_digest(pair.prim) == tree_digest(pair.sec)


def test_a_file_with_new_data_and_new_metadata_while_alone_resyncs_both(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    """Regression: a write and a chmod/utime of the same file while ALONE (what `cp -p`,
    `tar x` or `touch` after a write do) resynced the metadata only, the data never."""
    with make_pair(tmp_path, certs, timeout=2.0, barrier_interval=0.05) as pair:
        pair.stream.connect()
        assert pair.stream.try_mark_in_sync()
        pair.do(ops.Create("f", 0o644))
        pair.do(ops.Write("f", 0, bytes(1 << 20)))
        pair.do(ops.Fsync(None))
        time.sleep(0.3)  # the activity log's barrier: nothing but the writes alone is dirty
        pair.applier.close()
        _wait_alone(pair)
        pair.do(ops.Write("f", 300_000, b"new data" * 1000))
        pair.do(ops.Chmod("f", 0o600))
        pair.do(ops.Utimens("f", 1_000_000_000, 2_000_000_000))
        pair.new_applier()
        pair.stream.connect()
        blocks.resync(pair.stream, pair.prim, pair.dirty, full=False)
        pair.do(ops.Fsync(None))
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        assert blocks.verify(pair.stream, pair.prim, check_mtime=True) == []


def test_a_silent_peer_the_heartbeats_declare_dead_is_given_up_at_once(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    """A partition: the peer's connection stays open but nothing comes back. Writes must not
    wait for the stream's own timeout once the heartbeats declare the peer dead."""
    healed = threading.Event()

    class Silent(Applier):
        def _serve(self, sock: tls.Channel, reader: object) -> None:  # type: ignore[override]
            healed.wait(15)

        def _serve_native(self, sock: object) -> None:  # type: ignore[override]
            healed.wait(15)
    alive = [True]
    with make_pair(tmp_path, certs, timeout=10.0) as pair:
        pair.applier.close()
        pair.applier = Silent(pair.sec, node="node2", peer="node1", module="m",
                              ctx=tls.server_context(certs["node2"]))
        pair.applier.start()
        pair.stream.address = pair.applier.address
        pair.stream.peer_alive = lambda: alive[0]
        pair.stream.connect()
        threading.Timer(1.0, lambda: alive.__setitem__(0, False)).start()
        t0 = time.monotonic()
        pair.do(ops.Create("f", 0o644))  # waits for an ack that never comes ...
        assert time.monotonic() - t0 < 4, "the write waited for the stream's 10 s timeout"
        assert pair.stream.mode is Mode.ALONE and not pair.dirty.is_clean()
        healed.set()


def test_writes_made_durable_by_a_barrier_are_not_resent(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    """The stream sends a global barrier shortly after writes; once the peer acknowledged it,
    losing the peer records nothing (no needless resync)."""
    with make_pair(tmp_path, certs, timeout=2.0, barrier_interval=0.05) as pair:
        pair.stream.connect()
        assert pair.stream.try_mark_in_sync()
        pair.do(ops.Create("f", 0o600))
        pair.do(ops.Write("f", 0, b"y" * 300_000))
        deadline = time.monotonic() + 5  # the barrier follows within the interval, unasked
        while pair.stream.status().acked_seq < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pair.stream.status().acked_seq >= 3
        pair.applier.close()
        _wait_alone(pair)
        assert pair.dirty.is_clean()


@pytest.mark.parametrize(("chunk", "n"), [(256 << 10, 8), (1 << 20, 4), (1 << 20, 2)],
                         ids=["256k-writes", "1m-writes", "1m-the-last-fails"])
def test_full_disk_on_the_secondary_goes_alone(tmp_path: Path, certs: dict[str, tls.NodeCreds],
                                               chunk: int, n: int) -> None:
    """A Write the secondary acknowledged on receipt and then could not store is answered with a
    NACK, whether the lane received it into its input buffer (256 KiB) or its large frame
    buffer (1 MiB), and even when no frame follows (1m-the-last-fails: the second MiB does not
    fit; nobody waits for an ack then, and the receiver thread reads the NACK within its
    one-second watch); the primary's dirty map holds every zone the secondary lacks."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    sec = tmp_path / "sec"
    sec.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sec)], check=True)
    try:
        with make_pair(tmp_path, certs, sec=sec) as pair:
            pair.stream.connect()
            pair.stream.try_mark_in_sync()
            pair.do(ops.Create("big", 0o644))
            last = 0
            for i in range(n):  # 2-4 MiB into a 1 MiB file system
                last = pair.do(ops.Write("big", i * chunk, os.urandom(chunk)))
            deadline = time.monotonic() + 3
            while pair.stream.mode is not Mode.ALONE and time.monotonic() < deadline:
                time.sleep(0.005)
            st = pair.stream.status()
            assert st.mode is Mode.ALONE and "No space left" in st.last_error
            if n * chunk > 2 << 20:  # (else the failing write is the last: acked on receipt)
                assert st.acked_seq < last, "writes after the failure were acknowledged"
            # every zone the secondary lacks is in the dirty map, from the first write it could
            # not store (the native lane acknowledged it on receipt, before the disk refused
            # it; the Python applier never did) to the end
            assert len((pair.prim / "big").read_bytes()) == n * chunk
            assert_lacking_zones_dirty(pair.prim, sec, "big", pair.dirty)
    finally:
        subprocess.run(["umount", "-l", str(sec)], check=False)


def _connect_fails(stream: Stream) -> Exception:
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)) as info:
        stream.connect(timeout=3)
    return info.value


def test_wrong_ca_wrong_name_and_plaintext_are_refused(tmp_path: Path,
                                                       certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        addr = pair.applier.address
        dirty = pair.dirty
        for creds, peer in ((certs["rogue"], "node2"),   # a "node1" from another CA
                            (certs["node3"], "node2"),   # right CA, wrong node
                            (certs["node1"], "node3")):  # the server is not the expected peer
            s = Stream(node=creds.node, peer=peer, module="m", address=addr,
                       ctx=tls.client_context(creds), dirty=dirty, timeout=3)
            try:
                _connect_fails(s)
                assert s.mode is Mode.ALONE
            finally:
                s.close()
        with socket.create_connection(addr, timeout=3) as raw:  # plaintext
            raw.sendall(b"\x02" + bytes(15) + b"GET / HTTP/1.0\r\n\r\n")
            raw.settimeout(3)
            with contextlib.suppress(OSError):
                while raw.recv(4096):
                    pass
        time.sleep(0.2)
        assert pair.applier.sessions == 0
        assert os.listdir(pair.sec) == []
        pair.stream.connect()  # the right peer still gets in
        # (the applier counts the session just after its hello answer has gone out)
        deadline = time.monotonic() + 5
        while pair.applier.sessions == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pair.applier.sessions == 1


def test_read_only_guard_keeps_apps_out(tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for bind mounts")
    with make_pair(tmp_path, certs) as pair:
        guard = read_only_guard(pair.sec)  # after the applier opened its directory fd
        try:
            with pytest.raises(OSError) as info:
                (pair.sec / "app-write").write_text("no")
            assert info.value.errno == 30  # EROFS
            pair.stream.connect()
            pair.do(ops.Create("replicated", 0o644))
            pair.do(ops.Write("replicated", 0, b"yes"))
            assert (pair.sec / "replicated").read_bytes() == b"yes"
        finally:
            guard.release()


def test_unsafe_paths_are_never_applied(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link")
    t = TreeWriter(tmp_path / "root")
    try:
        for op in (ops.Create("../escape", 0o644), ops.Create("/abs", 0o644)):
            with pytest.raises(ValueError):
                t.apply(op)
        with pytest.raises(OSError):  # a symlink component is not followed
            t.apply(ops.Create("link/escape", 0o644))
        assert os.listdir(tmp_path / "outside") == []
    finally:
        t.close()


def test_alone_wait_fails_when_the_dirty_map_cannot_be_persisted(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    dirty = DirtyStore(tmp_path / "state", zone_size=4096)
    stream = Stream(node="node1", peer="node2", module="m", address=("127.0.0.1", 9),
                    ctx=tls.client_context(certs["node1"]), dirty=dirty)
    try:
        with stream.ordered():
            seq = stream.enqueue(ops.Write("f", 0, b"x"))
        stream.wait(seq)  # ALONE: recorded and persisted
        os.close(dirty._fd)
        dirty._fd = os.open(tmp_path / "state" / "dirty.log", os.O_RDONLY)  # the disk fails
        with stream.ordered():
            seq = stream.enqueue(ops.Write("f", 1 << 20, b"y"))
        with pytest.raises(OSError) as info:
            stream.wait(seq)
        assert info.value.errno == 5  # EIO for the application
    finally:
        stream.close()
        dirty.close()


def test_a_new_primary_stream_is_acknowledged_from_its_first_op(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    """A restarted primary (or the same node primary again after a swap) brings a new Stream
    that numbers its ops from 1 again, to an applier whose last session went much further.
    Its ops must be acknowledged at once: the applier used to carry the last session's count
    over and keep quiet until the new numbers passed it, so the new primary waited out its
    timeout, went ALONE and started a new data generation for nothing."""
    with make_pair(tmp_path, certs, timeout=3.0) as pair:
        pair.stream.connect()
        assert pair.stream.try_mark_in_sync()
        for i in range(4):
            pair.do(ops.Create(f"f{i}", 0o644))
        for i in range(40):
            pair.do(ops.Write(f"f{i % 4}", i * 10, b"first primary"))
        pair.stream.close()
        again = Stream(node="node1", peer="node2", module="m", address=pair.applier.address,
                       ctx=tls.client_context(certs["node1"]), dirty=pair.dirty, timeout=3.0)
        pair.stream = again
        again.connect()
        blocks.resync(again, pair.prim, pair.dirty, full=False)  # what the first left open
        assert again.try_mark_in_sync()
        pair.do(ops.Write("f0", 0, b"second primary"))
        pair.do(ops.Fsync("f0", False))
        st = again.status()
        assert st.mode is Mode.CONNECTED and st.in_sync, st.last_error
        assert (pair.sec / "f0").read_bytes()[:14] == b"second primary"
