"""The mirror file system on real FUSE mounts: every change reaches the sink, in order, and the
op stream alone rebuilds an identical directory (replayed by tests/replay_helper.py)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.replay_helper import ReplaySink, serving, tree_state

from hvha.replication.mirrorrules import (
    creation_mode,
    creation_owner,
    lost_mode_bits,
    op_path,
    open_plan,
)
from hvha.replication.mount import MirrorMount, cleanup_stale, is_mounted, parse_mountinfo
from hvha.replication.ops import Chown, Fsync, Rename, Write

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mirror fs tests mount FUSE file systems: need root and /dev/fuse")

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
PUNCH_HOLE_KEEP_SIZE, ZERO_RANGE = 0x02 | 0x01, 0x10
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if libc.fallocate(fd, mode, off, length) < 0:
        raise OSError(ctypes.get_errno(), "fallocate")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.dir = str(tmp / "vm1")
        self.replica = str(tmp / "replica")
        os.makedirs(self.dir)
        os.makedirs(self.replica)
        os.chmod(self.replica, 0o755)
        os.chmod(self.dir, 0o755)
        self.sink = ReplaySink(self.replica)
        self.mount = MirrorMount(self.dir, self.sink)

    def p(self, name: str) -> str:
        return os.path.join(self.dir, name)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    with serving(e.mount):
        yield e


def run_threads(target: Callable[[int], None], n: int) -> None:
    """target(0) .. target(n - 1), each in its own thread, all at once; return when all end."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def backing(e: Env) -> str:
    assert e.mount.root_fd is not None
    return f"/proc/self/fd/{e.mount.root_fd}"


# ------------------------------------------------------------------ pure rules (no mount)


def test_pure_translation_rules() -> None:
    assert op_path("/") == "" and op_path("/a/b") == "a/b"
    plan = open_plan(os.O_RDWR | os.O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_TRUNC)
    assert plan.truncates and plan.direct_io and not plan.sync_writes
    assert not plan.flags & (os.O_DIRECT | os.O_APPEND | os.O_CREAT) and plan.flags & os.O_RDWR
    assert not open_plan(os.O_RDONLY | os.O_TRUNC).truncates
    assert open_plan(os.O_WRONLY | os.O_SYNC).sync_writes
    # write-only handles skip the mount's page cache (nothing can read or mmap through them);
    # read-write handles keep it (SQLite maps its -shm file shared and writable)
    assert open_plan(os.O_WRONLY | os.O_APPEND).direct_io
    assert not open_plan(os.O_RDWR).direct_io and not open_plan(os.O_RDONLY).direct_io
    assert creation_owner(1000, 1000, 0o2775 | stat.S_IFDIR, 50) == (1000, 50)
    assert creation_owner(1000, 1000, 0o775 | stat.S_IFDIR, 50) == (1000, 1000)
    assert lost_mode_bits(0o666, 0o644) == 0o022 and lost_mode_bits(0o600, 0o600) == 0
    assert creation_mode(0o100666, 0o022, False) == 0o644  # the creator's umask applies
    assert creation_mode(0o4777, 0o077, False) == 0o4700
    assert creation_mode(0o100666, 0o022, True) == 0o666  # a default ACL decides instead
    text = ("36 25 0:32 / /var/lib/vms/vm\\0401 rw - fuse.hvha hvha:/x rw\n"
            "37 25 0:33 / /tmp rw shared:1 - tmpfs tmpfs rw\n")
    assert parse_mountinfo(text) == [("/var/lib/vms/vm 1", "fuse.hvha"), ("/tmp", "tmpfs")]


# ------------------------------------------------------------------ mounts


def test_same_path_before_and_after_mount(env: Env) -> None:
    with open(env.p("disk.img"), "wb") as f:  # opened by its usual path, through the mount
        f.write(b"guest data")
    assert is_mounted(env.dir)
    assert Path(backing(env), "disk.img").read_bytes() == b"guest data"
    env.mount.stop()
    assert not is_mounted(env.dir)
    assert Path(env.p("disk.img")).read_bytes() == b"guest data"  # the bare directory has it


def test_random_workload_replica_is_identical(env: Env) -> None:
    rng = random.Random(20240611)
    links = ["l0", "l1", "d/l2"]
    names = [f"f{i}" for i in range(8)] + [f"d/g{i}" for i in range(4)] + links
    os.mkdir(env.p("d"))
    done: dict[str, int] = {}
    for _ in range(400):
        kind = rng.choice(["write", "write", "write", "create", "truncate", "punch", "zero",
                           "rename", "link", "symlink", "chmod", "mkdir", "rmdir", "unlink",
                           "xattr", "utime"])
        a, b = env.p(rng.choice(names)), env.p(rng.choice(names))
        try:
            if kind in ("write", "create", "truncate", "punch", "zero"):
                flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if kind == "create" else 0)
                fd = os.open(a, flags, 0o640)
                try:
                    off = rng.randrange(0, 1 << 20)
                    if kind == "write":
                        os.pwrite(fd, rng.randbytes(rng.randrange(1, 200_000)), off)
                    elif kind == "truncate":
                        os.ftruncate(fd, off)
                    else:
                        fallocate(fd, PUNCH_HOLE_KEEP_SIZE if kind == "punch" else ZERO_RANGE,
                                  off, rng.randrange(1, 300_000))
                finally:
                    os.close(fd)
            elif kind == "rename":
                os.rename(a, b)
            elif kind == "link":
                dst = env.p(rng.choice(links))
                if os.path.lexists(dst):
                    os.unlink(dst)
                os.link(a, dst)
            elif kind == "symlink":
                os.symlink(f"target-{rng.random()}", b)
            elif kind == "chmod":
                os.chmod(a, rng.choice([0o600, 0o644, 0o755, 0o400]))
            elif kind == "mkdir":
                os.mkdir(env.p(f"d{rng.randrange(3)}"), 0o750)
            elif kind == "rmdir":
                os.rmdir(env.p(f"d{rng.randrange(3)}"))
            elif kind == "unlink":
                os.unlink(a)
            elif kind == "xattr":
                os.setxattr(a, "user.k", rng.randbytes(8))
            else:
                os.utime(a, ns=(rng.randrange(1 << 40), rng.randrange(1 << 40)))
            done[kind] = done.get(kind, 0) + 1
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                OSError) as ex:
            assert ex.errno in (errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR,
                                errno.ENOTEMPTY, errno.EINVAL, errno.EPERM), ex
    assert min(done.get(k, 0) for k in ("write", "rename", "link", "punch", "unlink")) > 3, done
    assert any(isinstance(o, Rename) for o in env.sink.ops)
    assert env.sink.errors == []
    assert tree_state(backing(env)) == tree_state(env.replica)


def test_rename_flags_and_xattrs_replicate(env: Env) -> None:
    for n in ("a", "b"):
        Path(env.p(n)).write_text(n)
    os.setxattr(env.p("a"), "user.tag", b"x")
    assert libc.renameat2(-100, env.p("a").encode(), -100, env.p("b").encode(),
                          RENAME_NOREPLACE) < 0 and ctypes.get_errno() == errno.EEXIST
    assert libc.renameat2(-100, env.p("a").encode(), -100, env.p("b").encode(),
                          RENAME_EXCHANGE) == 0
    assert Path(env.p("a")).read_text() == "b" and os.getxattr(env.p("b"), "user.tag") == b"x"
    assert Rename("a", "b", RENAME_EXCHANGE) in env.sink.ops
    os.removexattr(env.p("b"), "user.tag")
    assert env.sink.errors == [] and tree_state(backing(env)) == tree_state(env.replica)


SQLITE_APP = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute(f"PRAGMA journal_mode={sys.argv[2]}")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
for batch in range(10):
    with db:
        db.executemany("INSERT INTO t (v) VALUES (?)", [(os.urandom(300),) for _ in range(50)])
    db.execute("DELETE FROM t WHERE id % 7 = ?", (batch,))
print(db.execute("PRAGMA integrity_check").fetchone()[0], db.execute("SELECT count(*) FROM t")
      .fetchone()[0])
db.close()
"""

MMAP_APP = """
import mmap, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(64 * 1024)
with open(sys.argv[1], "r+b") as f, mmap.mmap(f.fileno(), 64 * 1024) as mm:
    mm[8192:8200] = b"MMAPDATA"
    mm.flush()
    print("flushed", flush=True)
    sys.stdin.readline()
"""


def run_app(code: str, *args: str) -> str:
    """Run an application in its own process, as the VM or app would be (the FUSE handlers
    live in this process: same-process access from C code holding the GIL would deadlock)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_sqlite_on_the_mount(env: Env, journal: str) -> None:
    check, rows = run_app(SQLITE_APP, env.p("app.db"), journal).split()
    assert check == "ok" and int(rows) > 100
    assert env.sink.errors == []
    replica = sqlite3.connect(os.path.join(env.replica, "app.db"))
    try:
        assert replica.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert replica.execute("SELECT count(*) FROM t").fetchone() == (int(rows),)
    finally:
        replica.close()


def test_mmap_write_reaches_the_sink(env: Env) -> None:
    app = subprocess.Popen([sys.executable, "-c", MMAP_APP, env.p("m")], text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "flushed"
        # msync alone (mapping still open) got the data to the sink and the replica
        assert any(isinstance(o, Write) and b"MMAPDATA" in o.data for o in env.sink.ops)
        assert Path(env.replica, "m").read_bytes()[8192:8200] == b"MMAPDATA"
    finally:
        app.communicate("\n", timeout=30)


def test_sparse_10g_image_stays_sparse(env: Env) -> None:
    fd = os.open(env.p("disk.img"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 10 << 30)
        os.pwrite(fd, b"\xab" * 4096, 5 << 30)
        os.fsync(fd)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 5 << 30  # SEEK_DATA through the mount
        assert os.lseek(fd, 5 << 30, os.SEEK_HOLE) == (5 << 30) + 4096
        os.pwrite(fd, b"\xcd" * 4096, 1 << 30)
        fallocate(fd, PUNCH_HOLE_KEEP_SIZE, 1 << 30, 4096)
    finally:
        os.close(fd)
    for root in (backing(env), env.replica):
        st = os.stat(os.path.join(root, "disk.img"))
        assert st.st_size == 10 << 30 and st.st_blocks * 512 <= 1 << 20, (root, st.st_blocks)
    assert Fsync("disk.img") in env.sink.ops


def test_concurrent_writers(env: Env) -> None:
    def writer(i: int) -> None:
        fd = os.open(env.p(f"w{i}"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for k in range(100):
                os.pwrite(fd, bytes([i + 1]) * 4096 + k.to_bytes(4, "big"), k * 8192)
                if k % 10 == 0:
                    os.fsync(fd)
        finally:
            os.close(fd)
    run_threads(writer, 4)
    assert sum(isinstance(o, Write) for o in env.sink.ops) == 400
    assert env.sink.errors == [] and tree_state(backing(env)) == tree_state(env.replica)


def test_write_returns_only_after_sink_wait(env: Env) -> None:
    Path(env.p("other")).write_bytes(b"")
    env.sink.hold = True
    done = threading.Event()

    def blocked_writer() -> None:
        with open(env.p("f"), "wb", buffering=0) as f:
            f.write(b"x" * 4096)
        done.set()
    t = threading.Thread(target=blocked_writer)
    t.start()
    try:
        time.sleep(0.3)
        assert not done.is_set(), "write returned before the secondary had it"
        # the order lock is not held while waiting, and the loop has other threads:
        assert env.sink.lock.acquire(timeout=2)
        env.sink.lock.release()
    finally:
        env.sink.release.set()
        t.join(10)
    assert done.is_set()


def test_sink_failure_gives_eio(env: Env) -> None:
    env.sink.fail_wait = True
    with pytest.raises(OSError) as exc:  # a create the secondary did not confirm fails
        os.open(env.p("g"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert exc.value.errno == errno.EIO
    env.sink.fail_wait = False
    fd = os.open(env.p("h"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        env.sink.fail_wait = True
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"data", 0)
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert len(env.sink.waited) == 1  # only the successful create of "h" was acknowledged


def test_o_direct_open_is_served(env: Env) -> None:
    buf = mmap.mmap(-1, 8192)  # page aligned, as O_DIRECT users do
    buf.write(b"D" * 8192)
    fd = os.open(env.p("direct.img"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        assert os.pwritev(fd, [buf], 0) == 8192
        os.fdatasync(fd)
        back = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [back], 0) == 8192 and back[:] == buf[:]
    finally:
        os.close(fd)
    assert Fsync("direct.img", datasync=True) in env.sink.ops
    assert Path(env.replica, "direct.img").read_bytes() == b"D" * 8192


def test_permissions_for_other_users() -> None:
    top = tempfile.mkdtemp(prefix="hvha-perm-")  # pytest's tmp dirs are 0700: not for nobody
    os.chmod(top, 0o755)
    e = Env(Path(top))
    e.mount.start()
    try:
        os.chmod(e.dir, 0o1777)
        Path(e.p("roots")).write_text("secret")
        os.chmod(e.p("roots"), 0o600)
        script = 'echo hi > "$1/mine" && (cat "$1/roots" 2>/dev/null && echo READ || echo DENIED)'
        out = subprocess.run(["sh", "-c", script, "sh", e.dir], user=65534, group=65534,
                             capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == "DENIED", (out.stdout, out.stderr)
        st = os.stat(os.path.join(backing(e), "mine"))
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert Chown("mine", 65534, 65534) in e.sink.ops
        assert tree_state(backing(e)) == tree_state(e.replica)
    finally:
        e.mount.stop()
        if is_mounted(e.dir):
            subprocess.run(["umount", "-l", e.dir], check=False)
        shutil.rmtree(top, ignore_errors=True)


def test_cleanup_stale_removes_a_dead_mount(tmp_path: Path) -> None:
    d = tmp_path / "dead"
    d.mkdir()
    code = ("import sys,time,threading,contextlib\n"
            "from hvha.replication.mount import MirrorMount\n"
            "class S:\n lock=threading.Lock()\n def ordered(self): return self.lock\n"
            " def enqueue(self, op): return 1\n def wait(self, seq): pass\n"
            "MirrorMount(sys.argv[1], S()).start(); print('up', flush=True); time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        os.kill(proc.pid, signal.SIGKILL)  # the agent dies: its mount dies with it
        proc.wait(10)
        with pytest.raises(OSError) as exc:
            os.listdir(d)
        assert exc.value.errno == errno.ENOTCONN  # the app is fenced
        assert cleanup_stale(str(d)) is True
        assert not is_mounted(str(d)) and os.listdir(d) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if is_mounted(str(d)):
            subprocess.run(["umount", "-l", str(d)], check=False)


def _thread_states() -> int:
    """Python thread states of this interpreter (C API: ThreadHead / PyThreadState_Next)."""
    api = ctypes.pythonapi
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
    api.PyThreadState_Next.restype = ctypes.c_void_p
    api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
    n, ts = 0, api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Get())
    while ts:
        n, ts = n + 1, api.PyThreadState_Next(ts)
    return n


def test_workers_keep_one_thread_state_each_and_release_them(tmp_path: Path) -> None:
    """The libfuse workers keep their Python thread states between requests (no state, and
    no mmap/munmap of its frame stack, per request), never more than max_threads of them,
    and all are gone once the mount is stopped: remounting (each failover) leaks nothing."""
    os.makedirs(tmp_path / "vm1")
    os.makedirs(tmp_path / "replica")
    before = _thread_states()
    for _cycle in range(2):
        mount = MirrorMount(str(tmp_path / "vm1"), ReplaySink(str(tmp_path / "replica")),
                            max_threads=4)
        with serving(mount):
            def writer(i: int) -> None:
                fd = os.open(tmp_path / "vm1" / f"w{i}", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    for k in range(200):
                        os.pwrite(fd, b"x" * 512, k * 512)
                finally:
                    os.close(fd)
            run_threads(writer, 8)
            during = _thread_states()
            # the serving thread, the 4 workers, and nothing per request or per writer
            assert before + 1 < during <= before + 1 + 4, (before, during)
        assert _thread_states() == before
    assert tree_state(str(tmp_path / "vm1")) == tree_state(str(tmp_path / "replica"))


def test_a_loop_that_ends_after_stop_gave_up_ends_cleanly(tmp_path: Path) -> None:
    """stop() waits a bounded time for the loop; a request stuck in the sink (a peer that
    does not answer) keeps the loop alive past it. The loop must then end on its own later,
    with its own handle (this used to pass NULL to fuse_unmount: a segfault of the agent)."""
    release = threading.Event()

    class StuckSink(ReplaySink):
        def wait(self, seq: int) -> None:
            release.wait(30)

    os.makedirs(tmp_path / "vm1")
    os.makedirs(tmp_path / "replica")
    mount = MirrorMount(str(tmp_path / "vm1"), StuckSink(str(tmp_path / "replica")))
    mount.start()
    try:
        errors: list[OSError] = []

        def writer() -> None:
            try:
                fd = os.open(tmp_path / "vm1" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, b"blocked")
                finally:
                    os.close(fd)
            except OSError as exc:
                errors.append(exc)

        w = threading.Thread(target=writer)
        w.start()
        time.sleep(0.5)  # the create is stuck in the sink's wait
        loop = mount._thread
        assert loop is not None and loop.is_alive()
        mount.stop(timeout=0.5)
        assert loop.is_alive(), "the loop should still be serving the stuck request"
        release.set()
        loop.join(20)
        w.join(20)
        assert not loop.is_alive() and not w.is_alive()
    finally:
        release.set()
        mount.stop()
        if is_mounted(str(tmp_path / "vm1")):
            subprocess.run(["umount", "-l", str(tmp_path / "vm1")], check=False)
