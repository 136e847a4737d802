"""Mounts a previous agent left over a replicated directory, removed before a new one starts.

Why: the mirror (FUSE) and the secondary's read-only guard (a bind mount) are mounted over the
replicated directory itself. They are not tied to the agent process: after a kill -9 or a power
loss of the agent (not of the host), they stay, stacked. A new agent would then open its
directory descriptor through them: a dead FUSE mount answers ENOTCONN, an old read-only guard
EROFS, and nothing could be applied. So at start the mounts at exactly that path are detached
from the top of the stack down (lazily: a process may still hold them), but only hvha's own:
the mirror (fuse.hvha) and the guard (a read-only bind of the directory over itself, on the
device of the mount below). The first other mount ends it: a volume the user mounted there
(a dedicated disk for a VM's directory is common) holds the data and must stay.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import NamedTuple

from hvha.replication.mount import unescape_mountinfo

log = logging.getLogger("hvha.replication")


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo, the fields used here."""

    mount_id: int
    parent_id: int
    device: str  # major:minor
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str


def parse(text: str) -> list[MountEntry]:
    """Every line of a mountinfo text, in mount order."""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) >= 6 and len(r) >= 2:
            out.append(MountEntry(int(f[0]), int(f[1]), f[2], unescape_mountinfo(f[4]),
                                  frozenset(f[5].split(",")), r[0], unescape_mountinfo(r[1])))
    return out


def is_ours(entry: MountEntry, below: MountEntry | None) -> bool:
    """The mirror, or the read-only guard (a bind on the same device as what it covers)."""
    if entry.fstype == "fuse.hvha" or entry.source.startswith("hvha:"):
        return True
    return ("ro" in entry.options and below is not None and entry.device == below.device
            and not entry.fstype.startswith("fuse"))


def leftovers(entries: list[MountEntry], path: str) -> int:
    """How many mounts at the top of `path`'s stack are hvha's (to detach, top first)."""
    by_id = {e.mount_id: e for e in entries}
    stack = [e for e in entries if e.mount_point == path]
    count = 0
    for entry in reversed(stack):  # later lines are mounted on top of earlier ones
        if not is_ours(entry, by_id.get(entry.parent_id)):
            break
        count += 1
    return count


def _entries() -> list[MountEntry]:
    try:
        with open("/proc/self/mountinfo") as f:
            return parse(f.read())
    except OSError:
        return []


def clear(path: str, limit: int = 16) -> int:
    """Detach hvha's leftover mounts at ``path`` (stacked ones too); how many were removed."""
    target = os.path.realpath(path)
    removed = 0
    while removed < limit and leftovers(_entries(), target):
        res = subprocess.run(["umount", "-l", target], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            log.error("cannot detach a leftover mount at %s: %s", target, res.stderr.strip())
            break
        removed += 1
    if removed:
        log.warning("detached %d mount(s) a previous agent left at %s", removed, target)
    return removed
