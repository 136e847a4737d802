"""Data fences at the witness (hvha.agent.fences): a node that wrote alone outdates the other
copy, and the witness then grants the module only to a node holding that data (fault-matrix
rows 5 and 18: a stale node refuses to become primary until resynced)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvha.agent.fences import FenceTable
from hvha.agent.witness import (
    Arbiter,
    encode_reply,
    encode_request,
    make_claims,
    parse_reply,
    parse_request,
)

L = 5.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _arbiter(saved: list[str] | None = None) -> tuple[Arbiter, Clock]:
    clock = Clock()
    a = Arbiter(L, clock, on_fence=lambda t: saved.append(t.to_json()) if saved is not None
                else None)
    clock.t = a.grace_ends + 0.01  # past the start-up grace
    return a, clock


def test_stale_node_is_refused_after_the_holder_wrote_alone() -> None:
    saved: list[str] = []
    a, clock = _arbiter(saved)
    assert a.handle("node1", [("vm", "acquire", "aa")])["vm"].granted
    # node1 loses node2 and writes alone under a new generation: recorded before any ack
    assert a.handle("node1", [("vm", "outdate", "bb")])["vm"].granted
    assert saved and '"gen": "bb"' in saved[-1]
    clock.t += L + 1  # node1 dies: its lease runs out
    refused = a.handle("node2", [("vm", "acquire", "aa")])["vm"]
    assert not refused.granted and refused.why == "outdated" and refused.holder == "node1"
    # node1 comes back: it holds the newest data, it may take the module again
    assert a.handle("node1", [("vm", "acquire", "bb")])["vm"].granted


def test_a_resynced_peer_presents_the_new_generation_and_is_granted() -> None:
    a, clock = _arbiter()
    a.handle("node1", [("vm", "acquire", "aa")])
    a.handle("node1", [("vm", "outdate", "bb")])
    clock.t += L + 1
    assert a.handle("node2", [("vm", "acquire", "bb")])["vm"].granted


def test_only_the_lease_holder_may_outdate_the_other_copy() -> None:
    a, _ = _arbiter()
    a.handle("node1", [("vm", "acquire", "aa")])
    assert not a.handle("node2", [("vm", "outdate", "cc")])["vm"].granted
    assert a.fences.fences == {}


def test_modules_without_fences_are_unaffected() -> None:
    a, _ = _arbiter()
    assert a.handle("node2", [("web", "acquire")])["web"].granted


def test_codec_carries_generations_and_the_reason() -> None:
    claims = make_claims([("vm", "acquire", "0a1b"), ("web", "renew")])
    nonce, back = parse_request(encode_request("0" * 32, claims))
    assert back == claims
    a, _ = _arbiter()
    a.handle("node1", [("vm", "acquire", "aa")])
    a.handle("node1", [("vm", "outdate", "bb")])
    a.handle("node1", [("vm", "release")])
    _, grants = parse_reply(encode_reply(nonce, a.handle("node2", [("vm", "acquire", "aa")])))
    assert grants["vm"].why == "outdated"


@pytest.mark.parametrize("bad", [("vm", "outdate"), ("vm", "acquire", "XYZ"),
                                 ("vm", "acquire", "")])
def test_bad_claims_are_rejected(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        make_claims([bad])


def test_fences_survive_a_witness_restart(tmp_path: Path) -> None:
    path = tmp_path / "fences.json"
    table = FenceTable()
    table.record("vm", "node1", "bb")
    table.save(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = Arbiter(L, Clock(), fences=FenceTable.load(path))
    assert again.fences.blocks("vm", "node2", "aa") is not None
    path.write_text("{not json")
    with pytest.raises(ValueError, match="fix or remove it"):
        FenceTable.load(path)
