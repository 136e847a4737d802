"""The primary's activity log: what the peer has applied but may not have on its disk yet.

Why: the secondary acknowledges a write once it is applied (in its page cache), or a large one
once received (lane.c; it may still fail there, e.g. a full disk); only an fsync barrier makes
it durable there. If the secondary loses power, writes it acknowledged since its
last barrier are gone from its copy, while the primary, having seen them acknowledged, keeps no
record of them: a later incremental resync would not resend them, the copies would differ
silently, and an application's later fsync (which covers every earlier write of the file)
would return while the peer lacks data. DRBD keeps an activity log for the same reason.

So the stream notes the dirty-map records of every op it streams, in epochs closed by a global
barrier (an Fsync of the whole directory: syncfs on the secondary) sent at most every
`max_age` seconds or `max_bytes` bytes while writes flow. Once the peer acknowledges an epoch's
barrier, the epoch is forgotten; when the peer is lost, every open epoch's records go to the
dirty map, so the resync resends them. Memory holds records (zones, paths), never data.

Pure bookkeeping: the Stream calls it under its own lock and decides when to send barriers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hvha.replication import ops
from hvha.replication.dirty import Dirt, op_records


@dataclass
class _Epoch:
    dirt: Dirt = field(default_factory=Dirt)
    started: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    barrier: int = 0  # sequence number of the barrier that closed it (0: still open)


class ActivityLog:
    """Epochs of streamed ops not yet known durable on the peer."""

    def __init__(self, zone_size: int, *, max_age: float = 1.0,
                 max_bytes: int = 256 << 20) -> None:
        self.zone_size, self.max_age, self.max_bytes = zone_size, max_age, max_bytes
        self._epochs: list[_Epoch] = [_Epoch()]

    def note(self, op: ops.Op) -> None:
        """An op was streamed to the peer (call in stream order)."""
        if isinstance(op, ops.Fsync):
            return
        cur = self._epochs[-1]
        if cur.dirt.empty() and not cur.nbytes:
            cur.started = time.monotonic()
        recs = op_records(op, self.zone_size)
        # a rename moves what older epochs hold for the old name too
        for ep in self._epochs if isinstance(op, ops.Rename) else (cur,):
            for rec in recs:
                ep.dirt.apply(rec)
        if isinstance(op, ops.Write):
            cur.nbytes += len(op.data)

    def barrier_due(self, now: float | None = None) -> bool:
        """Whether the open epoch should be closed by a barrier now."""
        cur = self._epochs[-1]
        if cur.dirt.empty():
            return False
        age = (time.monotonic() if now is None else now) - cur.started
        return age >= self.max_age or cur.nbytes >= self.max_bytes

    def seconds_to_barrier(self) -> float | None:
        """How long until the open epoch is due (None: nothing to make durable)."""
        cur = self._epochs[-1]
        if cur.dirt.empty():
            return None
        return max(self.max_age - (time.monotonic() - cur.started), 0.0)

    def close_epoch(self, barrier_seq: int) -> None:
        """A global barrier with this sequence number was queued after the open epoch."""
        self._epochs[-1].barrier = barrier_seq
        self._epochs.append(_Epoch())

    def acked(self, upto: int) -> None:
        """The peer acknowledged every op <= upto (barriers among them are durable)."""
        while len(self._epochs) > 1 and 0 < self._epochs[0].barrier <= upto:
            self._epochs.pop(0)

    def take(self) -> list[list[Any]]:
        """Every record not known durable on the peer (for the dirty map); then start over."""
        out: list[list[Any]] = []
        for ep in self._epochs:
            out += ep.dirt.records()
        self._epochs = [_Epoch()]
        return out

    def open_age(self) -> float | None:
        """Seconds since the open epoch's first record (None: it is empty)."""
        cur = self._epochs[-1]
        return None if cur.dirt.empty() else time.monotonic() - cur.started

    def open_epochs(self) -> int:
        return sum(1 for ep in self._epochs if not ep.dirt.empty())
