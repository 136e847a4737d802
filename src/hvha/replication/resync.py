"""verify() and resync(): the two ways a primary compares its copy with the peer's.

Why: after a failure the two copies differ. An incremental resync compares only what the
dirty map and namespace journal name; a full resync or a verify compares the whole trees.
Both ask the peer in batches (a few stats queries for all dirty paths, a listing per
directory, hashes of many files per query; see content.py) and send only what differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from hvha.replication import ops
from hvha.replication.blockplan import FileJob, merge_zones, one_job_per_file, under
from hvha.replication.content import run_files
from hvha.replication.dirty import DirtySet, DirtyStore
from hvha.replication.exclude import Excludes
from hvha.replication.stream import ResyncProgress, Stream, StreamDown
from hvha.replication.syncer import Difference, ResyncAborted, ResyncStats, Syncer


def _incremental(s: Syncer, d: DirtySet) -> None:
    """Compare what the dirty set names: renames replayed first, then journal paths,
    metadata-only paths, dirty zones; parents' metadata last."""
    handled: set[str] = set()
    parents: set[str] = set()
    t = s.local()
    for old, new in d.renames:  # one by one: each rename changes what the next one sees
        if s.peer.stat(old) is not None:
            s.send(lambda t, old=old, new=new: ops.Rename(old, new)  # type: ignore[misc]
                   if t.stat(new) is not None else None)
    def kept(names: set[str] | frozenset[str]) -> list[str]:  # a pattern added since
        return sorted(p for p in names if not s.excluded(p, t.stat(p))) if s.excludes \
            else sorted(names)
    dpaths = kept(d.paths)
    meta = kept(d.meta - d.paths)
    content = kept(set(d.zones) | set(d.trunc))
    wanted = sorted(set(dpaths) | set(meta) | set(content))
    peer = dict(zip(wanted, s.peer.stats(wanted), strict=True))  # none of it changes below
    for p in dpaths:  # except under a handled path, which is skipped
        if under(p, handled):
            continue
        le, pe = t.stat(p), peer[p]
        parents.add(p.rpartition("/")[0])
        if le is None:
            if pe is not None:
                s.remove_peer(p, pe)
            continue
        if p == "":
            s.sync_meta(p, le, pe)
            continue
        s.sync_entry(p, le, pe, None)
        handled.add(p)
    for p in meta:
        le, pe = t.stat(p), peer[p]
        if le is not None and pe is not None and le.kind == pe.kind and not under(p, handled):
            if le.kind == "f":
                s.jobs.append(FileJob(p, le, pe, []))
            else:
                s.sync_meta(p, le, pe)
    for p in content:
        if under(p, handled):
            continue
        le, pe = t.stat(p), peer[p]
        if le is None or le.kind != "f":
            continue
        if pe is None or pe.kind != "f":
            s.sync_entry(p, le, pe, None)
            continue
        ranges = merge_zones(d.zones.get(p, frozenset()), d.zone_size)
        if p in d.trunc and d.trunc[p] < max(le.size, pe.size):
            ranges.append((d.trunc[p], max(le.size, pe.size) - d.trunc[p]))
        s.jobs.append(FileJob(p, le, pe, ranges))
    s.jobs = one_job_per_file(s.jobs)  # a file with new data AND new metadata: both
    run_files(s, s.jobs, resume=False)
    ps = sorted(parents, reverse=True)
    for p, pe in zip(ps, s.peer.stats(ps), strict=True):
        le = t.stat(p)
        if le is not None and pe is not None and le.kind == pe.kind == "d":
            s.sync_meta(p, le, pe)


def _full(s: Syncer) -> None:
    le, pe = s.local().stat(""), s.peer.stat("")
    assert le is not None
    s.sync_entry("", le, pe, None)
    run_files(s, s.jobs, resume=True)
    s.jobs = []


def verify(stream: Stream, root: str | Path | int, *, streams: int = 2,
           check_mtime: bool = False, excludes: Excludes | None = None) -> list[Difference]:
    """Compare the whole local tree with the peer's by metadata and block hashes; change
    nothing. (Content is compared with COARSE blocks; mtimes only if check_mtime; entries
    matching `excludes` are not compared on either side.)"""
    s = Syncer(stream, root, apply=False, streams=streams, check_mtime=check_mtime,
               excludes=excludes)
    try:
        _full(s)
    finally:
        s.close()
    return s.stats.differences


def _add(total: ResyncStats, one: ResyncStats) -> None:
    total.files += one.files
    total.hashed_bytes += one.hashed_bytes
    total.sent_bytes += one.sent_bytes
    total.ops += one.ops
    total.queries += one.queries
    total.differences += one.differences


def resync(stream: Stream, root: str | Path | int, dirty: DirtyStore, *, full: bool,
           state_dir: Path | None = None, checkpoint_key: str = "", bandwidth: int = 0,
           streams: int = 2, progress: Callable[[ResyncProgress], None] | None = None,
           max_passes: int = 5, checkpoint_interval: float = 1.0,
           excludes: Excludes | None = None) -> ResyncStats:
    """Make the connected peer's copy equal to the local one, while the application runs,
    then mark the stream in sync. Incremental (full=False): what the dirty map and journal
    name. Full: every file by block hashes, resumable from a checkpoint in state_dir (kept
    only for the same checkpoint_key, e.g. both generation ids), then the dirty map too.
    Raises ResyncAborted if the peer is lost (call again after reconnecting)."""
    ckpt = None if state_dir is None else Path(state_dir) / "resync.checkpoint"
    total = ResyncStats()
    for n in range(max_passes):
        taken = dirty.take()
        s = Syncer(stream, root, apply=True, bandwidth=bandwidth, streams=streams,
                   progress=progress, checkpoint=ckpt if full and n == 0 else None,
                   checkpoint_interval=checkpoint_interval, excludes=excludes)
        try:
            if full and n == 0:
                s.load_checkpoint(checkpoint_key)
                _full(s)
            _incremental(s, taken)
            s.barrier()
        except StreamDown as exc:
            raise ResyncAborted(f"peer lost during the resync: {exc}") from exc
        finally:
            s.close()
            _add(total, s.stats)
        dirty.finish_taken()
        if ckpt is not None:
            with contextlib.suppress(FileNotFoundError):
                ckpt.unlink()
        if stream.try_mark_in_sync():
            stream.resync_progress = None
            return total
    raise ResyncAborted(f"still dirty after {max_passes} passes: the application changes the "
                        "namespace faster than the resync converges; retry")
