"""Data generations (as DRBD's UUIDs): which copy is newer when the two nodes meet again.

Why: after a failure each node knows only its own history. Each node keeps random 64-bit ids:
`current` (the period of data it holds), `bitmap` (the current id at the moment it started
tracking changes in its dirty map while the peer was away; 0 when not tracking) and `history`
(older ids, newest first). Comparing the two sets of ids at reconnect tells apart: same data,
"I changed, the peer did not" (incremental resync from my dirty map), "the peer changed", "we
share an ancestor but the dirty map cannot cover it" (full resync), both changed (split brain:
refused until an operator picks a side), and never related (unrelated: refused).

Everything here is a pure function of its arguments except `new_id` (random) and the small
load/save helpers at the end. Rules for callers:
- `start_alone` when this node becomes primary (or writes) while the peer is away (`unfenced`
  until `fenced`: until then none of its writes was acknowledged, and admin.meet lets such
  changes be overwritten by the peer's instead of calling it a split brain);
- `resync_started`/`resync_finished` on the sync target; `synced` on the source when the
  resync completes; a target with `inconsistent` set must never promote itself (`may_promote`).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

HISTORY = 4


class Decision(StrEnum):
    IN_SYNC = "in_sync"
    RESYNC_TO_PEER = "resync_to_peer"  # incremental, from my dirty map
    RESYNC_FROM_PEER = "resync_from_peer"  # incremental, from the peer's dirty map
    FULL_RESYNC_TO_PEER = "full_resync_to_peer"
    FULL_RESYNC_FROM_PEER = "full_resync_from_peer"
    SPLIT_BRAIN = "split_brain"
    UNRELATED = "unrelated"


@dataclass(frozen=True)
class Generations:
    current: int
    bitmap: int = 0
    history: tuple[int, ...] = ()
    inconsistent: bool = False  # a resync into this copy started and has not finished
    # this node started writing alone and the witness has not (yet) recorded the peer's copy
    # outdated: no write of the current period was acknowledged (they wait for that record)
    unfenced: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"current": f"{self.current:016x}", "bitmap": f"{self.bitmap:016x}",
                "history": [f"{h:016x}" for h in self.history],
                "inconsistent": self.inconsistent, "unfenced": self.unfenced}

    @staticmethod
    def from_dict(d: dict[str, object]) -> Generations:
        hist = d.get("history", [])
        if not isinstance(hist, list):
            raise ValueError("history must be a list")
        return Generations(int(str(d["current"]), 16), int(str(d.get("bitmap", "0")), 16),
                           tuple(int(str(h), 16) for h in hist),
                           bool(d.get("inconsistent", False)), d.get("unfenced") is True)


def new_id() -> int:
    """A random non-zero 64-bit id."""
    return secrets.randbits(64) | 1


def initial(ident: int | None = None) -> Generations:
    """A fresh copy (first node of a new mirror). The peer gets the same via `resync_finished`
    after its first full resync."""
    return Generations(new_id() if ident is None else ident)


def start_alone(g: Generations, ident: int | None = None, *,
                unfenced: bool = False) -> Generations:
    """This node writes while the peer is away: a new period of data begins, and the dirty map
    tracks changes since the old one (unless it already does). unfenced=True: its writes wait
    for the witness to record the peer's copy outdated (`fenced` once it has)."""
    nid = new_id() if ident is None else ident
    if g.bitmap == 0:
        return replace(g, current=nid, bitmap=g.current, unfenced=unfenced)
    return replace(g, current=nid, history=((g.current, *g.history))[:HISTORY],
                   unfenced=unfenced)


def fenced(g: Generations) -> Generations:
    """Writes of this period may now be acknowledged (the witness recorded the peer's copy
    outdated, or the peer is back and gets them by resync), so they count: persist this
    before acknowledging any."""
    return replace(g, unfenced=False)


def synced(source: Generations) -> Generations:
    """The source after a completed resync: the peer now holds its current data."""
    if source.bitmap == 0:
        return replace(source, unfenced=False)
    return replace(source, bitmap=0, history=((source.bitmap, *source.history))[:HISTORY],
                   unfenced=False)


def resync_started(target: Generations) -> Generations:
    return replace(target, inconsistent=True)


def resync_finished(target: Generations, source: Generations) -> Generations:
    """The target after a completed resync holds the source's data (and history)."""
    return Generations(source.current, 0, synced(source).history, False)


def may_promote(g: Generations) -> bool:
    """A copy with a resync into it unfinished holds a mix of old and new data."""
    return not g.inconsistent


def _related(a: Generations, b: Generations) -> bool:
    ids_a = {a.current, a.bitmap, *a.history} - {0}
    ids_b = {b.current, b.bitmap, *b.history} - {0}
    return bool(ids_a & ids_b)


def decide(local: Generations, peer: Generations) -> Decision:
    """What to do when the two nodes meet (pure; see the module docstring)."""
    if local.current == peer.current:
        if local.inconsistent and not peer.inconsistent:
            return Decision.FULL_RESYNC_FROM_PEER
        if peer.inconsistent and not local.inconsistent:
            return Decision.FULL_RESYNC_TO_PEER
        return Decision.IN_SYNC
    local_changed = local.bitmap != 0
    peer_changed = peer.bitmap != 0
    if local_changed and local.bitmap == peer.current and not peer_changed:
        return Decision.RESYNC_TO_PEER
    if peer_changed and peer.bitmap == local.current and not local_changed:
        return Decision.RESYNC_FROM_PEER
    if local_changed and peer_changed and (local.bitmap == peer.bitmap
                                           or _related(local, peer)):
        return Decision.SPLIT_BRAIN
    if peer.current in local.history or (local_changed and peer.current == local.bitmap):
        return Decision.SPLIT_BRAIN if peer_changed else Decision.FULL_RESYNC_TO_PEER
    if local.current in peer.history or (peer_changed and local.current == peer.bitmap):
        return Decision.SPLIT_BRAIN if local_changed else Decision.FULL_RESYNC_FROM_PEER
    if _related(local, peer):
        return Decision.SPLIT_BRAIN
    return Decision.UNRELATED


def load(path: str | Path) -> Generations | None:
    try:
        return Generations.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None


def save(path: str | Path, g: Generations) -> None:
    """Write atomically and durably (temp file, fsync, rename, fsync of the directory)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(g.as_dict(), sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
