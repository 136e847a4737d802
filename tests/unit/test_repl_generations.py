"""The data-generation decision table: what two nodes do when they meet again."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvha.replication import generations as g
from hvha.replication.generations import Decision, Generations

X, Y, Z, W = 0x10, 0x20, 0x30, 0x40


def both(a: Generations, b: Generations) -> tuple[Decision, Decision]:
    return g.decide(a, b), g.decide(b, a)


def test_same_data_is_in_sync() -> None:
    assert both(Generations(X), Generations(X)) == (Decision.IN_SYNC, Decision.IN_SYNC)


def test_stop_b_write_a_stop_a_start_b_alone_b_is_outdated() -> None:
    a = b = Generations(X)
    a = g.start_alone(a, Y)  # B stopped, A writes alone
    # A stops; B starts alone but does not write (it must not be promoted: see the agent)
    assert both(a, b) == (Decision.RESYNC_TO_PEER, Decision.RESYNC_FROM_PEER)
    # A alone a second time (restarted while B away): still incremental from A's dirty map
    a2 = g.start_alone(a, Z)
    assert both(a2, b) == (Decision.RESYNC_TO_PEER, Decision.RESYNC_FROM_PEER)


def test_both_wrote_is_split_brain() -> None:
    a = g.start_alone(Generations(X), Y)
    b = g.start_alone(Generations(X), Z)
    assert both(a, b) == (Decision.SPLIT_BRAIN, Decision.SPLIT_BRAIN)
    a2 = g.start_alone(a, W)
    assert both(a2, b) == (Decision.SPLIT_BRAIN, Decision.SPLIT_BRAIN)


def test_resync_completion_brings_both_in_sync() -> None:
    a = g.start_alone(Generations(X), Y)
    b = g.resync_started(Generations(X))
    assert not g.may_promote(b)
    assert g.decide(a, b) is Decision.RESYNC_TO_PEER  # an interrupted resync continues
    a, b = g.synced(a), g.resync_finished(b, a)
    assert g.may_promote(b)
    assert both(a, b) == (Decision.IN_SYNC, Decision.IN_SYNC)
    assert a.bitmap == 0 and X in a.history


def test_stale_peer_without_bitmap_needs_full_resync() -> None:
    a = g.synced(g.start_alone(Generations(X), Y))  # synced with someone, bitmap cleared
    b = Generations(X)  # a copy older than the last sync
    assert both(a, b) == (Decision.FULL_RESYNC_TO_PEER, Decision.FULL_RESYNC_FROM_PEER)


def test_inconsistent_copy_with_same_current_is_fully_resynced() -> None:
    a, b = Generations(X), g.resync_started(Generations(X))
    assert both(a, b) == (Decision.FULL_RESYNC_TO_PEER, Decision.FULL_RESYNC_FROM_PEER)


def test_unrelated_copies_are_refused() -> None:
    assert both(g.initial(), g.initial()) == (Decision.UNRELATED, Decision.UNRELATED)


@pytest.mark.parametrize("events", ["aab", "abab", "ba", "aa", "bb", ""])
def test_decisions_are_symmetric(events: str) -> None:
    nodes = {"a": Generations(X), "b": Generations(X)}
    for i, who in enumerate(events):
        nodes[who] = g.start_alone(nodes[who], 0x100 + i)
    d1, d2 = both(nodes["a"], nodes["b"])
    mirror = {Decision.RESYNC_TO_PEER: Decision.RESYNC_FROM_PEER,
              Decision.FULL_RESYNC_TO_PEER: Decision.FULL_RESYNC_FROM_PEER}
    mirror.update({v: k for k, v in mirror.items()})
    assert mirror.get(d1, d1) == d2


def test_history_is_bounded_and_persisted(tmp_path: Path) -> None:
    x = Generations(X)
    for i in range(10):
        x = g.start_alone(x, 0x1000 + i)
    assert len(x.history) <= g.HISTORY
    g.save(tmp_path / "gen.json", x)
    assert g.load(tmp_path / "gen.json") == x
    assert g.load(tmp_path / "missing.json") is None
    assert g.new_id() != 0
