"""The agent's incarnation: a counter persisted on disk, increased at every start.

Heartbeat and witness frames carry (incarnation, sequence); the peer rejects anything not newer
than what it saw. Wall clocks are not trusted for this (they jump), so the number is a counter
written atomically (temp file, fsync, rename, fsync of the directory) with mode 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from hvha.agent.frames import U64_MAX

INCARNATION_FILE = "incarnation"


def next_incarnation(state_dir: Path) -> int:
    """Bump and persist this node's incarnation counter; returns the new value (first is 1).

    Peers reject frames of an older incarnation as replays, so the counter must only grow:
    it lives in a file (wall clocks are not trusted), written to a 0600 temp file, fsynced and
    renamed over the old one, then the directory is fsynced. A corrupt file raises ValueError
    instead of restarting at 1, which would make the peer drop all our frames.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / INCARNATION_FILE
    try:
        raw = path.read_bytes().strip()
    except FileNotFoundError:
        current = 0
    else:
        if not raw.isdigit() or int(raw) >= U64_MAX:
            raise ValueError(f"{path}: corrupt incarnation counter {raw[:32]!r}; fix it by hand")
        current = int(raw)
    value = current + 1
    fd, tmp = tempfile.mkstemp(prefix=f".{INCARNATION_FILE}.", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(b"%d\n" % value)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return value
