"""The mutations a mirror streams to its secondary, as plain frozen data.

Why a module of its own: the FUSE file system (mirrorfs) produces these, the wire codec
(wire) serialises them, the secondary's applier replays them, and the dirty-map/journal code
records them while the peer is away. All four agree on this one vocabulary and nothing else.

Paths are relative to the replicated directory's root, with no leading slash, never containing
"..", NUL or an empty component ("" is the root itself). Offsets and sizes are bytes. Times are
integer nanoseconds. Every op carries a sequence number assigned by the primary's stream in
submission order; the secondary applies ops strictly in that order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Create:
    """A regular file created (O_CREAT|O_EXCL semantics on the secondary: replace if present)."""

    path: str
    mode: int


@dataclass(frozen=True, slots=True)
class Write:
    path: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Truncate:
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Fallocate:
    """fallocate(2): mode carries FALLOC_FL_* flags (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE)."""

    path: str
    mode: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Rename:
    """rename(2)/renameat2: flags carries RENAME_NOREPLACE / RENAME_EXCHANGE."""

    old: str
    new: str
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Unlink:
    path: str


@dataclass(frozen=True, slots=True)
class Mkdir:
    path: str
    mode: int


@dataclass(frozen=True, slots=True)
class Rmdir:
    path: str


@dataclass(frozen=True, slots=True)
class Symlink:
    target: str  # the link's content, not interpreted
    path: str


@dataclass(frozen=True, slots=True)
class Link:
    """A hard link: `new` becomes another name of `existing`."""

    existing: str
    new: str


@dataclass(frozen=True, slots=True)
class Chmod:
    path: str
    mode: int


@dataclass(frozen=True, slots=True)
class Chown:
    path: str
    uid: int  # -1 leaves it unchanged
    gid: int


@dataclass(frozen=True, slots=True)
class Utimens:
    path: str
    atime_ns: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SetXattr:
    path: str
    name: str
    value: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    path: str
    name: str


@dataclass(frozen=True, slots=True)
class Fsync:
    """A durability barrier: the secondary acknowledges it only once every earlier op on
    `path` (or on every file, when path is None: syncfs) is on its disk."""

    path: str | None
    datasync: bool = False


Op = (Create | Write | Truncate | Fallocate | Rename | Unlink | Mkdir | Rmdir | Symlink | Link
      | Chmod | Chown | Utimens | SetXattr | RemoveXattr | Fsync)

# Ops that change the namespace (journalled by name while the peer is away), as opposed to
# ops that change the content of one file (tracked in its dirty map).
NAMESPACE_OPS: tuple[type, ...] = (Create, Rename, Unlink, Mkdir, Rmdir, Symlink, Link)


def check_path(path: str) -> str:
    """Return `path` if it is a safe relative path under the root, else raise ValueError.

    The secondary calls this on every path it receives before touching its disk: a peer that
    passed authentication still never gets to write outside the replicated directory."""
    if path == "":
        return path
    if "\0" in path or path.startswith("/"):
        raise ValueError(f"unsafe replicated path {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"unsafe replicated path {path!r}")
    return path


def paths_of(op: Op) -> tuple[str, ...]:
    """Every path an op names (for validation and for the dirty journal)."""
    if isinstance(op, Rename):
        return (op.old, op.new)
    if isinstance(op, Link):
        return (op.existing, op.new)
    if isinstance(op, Fsync):
        return () if op.path is None else (op.path,)
    return (op.path,)
