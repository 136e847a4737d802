"""The express path (replication/express.py, native/express.c): small writes and fsyncs served
in C while the pair is in sync. These run the real thing: two MirrorReplicators, a FUSE mount,
the native lane over TLS on loopback. What they check is what a user relies on: the copies
stay byte-equal whichever path served a write, ops of the Python path (truncate, rename,
create, unlink) racing express writes keep one order on both nodes, and losing the peer in
the middle of express writes records them dirty so the resync repairs the copy."""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from tests.integration.test_repl_early_send import lend_express
from tests.integration.test_replicator import Lab, digest, lab, needs_root, run, until

from hvha.replication import express

__all__ = ["lab"]

pytestmark = [needs_root, pytest.mark.skipif(
    not express.available()[0], reason=f"no express path: {express.available()[1]}")]


def served(lab: Lab) -> int:
    x = lab.reps["node1"]._dirs[0].stream._express  # type: ignore[union-attr]
    assert x is not None, "the mount has no express path"
    return x.served()


def connection(lab: Lab) -> int:
    """The stream's connection number: it changes if the session failed and reconnected
    (an op out of order ends the session; the resync would then hide the bug)."""
    return lab.reps["node1"]._dirs[0].stream._conn  # type: ignore[union-attr]


def lend(lab: Lab, fd: int) -> None:
    """Until node1's stream has lent the path (test_repl_early_send.lend_express)."""
    stream = lab.reps["node1"]._dirs[0].stream  # type: ignore[union-attr]
    assert stream is not None
    lend_express(stream, fd)


def writer(path: Path, n: int, seed: int, errors: list[BaseException],
           stop: threading.Event | None = None, large: bool = False) -> threading.Thread:
    """4 KiB pwrite + fsync at random offsets of a 1 MiB file, as a database does. large:
    every other write is 128 KiB to 1 MiB (express.c's large writes), at any offset, from a
    page-aligned buffer (as QEMU's) or not (a Python bytes object)."""
    aligned = mmap.mmap(-1, 1 << 20)

    def data(rng: random.Random, i: int) -> bytes | memoryview:
        if not large or i % 2:
            return rng.randbytes(4096)
        size = rng.choice((128 << 10, (128 << 10) + 512, 300_000, 1 << 20))
        if i % 4:
            return rng.randbytes(size)
        aligned[:size] = rng.randbytes(size)
        return memoryview(aligned)[:size]

    def run_() -> None:
        rng = random.Random(seed)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for i in range(n):
                    if stop is not None and stop.is_set():
                        break
                    skew = rng.randrange(4096) if large and i % 3 else 0
                    os.pwrite(fd, data(rng, i), rng.randrange(256) * 4096 + skew)
                    if i % 3 != 2:
                        os.fsync(fd) if i % 2 else os.fdatasync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
    t = threading.Thread(target=run_)
    t.start()
    return t


@pytest.mark.parametrize("enabled", [True, False], ids=["express", "HVHA_EXPRESS=0"])
def test_small_writes_are_served_in_c_and_the_copies_stay_equal(
        lab: Lab, enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not enabled:
        monkeypatch.setenv("HVHA_EXPRESS", "0")
    r1, _ = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    conn = connection(lab)
    errors: list[BaseException] = []
    writer(lab.a / "db", 600, 1, errors).join(60)
    assert not errors, errors
    if enabled:
        assert served(lab) > 500, "the writes and fsyncs should have been served in C"
    else:
        assert lab.reps["node1"]._dirs[0].stream._express is None  # type: ignore[union-attr]
    assert digest(lab.a) == digest(lab.b)
    assert connection(lab) == conn and r1.in_sync()


def test_large_writes_are_sent_from_c_while_written_locally(lab: Lab) -> None:
    """Writes of 128 KiB to 1 MiB: sent from FUSE's buffer while a C thread writes them here
    (direct for the aligned middle, buffered head and tail); each is one op served in C, and
    both copies hold the same bytes, through a write-only and a read-write handle."""
    r1, _ = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    conn = connection(lab)
    rng = random.Random(11)
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as QEMU's: one FUSE request per write
    cases = [(1 << 20, 0), (1 << 20, 3 * 4096 + 100), (128 << 10, 4096), ((128 << 10) + 1, 7),
             (300_000, 5 << 20), (1 << 20, (1 << 20) - 1)]
    fd = os.open(lab.a / "img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        lend(lab, fd)  # the first ops are served in Python: the path is not lent yet
        before = served(lab)
        for size, off in cases:
            buf[:size] = rng.randbytes(size)
            assert os.pwrite(fd, memoryview(buf)[:size], off) == size
        assert served(lab) - before == len(cases), "each large write should be one C op"
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(lab.a / "img", "rb+") as f:  # a read-write handle: through the mount's cache
        for size, off in cases:
            f.seek(off + 5)
            f.write(rng.randbytes(size))
        os.fsync(f.fileno())
    assert digest(lab.a) == digest(lab.b)
    assert connection(lab) == conn and r1.in_sync(), "the session failed on the way"


@pytest.mark.parametrize("large", [False, True], ids=["4k", "with-large-writes"])
def test_python_ops_racing_express_writes_keep_one_order(lab: Lab, large: bool) -> None:
    """Truncates of the file being written, renames, creates and unlinks go through Python and
    take the express path back each time; whatever the interleaving, both copies end equal.
    With large writes, a take-back also waits for a large write's local part in C."""
    r1, _ = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    conn = connection(lab)
    errors: list[BaseException] = []
    stop = threading.Event()
    threads = [writer(lab.a / "db", 100_000, s, errors, stop, large) for s in (1, 2)]
    rng = random.Random(7)
    for i in range(150):
        choice = rng.randrange(4)
        if choice == 0:
            os.truncate(lab.a / "db", rng.randrange(1 << 20))
        elif choice == 1:
            (lab.a / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 9000)))
        elif choice == 2 and (lab.a / f"f{i - 1}").exists():
            os.rename(lab.a / f"f{i - 1}", lab.a / f"r{i}")
        else:
            for p in lab.a.glob("r*"):
                p.unlink()
                break
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert served(lab) > 100
    assert digest(lab.a) == digest(lab.b)
    assert connection(lab) == conn and r1.in_sync(), "the session failed on the way"


@pytest.mark.parametrize("large", [False, True], ids=["4k", "with-large-writes"])
def test_losing_the_peer_mid_express_records_dirty_and_resyncs(lab: Lab, large: bool) -> None:
    r1, r2 = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    errors: list[BaseException] = []
    stop = threading.Event()
    t = writer(lab.a / "db", 1_000_000, 3, errors, stop, large)
    until(lambda: served(lab) > 300, "express writes flowing")
    r2.close()  # the secondary goes away while writes are in flight in C
    until(lambda: r1.status()["dirs"][0]["mode"] == "alone", "primary ALONE")
    before = served(lab)
    until(lambda: r1.status()["dirs"][0]["dirty_bytes"] > 0, "dirty zones recorded")
    lab.start("node2")
    until(r1.in_sync, "in sync again after the resync", timeout=60)
    until(lambda: served(lab) > before + 100, "express again once in sync")
    stop.set()
    t.join(60)
    assert not errors, errors  # no write failed: ALONE records them (no fence in this lab)
    until(lambda: digest(lab.a) == digest(lab.b), "both copies equal", timeout=10)


def test_getxattr_is_answered_in_c_as_in_python(lab: Lab) -> None:
    """getxattr (asked by the kernel before each write of a read-write handle) is a local
    read served in C: values, a missing name, the directory itself and a symlink's own."""
    r1, _ = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    f = lab.a / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.k", b"v" * 300)
    os.setxattr(lab.a, "user.top", b"root")
    os.symlink("f", lab.a / "ln")
    assert os.getxattr(f, "user.k") == b"v" * 300
    assert os.getxattr(lab.a, "user.top") == b"root"
    assert os.getxattr(lab.a / "ln", "user.k") == b"v" * 300  # followed by the kernel
    with pytest.raises(OSError) as info:
        os.getxattr(lab.a / "ln", "user.k", follow_symlinks=False)
    assert info.value.errno in (errno.ENODATA, errno.EPERM)
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.missing")
    assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.getxattr(lab.a / "nothing", "user.k")
    assert info.value.errno == errno.ENOENT
    assert os.getxattr(lab.b / "f", "user.k") == b"v" * 300  # and it was replicated


def test_the_peer_closing_an_idle_lent_session_is_noticed(lab: Lab) -> None:
    """The C handlers read only while they wait for an ack; with the path lent and idle, the
    stream's receiver thread still watches the session and takes the path back when a frame
    or the end arrives: the primary goes ALONE at once, not at its next write."""
    r1, r2 = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    errors: list[BaseException] = []
    writer(lab.a / "db", 50, 4, errors).join(60)
    assert not errors, errors
    fd = os.open(lab.a / "db", os.O_WRONLY)
    try:
        lend(lab, fd)
        r2.close()
        until(lambda: r1.status()["dirs"][0]["mode"] == "alone", "primary ALONE", timeout=3)
    finally:
        os.close(fd)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to write "
                    "without CAP_FSETID")
def test_a_setuid_file_is_not_served_in_c_and_drops_the_bit_on_both_copies(lab: Lab) -> None:
    """A write-only (direct-I/O) handle of a setuid file, written by a process without
    CAP_FSETID while the path is lent to C: the write goes through Python, which drops the bit
    first (hvha.replication.killpriv), on both copies, as ext4 would."""
    r1, _ = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "in sync")
    tool = lab.a / "tool"
    tool.write_bytes(b"x" * 8192)
    os.chmod(tool, 0o4755)
    until(lambda: (lab.b / "tool").exists() and (lab.b / "tool").stat().st_mode & 0o7777
          == 0o4755, "the setuid file on node2")
    fd = os.open(lab.a / "other", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        lend(lab, fd)
    finally:
        os.close(fd)
    write = ("import mmap, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
             "os.pwrite(fd, b'y' * 4096, 0); os.pwrite(fd, mmap.mmap(-1, 1 << 20), 4096)")
    subprocess.run(["setpriv", "--bounding-set=-fsetid", "python3", "-c", write, str(tool)],
                   check=True, timeout=60)
    assert tool.stat().st_mode & 0o7777 == 0o755
    until(lambda: digest(lab.a) == digest(lab.b), "both copies equal")
    assert (lab.b / "tool").stat().st_mode & 0o7777 == 0o755
