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


# ------------------------------------------------- unfenced changes (a paused primary's writes)
def test_unfenced_changes_are_overwritten_instead_of_a_split_brain() -> None:
    """Fault-matrix row 6: A (primary) is paused, B takes over and is fenced (its writes
    count), A resumes and writes alone but the witness never fences B's copy for it: none of
    A's writes was acknowledged, so A takes B's data by a full resync, automatically."""
    from hvha.replication.admin import meet

    a = g.start_alone(Generations(X), Y, unfenced=True)
    b = g.fenced(g.start_alone(Generations(X), Z, unfenced=True))
    assert a.unfenced and not b.unfenced
    assert both(a, b) == (Decision.SPLIT_BRAIN, Decision.SPLIT_BRAIN)  # the bare table
    assert meet(a, b, 0x99) == Decision.FULL_RESYNC_FROM_PEER
    assert meet(b, a, 0x99) == Decision.FULL_RESYNC_TO_PEER
    # both sides' changes count, or neither side's: an operator picks (hvha resolve)
    for a_, b_ in ((g.fenced(a), b), (a, g.start_alone(Generations(X), Z, unfenced=True))):
        assert meet(a_, b_, 0x99) == meet(b_, a_, 0x99) == Decision.SPLIT_BRAIN


def test_unfenced_is_persisted_and_ends_with_a_resync(tmp_path: Path) -> None:
    a = g.start_alone(Generations(X), Y, unfenced=True)
    g.save(tmp_path / "gens.json", a)
    loaded = g.load(tmp_path / "gens.json")
    assert loaded == a and loaded.unfenced
    assert not g.synced(a).unfenced  # the peer holds this data now
    assert not g.resync_finished(Generations(X), a).unfenced
    # files written before the field existed read as fenced (the safe side: an operator picks)
    assert not Generations.from_dict({"current": "10", "bitmap": "20"}).unfenced
    # a second period alone on top of a fenced one is unfenced again until fenced
    assert g.start_alone(g.fenced(a), Z, unfenced=True).unfenced
