"""Mounts a previous agent left over a replicated directory, removed before a new one starts.

Why: the mirror (FUSE) and the secondary's read-only guard (a bind mount) are mounted over the
replicated directory itself. They are not tied to the agent process: after a kill -9 or a power
loss of the agent (not of the host), they stay, stacked. A new agent would then open its
directory descriptor through them: a dead FUSE mount answers ENOTCONN, an old read-only guard
EROFS, and nothing could be applied. Only hvha mounts over a replicated directory, so at start
every mount at exactly that path is detached (lazily: a process may still hold it).
"""

from __future__ import annotations

import logging
import os
import subprocess

from hvha.replication.mount import parse_mountinfo

log = logging.getLogger("hvha.replication")


def mounts_at(path: str) -> int:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return sum(1 for mp, _ in parse_mountinfo(f.read()) if mp == target)
    except OSError:
        return 0


def clear(path: str, limit: int = 16) -> int:
    """Detach every mount at ``path`` (stacked ones too); return how many were removed."""
    removed = 0
    while mounts_at(path) and removed < limit:
        res = subprocess.run(["umount", "-l", path], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            log.error("cannot detach a leftover mount at %s: %s", path, res.stderr.strip())
            break
        removed += 1
    if removed:
        log.warning("detached %d mount(s) a previous agent left at %s", removed, path)
    return removed
