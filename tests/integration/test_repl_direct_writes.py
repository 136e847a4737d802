"""Large aligned writes reach the backing files through O_DIRECT (replication/directio.py).

Why these tests: the direct path splits a write into a buffered head, a direct middle and a
buffered tail, and mixes with buffered writes to the same pages; a slip in that arithmetic
would corrupt both copies the same way, so comparing the two copies cannot catch it. Here every
result is compared with an in-memory model of the file. The page cache is inspected with
fincore(1) to prove the direct path really ran. Real ext4 (the test's tmp directory), a real
ramfs (which refuses O_DIRECT), a real FUSE mount and applier.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.integration.test_repl_early_send import choose_path, lend_express, mirrored
from tests.integration.test_repl_stream import tree_digest

from hvha.replication import tls
from hvha.replication.directio import ALIGN, DIRECT_MIN, DirectWriter

MIB = 1 << 20

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mounts ramfs and FUSE file systems: needs root and /dev/fuse")


def resident(path: Path) -> int:
    """Bytes of path in the page cache (fincore from util-linux)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def supports_direct(d: Path) -> bool:
    try:
        os.close(os.open(d / ".probe", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        (d / ".probe").unlink(missing_ok=True)
    return True


def random_writes(rng: random.Random, n: int, span: int) -> list[tuple[int, bytes]]:
    """Writes of every shape the split must handle: small and large, aligned and not,
    overlapping each other, some past the end (holes)."""
    out = []
    for _ in range(n):
        size = rng.choice([1, 100, 4095, 4096, 4097, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1,
                           MIB, MIB + 4096, MIB + 7, 3 * MIB - 5, rng.randrange(1, 3 * MIB)])
        off = rng.choice([rng.randrange(span) // ALIGN * ALIGN, rng.randrange(span)])
        out.append((off, rng.randbytes(size)))
    return out


def apply_model(model: bytearray, off: int, data: bytes) -> None:
    if len(model) < off:
        model.extend(bytes(off - len(model)))
    model[off:off + len(data)] = data


def write_model(pwrite: Callable[[int, bytes, int], int], fd: int, off: int, chunk: bytes,
                model: bytearray) -> None:
    """All of chunk at off through pwrite (short writes resumed), and into the model."""
    n = 0
    while n < len(chunk):
        n += pwrite(fd, chunk[n:], off + n)
    apply_model(model, off, chunk)


def test_direct_writes_match_a_model_and_skip_the_page_cache(tmp_path: Path) -> None:
    if not supports_direct(tmp_path):
        pytest.fail(f"{tmp_path} refuses O_DIRECT: run the tests on ext4/xfs/tmpfs")
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    reader = os.open(path, os.O_RDONLY)  # buffered reads between the writes: coherency
    w = DirectWriter()
    model = bytearray()
    try:
        # an aligned 8 MiB write goes direct: none of it lands in the page cache
        data = random.Random(1).randbytes(8 * MIB)
        assert w.pwrite(fd, data, 0) == len(data)
        apply_model(model, 0, data)
        assert resident(path) == 0
        # the same through a writer with the direct path off fills the cache
        assert DirectWriter(enabled=False).pwrite(fd, data, 0) == len(data)
        assert resident(path) >= len(data) - ALIGN
        rng = random.Random(2)
        for i, (off, chunk) in enumerate(random_writes(rng, 300, 12 * MIB)):
            write_model(w.pwrite, fd, off, chunk, model)
            if i % 7 == 0:
                at = rng.randrange(len(model))
                got = os.pread(reader, 2 * MIB, at)
                assert got == bytes(model[at:at + 2 * MIB]), f"write {i}: read at {at} differs"
        os.fsync(fd)
        assert os.fstat(fd).st_size == len(model)
        with open(path, "rb") as f:
            assert f.read() == bytes(model)
    finally:
        w.close()
        os.close(reader)
        os.close(fd)


@needs_root
def test_a_file_system_without_o_direct_is_written_buffered(tmp_path: Path) -> None:
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "hvha-test", str(mnt)], check=True)
    try:
        assert not supports_direct(mnt), "ramfs accepted O_DIRECT: this test needs another fs"
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o600)
        w = DirectWriter()
        try:
            data = random.Random(3).randbytes(2 * MIB + 5)
            assert w.pwrite(fd, data, 4096) == len(data)
            assert w.pwrite(fd, data[:10], 2 * MIB) == 10
            expect = bytearray(4096) + data
            expect[2 * MIB:2 * MIB + 10] = data[:10]
            assert os.pread(fd, 3 * MIB, 0) == bytes(expect)
        finally:
            w.close()
            os.close(fd)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@needs_root
@pytest.mark.parametrize("path", ["express", "python"])
def test_mirrored_large_writes_match_a_model_on_both_nodes(
        tmp_path: Path, certs: dict[str, tls.NodeCreds], path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the FUSE mirror: write-only and read-write handles, large writes (direct on both
    nodes) and small ones over the same pages; both copies equal the model, and both nodes'
    copies of the large writes bypassed their page cache. express: the large writes are
    served in C (express.c's large_write) once the path is lent; python: HVHA_EXPRESS=0."""
    choose_path(path, monkeypatch)
    prim = tmp_path / "prim"
    prim.mkdir()
    rng = random.Random(4)
    model = bytearray()
    with mirrored(tmp_path, certs, prim) as (mount, stream, _dirty, sec):
        big = rng.randbytes(16 * MIB)
        fd = os.open(prim / "img", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            lend_express(stream, fd)  # (HVHA_EXPRESS=0: nothing to lend)
            for i in range(16):
                os.pwrite(fd, big[i * MIB:(i + 1) * MIB], i * MIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        apply_model(model, 0, big)
        assert resident(sec / "img") < MIB, "the secondary's large writes went through its cache"
        backing = Path(f"/proc/{os.getpid()}/fd/{mount.root_fd}/img")
        assert resident(backing) < 2 * MIB, "the primary's large writes went through its cache"
        x = mount._express
        assert (x is not None and x.served() >= 16) == (path == "express")
        for access in (os.O_WRONLY, os.O_RDWR):
            fd = os.open(prim / "img", access)
            try:
                for off, chunk in random_writes(rng, 60, 18 * MIB):
                    write_model(os.pwrite, fd, off, chunk, model)
                os.fsync(fd)
            finally:
                os.close(fd)
        with open(prim / "img", "rb") as f:
            assert f.read() == bytes(model)
        assert (sec / "img").read_bytes() == bytes(model)
        assert stream.status().in_sync
        assert tree_digest(prim) == tree_digest(sec)


@needs_root
@pytest.mark.parametrize("path", ["express", "python"])
def test_mirrored_large_writes_on_a_file_system_without_o_direct(
        tmp_path: Path, certs: dict[str, tls.NodeCreds], path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary's directory on ramfs (no O_DIRECT): large writes are written buffered
    there, in C as in Python, and both copies equal the model."""
    choose_path(path, monkeypatch)
    prim = tmp_path / "prim"
    prim.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "hvha-test", str(prim)], check=True)
    try:
        assert not supports_direct(prim), "ramfs accepted O_DIRECT: this test needs another fs"
        rng = random.Random(6)
        model = bytearray()
        with mirrored(tmp_path, certs, prim) as (mount, stream, _dirty, sec):
            fd = os.open(prim / "img", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for off, chunk in [(0, rng.randbytes(MIB)), *random_writes(rng, 40, 6 * MIB)]:
                    write_model(os.pwrite, fd, off, chunk, model)
                os.fsync(fd)
            finally:
                os.close(fd)
            x = mount._express
            assert (x is not None and x.served() > 10) == (path == "express")
            assert (prim / "img").read_bytes() == bytes(model)
            assert (sec / "img").read_bytes() == bytes(model)
            assert stream.status().in_sync
    finally:
        subprocess.run(["umount", "-l", str(prim)], check=False)
