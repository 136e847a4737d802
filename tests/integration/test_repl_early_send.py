"""Large writes leave for the peer before they are written locally (mirrordata._write_early).

Why these tests: sending first lets the two page-cache copies overlap, but it opens a window
where the peer holds data this copy does not; if the local write then fails (a full disk on
the primary), the copies must still end up equal, the failed write must never be reported as
done, and nothing must hang. Real FUSE mount, real TLS stream and applier, a real full tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_repl_stream import assert_lacking_zones_dirty, make_pair, tree_digest
from tests.replay_helper import serving

from hvha.replication import blocks, express, tls
from hvha.replication.dirty import DirtyStore
from hvha.replication.mirrordata import EARLY_SEND
from hvha.replication.mount import MirrorMount
from hvha.replication.stream import Mode, Stream

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mounts FUSE and tmpfs file systems: needs root and /dev/fuse")


def choose_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """"python": the mount's writes stay in Python (HVHA_EXPRESS=0); "express": served in C
    once lent (skipped, saying why, where the express path cannot run)."""
    if path == "python":
        monkeypatch.setenv("HVHA_EXPRESS", "0")
    elif not express.available()[0]:
        pytest.skip(f"no express path here: {express.available()[1]}")


def lend_express(stream: Stream, fd: int) -> None:
    """With the express path on: a 1-byte write at offset 0 of fd and an fsync, until the
    stream has lent the path (the caller's next writes replace that byte); each of them lends
    it when the stream is idle, and one may find it busy (a timer barrier, an ack being read).
    Any op of the stream's own (a create, say) takes it back. Without the path: nothing."""
    if not express.available()[0]:
        return
    for _ in range(200):
        os.pwrite(fd, b"x", 0)
        os.fsync(fd)
        if stream._express_on:
            return
    raise AssertionError("the stream never lent the express path")


@contextlib.contextmanager
def mirrored(tmp: Path, certs: dict[str, tls.NodeCreds], prim: Path
             ) -> Iterator[tuple[MirrorMount, Stream, DirtyStore, Path]]:
    """`prim` mounted through the mirror, streamed to an applier on tmp/sec, in sync."""
    with make_pair(tmp, certs, prim=prim) as pair:
        pair.stream.connect()
        assert pair.stream.try_mark_in_sync()
        with serving(MirrorMount(str(prim), pair.stream)) as mount:
            yield mount, pair.stream, pair.dirty, pair.sec


def test_large_writes_sent_early_keep_order_with_small_writers(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    prim = tmp_path / "prim"
    prim.mkdir()
    rng = random.Random(5)
    with mirrored(tmp_path, certs, prim) as (_, stream, _dirty, sec):
        big = [rng.randbytes(EARLY_SEND * k) for k in (1, 2, 8)]

        def small_writer() -> None:  # overlapping 4 KiB writes into the same file, fsynced
            fd = os.open(prim / "img", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for i in range(200):
                    os.pwrite(fd, rng.randbytes(4096), (i * 37 % 512) * 4096)
                    os.fsync(fd)
            finally:
                os.close(fd)

        t = threading.Thread(target=small_writer)
        t.start()
        fd = os.open(prim / "img", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(30):
                os.pwrite(fd, big[i % 3], (i * 97 % 1024) * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        t.join()
        with open(prim / "img", "rb+") as f:  # the same through a read-write open
            f.write(big[2])
            os.fsync(f.fileno())
        st = stream.status()
        assert st.mode is Mode.CONNECTED and st.in_sync
        assert tree_digest(prim) == tree_digest(sec)


@pytest.mark.parametrize("path", ["express", "python"])
def test_a_write_sent_early_that_fails_locally_is_resynced_not_reported(
        tmp_path: Path, certs: dict[str, tls.NodeCreds], path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """express: the failing write is sent by express.c's large_write (the handler's own local
    write meets the full disk); python: by the stream's sender thread (HVHA_EXPRESS=0)."""
    choose_path(path, monkeypatch)
    prim = tmp_path / "prim"
    prim.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(prim)], check=True)
    try:
        with mirrored(tmp_path, certs, prim) as (mount, stream, dirty, sec):
            # page-aligned (as QEMU's buffers): each write is one FUSE request, so the one
            # that fails is a large write (an unaligned one begins with a small request)
            chunk = mmap.mmap(-1, 4 * EARLY_SEND)
            chunk[:] = os.urandom(4 * EARLY_SEND)
            fd = os.open(prim / "big", os.O_WRONLY | os.O_CREAT, 0o644)
            written, failure, in_c = 0, None, 0
            try:
                for _ in range(8):  # 4 MiB into a 1 MiB file system
                    # lent before each write: on a loaded machine the stream's timer barrier
                    # may come between two writes, and it takes the path back
                    lend_express(stream, fd)
                    before = mount._express.served() if mount._express else 0
                    try:
                        n = os.write(fd, chunk)
                    finally:
                        in_c = (mount._express.served() if mount._express else 0) - before
                    written += n
                    if n < len(chunk):
                        break
            except OSError as exc:
                failure = exc
            finally:
                os.close(fd)
            assert in_c == (path == "express"), "the failing write went the other path"
            if failure is not None:
                assert failure.errno == errno.ENOSPC, failure
            else:
                assert written % len(chunk), "the primary's disk never filled up"
            assert written <= 1 << 20, "a write was reported done that the primary lacks"
            # the peer got data this copy lacks: recorded dirty, connection dropped
            deadline = time.monotonic() + 10
            while stream.mode is not Mode.ALONE and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stream.mode is Mode.ALONE and "failed locally" in stream.status().last_error
            assert "big" in dirty.snapshot().zones
            # reconnect and resync: the peer's copy is put back to the primary's
            stream.connect()
            blocks.resync(stream, f"/proc/self/fd/{mount.root_fd}", dirty, full=False)
            assert stream.status().in_sync and dirty.is_clean()
            assert tree_digest(prim) == tree_digest(sec)
    finally:
        subprocess.run(["umount", "-l", str(prim)], check=False)


@pytest.mark.parametrize("n", [4, 1], ids=["4m", "the-only-one-fails"])
def test_full_disk_on_the_secondary_under_large_writes_in_c(
        tmp_path: Path, certs: dict[str, tls.NodeCreds], n: int) -> None:
    """Large writes served in C (express.c's large_write) that the secondary cannot store (a
    1 MiB tmpfs, half full): it NACKs (before or after acknowledging on receipt), the stream
    takes the path back and goes ALONE, and every zone the secondary lacks is in the dirty
    map; also when the failing write is the only one (the-only-one-fails)."""
    if not express.available()[0]:
        pytest.skip(f"no express path here: {express.available()[1]}")
    prim, sec = tmp_path / "prim", tmp_path / "sec"
    prim.mkdir()
    sec.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sec)], check=True)
    try:
        (sec / "filler").write_bytes(bytes(512 << 10))  # so the first MiB does not fit either
        with make_pair(tmp_path, certs, sec=sec, prim=prim) as pair:
            pair.stream.connect()
            assert pair.stream.try_mark_in_sync()
            with serving(MirrorMount(str(prim), pair.stream)) as mount:
                assert mount._express is not None
                fd = os.open(prim / "big", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    lend_express(pair.stream, fd)
                    before = mount._express.served()
                    for i in range(n):  # 1-4 MiB into a 1 MiB file system
                        try:
                            os.pwrite(fd, os.urandom(1 << 20), i << 20)
                        except OSError:  # a write after the NACK may fail (a fence) or not
                            break
                    in_c = mount._express.served() - before
                finally:
                    os.close(fd)
                deadline = time.monotonic() + 3
                while pair.stream.mode is not Mode.ALONE and time.monotonic() < deadline:
                    time.sleep(0.005)
                st = pair.stream.status()
                assert st.mode is Mode.ALONE and "No space left" in st.last_error, st.last_error
                assert in_c >= 1, "the large writes should have been served in C"
                assert_lacking_zones_dirty(prim, sec, "big", pair.dirty)
    finally:
        subprocess.run(["umount", "-l", str(sec)], check=False)
