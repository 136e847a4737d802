"""Pure decisions of the block-hash resync: what to compare, in which batches, what to send.

Why: the resync's side effects (reading files, queries, ops) live in content.py and
syncer.py; what they act on is decided here without any I/O, so the batching and the
"which blocks differ" logic are tested directly: a file job becomes pieces of at most
PIECE bytes, pieces become batches (one hashes query each, at most BATCH_BYTES compared or
BATCH_ITEMS files), and two digest lists become the byte spans to send or to compare at the
fine block size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hvha.replication.hashing import COARSE, FINE, ZERO
from hvha.replication.protocol import Entry, Ranges

PIECE = 16 * 1024 * 1024  # at most this many bytes of one file per piece (a progress step)
BATCH_BYTES = 16 * 1024 * 1024  # bytes compared per batched query
BATCH_ITEMS = 1024  # pieces (files) per batched query: many small files in one round trip
BATCH_CHARS = 1 << 20  # path characters per batched query (keeps the query far below 8 MiB)
MAX_RUN = 1 << 20  # bytes per Write op made from adjacent differing coarse blocks


@dataclass(slots=True)
class FileJob:
    """One regular file whose content is compared: the local entry and the peer's (None: the
    file is new on the peer), both as listed; ranges None: the whole file."""

    path: str
    local: Entry
    peer: Entry | None
    ranges: Ranges | None
    gone: bool = False  # the local file vanished meanwhile: its own ops are in the stream

    @property
    def peer_size(self) -> int:
        return -1 if self.peer is None else self.peer.size

    def todo(self, start: int = 0) -> Ranges:
        """The ranges to compare; a whole-file job resumes at `start` (rounded down)."""
        end = max(self.local.size, self.peer_size)
        if self.ranges is None:
            begin = min(start - start % COARSE, end)
            return [(begin, end - begin)]
        return [(o, min(n, end - o)) for o, n in self.ranges if o < end and n > 0]


@dataclass(slots=True)
class Piece:
    """Up to PIECE bytes of one job: `first`/`last` piece of the job; end: where it stops."""

    job: FileJob
    ranges: Ranges
    first: bool
    last: bool
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(n for _, n in self.ranges)

    @property
    def end(self) -> int:
        return self.ranges[-1][0] + self.ranges[-1][1] if self.ranges else 0


def split_ranges(ranges: Ranges, limit: int) -> list[Ranges]:
    """Ranges -> groups of at most `limit` bytes each, long ranges cut every `limit` bytes
    from their start (limit is a multiple of COARSE: the blocks stay where they were)."""
    groups: list[Ranges] = []
    cur: Ranges = []
    size = 0
    for off, n in ranges:
        while n > 0:
            take = min(n, limit - size)
            cur.append((off, take))
            size += take
            off, n = off + take, n - take
            if size >= limit:
                groups.append(cur)
                cur, size = [], 0
    if cur or not groups:
        groups.append(cur)
    return groups


def pieces(job: FileJob, start: int = 0, limit: int = PIECE) -> list[Piece]:
    """A job's pieces (at least one, maybe empty: the job still finishes with its metadata)."""
    if job.ranges is None and start < COARSE:  # the common case, made cheap: a small file
        end = max(job.local.size, job.peer_size)
        if end <= limit:
            return [Piece(job, [(0, end)] if end > 0 else [], True, True)]
    groups = split_ranges(job.todo(start), limit)
    return [Piece(job, g, i == 0, i == len(groups) - 1) for i, g in enumerate(groups)]


def batches(items: Iterable[Piece], max_bytes: int = BATCH_BYTES, max_items: int = BATCH_ITEMS,
            max_chars: int = BATCH_CHARS) -> Iterator[list[Piece]]:
    """Pieces in order -> batches (a batch is closed once any of the limits is reached)."""
    cur: list[Piece] = []
    size = chars = 0
    for p in items:
        cur.append(p)
        size += p.nbytes
        chars += len(p.job.path)
        if size >= max_bytes or len(cur) >= max_items or chars >= max_chars:
            yield cur
            cur, size, chars = [], 0, 0
    if cur:
        yield cur


def spans(ranges: Ranges, bs: int) -> Ranges:
    """The (offset, length) of each block that hashing cuts from these ranges."""
    return [(o + i, min(bs, n - i)) for o, n in ranges for i in range(0, n, bs)]


def coarse_diff(blocks: Ranges, mine: list[bytes], theirs: list[bytes] | None,
                fine: bool) -> tuple[int, Ranges, Ranges]:
    """-> (how many blocks differ, spans to send as they are, spans to compare at FINE).
    theirs None: the peer has no digests (all differ). Blocks that are zero on either side,
    or no larger than FINE, are sent whole; the rest are compared finely if `fine`."""
    if theirs is not None and len(theirs) != len(mine):
        raise ValueError(f"peer sent {len(theirs)} digests for {len(mine)} blocks")
    differ = [k for k in range(len(mine)) if theirs is None or mine[k] != theirs[k]]
    direct: Ranges = []
    finely: Ranges = []
    for k in differ:
        if (not fine or theirs is None or theirs[k] == ZERO or mine[k] == ZERO
                or blocks[k][1] <= FINE):
            direct.append(blocks[k])
        else:
            finely.append(blocks[k])
    return len(differ), direct, finely


def fine_diff(blocks: Ranges, mine: list[bytes], theirs: list[bytes] | None) -> Ranges:
    """The FINE spans whose digests differ (theirs None: all)."""
    if theirs is None:
        return list(blocks)
    if len(theirs) != len(mine):
        raise ValueError(f"peer sent {len(theirs)} digests for {len(mine)} blocks")
    return [b for b, a, t in zip(blocks, mine, theirs, strict=True) if a != t]


def merge(spans_: Ranges, max_run: int) -> Ranges:
    """Adjacent spans -> runs of at most max_run bytes (spans in ascending order)."""
    out: Ranges = []
    for off, n in spans_:
        if out and out[-1][0] + out[-1][1] == off and out[-1][1] + n <= max_run:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def merge_zones(zones: frozenset[int], zone_size: int) -> Ranges:
    """Dirty zone numbers -> merged (offset, length) ranges."""
    return merge([(z * zone_size, zone_size) for z in sorted(zones)], 1 << 62)


def one_job_per_file(jobs: Iterable[FileJob]) -> list[FileJob]:
    """Jobs merged per path, in first-seen order: the whole file beats ranges, ranges add up,
    and an empty list (metadata only) never hides another job's content ranges."""
    out: dict[str, FileJob] = {}
    for j in jobs:
        prev = out.get(j.path)
        if prev is None:
            out[j.path] = j
        elif prev.ranges is not None:
            prev.ranges = None if j.ranges is None else prev.ranges + j.ranges
    return list(out.values())


def under(path: str, dirs: set[str]) -> bool:
    """Is path, or a directory above it, in dirs?"""
    while path:
        if path in dirs:
            return True
        path = path.rpartition("/")[0]
    return "" in dirs
