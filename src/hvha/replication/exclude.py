"""`exclude` patterns of a replicated directory: which entries are never sent to the peer.

Why: users keep scratch files, caches and sockets inside directories they replicate (SafeKit's
"notreplicated" paths). Excluded entries live on the primary only; nothing about them crosses
the wire, neither while mirroring nor in a resync or verify.

Pattern rules (docs/configuration.md), paths relative to the replicated directory:
- ``*.tmp``: no slash, matches the name of a file or directory at any depth;
- ``cache/``: a trailing slash matches directories only;
- ``logs/*.gz``, ``/build``: a slash inside or in front anchors the pattern at the replicated
  directory;
- ``*`` and ``?`` never match a slash, ``**`` matches across slashes (``**/x`` also matches
  ``x`` itself), ``[...]`` and ``[!...]`` as in fnmatch;
- everything below an excluded directory is excluded.

Renames across the boundary keep the peer's copy exact: moving an excluded entry to a
replicated name sends its whole content (the ``*.tmp`` then rename idiom of atomic writes),
moving a replicated entry to an excluded name removes it on the peer. `copy_ops` and
`removal_ops` generate those op sequences from the local tree.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Iterator, Sequence

from hvha.replication import ops
from hvha.replication.dirty import RENAME_EXCHANGE

CHUNK = 1 << 20



def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):  # zero or more directories
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class Excludes:
    """The compiled patterns of one replicated directory."""

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self.patterns = tuple(patterns)
        name: list[str] = []
        anchored: list[str] = []
        name_dir: list[str] = []
        anchored_dir: list[str] = []
        for p in self.patterns:
            dir_only = p.endswith("/")
            body = p.strip("/")
            if not body:
                continue
            rx = _glob_regex(body)
            if "/" in body or p.startswith("/"):
                (anchored_dir if dir_only else anchored).append(rx)
            else:
                (name_dir if dir_only else name).append(rx)
        self._name = _compile(name)
        self._name_dir = _compile(name + name_dir)
        self._path = _compile(anchored)
        self._path_dir = _compile(anchored + anchored_dir)
        self.anchored = bool(anchored or anchored_dir)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, path: str, is_dir: bool = False) -> bool:
        """Whether the entry at `path` ("a/b", "" for the root) is not replicated."""
        if not path or not self.patterns:
            return False
        parent, _, _ = path.rpartition("/")
        return self._matches(path, is_dir) or (bool(parent) and self._under(parent))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Excludes per mount, kept for its life
    def _under(self, directory: str) -> bool:
        """Whether `directory` or one of its ancestors is excluded."""
        parent, _, _ = directory.rpartition("/")
        return self._matches(directory, True) or (bool(parent) and self._under(parent))

    def _matches(self, path: str, is_dir: bool) -> bool:
        name = path.rpartition("/")[2]
        by_name, by_path = (self._name_dir, self._path_dir) if is_dir else (self._name, self._path)
        return bool((by_name and by_name.fullmatch(name)) or (by_path and by_path.fullmatch(path)))


def _compile(rxs: list[str]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{r})" for r in rxs)) if rxs else None


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _chunks(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """Data chunks of a file, skipping holes (a sparse image stays sparse on the peer)."""
    off = 0
    while off < size:
        try:
            data_at = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
        while data_at < hole_at:
            chunk = os.pread(fd, min(CHUNK, hole_at - data_at), data_at)
            if not chunk:
                return
            yield data_at, chunk
            data_at += len(chunk)
        off = hole_at


def copy_ops(root_fd: int, path: str, excludes: Excludes, as_path: str | None = None
             ) -> Iterator[ops.Op]:
    """Ops that create the local entry `path` (a whole subtree for a directory, skipping
    excluded entries) on the peer under `as_path` (default: the same name)."""
    dest = path if as_path is None else as_path
    st = os.stat(path, dir_fd=root_fd, follow_symlinks=False)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        yield ops.Mkdir(dest, mode)
        for name in sorted(os.listdir(_at(root_fd, path))):
            child = _join(path, name)
            cst = os.stat(child, dir_fd=root_fd, follow_symlinks=False)
            if not excludes.excluded(_join(dest, name), stat.S_ISDIR(cst.st_mode)):
                yield from copy_ops(root_fd, child, excludes, _join(dest, name))
    elif stat.S_ISLNK(st.st_mode):
        yield ops.Symlink(os.readlink(path, dir_fd=root_fd), dest)
        yield ops.Chown(dest, st.st_uid, st.st_gid)
        return
    elif stat.S_ISREG(st.st_mode):
        yield ops.Create(dest, mode)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=root_fd)
        try:
            for off, chunk in _chunks(fd, st.st_size):
                yield ops.Write(dest, off, chunk)
        finally:
            os.close(fd)
        yield ops.Truncate(dest, st.st_size)
    else:
        return  # FIFOs, sockets, devices are never replicated
    yield ops.Chown(dest, st.st_uid, st.st_gid)
    yield ops.Chmod(dest, mode)
    yield ops.Utimens(dest, st.st_atime_ns, st.st_mtime_ns)


def removal_ops(root_fd: int, path: str, excludes: Excludes, peer_path: str,
                judged_at: str | None = None) -> Iterator[ops.Op]:
    """Ops that remove from the peer what it holds for the local entry now at `path`, known
    to the peer as `peer_path` (children first). The peer received the entries below that were
    not excluded at `judged_at` (default: `peer_path`); the others are not there to remove."""
    judged = peer_path if judged_at is None else judged_at
    st = os.stat(path, dir_fd=root_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(_at(root_fd, path))):
            child = _join(path, name)
            cst = os.stat(child, dir_fd=root_fd, follow_symlinks=False)
            if not excludes.excluded(_join(judged, name), stat.S_ISDIR(cst.st_mode)):
                yield from removal_ops(root_fd, child, excludes, _join(peer_path, name),
                                       _join(judged, name))
        yield ops.Rmdir(peer_path)
    elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        yield ops.Unlink(peer_path)


def changed_below(root_fd: int, path: str, old: str, excludes: Excludes) -> Iterator[ops.Op]:
    """After a replicated directory moved from `old` to `path` (the peer renamed it too),
    anchored patterns may judge entries below differently: copy what became replicated,
    remove what became excluded."""
    for name in sorted(os.listdir(_at(root_fd, path))):
        child, before = _join(path, name), _join(old, name)
        is_dir = stat.S_ISDIR(os.stat(child, dir_fd=root_fd, follow_symlinks=False).st_mode)
        was, now = excludes.excluded(before, is_dir), excludes.excluded(child, is_dir)
        if was and not now:
            yield from copy_ops(root_fd, child, excludes)
        elif now and not was:
            yield from removal_ops(root_fd, child, excludes, child, before)
        elif is_dir and not now:
            yield from changed_below(root_fd, child, before, excludes)


def _at(root_fd: int, path: str) -> str:
    return f"/proc/self/fd/{root_fd}/{path}" if path else f"/proc/self/fd/{root_fd}"


def rename_ops(root_fd: int, excludes: Excludes, old: str, new: str, flags: int,
               moved_is_dir: bool, replaced_is_dir: bool | None) -> Iterator[ops.Op]:
    """What the peer must do after the local rename(old, new, flags), already done.
    `replaced_is_dir`: kind of the entry `new` named before (None: there was none)."""
    ex = excludes.excluded
    if flags & RENAME_EXCHANGE:  # entry A (was at old) is now at new, entry B the other way
        b_dir = bool(replaced_is_dir)
        a_before, a_after = ex(old, moved_is_dir), ex(new, moved_is_dir)
        b_before, b_after = ex(new, b_dir), ex(old, b_dir)
        if not (a_before or a_after or b_before or b_after):
            yield ops.Rename(old, new, flags)
        elif not (a_before and a_after and b_before and b_after):
            if not a_before:
                yield from removal_ops(root_fd, new, excludes, old)
            if not b_before:
                yield from removal_ops(root_fd, old, excludes, new)
            if not a_after:
                yield from copy_ops(root_fd, new, excludes)
            if not b_after:
                yield from copy_ops(root_fd, old, excludes)
        return
    was, now = ex(old, moved_is_dir), ex(new, moved_is_dir)
    if not was and not now:
        yield ops.Rename(old, new, flags)
        if moved_is_dir and excludes.anchored:
            yield from changed_below(root_fd, new, old, excludes)
    elif not was:  # replicated -> excluded: the peer forgets it (what it replaced was excluded)
        yield from removal_ops(root_fd, new, excludes, old)
    elif not now:  # excluded -> replicated (write *.tmp, rename): the peer gets all of it
        if replaced_is_dir is not None:
            yield ops.Rmdir(new) if replaced_is_dir else ops.Unlink(new)
        yield from copy_ops(root_fd, new, excludes)


def link_ops(root_fd: int, excludes: Excludes, existing: str, new: str) -> Iterator[ops.Op]:
    """What the peer must do after the local link(existing, new), already done."""
    if excludes.excluded(new):
        return
    if excludes.excluded(existing):  # the peer has no inode to share: a copy
        yield from copy_ops(root_fd, new, excludes)
    else:
        yield ops.Link(existing, new)
