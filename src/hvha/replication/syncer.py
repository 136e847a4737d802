"""One verify or resync run: the namespace walk, metadata, ops, barriers and checkpoints.

Why: a resync runs while the application writes. Every op it sends is built under
``stream.ordered()`` from the local tree's CURRENT state and goes through the same ordered
stream, so a later application write always lands after it, whatever the peer's answers
said. This module walks the two namespaces (directories listed a page at a time, metadata
taken from the listings), sends the namespace and metadata ops, and collects the regular
files whose content content.py then compares in batches. Checkpoints record only what the
peer acknowledged, so an interrupted full resync resumes where it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from hvha.replication import ops
from hvha.replication.blockplan import FileJob
from hvha.replication.exclude import Excludes
from hvha.replication.peer import Peer
from hvha.replication.protocol import Entry
from hvha.replication.stream import Mode, ResyncProgress, Stream
from hvha.replication.tree import TreeReader


class ResyncAborted(ConnectionError):
    """The peer was lost during the resync; what is left is still in the dirty map or the
    checkpoint, and the next resync continues from there."""


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the peer's copy differs: missing, extra, type, link, symlink, size, content,
    mode, owner, mtime (detail says more)."""

    path: str
    kind: str
    detail: str = ""


@dataclass
class ResyncStats:
    files: int = 0
    hashed_bytes: int = 0
    sent_bytes: int = 0
    ops: int = 0
    differences: list[Difference] = field(default_factory=list)
    queries: int = 0  # questions asked of the peer (round trips, many in flight at once)


LIST_AHEAD = 32  # subdirectory listings asked for ahead per directory


def join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


class Syncer:
    """One verify (apply=False: only differences) or resync run (see resync.py)."""

    def __init__(self, stream: Stream, root: str | Path | int, *, apply: bool,
                 bandwidth: int = 0, streams: int = 2, check_mtime: bool = False,
                 progress: Callable[[ResyncProgress], None] | None = None,
                 checkpoint: Path | None = None, checkpoint_interval: float = 1.0,
                 excludes: Excludes | None = None) -> None:
        self.stream, self.peer, self.apply = stream, Peer(stream), apply
        self.excludes = excludes or Excludes()  # entries neither node sends nor compares
        self.root = root
        self.bandwidth, self.streams, self.check_mtime = bandwidth, max(1, streams), check_mtime
        self.progress_cb, self.checkpoint = progress, checkpoint
        self.stats = ResyncStats()
        self.prog = ResyncProgress(started=time.monotonic())
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._readers: list[TreeReader] = []
        self._links: dict[int, tuple[str, int | None]] = {}  # local ino -> (first path, peer ino)
        self._last_seq = 0
        self._t0 = time.monotonic()
        self.jobs: list[FileJob] = []
        self._ahead: dict[str, Future[bytes]] = {}  # listings asked for ahead
        self.done: set[str] = set()  # whole files done (this run or the checkpoint's)
        self.covered: set[str] = set()  # whole files this run compares from their start
        self.partial: dict[str, int] = {}
        self._key = ""
        self._saved_at = time.monotonic()
        self.checkpoint_interval = checkpoint_interval

    # -------------------------------------------------------------- plumbing
    def local(self) -> TreeReader:
        """This thread's reader of the local tree."""
        t: TreeReader | None = getattr(self._tls, "tree", None)
        if t is None:
            t = self._tls.tree = TreeReader(self.root)
            with self._lock:
                self._readers.append(t)
        return t

    def close(self) -> None:
        for t in self._readers:
            t.close()
        self.stats.queries = self.peer.queries

    def diff(self, path: str, kind: str, detail: str = "") -> None:
        with self._lock:
            self.stats.differences.append(Difference(path, kind, detail))

    def send(self, make: Callable[[TreeReader], ops.Op | None]) -> None:
        """Under the stream's order lock, build an op from the local tree's CURRENT state (None:
        nothing to send any more) and enqueue it."""
        self.send_ops(lambda t: [op] if (op := make(t)) is not None else [])

    def send_ops(self, make: Callable[[TreeReader], list[ops.Op]]) -> None:
        """send() of several ops built and enqueued under one hold of the order lock (keep
        them few: application writes wait meanwhile)."""
        if not self.apply:
            return
        with self.stream.ordered():
            try:
                built = make(self.local())
            except (FileNotFoundError, NotADirectoryError):
                built = []  # changed under us: the application's own ops are in the stream
            seq = 0
            for op in built:
                seq = self.stream.enqueue(op)
        if not built:
            return
        n = sum(len(op.data) for op in built if isinstance(op, ops.Write))
        with self._lock:
            self._last_seq = max(self._last_seq, seq)
            self.stats.ops += len(built)
            self.stats.sent_bytes += n
            sent = self.stats.sent_bytes
        if self.bandwidth > 0:
            delay = self._t0 + sent / self.bandwidth - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def barrier(self) -> None:
        """Wait until everything sent so far is acknowledged; abort if the peer was lost."""
        with self._lock:
            seq = self._last_seq
        if (seq and not self.stream.settled(seq)) or self.stream.mode is Mode.ALONE:
            raise ResyncAborted(f"peer lost during the resync: {self.stream.last_error}")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.prog.done_bytes += nbytes
            self.stats.hashed_bytes += nbytes
        self.stream.resync_progress = self.prog
        if self.progress_cb is not None:
            self.progress_cb(self.prog)

    # -------------------------------------------------------------- namespace
    def remove_peer(self, path: str, pe: Entry) -> None:
        self.diff(path, "extra", pe.kind)
        if pe.kind == "d":
            for child in self.peer.list_dir(path):
                self.remove_peer(join(path, child.name), child)
        op: ops.Op = ops.Rmdir(path) if pe.kind == "d" else ops.Unlink(path)
        self.send(lambda t: None if kind_of(t, path) == pe.kind else op)

    def sync_dir(self, path: str, on_peer: bool = True) -> None:
        """Compare a directory's entries (on_peer False: the peer has no such directory, or
        only the one just created, nothing to list)."""
        local = self._kept(path, self.local().list_dir(path, 0, 1 << 62)[0])
        ahead = self._ahead.pop(path, None)
        peer = self._kept(path, self.peer.list_dir(path, ahead)) if on_peer else {}
        # the listings of the next LIST_AHEAD subdirectories both sides have are asked for
        # ahead: the peer lists them while this node works (the ops sent meanwhile are for
        # other entries than theirs)
        both = [n for n in sorted(local)
                if local[n].kind == "d" and n in peer and peer[n].kind == "d"]
        asked = seen = 0
        for name in sorted(peer.keys() - local.keys()):
            self.remove_peer(join(path, name), peer[name])
        for name in sorted(local):
            if seen < len(both) and both[seen] == name:
                seen += 1
                for sub in both[asked:seen + LIST_AHEAD]:
                    self._ahead[join(path, sub)] = self.peer.list_ahead(join(path, sub))
                asked = max(asked, min(seen + LIST_AHEAD, len(both)))
            self.sync_entry(join(path, name), local[name], peer.get(name), None)

    def _kept(self, path: str, entries: list[Entry]) -> dict[str, Entry]:
        """A listing by name, without excluded entries (on either node they are left alone)."""
        ex = self.excludes
        return {e.name: e for e in entries
                if not (ex and ex.excluded(join(path, e.name), e.kind == "d"))}

    def excluded(self, path: str, entry: Entry | None) -> bool:
        return bool(self.excludes) and self.excludes.excluded(
            path, entry is not None and entry.kind == "d")

    def sync_entry(self, path: str, le: Entry, pe: Entry | None,
                   ranges: list[tuple[int, int]] | None) -> None:
        """Make the peer's entry equal to le: a file's content is only queued (self.jobs)."""
        if le.kind == "o":
            return
        if pe is not None and pe.kind != le.kind:
            self.diff(path, "type", f"{pe.kind} on the peer, {le.kind} here")
            self.remove_peer(path, pe)
            pe = None
        if pe is None and path:
            self.diff(path, "missing", le.kind)
        if le.kind == "d":
            if pe is None and path:
                self.send(lambda t: ops.Mkdir(path, le.mode) if kind_of(t, path) == "d" else None)
            self.sync_dir(path, pe is not None or not path)
        elif le.kind == "l":
            if pe is not None and pe.target != le.target:
                self.diff(path, "symlink", f"{pe.target!r} -> {le.target!r}")
            if pe is None or pe.target != le.target:
                self.send(lambda t: ops.Symlink(os.readlink(t.parent(path)[1],
                                                            dir_fd=t.parent(path)[0]), path))
        elif self._link(path, le, pe):
            return
        else:
            if pe is None:
                self.send(lambda t: ops.Create(path, le.mode) if kind_of(t, path) == "f"
                          else None)
            self.jobs.append(FileJob(path, le, pe, ranges))
            return  # metadata after the content
        self.sync_meta(path, le, pe)

    def _link(self, path: str, le: Entry, pe: Entry | None) -> bool:
        """Hard links: the second name of an inode becomes a Link to the first."""
        if le.nlink < 2:
            return False
        first = self._links.get(le.ino)
        if first is None:
            self._links[le.ino] = (path, None if pe is None else pe.ino)
            return False
        if pe is None or first[1] is None or pe.ino != first[1]:
            self.diff(path, "link", f"should be a hard link of {first[0]}")
            self.send(lambda t: ops.Link(first[0], path)
                      if ino_of(t, path) == ino_of(t, first[0]) else None)
        return True

    def sync_meta(self, path: str, le: Entry, pe: Entry | None) -> None:
        if pe is not None:
            if pe.mode != le.mode and le.kind != "l":
                self.diff(path, "mode", f"{pe.mode:o} -> {le.mode:o}")
            if (pe.uid, pe.gid) != (le.uid, le.gid):
                self.diff(path, "owner", f"{pe.uid}:{pe.gid} -> {le.uid}:{le.gid}")
            if self.check_mtime and pe.mtime_ns != le.mtime_ns and le.kind != "d":
                self.diff(path, "mtime")
        if not self.apply:
            return
        if le.kind != "l" and (pe is None or pe.mode != le.mode):
            self.send(lambda t: ops.Chmod(path, lstat(t, path).st_mode & 0o7777))
        if pe is None or (pe.uid, pe.gid) != (le.uid, le.gid):
            self.send(lambda t: ops.Chown(path, lstat(t, path).st_uid, lstat(t, path).st_gid))
        if pe is None or pe.mtime_ns != le.mtime_ns or le.kind == "f":
            self.send(lambda t: ops.Utimens(path, lstat(t, path).st_atime_ns,
                                            lstat(t, path).st_mtime_ns))

    # -------------------------------------------------------------- checkpoints
    def load_checkpoint(self, key: str) -> None:
        self._key = key
        if self.checkpoint is None:
            return
        with contextlib.suppress(FileNotFoundError, ValueError):
            d = json.loads(self.checkpoint.read_text())
            if d.get("key") == key:
                self.done = set(d.get("done", []))
                self.partial = {str(k): int(v) for k, v in d.get("partial", {}).items()}

    def progress_made(self, done: list[str], partial: dict[str, int]) -> None:
        """Files finished and how far others got (every op for them is already sent);
        persisted (at most once per checkpoint_interval) once the peer acknowledged it."""
        with self._lock:
            self.done.update(done)
            for p in done:
                self.partial.pop(p, None)
        if self.checkpoint is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._saved_at < self.checkpoint_interval:
                self.partial.update(partial)
                return
            self._saved_at = now
        self.barrier()
        with self._lock:
            self.partial.update(partial)
            data = json.dumps({"key": self._key, "done": sorted(self.done),
                               "partial": self.partial})
        tmp = self.checkpoint.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.checkpoint)


def lstat(t: TreeReader, path: str) -> os.stat_result:
    if path == "":
        return os.stat(t.root_fd)
    pfd, name = t.parent(path)
    return os.stat(name, dir_fd=pfd, follow_symlinks=False)


def kind_of(t: TreeReader, path: str) -> str | None:
    e = t.stat(path)
    return None if e is None else e.kind


def ino_of(t: TreeReader, path: str) -> int | None:
    e = t.stat(path)
    return None if e is None else e.ino
