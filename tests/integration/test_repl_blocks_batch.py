"""Batched, pipelined verify and resync over the real TLS stream (many files per query).

Covers: a verify of a few thousand small files names exactly the differences planted among
them (content, size, mode, symlink target, type, missing and extra entries and directories)
and asks O(files / batch) queries, not O(files); a full resync then makes the trees equal; an
incremental resync of many files and of hundreds of scattered dirty zones stays batched and
sends little more than what changed; against a peer that only knows the previous version's
one-file queries the same verify and resync still work; a peer still answers those old
queries as before.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from test_repl_stream import (
    Pair,
    interrupted_full_resync,
    make_pair,
    tree_digest,
)

from hvha.replication import blocks, ops, tls
from hvha.replication.stream import Mode, Stream, unwrap

COARSE, FINE = blocks.COARSE, blocks.FINE

FILES = 3000
PER_DIR = 1000


def _make_tree(root: Path) -> None:
    for i in range(FILES):
        d = root / f"d{i // PER_DIR}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}").write_bytes(i.to_bytes(4, "little") * (16 + i % 40))
    os.symlink("d0/f00000", root / "link")


class Counter:
    """Counts the queries a stream sends (query() goes through query_async())."""

    def __init__(self, stream: Stream) -> None:
        self.kinds: list[str] = []
        real = stream.query_async

        def counted(request: dict[str, Any]) -> Future[bytes]:
            self.kinds.append(str(request.get("q")))
            return real(request)
        stream.query_async = counted  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self.kinds)


@pytest.fixture
def trees(tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> Iterator[Pair]:
    with make_pair(tmp_path, certs) as pair:
        _make_tree(pair.prim)
        shutil.copytree(pair.prim, pair.sec, symlinks=True, dirs_exist_ok=True)
        yield pair


def _plant_differences(pair: Pair) -> set[tuple[str, str]]:
    prim, sec = pair.prim, pair.sec
    with open(sec / "d1/f01234", "r+b") as f:  # same size, one byte changed
        f.seek(5)
        f.write(b"\xff")
    os.truncate(sec / "d2/f02222", 10)  # shorter: size and content
    os.chmod(sec / "d0/f00042", 0o600)
    os.unlink(sec / "link")
    os.symlink("d0/f00001", sec / "link")
    os.unlink(sec / "d0/f00777")  # missing on the peer
    (sec / "d1/extra").write_bytes(b"not here")
    (sec / "gone").mkdir()  # an extra directory with a file in it
    (sec / "gone/x").write_bytes(b"x")
    os.unlink(sec / "d2/f02500")  # a directory where the file should be
    (sec / "d2/f02500").mkdir()
    (prim / "newdir").mkdir()  # a directory missing on the peer
    (prim / "newdir/n").write_bytes(b"new")
    return {("d1/f01234", "content"), ("d2/f02222", "size"), ("d2/f02222", "content"),
            ("d0/f00042", "mode"), ("link", "symlink"), ("d0/f00777", "missing"),
            ("d1/extra", "extra"), ("gone", "extra"), ("gone/x", "extra"),
            ("d2/f02500", "type"), ("d2/f02500", "extra"), ("d2/f02500", "missing"),
            ("newdir", "missing"), ("newdir/n", "missing")}


def test_verify_of_many_files_lists_exactly_the_differences_in_few_queries(
        trees: Pair) -> None:
    pair = trees
    assert tree_digest(pair.prim) == tree_digest(pair.sec)
    pair.stream.connect()
    counter = Counter(pair.stream)
    assert blocks.verify(pair.stream, pair.prim) == []
    dirs = FILES // PER_DIR + 1
    # one listing per directory, one hashes query per 1024 files, one stat of the root
    assert len(counter) <= dirs + 2 * (FILES // 1024 + 1) + 2, counter.kinds
    assert counter.kinds.count("hashes") <= FILES // 1024 + 2, counter.kinds
    assert "hash" not in counter.kinds and "stat" not in counter.kinds

    expected = _plant_differences(pair)
    before = tree_digest(pair.sec)
    diffs = blocks.verify(pair.stream, pair.prim)
    assert {(d.path, d.kind) for d in diffs} == expected, diffs
    assert tree_digest(pair.sec) == before, "verify changed the peer's copy"


def test_full_resync_after_differences_then_verify_is_clean(trees: Pair) -> None:
    pair = trees
    _plant_differences(pair)
    pair.stream.connect()
    counter = Counter(pair.stream)
    stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=True, state_dir=pair.state)
    pair.do(ops.Fsync(None))
    assert pair.stream.status().mode is Mode.CONNECTED
    assert tree_digest(pair.prim) == tree_digest(pair.sec)
    assert blocks.verify(pair.stream, pair.prim) == []
    assert stats.files >= FILES and stats.sent_bytes < 10_000, stats
    assert counter.kinds.count("hashes") <= 2 * (FILES // 1024 + 2), counter.kinds


def test_incremental_resync_of_many_files_is_batched(trees: Pair) -> None:
    pair = trees
    pair.stream.connect()
    pair.stream.try_mark_in_sync()
    pair.stream.detach()
    changed = [f"d{i // PER_DIR}/f{i:05d}" for i in range(0, FILES, 3)]
    for p in changed:  # the peer is away: each write is recorded in the dirty map
        pair.do(ops.Write(p, 2, b"CHANGED"))
    pair.do(ops.Chmod("d1/f01000", 0o640))
    pair.stream.connect()
    counter = Counter(pair.stream)
    stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=False)
    pair.do(ops.Fsync(None))
    assert tree_digest(pair.prim) == tree_digest(pair.sec)
    assert pair.stream.status().in_sync
    assert len(counter) <= 20, f"{len(counter)} queries for {len(changed)} files"
    assert stats.sent_bytes <= 2 * len(changed) * 200, stats


def test_scattered_zones_are_compared_in_few_queries_and_send_little(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:  # dirty zones of 64 KiB
        pair.stream.connect()
        pair.stream.try_mark_in_sync()
        pair.do(ops.Create("img", 0o644))
        for i in range(0, 64 << 20, 4 << 20):
            pair.do(ops.Write("img", i, os.urandom(4 << 20)))
        pair.stream.detach()
        offsets = sorted(b * FINE for b in random.Random(7).sample(range(16384), 400))
        for off in offsets:  # scattered, aligned 4 KiB writes while ALONE
            pair.do(ops.Write("img", off, os.urandom(FINE)))
        pair.stream.connect()
        counter = Counter(pair.stream)
        stats = blocks.resync(pair.stream, pair.prim, pair.dirty, full=False)
        pair.do(ops.Fsync(None))
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
        changed = len(offsets) * FINE
        assert stats.sent_bytes <= 1.2 * changed, stats
        zones = len({off // (64 << 10) for off in offsets})
        assert zones > 300 and len(counter) <= 12, f"{len(counter)} queries, {zones} zones"


def _old_peer(pair: Pair) -> list[str]:
    """Make the secondary answer like the previous version: no batched query kinds."""
    refused: list[str] = []
    real = pair.applier.tree.query

    def old(payload: bytes) -> bytes:
        kind = json.loads(payload).get("q")
        if kind in ("hashes", "stats"):
            refused.append(kind)
            return b"\1" + f"ValueError: unknown query {kind!r}".encode()
        return real(payload)
    pair.applier.tree.query = old  # type: ignore[method-assign]
    return refused


def test_a_peer_of_the_previous_version_still_verifies_and_resyncs(trees: Pair) -> None:
    pair = trees
    refused = _old_peer(pair)
    expected = _plant_differences(pair)
    pair.stream.connect()
    diffs = blocks.verify(pair.stream, pair.prim)
    assert {(d.path, d.kind) for d in diffs} == expected
    assert refused, "the batched queries were never tried"
    with open(pair.prim / "d0/f00003", "r+b") as f:  # a coarse block to compare finely
        f.write(os.urandom(3 * COARSE))
    blocks.resync(pair.stream, pair.prim, pair.dirty, full=True)
    pair.do(ops.Fsync(None))
    assert tree_digest(pair.prim) == tree_digest(pair.sec)


def test_the_previous_versions_queries_are_still_answered(trees: Pair) -> None:
    pair = trees
    pair.stream.connect()
    ranges = [[0, 100], [64, 5000]]
    with blocks.TreeReader(pair.prim) as local:
        want = local.hashes("d0/f00005", [(0, 100), (64, 5000)], FINE)
        entry = local.stat("d0/f00005")
    assert unwrap(pair.stream.query_async(
        {"q": "hash", "path": "d0/f00005", "ranges": ranges, "bs": FINE}).result(10)) == want
    got = json.loads(pair.stream.query({"q": "stat", "path": "d0/f00005"}))
    assert entry is not None and got[1:3] == ["f", entry.mode] and got[5] == entry.size
    assert json.loads(pair.stream.query({"q": "stat", "path": "nope"})) is None
    with pytest.raises(OSError, match="unknown query"):
        pair.stream.query({"q": "no-such-kind"})


def test_a_write_after_the_checkpoint_to_a_file_it_has_as_done_is_resent(
        tmp_path: Path, certs: dict[str, tls.NodeCreds]) -> None:
    with make_pair(tmp_path, certs) as pair:
        interrupted_full_resync(pair, 4, 16 << 20)  # f0 is done (or at its end)
        pair.do(ops.Write("f0", 12_288, os.urandom(4096)))  # while ALONE: dirty map only
        pair.stream.connect()
        blocks.resync(pair.stream, pair.prim, pair.dirty, full=True, state_dir=pair.state,
                      checkpoint_key="k", streams=1)
        pair.do(ops.Fsync(None))
        assert tree_digest(pair.prim) == tree_digest(pair.sec)
