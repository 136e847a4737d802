"""The resync's pure decisions and its query encoding, without a network.

Covers: file jobs become pieces (resumed on a coarse boundary) and pieces become batches
within the file, byte and path limits; which blocks are sent whole and which are compared
finely; runs of adjacent blocks; the batched hashes answer round-trips, errors included, and
a short or long answer is refused; a tree answers a batched hashes query exactly as the
previous version's one-file queries (a mixed-version pair agrees), including holes, a
missing file and a fifo; hashing a short range in one read equals the hole-skipping path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hvha.replication import blockplan, hashing, protocol
from hvha.replication.blockplan import FileJob
from hvha.replication.hashing import COARSE, FINE, ZERO
from hvha.replication.protocol import Entry
from hvha.replication.tree import TreeReader

MIB = 1 << 20


def _entry(size: int) -> Entry:
    return Entry("x", "f", 0o644, 0, 0, size, 0, 1, 1)


def _job(path: str, size: int, peer: int | None = None,
         ranges: list[tuple[int, int]] | None = None) -> FileJob:
    return FileJob(path, _entry(size), None if peer is None else _entry(peer), ranges)


def test_a_large_file_becomes_pieces_and_resumes_on_a_coarse_boundary() -> None:
    job = _job("img", 40 * MIB, 40 * MIB)
    ps = blockplan.pieces(job)
    assert [p.nbytes for p in ps] == [16 * MIB, 16 * MIB, 8 * MIB]
    assert [(p.first, p.last) for p in ps] == [(True, False), (False, False), (False, True)]
    resumed = blockplan.pieces(job, start=16 * MIB + 100)
    assert resumed[0].ranges[0][0] == 16 * MIB and resumed[-1].end == 40 * MIB
    # the peer's longer copy is compared up to its end; an empty file still has a piece
    assert blockplan.pieces(_job("a", 10, 5000))[0].ranges == [(0, 5000)]
    assert [p.ranges for p in blockplan.pieces(_job("e", 0, 0))] == [[]]


def test_dirty_ranges_are_clipped_and_grouped() -> None:
    job = _job("f", 3 * MIB, 2 * MIB, [(0, MIB), (4 * MIB, MIB), (2 * MIB, 2 * MIB)])
    assert job.todo() == [(0, MIB), (2 * MIB, MIB)]  # beyond both ends: nothing to compare
    groups = blockplan.split_ranges([(0, 20 * MIB), (30 * MIB, 4 * MIB)], 16 * MIB)
    assert groups == [[(0, 16 * MIB)], [(16 * MIB, 4 * MIB), (30 * MIB, 4 * MIB)]]


def test_many_small_files_share_a_batch_and_large_pieces_do_not() -> None:
    small = [p for i in range(3000) for p in blockplan.pieces(_job(f"d/f{i}", 100, 100))]
    sizes = [len(b) for b in blockplan.batches(small)]
    assert sizes == [1024, 1024, 952]
    big = [p for p in blockplan.pieces(_job("img", 64 * MIB, 64 * MIB))]
    assert [len(b) for b in blockplan.batches(big)] == [1, 1, 1, 1]
    long_paths = [p for i in range(10) for p in blockplan.pieces(_job("x" * 300_000 + str(i),
                                                                      1, 1))]
    assert [len(b) for b in blockplan.batches(long_paths)] == [4, 4, 2]


def test_blocks_that_differ_are_sent_whole_or_compared_finely() -> None:
    blocks = blockplan.spans([(0, 3 * COARSE + 100)], COARSE)
    assert blocks[-1] == (3 * COARSE, 100)
    a, b, c, d = (bytes([i]) * 16 for i in range(1, 5))
    mine = [a, ZERO, c, d]
    theirs = [a, b, ZERO, a]  # equal, zero here, zero there, both data
    n, direct, finely = blockplan.coarse_diff(blocks, mine, theirs, fine=True)
    assert n == 3 and direct == [blocks[1], blocks[2], blocks[3]] and finely == []
    n, direct, finely = blockplan.coarse_diff(blocks[:3], [a, b, c], [d, d, d], fine=True)
    assert n == 3 and direct == [] and finely == blocks[:3]
    assert blockplan.coarse_diff(blocks[:3], [a, b, c], [d, d, d], fine=False)[1] == blocks[:3]
    assert blockplan.coarse_diff(blocks, mine, None, fine=True)[1] == blocks  # peer failed
    with pytest.raises(ValueError, match="digests"):
        blockplan.coarse_diff(blocks, mine, theirs[:2], fine=True)
    fine = blockplan.spans([(COARSE, COARSE)], FINE)
    assert blockplan.fine_diff(fine[:3], [a, b, c], [a, d, c]) == [fine[1]]
    assert blockplan.merge([(0, 4), (4, 4), (8, 4), (20, 4)], 8) == [(0, 8), (8, 4), (20, 4)]
    assert blockplan.merge_zones(frozenset({3, 1, 2, 7}), 10) == [(10, 30), (70, 10)]


def test_hashes_answers_round_trip_and_bad_answers_are_refused() -> None:
    items = [("a", [(0, 100)]), ("b", [(0, 3 * FINE)]), ("c", [(0, 1)])]
    results: list[protocol.HashResult] = [b"\1" * 16, "FileNotFoundError: b", b"\2" * 16]
    body = protocol.encode_hashes([b"\1" * 16, "FileNotFoundError: b", b"\2" * 16])
    assert protocol.decode_hashes(body, items, FINE) == results
    with pytest.raises(ValueError):
        protocol.decode_hashes(body[:-1], items, FINE)
    with pytest.raises(ValueError):
        protocol.decode_hashes(body + b"\0", items, FINE)


def _ask(tree: TreeReader, q: dict[str, object]) -> bytes:
    reply = tree.query(json.dumps(q).encode())
    assert reply[:1] == b"\0", reply
    return reply[1:]


def test_batched_answers_equal_the_previous_versions_one_file_answers(tmp_path: Path) -> None:
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(3 * MIB)
        f.seek(MIB + 5)
        f.write(os.urandom(70_000))
    (tmp_path / "small").write_bytes(b"hello" * 30)
    (tmp_path / "zeros").write_bytes(bytes(10_000))
    os.mkfifo(tmp_path / "fifo")
    ranges = [[0, 3 * MIB + 7], [MIB, 200]]
    with TreeReader(tmp_path) as tree:
        files = [["sparse", ranges], ["small", ranges], ["zeros", [[0, 10_000]]],
                 ["missing", ranges], ["fifo", ranges]]
        for bs in (COARSE, FINE):
            got = protocol.decode_hashes(_ask(tree, {"q": "hashes", "bs": bs, "files": files}),
                                         [(p, [(a, b) for a, b in r]) for p, r in files], bs)
            for (path, r), answer in zip(files[:3], got, strict=False):
                assert answer == _ask(tree, {"q": "hash", "path": path, "ranges": r, "bs": bs})
            assert isinstance(got[3], str) and "FileNotFound" in got[3]
            assert isinstance(got[4], str) and "not a regular file" in got[4]
        assert isinstance(got[2], bytes) and hashing.split_digests(got[2]) == [ZERO] * 3
        stats = protocol.decode_stats(_ask(tree, {"q": "stats", "paths": ["small", "no"]}))
        assert stats[0] is not None and stats[0].size == 150 and stats[1] is None
        too_many = {"q": "hashes", "bs": 1, "files": [["small", [[0, 1 << 30]]]]}
        assert tree.query(json.dumps(too_many).encode()).startswith(b"\1ValueError: more than")


def test_a_short_range_read_at_once_hashes_like_the_hole_skipping_path(
        tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(600_000)
        f.seek(200_000)
        f.write(os.urandom(9000))
    fd = os.open(p, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for off, n in [(0, 250_000), (190_000, 30_000), (590_000, 20_000), (700_000, 5)]:
            short = hashing._hash_small(fd, off, n, FINE, size)
            assert short == hashing._hash_range(fd, off, n, FINE, size), (off, n)
            assert len(short) == hashing.block_count([(off, n)], FINE) * 16
    finally:
        os.close(fd)


def test_one_job_per_file_keeps_content_ranges_next_to_a_metadata_job() -> None:
    """Regression: a metadata-only job hid the content ranges of the same file."""
    e = Entry("a", "f", 0o644, 0, 0, 10 << 20, 0, 1, 1)
    jobs = blockplan.one_job_per_file([
        FileJob("a", e, e, []), FileJob("a", e, e, [(0, 4096)]), FileJob("b", e, e, None),
        FileJob("a", e, e, [(1 << 20, 4096)]), FileJob("b", e, e, [(0, 1)])])
    assert [(j.path, j.ranges) for j in jobs] == [("a", [(0, 4096), (1 << 20, 4096)]),
                                                   ("b", None)]
