"""The module state machine: invariants over every (role, event) pair, then scenarios."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from hvha.agent.fsm import Action, Ev, Event, Policy, Role, State, step

P = Policy()
TO_PRIMARY = [Action.REPL_PRIMARY, Action.ADD_VIP, Action.START_PAYLOAD, Action.START_CHECKERS]

# Representative states of each role, with the peer in each situation that matters.
PEERS = [
    dict(peer_alive=False, peer_role=None),
    dict(peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True, peer_data_ok=True),
    dict(peer_alive=True, peer_role=Role.PRIM, peer_data_ok=True),
    dict(peer_alive=True, peer_role=Role.WAIT, peer_data_ok=True),
    dict(peer_alive=True, peer_role=Role.STOP),
]
STATES = [replace(State(role=r, acquiring=a), **peer)  # type: ignore[arg-type]
          for r, a, peer in itertools.product(Role, (False, True), PEERS)
          if not (a and r.primary)]
EVENTS = [
    Event(Ev.CMD_START, 10), Event(Ev.CMD_STOP, 10), Event(Ev.CMD_PRIM, 10),
    Event(Ev.CMD_SECOND, 10), Event(Ev.CMD_SWAP, 10), Event(Ev.CMD_RESTART, 10),
    Event(Ev.PEER, 10, peer_alive=False), Event(Ev.PEER, 10, peer_alive=True, peer_role=Role.PRIM),
    Event(Ev.PEER, 10, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True),
    Event(Ev.PEER_WANTS_PRIMARY, 10), Event(Ev.LEASE_GRANTED, 10), Event(Ev.LEASE_DENIED, 10),
    Event(Ev.LEASE_LOST, 10), Event(Ev.PAYLOAD_FAILED, 10, action="restart"),
    Event(Ev.PAYLOAD_FAILED, 10, action="failover"), Event(Ev.PAYLOAD_FAILED, 10, action="stop"),
    Event(Ev.RESOURCE_DOWN, 10, action="eth0"), Event(Ev.RESOURCE_UP, 10, action="eth0"),
    Event(Ev.DATA, 10, data_ok=False), Event(Ev.TICK, 10),
]
PAIRS = list(itertools.product(STATES, EVENTS))


def _id(pair: tuple[State, Event]) -> str:
    s, e = pair
    return f"{s.role}{'+acq' if s.acquiring else ''}-peer:{s.peer_role}-{e.kind}{e.action}"


@pytest.mark.parametrize("pair", PAIRS, ids=[_id(p) for p in PAIRS])
def test_every_pair_keeps_the_invariants(pair: tuple[State, Event]) -> None:
    s, e = pair
    t, actions = step(s, e, P)
    assert isinstance(t.role, Role)
    # Becoming primary happens only on a witness grant, and does the whole start sequence.
    if t.role.primary and not s.role.primary:
        assert e.kind is Ev.LEASE_GRANTED, (s, e, t)
        assert actions == TO_PRIMARY
    # Never become primary while the peer is known primary.
    if t.role.primary and not s.role.primary:
        assert not (t.peer_alive and t.peer_role is not None and t.peer_role.primary)
    # Leaving the primary role always stops the payload (or fences) and drops the VIP.
    if s.role.primary and not t.role.primary:
        assert (Action.STOP_PAYLOAD in actions) != (Action.FENCE in actions)
        assert Action.DEL_VIP in actions and Action.RELEASE_LEASE in actions
        assert actions.index(Action.STOP_CHECKERS) < actions.index(Action.DEL_VIP)
    # A module outside the primary role never starts anything.
    if not t.role.primary:
        assert not {Action.START_PAYLOAD, Action.ADD_VIP, Action.RESTART_PAYLOAD,
                    Action.ANNOUNCE_VIP} & set(actions)
    # Only `start` leaves STOP; `stop` always reaches it.
    if s.role is Role.STOP and e.kind is not Ev.CMD_START:
        assert t.role is Role.STOP and actions in ([], [Action.RELEASE_LEASE])
    if e.kind is Ev.CMD_STOP:
        assert t.role is Role.STOP
    # The lease is asked for only by a standby node whose peer is not primary.
    if Action.ACQUIRE_LEASE in actions:
        assert not t.role.primary and t.acquiring
        assert not (t.peer_alive and t.peer_role is not None and t.peer_role.primary)
    assert len(actions) == len(set(actions))
    # Whoever stops asking for the lease without getting the role cancels the request.
    if s.acquiring and not t.acquiring and not t.role.primary and e.kind is not Ev.LEASE_DENIED:
        assert Action.RELEASE_LEASE in actions
    # A grant nobody asked for is handed back.
    if e.kind is Ev.LEASE_GRANTED and not s.acquiring and not s.role.primary:
        assert actions == [Action.RELEASE_LEASE]


def run(s: State, *events: Event, p: Policy = P) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    for e in events:
        s, acts = step(s, e, p)
        actions += acts
    return s, actions


def test_first_start_designated_node_asks_then_becomes_alone() -> None:
    s, acts = run(State(), Event(Ev.CMD_START, 0, peer_alive=False))
    assert (s.role, acts) == (Role.WAIT, [Action.ACQUIRE_LEASE])
    s, acts = run(s, Event(Ev.LEASE_GRANTED, 1))
    assert (s.role, acts) == (Role.ALONE, TO_PRIMARY)
    s, acts = run(s, Event(Ev.PEER, 2, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True))
    assert (s.role, acts) == (Role.PRIM, [Action.ANNOUNCE_VIP])


def test_non_designated_node_waits_for_a_live_peer_then_follows() -> None:
    p = replace(P, designated=False)
    s, acts = run(State(), Event(Ev.CMD_START, 0, peer_alive=True, peer_role=Role.WAIT,
                                 peer_data_ok=True), p=p)
    assert (s.role, acts) == (Role.WAIT, [])
    s, acts = run(s, Event(Ev.PEER, 1, peer_role=Role.ALONE), p=p)
    assert (s.role, acts) == (Role.SECOND, [Action.REPL_SECONDARY])


def test_failover_when_the_primary_dies_needs_the_lease() -> None:
    s = State(role=Role.SECOND, peer_alive=True, peer_role=Role.PRIM)
    s, acts = run(s, Event(Ev.PEER, 5, peer_alive=False))
    assert (s.role, acts) == (Role.SECOND, [Action.ACQUIRE_LEASE])
    denied, acts = run(s, Event(Ev.LEASE_DENIED, 6, detail="held by node1"))
    assert denied.role is Role.WAIT and "node1" in denied.reason and not acts
    _, acts = run(denied, Event(Ev.TICK, 7))
    assert acts == [Action.ACQUIRE_LEASE]
    s, acts = run(s, Event(Ev.LEASE_GRANTED, 6))
    assert (s.role, acts) == (Role.ALONE, TO_PRIMARY)


def test_failover_off_keeps_the_secondary_waiting() -> None:
    s = State(role=Role.SECOND, peer_alive=True, peer_role=Role.PRIM)
    s, acts = run(s, Event(Ev.PEER, 5, peer_alive=False), p=replace(P, automatic=False))
    assert (s.role, acts) == (Role.WAIT, [])
    s, acts = run(s, Event(Ev.CMD_PRIM, 6), p=replace(P, automatic=False))
    assert acts == [Action.ACQUIRE_LEASE]


def test_stale_node_never_promotes_itself() -> None:
    s = State(role=Role.SECOND, peer_alive=True, peer_role=Role.PRIM, data_ok=False)
    s, acts = run(s, Event(Ev.PEER, 5, peer_alive=False), Event(Ev.TICK, 6))
    assert (s.role, acts) == (Role.WAIT, [])
    assert "hvha prim" in s.reason


def test_swap_from_the_primary() -> None:
    s = State(role=Role.PRIM, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True)
    s, acts = run(s, Event(Ev.CMD_SWAP, 1))
    assert s.role is Role.SECOND and s.yielded
    assert acts == [Action.STOP_CHECKERS, Action.STOP_PAYLOAD, Action.DEL_VIP,
                    Action.RELEASE_LEASE, Action.REPL_SECONDARY]
    # It does not take the role back while the peer is alive and taking over...
    s, acts = run(s, Event(Ev.TICK, 2), Event(Ev.PEER, 3, peer_role=Role.SECOND))
    assert acts == []
    # ...and follows it once it is primary.
    s, _ = run(s, Event(Ev.PEER, 4, peer_role=Role.ALONE))
    assert s.role is Role.SECOND and not s.yielded


def test_peer_side_of_a_swap_takes_over() -> None:
    s = State(role=Role.SECOND, peer_alive=True, peer_role=Role.PRIM, peer_data_ok=True)
    s, acts = run(s, Event(Ev.PEER, 1, peer_role=Role.SECOND), p=replace(P, designated=False))
    assert acts == [Action.ACQUIRE_LEASE]


def test_swap_from_the_secondary_asks_the_primary() -> None:
    s = State(role=Role.SECOND, peer_alive=True, peer_role=Role.PRIM)
    s, acts = run(s, Event(Ev.CMD_SWAP, 1))
    assert s.wants_primary and acts == []
    prim = State(role=Role.PRIM, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True)
    prim, acts = run(prim, Event(Ev.PEER_WANTS_PRIMARY, 2))
    assert prim.role is Role.SECOND and Action.STOP_PAYLOAD in acts


def test_swap_refused_without_an_in_sync_secondary() -> None:
    s, acts = run(State(role=Role.ALONE), Event(Ev.CMD_SWAP, 1))
    assert (s.role, acts) == (Role.ALONE, [])
    assert "refused" in s.reason


def test_failback_waits_for_the_stability_window() -> None:
    p = replace(P, failback=True, peer_preferred=True, stability_window=30)
    s = State(role=Role.ALONE)
    s, acts = run(s, Event(Ev.PEER, 100, peer_alive=True, peer_role=Role.SECOND,
                           peer_in_sync=True), p=p)
    assert (s.role, acts) == (Role.PRIM, [Action.ANNOUNCE_VIP])
    s, acts = run(s, Event(Ev.TICK, 129), p=p)
    assert (s.role, acts) == (Role.PRIM, [])
    s, acts = run(s, Event(Ev.TICK, 130), p=p)
    assert s.role is Role.SECOND and Action.STOP_PAYLOAD in acts


def test_failback_window_restarts_when_the_peer_leaves_sync() -> None:
    p = replace(P, failback=True, peer_preferred=True, stability_window=30)
    s = State(role=Role.PRIM, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True,
              peer_second_since=0)
    s, _ = run(s, Event(Ev.PEER, 20, peer_in_sync=False), p=p)
    s, _ = run(s, Event(Ev.PEER, 25, peer_in_sync=True), p=p)
    s, acts = run(s, Event(Ev.TICK, 40), p=p)
    assert s.role is Role.PRIM and not acts
    s, acts = run(s, Event(Ev.TICK, 55), p=p)
    assert s.role is Role.SECOND


def test_restart_budget_then_stop() -> None:
    p = replace(P, restart_count=2, restart_window=100)
    s = State(role=Role.ALONE)
    for t in (1, 2):
        s, acts = run(s, Event(Ev.PAYLOAD_FAILED, t, action="restart"), p=p)
        assert Action.RESTART_PAYLOAD in acts and s.role is Role.ALONE
    s, acts = run(s, Event(Ev.PAYLOAD_FAILED, 3, action="restart"), p=p)
    assert s.role is Role.STOP and "budget" in s.reason and Action.STOP_PAYLOAD in acts


def test_restart_budget_window_slides() -> None:
    p = replace(P, restart_count=1, restart_window=10)
    s, _ = run(State(role=Role.ALONE), Event(Ev.PAYLOAD_FAILED, 0, action="restart"), p=p)
    s, acts = run(s, Event(Ev.PAYLOAD_FAILED, 11, action="restart"), p=p)
    assert s.role is Role.ALONE and Action.RESTART_PAYLOAD in acts


def test_failover_action_hands_over_to_a_secondary() -> None:
    s = State(role=Role.PRIM, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True)
    s, acts = run(s, Event(Ev.PAYLOAD_FAILED, 1, action="failover"))
    assert s.role is Role.SECOND and s.yielded and Action.STOP_PAYLOAD in acts


def test_a_primary_whose_disk_failed_hands_over_to_an_in_sync_peer() -> None:
    """Fault-matrix row 16: the replicator reports this copy bad (data_ok False, polled on
    each tick) -> the module moves to the in-sync secondary, and this node then follows it
    and never takes the role back on its own while its copy is bad."""
    s = State(role=Role.PRIM, peer_alive=True, peer_role=Role.SECOND, peer_in_sync=True)
    s, acts = run(s, Event(Ev.TICK, 1, data_ok=False))
    assert s.role is Role.SECOND and s.yielded and "disk" in s.reason
    assert acts == [Action.STOP_CHECKERS, Action.STOP_PAYLOAD, Action.DEL_VIP,
                    Action.RELEASE_LEASE, Action.REPL_SECONDARY]
    s, acts = run(s, Event(Ev.PEER, 2, peer_role=Role.ALONE))
    assert s.role is Role.SECOND and acts == []
    s, acts = run(s, Event(Ev.PEER, 3, peer_alive=False), Event(Ev.TICK, 4, data_ok=False))
    assert s.role is Role.WAIT and Action.ACQUIRE_LEASE not in acts


def test_a_primary_whose_disk_failed_stays_without_an_in_sync_peer() -> None:
    for peer in (dict(peer_alive=False), dict(peer_alive=True, peer_role=Role.SECOND)):
        s = replace(State(role=Role.ALONE), **peer)  # type: ignore[arg-type]
        s, acts = run(s, Event(Ev.TICK, 1, data_ok=False))
        assert (s.role, acts) == (Role.ALONE, []) and "disk" in s.reason
        # ...and hands over as soon as the peer has caught up
        s, acts = run(s, Event(Ev.PEER, 2, peer_alive=True, peer_role=Role.SECOND,
                               peer_in_sync=True))
        assert s.role is Role.SECOND and Action.STOP_PAYLOAD in acts


def test_lease_lost_fences_at_once() -> None:
    s, acts = run(State(role=Role.ALONE), Event(Ev.LEASE_LOST, 1))
    assert s.role is Role.WAIT and Action.FENCE in acts and Action.STOP_PAYLOAD not in acts


def test_split_brain_the_non_designated_node_gives_way() -> None:
    e = Event(Ev.PEER, 1, peer_alive=True, peer_role=Role.ALONE)
    loser, acts = run(State(role=Role.ALONE), e, p=replace(P, designated=False))
    assert loser.role is Role.WAIT and Action.FENCE in acts
    winner, acts = run(State(role=Role.ALONE), e)
    assert winner.role is Role.ALONE and acts == [Action.ANNOUNCE_VIP]


def test_with_an_arbiter_the_lease_holder_keeps_the_role() -> None:
    """Regression (e2e SIGSTOP/SIGCONT): a resumed node's stale PRIM must not make the lease
    holder give way; the resumed node fences itself for lack of a lease."""
    e = Event(Ev.PEER, 1, peer_alive=True, peer_role=Role.PRIM)
    p = replace(P, arbitrated=True, designated=False)
    holder, acts = run(State(role=Role.ALONE), e, p=p)
    assert holder.role is Role.ALONE and acts == [Action.ANNOUNCE_VIP]


def test_primary_reannounces_the_vip_when_the_peer_returns_or_gives_up() -> None:
    """Regression (e2e SIGSTOP): a frozen peer's kernel kept answering ARP for the VIP."""
    p = replace(P, arbitrated=True)
    s = State(role=Role.ALONE)
    s, acts = run(s, Event(Ev.PEER, 1, peer_alive=True, peer_role=Role.PRIM), p=p)
    assert acts == [Action.ANNOUNCE_VIP]
    s, acts = run(s, Event(Ev.PEER, 2, peer_role=Role.WAIT), p=p)
    assert acts == [Action.ANNOUNCE_VIP]
    s, acts = run(s, Event(Ev.PEER, 3, peer_role=Role.SECOND, peer_in_sync=True), p=p)
    assert acts == [] and s.role is Role.PRIM


def test_resource_down_stops_and_waits_then_recovers() -> None:
    s, acts = run(State(role=Role.ALONE), Event(Ev.RESOURCE_DOWN, 1, action="eth0"))
    assert s.role is Role.WAIT and Action.STOP_PAYLOAD in acts
    s, acts = run(s, Event(Ev.RESOURCE_UP, 2, action="eth0"))
    assert acts == [Action.ACQUIRE_LEASE]


def test_exit_codes_are_safekits() -> None:
    assert [r.exit_code for r in (Role.STOP, Role.WAIT, Role.ALONE, Role.PRIM, Role.SECOND)] \
        == [0, 1, 2, 3, 4]
