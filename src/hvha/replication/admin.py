"""Operator actions on replicated data: split-brain rules, moving a discarded copy aside.

Why a module of its own: replicator.py runs the engine; what an operator may decide (which copy
survives a split brain, forcing a half-synced copy to count as good) changes whose data wins,
so the rules are pure functions here, next to the one side effect they need (moving a copy
aside), and are tested on their own.

Where a discarded copy goes: every entry of the replicated directory is moved into a NEW
sibling directory ``<dir>.hvha-discarded-<YYYYmmdd-HHMMSS>`` (same parent). Why next to it and
not under the state directory: a sibling is nearly always on the same file system, so the move
is a rename per top-level entry (instant, no extra space, even for 100 GiB of VM images), while
the state directory (/var/lib/hvha) is usually on the root file system; and the operator finds
the copy where the data lives. The replicated directory itself stays (its inode, owner and
mode, the read-only guard bound over it and the applier's descriptor remain valid): only its
content moves. When the directory is the root of its own file system (rename gives EXDEV), the
content is copied (``cp -a --sparse=always``) into the sibling, then removed; a failed copy
removes nothing. The aside directory is never inside the replicated directory, so it is never
replicated nor resynced away.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from hvha.replication import generations
from hvha.replication.generations import Decision, Generations
from hvha.replication.plan import plan

log = logging.getLogger("hvha.replication")
ASIDE_TAG = ".hvha-discarded-"
CONFLICTS = (Decision.SPLIT_BRAIN, Decision.UNRELATED)
# decisions a secondary refuses until an operator decides (the last two: it holds newer data)
REFUSALS = (*CONFLICTS, Decision.FULL_RESYNC_TO_PEER, Decision.RESYNC_TO_PEER)


class OperatorError(Exception):
    """An operator command that cannot run now; the message says what to do instead."""


# ------------------------------------------------------------------ pure rules
def meet(local: Generations, peer: Generations, initial: int) -> Decision:
    """`plan.plan`, plus the operator's resolution of a conflict: a copy marked inconsistent
    (a resync into it unfinished, or discarded by `hvha resolve`) holds nothing worth keeping,
    so against a consistent copy it is overwritten by a full resync instead of being refused;
    likewise a split brain where one side's changes were never acknowledged (`unfenced`)."""
    d = plan(local, peer, initial)
    if d in CONFLICTS:
        if peer.inconsistent and not local.inconsistent:
            return Decision.FULL_RESYNC_TO_PEER
        if local.inconsistent and not peer.inconsistent:
            return Decision.FULL_RESYNC_FROM_PEER
    if d is Decision.SPLIT_BRAIN:
        # one side's changes since the split were never acknowledged (it wrote alone, but the
        # witness never recorded the other copy outdated: a primary paused while its peer
        # took over, fault-matrix row 6): discarding them loses nothing an application was
        # told is written, so that copy takes the other's data by a full compare
        if peer.unfenced and not local.unfenced:
            return Decision.FULL_RESYNC_TO_PEER
        if local.unfenced and not peer.unfenced:
            return Decision.FULL_RESYNC_FROM_PEER
    return d


def discarded() -> Generations:
    """The generations of a copy whose data an operator discarded: related to nothing and
    inconsistent, so it never promotes itself and takes the peer's data by a full resync."""
    return Generations(generations.new_id(), 0, (), inconsistent=True)


def forced(g: Generations) -> Generations:
    """`hvha prim --force`: the operator declares this (half-synced) copy good."""
    return replace(g, inconsistent=False)


def conflict_of(text: str) -> str:
    """The decision a peer's refusal message names (split_brain, unrelated, or the peer holds
    newer data: full_resync_to_peer, resync_to_peer), or "" for any other refusal."""
    return next((d.value for d in REFUSALS if d.value in text), "")


def resolve_action(*, discard: str, me: str, peer: str, primary: bool, module: str) -> str:
    """Where `hvha resolve MODULE --discard NODE` acts: "local" (move this node's copy aside)
    or "peer" (ask the peer, in the next session's hello, to move its copy aside).
    Raises OperatorError when it cannot run here."""
    if discard not in (me, peer):
        raise OperatorError(f"--discard names a node of the pair ({me} or {peer}), not "
                            f"{discard!r}")
    if discard == me and primary:
        raise OperatorError(f"{me} is primary for {module}: its data cannot be discarded while "
                            f"the application uses it; run `hvha second {module}` here so "
                            f"{peer} becomes primary, then run this again")
    if discard == peer and not primary:
        raise OperatorError(f"{me} is not primary for {module}: run `hvha resolve {module} "
                            f"--discard {peer}` on {peer}, or make {me} primary first")
    return "local" if discard == me else "peer"


def aside_path(path: Path, stamp: str) -> Path:
    """The sibling directory a discarded copy of `path` moves to."""
    return path.with_name(f"{path.name}{ASIDE_TAG}{stamp}")


# ------------------------------------------------------------------ the side effect
def move_aside(root_fd: int, path: Path, now: float | None = None) -> Path:
    """Move every entry of the directory open as `root_fd` (the replicated directory `path`)
    into a new sibling directory and return it (see the module docstring). The caller keeps
    the replicator from writing into the directory meanwhile."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    dest = aside_path(path, stamp)
    n = 1
    while True:
        try:
            os.mkdir(dest, 0o700)
            break
        except FileExistsError:
            n += 1
            dest = aside_path(path, f"{stamp}-{n}")
    st = os.fstat(root_fd)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    names = sorted(os.listdir(root_fd))
    dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(names):
            try:
                os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.EXDEV or i:
                    raise OperatorError(f"moving {path / name} to {dest}: {exc}; what was "
                                        f"moved is in {dest}; fix the cause and run the "
                                        "command again") from exc
                _copy_then_remove(root_fd, names, dest)
                break
        os.fsync(dfd)
        os.fsync(root_fd)
    finally:
        os.close(dfd)
    log.warning("replication: the discarded copy of %s is kept in %s (%d entries)", path, dest,
                len(names))
    return dest


def _copy_then_remove(root_fd: int, names: list[str], dest: Path) -> None:
    """The directory is the root of its own file system: copy, then remove the originals."""
    src = f"/proc/{os.getpid()}/fd/{root_fd}"
    done = subprocess.run(["cp", "-a", "--sparse=always", *(f"{src}/{n}" for n in names),
                           f"{dest}/"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OperatorError(f"copying the discarded data to {dest} failed (it is on another "
                            f"file system): {done.stderr.strip()}; nothing was removed; free "
                            "space there, or move the data aside yourself, then run again")
    for name in names:
        if stat.S_ISDIR(os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=root_fd)
        else:
            os.unlink(name, dir_fd=root_fd)
