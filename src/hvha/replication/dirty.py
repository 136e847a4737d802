"""Persistent dirty maps and namespace journal: what changed while the peer was away.

Why: a write acknowledged while the peer is away (ALONE) must reach the peer later, even if
this node crashes first, and the resync should send only what changed. So before such a write
is acknowledged, the zones it touched (fixed-size, zone_size bytes) are appended to a log in
the state directory and fsynced. A zone that is already dirty costs nothing: only the first
write to a clean zone appends a record, and concurrent records share one fsync (group commit).
Namespace and metadata ops record the paths they name (the journal); the resync compares
those entries with the peer's. Renames move the dirty zones of the old name to the new one.

Two sets exist: `current` (what the stream records now) and `taken` (what a resync is working
on, from `take()` until `finish_taken()`). Renames while a resync is pending are also applied to
the taken set (`observe`), or a renamed, not yet resynced file would be missed.

Log records are JSON lines: ["z", path, zone], ["t", path, size] (truncated to size),
["p", path] (journal: compare this entry), ["m", path] (its metadata only), ["d", path]
(forget zones of a replaced or removed name), ["r", old, new] (rename; ["R", ...] in a
compacted log: remembered for the replay only), ["x", a, b]
(exchange); see `Dirt.apply`. A torn last line (crash mid-append) is ignored: the op it
belonged to was never acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hvha.replication import ops

log = logging.getLogger("hvha.replication.dirty")
RENAME_EXCHANGE = 2
_V = TypeVar("_V")


def _move_keys(d: dict[str, _V], old: str, new: str) -> None:
    pre = old + "/"
    keys = [p for p in d if p == old or p.startswith(pre)]
    moved = {new + p[len(old):]: d.pop(p) for p in keys}
    d.update(moved)


@dataclass
class Dirt:
    """A mutable dirty set built from log records (the store's, and the activity log's)."""

    zones: dict[str, set[int]] = field(default_factory=dict)
    trunc: dict[str, int] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    meta: set[str] = field(default_factory=set)
    renames: list[tuple[str, str]] = field(default_factory=list)  # in order, for the replay

    def empty(self) -> bool:
        return not (self.zones or self.trunc or self.paths or self.meta)

    def _drop(self, path: str) -> bool:
        pre = path + "/"
        found = False
        for d in (self.zones, self.trunc):
            for p in [p for p in d if p == path or p.startswith(pre)]:
                del d[p]
                found = True
        return found

    def _move(self, old: str, new: str) -> None:
        _move_keys(self.zones, old, new)
        _move_keys(self.trunc, old, new)

    def apply(self, rec: list[Any]) -> bool:
        """Apply one record; return whether it changed anything (i.e. must be persisted)."""
        kind = rec[0]
        if kind == "z":
            zones = self.zones.setdefault(rec[1], set())
            if rec[2] in zones:
                return False
            zones.add(rec[2])
        elif kind == "t":
            if self.trunc.get(rec[1], rec[2] + 1) <= rec[2]:
                return False
            self.trunc[rec[1]] = rec[2]
        elif kind in ("p", "m"):
            target = self.paths if kind == "p" else self.meta
            if rec[1] in target:
                return False
            target.add(rec[1])
        elif kind == "d":
            return self._drop(rec[1])
        elif kind == "R":
            self.renames.append((rec[1], rec[2]))
        elif kind == "r":
            self.renames.append((rec[1], rec[2]))
            self._drop(rec[2])
            self._move(rec[1], rec[2])
            self.paths.update((rec[1], rec[2]))
        elif kind == "x":
            self._move(rec[1], "\0tmp")
            self._move(rec[2], rec[1])
            self._move("\0tmp", rec[2])
            self.paths.update((rec[1], rec[2]))
        return True

    def records(self) -> list[list[Any]]:
        out: list[list[Any]] = [["p", p] for p in sorted(self.paths)]
        out += [["m", p] for p in sorted(self.meta)]
        out += [["R", a, b] for a, b in self.renames]
        out += [["t", p, s] for p, s in sorted(self.trunc.items())]
        out += [["z", p, z] for p, zs in sorted(self.zones.items()) for z in sorted(zs)]
        return out


@dataclass(frozen=True)
class DirtySet:
    """An immutable view: zones per file, smallest truncate size per file, journal paths
    (namespace changes: compare the entry and what is below it), meta paths (compare mode,
    owner, times only)."""

    zones: dict[str, frozenset[int]]
    trunc: dict[str, int]
    paths: frozenset[str]
    meta: frozenset[str]
    zone_size: int
    renames: tuple[tuple[str, str], ...] = ()

    def empty(self) -> bool:
        return not (self.zones or self.trunc or self.paths or self.meta)

    def dirty_bytes(self) -> int:
        return sum(len(z) for z in self.zones.values()) * self.zone_size


def op_records(op: ops.Op, zone_size: int) -> list[list[Any]]:
    """The log records an op needs (pure)."""
    if isinstance(op, ops.Write | ops.Fallocate):
        length = len(op.data) if isinstance(op, ops.Write) else op.length
        if length <= 0:
            return []
        first, last = op.offset // zone_size, (op.offset + length - 1) // zone_size
        return [["z", op.path, z] for z in range(first, last + 1)]
    if isinstance(op, ops.Truncate):
        return [["t", op.path, op.size], ["z", op.path, op.size // zone_size]]
    if isinstance(op, ops.Fsync):
        return []
    if isinstance(op, ops.Rename):
        if op.flags & RENAME_EXCHANGE:
            return [["x", op.old, op.new]]
        return [["r", op.old, op.new]]
    if isinstance(op, ops.Unlink | ops.Rmdir | ops.Create):
        return [["d", op.path], ["p", op.path]]
    if isinstance(op, ops.Link):
        return [["d", op.new], ["p", op.existing], ["p", op.new]]
    if isinstance(op, ops.Symlink | ops.Mkdir):
        return [["p", op.path]]
    return [["m", p] for p in ops.paths_of(op)]


class DirtyStore:
    """The dirty state of one replicated directory, persisted under state_dir."""

    def __init__(self, state_dir: str | Path, zone_size: int = 1024 * 1024) -> None:
        if zone_size <= 0:
            raise ValueError("zone_size must be positive")
        self.dir = Path(state_dir)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.zone_size = zone_size
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._current = self._load(self.dir / "dirty.log")
        taken_path = self.dir / "dirty.taken.log"
        self._has_taken = taken_path.exists()
        self._taken = self._load(taken_path)
        self._pending: list[bytes] = []  # records for dirty.log not yet written
        self._pending_taken: list[bytes] = []
        self._ticket = 0  # records appended so far (in memory)
        self._synced = 0
        self._broken: OSError | None = None
        self._fd = os.open(self.dir / "dirty.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fsync_dir()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self, path: Path) -> Dirt:
        dirt = Dirt()
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    log.warning("dirty log %s: ignoring a torn record", path)
                    continue
                dirt.apply(rec)
        return dirt

    def record(self, op: ops.Op) -> int:
        """Record op in memory; return the ticket to pass to sync() before acknowledging the op.
        (The latest ticket even when nothing new was recorded: an earlier record of the same
        zone may not be durable yet.)"""
        recs = op_records(op, self.zone_size)
        with self._lock:
            for rec in recs:
                if self._current.apply(rec):
                    self._pending.append(json.dumps(rec).encode() + b"\n")
                    self._ticket += 1
            if self._has_taken and isinstance(op, ops.Rename) and self._observe(recs):
                self._ticket += 1
            return self._ticket

    def record_records(self, recs: list[list[Any]]) -> int:
        """Record raw log records (e.g. the activity log's); return the ticket for sync()."""
        with self._lock:
            for rec in recs:
                if self._current.apply(rec):
                    self._pending.append(json.dumps(rec).encode() + b"\n")
                    self._ticket += 1
            return self._ticket

    def observe(self, op: ops.Op) -> int:
        """An op streamed (not recorded) while a resync is pending: renames must move the
        taken set's zones. Returns a ticket for sync() (0: nothing to persist)."""
        if not (self._has_taken and isinstance(op, ops.Rename)):
            return 0
        with self._lock:
            if self._observe(op_records(op, self.zone_size)):
                self._ticket += 1
                return self._ticket
        return 0

    def _observe(self, recs: list[list[Any]]) -> bool:
        for rec in recs:
            self._taken.apply(rec)
            self._pending_taken.append(json.dumps(rec).encode() + b"\n")
        return bool(recs)

    def sync(self, ticket: int) -> None:
        """Make every record up to `ticket` durable (group commit). Raises OSError if the state
        directory cannot be written: the caller must then fail the write (EIO)."""
        if ticket <= 0:
            return
        with self._sync_lock:
            if self._broken is not None:
                raise OSError(self._broken.errno, f"dirty map not persisted: {self._broken}")
            if self._synced >= ticket:
                return
            with self._lock:
                recs, self._pending = self._pending, []
                taken, self._pending_taken = self._pending_taken, []
                upto = self._ticket
            try:
                if recs:
                    os.write(self._fd, b"".join(recs))
                    os.fsync(self._fd)
                if taken:
                    self._append_taken(taken)
            except OSError as exc:
                self._broken = exc
                raise
            self._synced = upto

    def _append_taken(self, recs: list[bytes]) -> None:
        fd = os.open(self.dir / "dirty.taken.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(recs))
            os.fsync(fd)
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Persist everything recorded so far."""
        with self._lock:
            ticket = self._ticket
        self.sync(ticket)

    def snapshot(self) -> DirtySet:
        """What is dirty now (current and taken together)."""
        with self._lock:
            return self._view(self._current, self._taken)

    def _view(self, *dirts: Dirt) -> DirtySet:
        zones: dict[str, set[int]] = {}
        trunc: dict[str, int] = {}
        paths: set[str] = set()
        meta: set[str] = set()
        renames: list[tuple[str, str]] = []
        for d in dirts:
            renames += d.renames
            for p, zs in d.zones.items():
                zones.setdefault(p, set()).update(zs)
            for p, s in d.trunc.items():
                trunc[p] = min(s, trunc.get(p, s))
            paths |= d.paths
            meta |= d.meta
        return DirtySet({p: frozenset(z) for p, z in zones.items()}, trunc, frozenset(paths),
                        frozenset(meta), self.zone_size, tuple(renames))

    def is_clean(self) -> bool:
        with self._lock:
            return self._current.empty() and self._taken.empty() and not self._has_taken

    def take(self) -> DirtySet:
        """Start a resync: move the current set into the taken set (persisted) and return it.
        A taken set left by an interrupted resync is merged, never lost."""
        self.flush()
        with self._sync_lock, self._lock:
            merged = Dirt()
            for rec in self._taken.records() + self._current.records():
                merged.apply(rec)
            tmp = self.dir / "dirty.taken.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"".join(json.dumps(r).encode() + b"\n" for r in merged.records()))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir / "dirty.taken.log")
            self._fsync_dir()
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self._taken, self._current, self._has_taken = merged, Dirt(), True
            return self._view(merged)

    def taken(self) -> DirtySet:
        with self._lock:
            return self._view(self._taken)

    def finish_taken(self) -> None:
        """The resync of the taken set completed (every op acknowledged by the peer)."""
        self.flush()
        with self._sync_lock, self._lock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / "dirty.taken.log")
            self._fsync_dir()
            self._taken, self._has_taken = Dirt(), False

    def resync_pending(self) -> bool:
        return self._has_taken
