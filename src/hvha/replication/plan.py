"""Pure rules of the replicator: what to do when the two copies meet, initial generations.

Why a separate module: these decide whose data wins, so they are kept free of I/O and tested
on their own (tests/integration/test_replicator.py::test_plan_rules); replicator.py applies them.
"""

from __future__ import annotations

import hashlib
import re

from hvha.replication import generations
from hvha.replication.generations import Decision, Generations

TO_PEER = (Decision.RESYNC_TO_PEER, Decision.FULL_RESYNC_TO_PEER)
FROM_PEER = (Decision.RESYNC_FROM_PEER, Decision.FULL_RESYNC_FROM_PEER)


def initial_id(module: str, index: int) -> int:
    """The generation of a never-replicated copy: the same on both nodes, so a fresh pair is
    related (and data_ok) but is always compared by a full resync before it counts as in sync."""
    digest = hashlib.sha256(f"hvha-initial\0{module}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") | 1


def plan(local: Generations, peer: Generations, initial: int) -> Decision:
    """What to do when the two copies meet (pure). A sync based on the never-replicated initial
    generation is always full: the two copies were never compared."""
    d = generations.decide(local, peer)
    if d is Decision.RESYNC_TO_PEER and local.bitmap == initial:
        return Decision.FULL_RESYNC_TO_PEER
    if d is Decision.RESYNC_FROM_PEER and peer.bitmap == initial:
        return Decision.FULL_RESYNC_FROM_PEER
    return d


def begin_primary(g: Generations, initial: int) -> Generations:
    """A never-replicated copy leaves the initial generation when it first serves as primary
    (so the peer, still at `initial`, gets a full resync from it)."""
    if g.current != initial:
        return g
    return Generations(generations.new_id(), 0, (initial, *g.history)[:generations.HISTORY])


def dir_key(path: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/")) or "root"
    return f"{slug[:60]}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
