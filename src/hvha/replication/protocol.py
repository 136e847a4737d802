"""The resync's query language: what the primary asks the secondary's tree, and the answers.

Why a module of its own: both nodes must agree on it, a node may talk to a peer one version
older during a rolling upgrade, and the encoding is pure (no files, no sockets), so it is
tested on its own. Queries are JSON objects sent in order with the ops (Stream.query); a
REPLY payload is status byte 0 + body, or 1 + a UTF-8 error message.

Kinds (``q``):
- ``list`` {path, start, limit}: JSON [more, [entry, ...]] (entries sorted by name).
- ``stats`` {paths}: JSON [entry or null, ...], one per path (batched).
- ``hashes`` {bs, files: [[path, [[offset, length], ...]], ...]}: per file, byte 0 then the
  digests of its ranges (hashing.block_count of them), or byte 1, a 2-byte big-endian length
  and a UTF-8 error message (the file is missing, not a regular file, unreadable). Batched:
  one round trip covers many files and ranges.
- ``hash`` {path, ranges, bs} and ``stat`` {path}: one file per query; the previous
  version's kinds, still answered for a primary that has not been upgraded yet.
"""

from __future__ import annotations

import json
import stat as st
import struct
from dataclasses import astuple, dataclass
from typing import Any, Protocol

from hvha.replication.hashing import DIGEST, block_count

#: What one batched hashes query may ask for (the answer stays far below wire.MAX_PAYLOAD).
MAX_BLOCKS = 256 * 1024
MAX_BS = 16 * 1024 * 1024
UNKNOWN = "unknown query"  # the start of a peer's answer to a kind it does not know


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


def kind_of_mode(mode: int) -> str:
    if st.S_ISREG(mode):
        return "f"
    if st.S_ISDIR(mode):
        return "d"
    return "l" if st.S_ISLNK(mode) else "o"


Ranges = list[tuple[int, int]]
#: One file's answer in a batched hashes query: its digests, or why it has none.
HashResult = bytes | str


class Tree(Protocol):
    """What the secondary's tree offers the queries (TreeReader)."""

    def stat(self, path: str) -> Entry | None: ...
    def list_dir(self, path: str, start: int = 0,
                 limit: int = 20000) -> tuple[list[Entry], bool]: ...
    def hashes(self, path: str, ranges: Ranges, bs: int) -> bytes: ...
    def hash_many(self, items: list[tuple[str, Ranges]], bs: int) -> list[HashResult]: ...


# ------------------------------------------------------------------ requests (primary side)
def hashes_request(items: list[tuple[str, Ranges]], bs: int) -> dict[str, Any]:
    return {"q": "hashes", "bs": bs, "files": [[p, [[o, n] for o, n in r]] for p, r in items]}


def stats_request(paths: list[str]) -> dict[str, Any]:
    return {"q": "stats", "paths": paths}


def list_request(path: str, start: int, limit: int) -> dict[str, Any]:
    return {"q": "list", "path": path, "start": start, "limit": limit}


def decode_hashes(body: bytes, items: list[tuple[str, Ranges]], bs: int) -> list[HashResult]:
    """A hashes answer -> per item its digests (bytes) or the peer's error (str)."""
    out: list[HashResult] = []
    pos = 0
    for _, ranges in items:
        status = body[pos:pos + 1]
        if status == b"\0":
            n = block_count(ranges, bs) * DIGEST
            digests = body[pos + 1:pos + 1 + n]
            if len(digests) != n:
                raise ValueError("peer's hashes answer is truncated")
            out.append(digests)
            pos += 1 + n
        elif status == b"\1":
            (n,) = struct.unpack_from(">H", body, pos + 1)
            out.append(body[pos + 3:pos + 3 + n].decode(errors="replace"))
            pos += 3 + n
        else:
            raise ValueError("peer's hashes answer is malformed")
    if pos != len(body):
        raise ValueError("peer's hashes answer is longer than the question")
    return out


def decode_stats(body: bytes) -> list[Entry | None]:
    return [None if v is None else Entry.from_list(v) for v in json.loads(body)]


# ------------------------------------------------------------------ answers (secondary side)
def encode_hashes(results: list[HashResult]) -> bytes:
    out = bytearray()
    for r in results:
        if isinstance(r, bytes):
            out += b"\0" + r
        else:
            msg = r.encode()[:4000]
            out += b"\1" + struct.pack(">H", len(msg)) + msg
    return bytes(out)


def _ranges(v: Any) -> Ranges:
    return [(int(a), int(b)) for a, b in v]


def _hash_items(q: dict[str, Any]) -> tuple[list[tuple[str, Ranges]], int]:
    bs = int(q["bs"])
    if not 0 < bs <= MAX_BS:
        raise ValueError(f"block size {bs} out of range")
    items = [(str(p), _ranges(r)) for p, r in q["files"]]
    if sum(block_count(r, bs) for _, r in items) > MAX_BLOCKS:
        raise ValueError(f"more than {MAX_BLOCKS} blocks asked in one query: ask in batches")
    return items, bs


def serve(tree: Tree, payload: bytes) -> bytes:
    """Answer one QUERY payload from `tree` (the REPLY payload)."""
    try:
        q = json.loads(payload)
        kind = q["q"]
        if kind == "hashes":
            items, bs = _hash_items(q)
            body = encode_hashes(tree.hash_many(items, bs))
        elif kind == "stats":
            body = json.dumps([None if e is None else e.to_list()
                               for e in (tree.stat(str(p)) for p in q["paths"])]).encode()
        elif kind == "list":
            entries, more = tree.list_dir(q["path"], int(q["start"]), int(q["limit"]))
            body = json.dumps([more, [e.to_list() for e in entries]]).encode()
        elif kind == "hash":
            body = tree.hashes(q["path"], _ranges(q["ranges"]), int(q["bs"]))
        elif kind == "stat":
            e = tree.stat(q["path"])
            body = json.dumps(None if e is None else e.to_list()).encode()
        else:
            raise ValueError(f"{UNKNOWN} {kind!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return b"\1" + f"{type(exc).__name__}: {exc}".encode()
    return b"\0" + body
