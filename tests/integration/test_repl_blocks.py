"""Block-hash verify and resync between two directories over the real TLS stream.

Covers: verify names each kind of difference without changing anything; a full resync and an
incremental resync make the trees equal (hard links, symlinks, modes); a sparse 1 GiB file
stays sparse; a full resync interrupted at 50% resumes from its checkpoint, not from zero.
"""

from __future__ import annotations

import os
from pathlib import Path

from test_repl_stream import (
    interrupted_full_resync,
    make_pair,
    tree_digest,
)

from hvha.replication import blocks, ops, tls
from hvha.replication.stream import Mode

GIB = 1 << 30


def _populate(root: Path) -> None:
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/a").write_bytes(os.urandom(300_000))
    (root / "dir/sub/b").write_bytes(b"b" * 70_000)
    os.link(root / "dir/a", root / "dir/a-link")
    os.symlink("a", root / "dir/sym")
    (root / "empty").write_bytes(b"")
    os.chmod(root / "dir/sub/b", 0o600)


def test_verify_lists_differences_and_changes_nothing(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        _populate(pair.prim)
        _populate(pair.sec)
        (pair.sec / "extra").write_bytes(b"x")
        (pair.prim / "missing").write_bytes(b"y")
        with open(pair.sec / "dir/a", "r+b") as f:
            f.seek(123_456)
            f.write(b"changed")
        os.chmod(pair.sec / "dir/sub/b", 0o644)
        os.unlink(pair.sec / "dir/sym")
        os.symlink("elsewhere", pair.sec / "dir/sym")
        before = tree_digest(pair.sec)
        pair.stream.connect()
        diffs = blocks.verify(pair.stream, pair.prim)
        found = {(d.path, d.kind) for d in diffs}
        assert {("extra", "extra"), ("missing", "missing"), ("dir/a", "content"),
                ("dir/sub/b", "mode"), ("dir/sym", "symlink")} <= found
        assert ("dir/sub/b", "content") not in found
        assert tree_digest(pair.sec) == before


def test_full_resync_makes_trees_equal(tmp_path: Path,
                                       certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        _populate(pair.prim)
        (pair.sec / "dir").mkdir()
        (pair.sec / "dir/a").write_bytes(b"old")
        (pair.sec / "dir/sub").write_bytes(b"a file where a directory should be")
        (pair.sec / "stale").mkdir()
        (pair.sec / "stale/x").write_bytes(b"x")
        pair.stream.connect()
        stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=True,
                              state_dir=pair.state)
        pair.do(ops.Fsync(None))
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        assert pair.stream.status().mode is Mode.CONNECTED
        assert blocks.verify(pair.stream, pair.prim) == []
        # a second full resync of identical trees sends no data
        pair.stream.detach()
        pair.stream.connect()
        again = blocks.resync(pair.stream, pair.prim, pair.dirty, full=True)
        assert again.sent_bytes == 0 and stats.sent_bytes > 300_000


def test_incremental_resync_sends_little(tmp_path: Path,
                                         certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        pair.stream.connect()
        pair.stream.try_mark_in_sync()
        pair.do(ops.Create("img", 0o644))
        pair.do(ops.Truncate("img", 64 << 20))
        for i in range(0, 64 << 20, 1 << 20):
            pair.do(ops.Write("img", i, os.urandom(1 << 20)))
        pair.stream.detach()
        changed = 0
        for i in range(20):  # scattered, aligned 4 KiB writes while ALONE (as a VM does)
            pair.do(ops.Write("img", i * 3_000_000 // 4096 * 4096, os.urandom(4096)))
            changed += 4096
        pair.do(ops.Rename("img", "img2"))
        pair.do(ops.Symlink("img2", "img"))
        pair.stream.connect()
        stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=False)
        pair.do(ops.Fsync(None))
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        assert stats.sent_bytes <= 1.2 * changed, stats


def test_sparse_file_stays_sparse(tmp_path: Path,
                                  certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        with open(pair.prim / "disk.img", "wb") as f:
            f.truncate(GIB)
            for off in (0, 300 << 20, GIB - 4096):
                f.seek(off)
                f.write(os.urandom(4096))
        with open(pair.sec / "disk.img", "wb") as f:  # a stale copy with data in a hole
            f.truncate(GIB)
            f.seek(500 << 20)
            f.write(os.urandom(1 << 20))
        pair.stream.connect()
        stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=True)
        st = os.stat(pair.sec / "disk.img")
        assert st.st_size == GIB
        assert st.st_blocks * 512 < 4 << 20, "the copy is no longer sparse"
        assert stats.sent_bytes < 1 << 20
        assert blocks.verify(pair.stream, pair.prim) == []


def test_interrupted_full_resync_resumes_from_checkpoint(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        interrupted_full_resync(pair, 4, 32 << 20)
        pair.stream.connect()
        reports: list[tuple[int, int]] = []
        blocks.resync(pair.stream, pair.prim, pair.dirty, full=True, state_dir=pair.state,
                      checkpoint_key="k", streams=1,
                      progress=lambda p: reports.append((p.done_bytes, p.total_bytes)))
        # half was done (f0, and f1 up to the piece in flight when the peer was lost): the
        # full pass's first report, after one 16 MiB piece, counts them as done, not to hash.
        # (What the dirty map holds since, e.g. writes the peer had not made durable, is
        # compared again afterwards.)
        done, total = reports[0]
        assert done >= (32 + 16) << 20 and total - done <= 64 << 20, "resync started from zero"
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        assert not (pair.state / "resync.checkpoint").exists()


def test_bandwidth_cap(tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    import time
    with make_pair(tmp_path, certs) as pair:
        (pair.prim / "f").write_bytes(os.urandom(8 << 20))
        pair.stream.connect()
        t = time.monotonic()
        blocks.resync(pair.stream, pair.prim, pair.dirty, full=True, bandwidth=16 << 20)
        assert time.monotonic() - t >= 0.45
