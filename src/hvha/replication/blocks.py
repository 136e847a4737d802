"""Block-hash verify and resync of a replicated tree, and safe dir-fd access to a tree.

Why: after a failure the two copies differ. An incremental resync sends only what the dirty
map and namespace journal name; a full resync or a verify compares the two trees by per-file
block hashes (xxh3_128) and sends only differing blocks, keeping holes holes. The resync runs
while the application writes: each block is read under ``stream.ordered()`` and sent as a Write
through the same ordered stream, so a later application write always lands after it.

TreeReader is the read side shared by both nodes (the secondary's applier extends it with the
ops): every path is checked and resolved one component at a time with O_NOFOLLOW below a
directory descriptor, so a symlink inside the tree never leads outside it.

Hashes: blocks of COARSE bytes first, then FINE bytes inside the coarse blocks that differ, so
a scattered 4 KiB change costs 4 KiB plus a few hash bytes. A block that is a hole or all zeros
hashes to ZERO (16 zero bytes) on both sides; holes are found with SEEK_DATA/SEEK_HOLE and not
read at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat as st
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from hvha.replication import ops
from hvha.replication.dirty import DirtySet, DirtyStore
from hvha.replication.ops import check_path
from hvha.replication.stream import Mode, ResyncProgress, Stream, unwrap

COARSE = 64 * 1024
FINE = 4 * 1024
ZERO = bytes(16)
_READ_CHUNK = 1024 * 1024
_ZERO_DIGESTS: dict[int, bytes] = {}
_O_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def _zero_digest(n: int) -> bytes:
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = _ZERO_DIGESTS[n] = xxhash.xxh3_128_digest(bytes(n))
    return d


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry with what the resync compares. kind: f file, d dir, l symlink,
    o other (fifo, socket, device: not replicated)."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ino: int
    nlink: int
    target: str = ""

    def to_list(self) -> list[Any]:
        return list(astuple(self))

    @staticmethod
    def from_list(v: list[Any]) -> Entry:
        n = [int(x) for x in v[2:9]]
        return Entry(str(v[0]), str(v[1]), n[0], n[1], n[2], n[3], n[4], n[5], n[6], str(v[9]))


def _kind(mode: int) -> str:
    if st.S_ISREG(mode):
        return "f"
    if st.S_ISDIR(mode):
        return "d"
    return "l" if st.S_ISLNK(mode) else "o"


class TreeReader:
    """Read access to a tree below one directory descriptor (not thread-safe: one per thread)."""

    MAX_DIRS = 512
    MAX_FILES = 256

    def __init__(self, root: str | Path | int, writable: bool = False) -> None:
        if isinstance(root, int):
            self.root_fd = os.dup(root)
        else:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.writable = writable
        self._dirs: OrderedDict[str, int] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        for cache in (self._dirs, self._files):
            for fd in cache.values():
                os.close(fd)
            cache.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> TreeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dir_fd(self, dpath: str) -> int:
        if dpath == "":
            return self.root_fd
        fd = self._dirs.get(dpath)
        if fd is not None:
            self._dirs.move_to_end(dpath)
            return fd
        parent, _, name = dpath.rpartition("/")
        pfd = self.dir_fd(parent)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _O_FLAGS, dir_fd=pfd)
        self._dirs[dpath] = fd
        if len(self._dirs) > self.MAX_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of a non-root path."""
        if check_path(path) == "":
            raise ValueError("the replicated root itself has no parent")
        d, _, name = path.rpartition("/")
        return self.dir_fd(d), name

    def file_fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is not None:
            self._files.move_to_end(path)
            return fd
        pfd, name = self.parent(path)
        fd = os.open(name, (os.O_RDWR if self.writable else os.O_RDONLY) | _O_FLAGS, dir_fd=pfd)
        self._files[path] = fd
        if len(self._files) > self.MAX_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def forget(self, path: str) -> None:
        """Drop cached descriptors of path and everything below it (after rename/unlink)."""
        prefix = path + "/"
        for cache in (self._files, self._dirs):
            for p in [p for p in cache if p == path or p.startswith(prefix) or path == ""]:
                os.close(cache.pop(p))

    def _entry(self, dfd: int, name: str) -> Entry:
        s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        kind = _kind(s.st_mode)
        target = os.readlink(name, dir_fd=dfd) if kind == "l" else ""
        return Entry(name, kind, st.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                     s.st_size if kind == "f" else 0, s.st_mtime_ns, s.st_ino, s.st_nlink,
                     target)

    def stat(self, path: str) -> Entry | None:
        try:
            if check_path(path) == "":
                return self._entry(self.root_fd, ".")
            pfd, name = self.parent(path)
            return self._entry(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_dir(self, path: str, start: int = 0, limit: int = 20000) -> tuple[list[Entry], bool]:
        """Entries of a directory, sorted by name, from index start; (entries, more?)."""
        dfd = self.dir_fd(check_path(path))
        names = sorted(os.listdir(dfd))
        out = []
        for name in names[start:start + limit]:
            with contextlib.suppress(FileNotFoundError):
                out.append(self._entry(dfd, name))
        return out, start + limit < len(names)

    def hashes(self, path: str, ranges: list[tuple[int, int]], bs: int) -> bytes:
        """16 bytes per block of `bs` bytes over each (offset, length) range, ZERO for holes,
        zero-filled blocks and blocks beyond the end of the file."""
        fd = self.file_fd(path)
        size = os.fstat(fd).st_size
        out = bytearray()
        for off, length in ranges:
            out += _hash_range(fd, off, length, bs, size)
        return bytes(out)

    def query(self, payload: bytes) -> bytes:
        """Serve one QUERY payload (JSON) and return the REPLY payload: status byte 0 + body,
        or 1 + UTF-8 error message."""
        try:
            q = json.loads(payload)
            kind = q["q"]
            if kind == "hash":
                body = self.hashes(q["path"], [(int(a), int(b)) for a, b in q["ranges"]],
                                   int(q["bs"]))
            elif kind == "stat":
                e = self.stat(q["path"])
                body = json.dumps(None if e is None else e.to_list()).encode()
            elif kind == "list":
                entries, more = self.list_dir(q["path"], int(q["start"]), int(q["limit"]))
                body = json.dumps([more, [e.to_list() for e in entries]]).encode()
            else:
                raise ValueError(f"unknown query {kind!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return b"\1" + f"{type(exc).__name__}: {exc}".encode()
        return b"\0" + body


def _hash_range(fd: int, off: int, length: int, bs: int, size: int) -> bytes:
    out = bytearray()
    end = off + length
    pos = off
    data_start, data_end = pos, pos  # the current data extent [data_start, data_end)
    chunk_off, chunk = -1, memoryview(b"")
    while pos < end:
        blen = min(bs, end - pos)
        if pos >= size:
            out += ZERO
            pos += blen
            continue
        if pos >= data_end:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
                data_end = os.lseek(fd, data_start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_start = data_end = size
        if pos + blen <= data_start:
            out += ZERO
            pos += blen
            continue
        if not chunk_off <= pos < chunk_off + len(chunk) - blen + 1:
            want = min(_READ_CHUNK, end - pos, size - pos)
            chunk_off, chunk = pos, memoryview(os.pread(fd, max(want, blen), pos))
        block = chunk[pos - chunk_off:pos - chunk_off + blen]
        d = xxhash.xxh3_128_digest(block)
        out += ZERO if d == _zero_digest(len(block)) else d
        pos += blen
    return bytes(out)


# ------------------------------------------------------------------ verify and resync

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_RANGE = 16 * 1024 * 1024  # bytes compared per hash query
_ZEROS: dict[int, bytes] = {}


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


def _is_zero(data: bytes) -> bool:
    z = _ZEROS.get(len(data))
    if z is None:
        z = _ZEROS[len(data)] = bytes(len(data))
    return data == z


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _runs(indexes: list[int], bs: int, base: int, max_run: int) -> list[tuple[int, int]]:
    """Differing block indexes -> merged (offset, length) runs of at most max_run bytes."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        off = base + i * bs
        if out and out[-1][0] + out[-1][1] == off and out[-1][1] + bs <= max_run:
            out[-1] = (out[-1][0], out[-1][1] + bs)
        else:
            out.append((off, bs))
    return out


def _blocks(digests: bytes) -> list[bytes]:
    return [digests[i:i + 16] for i in range(0, len(digests), 16)]


class _Peer:
    """The peer's tree, through queries on the ordered stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def stat(self, path: str) -> Entry | None:
        v = json.loads(self.stream.query({"q": "stat", "path": path}))
        return None if v is None else Entry.from_list(v)

    def list_dir(self, path: str) -> list[Entry]:
        out: list[Entry] = []
        more, start = True, 0
        while more:
            more, entries = json.loads(self.stream.query(
                {"q": "list", "path": path, "start": start, "limit": 20000}))
            out += [Entry.from_list(e) for e in entries]
            start += 20000
        return out

    def hashes(self, path: str, ranges: list[tuple[int, int]], bs: int) -> Future[bytes]:
        return self.stream.query_async({"q": "hash", "path": path, "ranges": ranges, "bs": bs})


class _Syncer:
    """One verify or resync run (see verify() and resync())."""

    def __init__(self, stream: Stream, root: str | Path | int, *, apply: bool,
                 bandwidth: int = 0, streams: int = 2, check_mtime: bool = False,
                 progress: Callable[[ResyncProgress], None] | None = None,
                 checkpoint: Path | None = None, checkpoint_interval: float = 1.0) -> None:
        self.stream, self.peer, self.apply = stream, _Peer(stream), apply
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
        self._files: list[tuple[str, int, list[tuple[int, int]] | None]] = []
        self._done: set[str] = set()
        self._partial: dict[str, int] = {}
        self._watermark = ""
        self._key = ""
        self._saved_at = time.monotonic()
        self.checkpoint_interval = checkpoint_interval

    # -------------------------------------------------------------- plumbing
    def local(self) -> TreeReader:
        t: TreeReader | None = getattr(self._tls, "tree", None)
        if t is None:
            t = self._tls.tree = TreeReader(self.root)
            with self._lock:
                self._readers.append(t)
        return t

    def close(self) -> None:
        for t in self._readers:
            t.close()

    def diff(self, path: str, kind: str, detail: str = "") -> None:
        with self._lock:
            self.stats.differences.append(Difference(path, kind, detail))

    def send(self, make: Callable[[TreeReader], ops.Op | None]) -> None:
        """Under the stream's order lock, build an op from the local tree's CURRENT state (None:
        nothing to send any more) and enqueue it."""
        if not self.apply:
            return
        with self.stream.ordered():
            try:
                op = make(self.local())
            except (FileNotFoundError, NotADirectoryError):
                op = None  # changed under us: the application's own ops are in the stream
            if op is None:
                return
            seq = self.stream.enqueue(op)
        n = len(op.data) if isinstance(op, ops.Write) else 0
        with self._lock:
            self._last_seq = max(self._last_seq, seq)
            self.stats.ops += 1
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
        if seq:
            self.stream.wait(seq)
        if self.stream.mode is Mode.ALONE:
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
                self.remove_peer(_join(path, child.name), child)
        op: ops.Op = ops.Rmdir(path) if pe.kind == "d" else ops.Unlink(path)
        self.send(lambda t: None if _kind_of(t, path) == pe.kind else op)

    def sync_dir(self, path: str) -> None:
        local = {e.name: e for e in self.local().list_dir(path, 0, 1 << 62)[0]}
        peer = {e.name: e for e in self.peer.list_dir(path)}
        for name in sorted(peer.keys() - local.keys()):
            self.remove_peer(_join(path, name), peer[name])
        for name in sorted(local):
            self.sync_entry(_join(path, name), local[name], peer.get(name), None)

    def sync_entry(self, path: str, le: Entry, pe: Entry | None,
                   ranges: list[tuple[int, int]] | None) -> None:
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
                self.send(lambda t: ops.Mkdir(path, le.mode) if _kind_of(t, path) == "d" else None)
            self.sync_dir(path)
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
                self.send(lambda t: ops.Create(path, le.mode) if _kind_of(t, path) == "f"
                          else None)
            self._files.append((path, -1 if pe is None else pe.size, ranges))
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
                      if _ino_of(t, path) == _ino_of(t, first[0]) else None)
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
            self.send(lambda t: ops.Chmod(path, _st(t, path).st_mode & 0o7777))
        if pe is None or (pe.uid, pe.gid) != (le.uid, le.gid):
            self.send(lambda t: ops.Chown(path, _st(t, path).st_uid, _st(t, path).st_gid))
        if pe is None or pe.mtime_ns != le.mtime_ns or le.kind == "f":
            self.send(lambda t: ops.Utimens(path, _st(t, path).st_atime_ns,
                                            _st(t, path).st_mtime_ns))

    # -------------------------------------------------------------- content
    def sync_file(self, path: str, peer_size: int, ranges: list[tuple[int, int]] | None) -> None:
        t = self.local()
        t.forget("")
        le = t.stat(path)
        if le is None or le.kind != "f":
            return
        self.stats.files += 1
        if peer_size != le.size:
            if peer_size >= 0:
                self.diff(path, "size", f"{peer_size} -> {le.size}")
            self.send(lambda t: ops.Truncate(path, os.fstat(t.file_fd(path)).st_size))
        end = max(le.size, peer_size)
        todo = [(0, end)] if ranges is None else [(o, min(n, end - o)) for o, n in ranges
                                                   if o < end]
        start = self._partial.get(path, 0)
        for off, n in todo:
            pos = max(off, start - start % COARSE) if ranges is None else off
            while pos < off + n:
                length = min(_RANGE, off + n - pos)
                self._compare(t, path, pos, length, peer_size < 0)
                self.advance(length)
                pos += length
                if ranges is None and self.checkpoint is not None:
                    self._save_checkpoint(path, pos)
        if le is not None:
            self.sync_meta(path, le, None if peer_size < 0 else self.peer.stat(path))

    def _compare(self, t: TreeReader, path: str, pos: int, length: int, new: bool) -> None:
        fut = None if new else self.peer.hashes(path, [(pos, length)], COARSE)
        mine = _blocks(t.hashes(path, [(pos, length)], COARSE))
        theirs = _blocks(unwrap(fut.result(self.stream.timeout * 6))) if fut else [ZERO] * len(mine)
        coarse = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
        if coarse:
            self.diff(path, "content", f"{len(coarse)} blocks of {COARSE} from {pos}")
        fine_check = [i for i in coarse if theirs[i] != ZERO and mine[i] != ZERO]
        direct = [i for i in coarse if i not in set(fine_check)]
        for off, n in _runs(direct, COARSE, pos, 1 << 20):
            self.send(lambda t, off=off, n=n: _block_op(t, path, off, n))  # type: ignore[misc]
        if fine_check and self.apply:
            rs = [(pos + i * COARSE, COARSE) for i in fine_check]
            fut2 = self.peer.hashes(path, rs, FINE)
            fmine = _blocks(t.hashes(path, rs, FINE))
            ftheirs = _blocks(unwrap(fut2.result(self.stream.timeout * 6)))
            per = COARSE // FINE
            for k, i in enumerate(fine_check):
                idx = [j for j in range(per) if fmine[k * per + j] != ftheirs[k * per + j]]
                for off, n in _runs(idx, FINE, pos + i * COARSE, COARSE):
                    self.send(lambda t, off=off, n=n: _block_op(t, path, off, n))  # type: ignore[misc]

    def run_files(self) -> None:
        files = sorted(self._files)
        pending = [f for f in files if f[0] not in self._done and
                   (f[2] is not None or not self._watermark or f[0] > self._watermark)]
        skipped = sum(max(f[1], 0) for f in files if f not in pending)
        self.prog.total_bytes = sum(_todo_bytes(self.local(), f) for f in pending) + skipped
        self.prog.done_bytes = skipped
        if self.streams == 1:
            for f in pending:
                self._one(f)
        else:
            with ThreadPoolExecutor(self.streams, thread_name_prefix="hvha-resync") as pool:
                for r in [pool.submit(self._one, f) for f in pending]:
                    r.result()
        self.barrier()

    def _one(self, f: tuple[str, int, list[tuple[int, int]] | None]) -> None:
        self.sync_file(*f)
        with self._lock:
            self._done.add(f[0])

    # -------------------------------------------------------------- checkpoints
    def load_checkpoint(self, key: str) -> None:
        self._key = key
        if self.checkpoint is None:
            return
        with contextlib.suppress(FileNotFoundError, ValueError):
            d = json.loads(self.checkpoint.read_text())
            if d.get("key") == key:
                self._done = set(d.get("done", []))
                self._partial = {str(k): int(v) for k, v in d.get("partial", {}).items()}

    def _save_checkpoint(self, path: str, pos: int) -> None:
        """Persist progress (at most once a second): only what the peer acknowledged."""
        assert self.checkpoint is not None
        now = time.monotonic()
        with self._lock:
            if now - self._saved_at < self.checkpoint_interval:
                return
            self._saved_at = now
        self.barrier()
        with self._lock:
            self._partial[path] = pos
            data = json.dumps({"key": self._key, "done": sorted(self._done),
                               "partial": self._partial})
        tmp = self.checkpoint.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.checkpoint)


def _todo_bytes(t: TreeReader, f: tuple[str, int, list[tuple[int, int]] | None]) -> int:
    if f[2] is not None:
        return sum(n for _, n in f[2])
    e = t.stat(f[0])
    return max(e.size if e else 0, f[1])


def _st(t: TreeReader, path: str) -> os.stat_result:
    if path == "":
        return os.stat(t.root_fd)
    pfd, name = t.parent(path)
    return os.stat(name, dir_fd=pfd, follow_symlinks=False)


def _kind_of(t: TreeReader, path: str) -> str | None:
    e = t.stat(path)
    return None if e is None else e.kind


def _ino_of(t: TreeReader, path: str) -> int | None:
    e = t.stat(path)
    return None if e is None else e.ino


def _block_op(t: TreeReader, path: str, off: int, n: int) -> ops.Op | None:
    """The op that makes the peer's [off, off+n) equal to ours now (read under the lock)."""
    t.forget(path)
    data = os.pread(t.file_fd(path), n, off)
    if not data:
        return None
    if _is_zero(data):
        return ops.Fallocate(path, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len(data))
    return ops.Write(path, off, data)


def _merge_zones(zones: frozenset[int], zone_size: int) -> list[tuple[int, int]]:
    return _runs(sorted(zones), zone_size, 0, 1 << 62)


def _under(path: str, dirs: set[str]) -> bool:
    while path:
        if path in dirs:
            return True
        path = path.rpartition("/")[0]
    return "" in dirs


def _incremental(s: _Syncer, d: DirtySet) -> None:
    handled: set[str] = set()
    parents: set[str] = set()
    t = s.local()
    for old, new in d.renames:  # replay renames first: the content then mostly matches
        if s.peer.stat(old) is not None:
            s.send(lambda t, old=old, new=new: ops.Rename(old, new)  # type: ignore[misc]
                   if t.stat(new) is not None else None)
    for p in sorted(d.paths):
        if _under(p, handled):
            continue
        le, pe = t.stat(p), s.peer.stat(p)
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
    for p in sorted(d.meta - d.paths):
        le, pe = t.stat(p), s.peer.stat(p)
        if le is not None and pe is not None and le.kind == pe.kind and not _under(p, handled):
            if le.kind == "f":
                s._files.append((p, pe.size, []))
            else:
                s.sync_meta(p, le, pe)
    for p in sorted(set(d.zones) | set(d.trunc)):
        if _under(p, handled):
            continue
        le, pe = t.stat(p), s.peer.stat(p)
        if le is None or le.kind != "f":
            continue
        if pe is None or pe.kind != "f":
            s.sync_entry(p, le, pe, None)
            continue
        ranges = _merge_zones(d.zones.get(p, frozenset()), d.zone_size)
        if p in d.trunc and d.trunc[p] < max(le.size, pe.size):
            ranges.append((d.trunc[p], max(le.size, pe.size) - d.trunc[p]))
        s._files.append((p, pe.size, ranges))
    s._files = list({f[0]: f for f in reversed(s._files)}.values())
    s.run_files()
    for p in sorted(parents, reverse=True):
        le, pe = t.stat(p), s.peer.stat(p)
        if le is not None and pe is not None and le.kind == pe.kind == "d":
            s.sync_meta(p, le, pe)


def verify(stream: Stream, root: str | Path | int, *, streams: int = 2,
           check_mtime: bool = False) -> list[Difference]:
    """Compare the whole local tree with the peer's by metadata and block hashes; change
    nothing. (Content is compared with COARSE blocks; mtimes only if check_mtime.)"""
    s = _Syncer(stream, root, apply=False, streams=streams, check_mtime=check_mtime)
    try:
        le, pe = s.local().stat(""), s.peer.stat("")
        assert le is not None
        s.sync_entry("", le, pe, None)
        s.run_files()
    finally:
        s.close()
    return s.stats.differences


def resync(stream: Stream, root: str | Path | int, dirty: DirtyStore, *, full: bool,
           state_dir: Path | None = None, checkpoint_key: str = "", bandwidth: int = 0,
           streams: int = 2, progress: Callable[[ResyncProgress], None] | None = None,
           max_passes: int = 5, checkpoint_interval: float = 1.0) -> ResyncStats:
    """Make the connected peer's copy equal to the local one, while the application runs,
    then mark the stream in sync. Incremental (full=False): what the dirty map and journal
    name. Full: every file by block hashes, resumable from a checkpoint in state_dir (kept
    only for the same checkpoint_key, e.g. both generation ids), then the dirty map too.
    Raises ResyncAborted if the peer is lost (call again after reconnecting)."""
    ckpt = None if state_dir is None else Path(state_dir) / "resync.checkpoint"
    total = ResyncStats()
    for n in range(max_passes):
        taken = dirty.take()
        s = _Syncer(stream, root, apply=True, bandwidth=bandwidth, streams=streams,
                    progress=progress, checkpoint=ckpt if full and n == 0 else None,
                    checkpoint_interval=checkpoint_interval)
        try:
            if full and n == 0:
                s.load_checkpoint(checkpoint_key)
                le, pe = s.local().stat(""), s.peer.stat("")
                assert le is not None
                s.sync_entry("", le, pe, None)
                s.run_files()
                s._files = []
            _incremental(s, taken)
            s.barrier()
        finally:
            s.close()
            total.files += s.stats.files
            total.hashed_bytes += s.stats.hashed_bytes
            total.sent_bytes += s.stats.sent_bytes
            total.ops += s.stats.ops
            total.differences += s.stats.differences
        dirty.finish_taken()
        if ckpt is not None:
            with contextlib.suppress(FileNotFoundError):
                ckpt.unlink()
        if stream.try_mark_in_sync():
            stream.resync_progress = None
            return total
    raise ResyncAborted(f"still dirty after {max_passes} passes: the application changes the "
                        "namespace faster than the resync converges; retry")
