"""Pipelined, batched comparison of file contents by block hashes (the resync's data path).

Why: a round trip to the peer costs about a millisecond; asking once per file or per dirty
zone made a verify of 100,000 small files take minutes. Here the files' pieces are grouped
into batches (blockplan.batches: up to 1024 files or 16 MiB per query), each batch is ONE
hashes query, and several batches are in flight at once: while the peer hashes batch k+1..,
this node hashes its own copy of them on `streams` threads and compares batch k. Coarse
(64 KiB) blocks are compared first; the coarse blocks that differ and hold data on both sides
are compared at 4 KiB in one more query per batch, answered while the next batch is compared.
A file's metadata follows its content; progress and the checkpoint advance in file order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from hvha.replication import blockplan
from hvha.replication.blockplan import MAX_RUN, FileJob, Piece
from hvha.replication.hashing import COARSE, FINE, ZERO, split_digests
from hvha.replication.ops import Fallocate, Op, Truncate, Write
from hvha.replication.peer import PendingHashes
from hvha.replication.protocol import HashResult, Ranges
from hvha.replication.stream import StreamDown
from hvha.replication.syncer import ResyncAborted, Syncer
from hvha.replication.tree import TreeReader

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SEND_GROUP = 1 << 20  # bytes of one file's runs read and enqueued under one lock hold
_ZEROS: dict[int, bytes] = {}


def _is_zero(data: bytes) -> bool:
    z = _ZEROS.get(len(data))
    if z is None:
        z = _ZEROS[len(data)] = bytes(len(data))
    return data == z


def block_ops(t: TreeReader, path: str, runs: Ranges) -> list[Op]:
    """The ops that make the peer's runs [off, off+n) equal to ours now (read under the
    order lock; a run beyond our end needs none: the Truncate did it)."""
    fd = t.current_fd(path)
    out: list[Op] = []
    for off, n in runs:
        data = os.pread(fd, n, off)
        if not data:
            continue
        if _is_zero(data):
            out.append(Fallocate(path, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
                                 len(data)))
        else:
            out.append(Write(path, off, data))
    return out


def _truncate(t: TreeReader, path: str) -> Op:
    return Truncate(path, os.fstat(t.current_fd(path)).st_size)


@dataclass
class _Flight:
    """One batch's question at one block size: the peer's answer and ours, on their way.
    Per piece: the spans compared (empty: nothing), and where its answers are (-1: none)."""

    pieces: list[Piece]
    spans: list[Ranges]
    peer_at: list[int]
    local_at: list[int]
    peer: PendingHashes | None
    local: Future[list[HashResult]] | None

    mine: list[HashResult] | None = None
    theirs: list[HashResult] | None = None

    def answers(self, k: int, timeout: float) -> tuple[HashResult | None, HashResult | None]:
        """(ours, theirs) for piece k (None: not asked); waits for both answers."""
        if self.mine is None:
            self.mine = self.local.result(timeout) if self.local is not None else []
            self.theirs = self.peer.result() if self.peer is not None else []
        assert self.theirs is not None
        return (self.mine[self.local_at[k]] if self.local_at[k] >= 0 else None,
                self.theirs[self.peer_at[k]] if self.peer_at[k] >= 0 else None)


class ContentSync:
    """Compares (and with apply, fixes) the content of a run's file jobs."""

    def __init__(self, s: Syncer, pool: ThreadPoolExecutor) -> None:
        self.s, self.pool = s, pool
        self.depth = 2 + s.streams  # batches whose coarse question is in flight

    def _local_hashes(self, items: list[tuple[str, Ranges]], bs: int) -> list[HashResult]:
        t = self.s.local()
        t.forget("")  # the tree may have changed since the last batch: resolve paths anew
        return t.hash_many(items, bs)

    def _ask(self, pieces: list[Piece], spans: list[Ranges], bs: int) -> _Flight:
        """Ask the peer (and this node's hashing threads) for the digests of these spans."""
        peer_at: list[int] = []
        local_at: list[int] = []
        peer_items: list[tuple[str, Ranges]] = []
        local_items: list[tuple[str, Ranges]] = []
        for p, r in zip(pieces, spans, strict=True):
            live = bool(r) and not p.job.gone
            local_at.append(len(local_items) if live else -1)
            if live:
                local_items.append((p.job.path, r))
            peer_at.append(len(peer_items) if live and p.job.peer is not None else -1)
            if live and p.job.peer is not None:
                peer_items.append((p.job.path, r))
        peer = self.s.peer.hashes(peer_items, bs) if peer_items else None
        local = self.pool.submit(self._local_hashes, local_items, bs) if local_items else None
        return _Flight(pieces, spans, peer_at, local_at, peer, local)

    # -------------------------------------------------------------- one batch
    def _coarse(self, f: _Flight) -> _Flight:
        """Compare a batch's coarse digests, send what differs, ask the fine question."""
        timeout = self.s.peer.timeout
        fine_spans: list[Ranges] = []
        for k, p in enumerate(f.pieces):
            job = p.job
            if p.first:
                self._start(job)
            fine_spans.append([])
            m, t = f.answers(k, timeout)
            if m is None or job.gone:
                continue
            if isinstance(m, str):  # vanished or replaced here: its own ops are in the stream
                job.gone = True
                continue
            ours = split_digests(m)
            theirs: list[bytes] | None = [ZERO] * len(ours) if job.peer is None else None
            if isinstance(t, bytes):
                theirs = split_digests(t)
            elif isinstance(t, str):
                self.s.diff(job.path, "content", f"the peer could not hash it: {t}")
            blocks = blockplan.spans(f.spans[k], COARSE)
            n, direct, finely = blockplan.coarse_diff(blocks, ours, theirs, self.s.apply)
            if n and isinstance(t, bytes):
                self.s.diff(job.path, "content", f"{n} blocks of {COARSE} from {p.ranges[0][0]}")
            self._send_runs(job.path, blockplan.merge(direct, MAX_RUN))
            fine_spans[k] = finely  # asked at FINE: each coarse span cut into FINE blocks
        return self._ask(f.pieces, fine_spans, FINE)

    def _fine(self, f: _Flight) -> None:
        """Send the fine blocks that differ, then finish the batch's pieces in order."""
        timeout = self.s.peer.timeout
        for k, p in enumerate(f.pieces):
            m, t = f.answers(k, timeout)
            if m is None or isinstance(m, str) or p.job.gone:
                continue
            differ = blockplan.fine_diff(blockplan.spans(f.spans[k], FINE), split_digests(m),
                                         split_digests(t) if isinstance(t, bytes) else None)
            self._send_runs(p.job.path, blockplan.merge(differ, COARSE))
        done: list[str] = []
        partial: dict[str, int] = {}
        for p in f.pieces:
            self.s.advance(p.nbytes)
            if p.last:
                if not p.job.gone:
                    self.s.sync_meta(p.job.path, p.job.local, p.job.peer)
                done.append(p.job.path)
            elif p.job.ranges is None:
                partial[p.job.path] = p.end
        self.s.progress_made(done, partial)

    # -------------------------------------------------------------- per file
    def _start(self, job: FileJob) -> None:
        self.s.stats.files += 1
        if job.peer_size != job.local.size:
            if job.peer is not None:
                self.s.diff(job.path, "size", f"{job.peer_size} -> {job.local.size}")
            path = job.path
            self.s.send(lambda t: _truncate(t, path))

    def _send_runs(self, path: str, runs: Ranges) -> None:
        """Send these runs of a file, up to SEND_GROUP bytes per hold of the order lock."""
        group: Ranges = []
        size = 0
        for i, (off, n) in enumerate(runs):
            group.append((off, n))
            size += n
            if size >= SEND_GROUP or i == len(runs) - 1:
                self.s.send_ops(lambda t, g=group: block_ops(t, path, g))  # type: ignore[misc]
                group, size = [], 0

    # -------------------------------------------------------------- the pipeline
    def run(self, batches: Iterator[list[Piece]]) -> None:
        """Coarse questions of the next `depth` batches in flight; the fine question of a
        batch is answered while the next batch's coarse digests are compared."""
        coarse: deque[_Flight] = deque()
        fine: _Flight | None = None
        while True:
            while len(coarse) < self.depth:
                b = next(batches, None)
                if b is None:
                    break
                coarse.append(self._ask(b, [p.ranges for p in b], COARSE))
            if not coarse:
                break
            nxt = self._coarse(coarse.popleft())
            if fine is not None:
                self._fine(fine)
            fine = nxt
        if fine is not None:
            self._fine(fine)


def run_files(s: Syncer, jobs: list[FileJob], *, resume: bool) -> None:
    """Compare (and with s.apply, fix) the content, then the metadata, of these files, in
    path order; wait until the peer has it all. resume (a full pass): files the checkpoint
    has as done are skipped, partly done ones continue where they were. Otherwise (the dirty
    set's jobs): only files this run already compared whole from their start are skipped
    (the dirty set was taken before); a checkpoint's files are compared again, as their dirty
    records may be newer than it (written since, or not yet durable on the peer)."""
    jobs = sorted(jobs, key=lambda j: j.path)
    skip = s.done if resume else s.covered
    pending = [j for j in jobs if j.path not in skip]
    skipped = sum(max(j.peer_size, 0) for j in jobs if j.path in skip)
    todo = [(j, s.partial.get(j.path, 0) if resume and j.ranges is None else 0)
            for j in pending]
    s.covered.update(j.path for j, start in todo if j.ranges is None and start < COARSE)
    s.prog.total_bytes = sum(n for j, a in todo for _, n in j.todo(a)) + skipped
    s.prog.done_bytes = skipped
    batches = blockplan.batches(p for j, a in todo for p in blockplan.pieces(j, a))
    try:
        with ThreadPoolExecutor(s.streams, thread_name_prefix="hvha-resync") as pool:
            try:
                ContentSync(s, pool).run(batches)
            finally:
                pool.shutdown(cancel_futures=True)
    except StreamDown as exc:
        raise ResyncAborted(f"peer lost during the resync: {exc}") from exc
    s.barrier()
