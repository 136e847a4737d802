"""The module state machine: a pure function ``step(state, event, policy) -> (state, actions)``.

SafeKit's states (STOP, WAIT, ALONE, PRIM, SECOND) and its operator commands, with hvha's
arbitration: a node takes the primary role only after the witness granted it a lease
(``LEASE_GRANTED``); it gives the role up, fencing, when the runtime says the lease and the peer
are both gone (``LEASE_LOST``). Side effects are *named* here (:class:`Action`) and performed by
the executor; nothing in this module does I/O or reads a clock (``now`` comes with each event).
See docs/arbitration.md for the timing argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from hvha.model.roles import Role

__all__ = ["Action", "Ev", "Event", "Policy", "Role", "State", "step"]


class Ev(StrEnum):
    CMD_START = "start"
    CMD_STOP = "stop"
    CMD_PRIM = "prim"
    CMD_SECOND = "second"
    CMD_SWAP = "swap"
    CMD_RESTART = "restart"
    PEER = "peer"  # the peer's liveness or its view of this module changed
    PEER_WANTS_PRIMARY = "peer-wants-primary"
    LEASE_GRANTED = "lease-granted"
    LEASE_DENIED = "lease-denied"
    LEASE_LOST = "lease-lost"
    PAYLOAD_FAILED = "payload-failed"  # a checker fired (action) or the start failed
    RESOURCE_DOWN = "resource-down"
    RESOURCE_UP = "resource-up"
    DATA = "data"  # replication reports local data freshness
    TICK = "tick"


class Action(StrEnum):
    REPL_PRIMARY = "repl-primary"
    REPL_SECONDARY = "repl-secondary"
    REPL_STOP = "repl-stop"
    ACQUIRE_LEASE = "acquire-lease"
    RELEASE_LEASE = "release-lease"
    ADD_VIP = "add-vip"
    DEL_VIP = "del-vip"
    ANNOUNCE_VIP = "announce-vip"  # gratuitous ARP again: the peer may have answered for it
    START_PAYLOAD = "start-payload"
    STOP_PAYLOAD = "stop-payload"  # graceful, then forced after the timeouts
    FENCE = "fence"  # forced stop now: kill/destroy, no graceful phase
    RESTART_PAYLOAD = "restart-payload"
    START_CHECKERS = "start-checkers"
    STOP_CHECKERS = "stop-checkers"


@dataclass(frozen=True)
class Policy:
    """What the configuration says, seen from this node."""

    automatic: bool = True
    arbitrated: bool = False  # an arbiter witness grants leases: the lease, not a tie-break, rules
    designated: bool = True  # this node goes first when both could: preferred, else lower name
    peer_preferred: bool = False  # the peer is the preferred node (failback goes there)
    failback: bool = False
    stability_window: float = 30.0
    restart_count: int = 3
    restart_window: float = 86400.0


@dataclass(frozen=True)
class Event:
    kind: Ev
    now: float
    peer_alive: bool | None = None
    peer_role: Role | None = None
    peer_data_ok: bool | None = None
    peer_in_sync: bool | None = None
    data_ok: bool | None = None
    action: str = ""  # PAYLOAD_FAILED: restart | failover | stop; RESOURCE_*: checker name
    detail: str = ""


@dataclass(frozen=True)
class State:
    role: Role = Role.STOP
    reason: str = "not started"
    since: float = 0.0
    peer_alive: bool = False
    peer_role: Role | None = None
    peer_data_ok: bool = False
    peer_in_sync: bool = False
    peer_second_since: float | None = None  # when the peer became an in-sync SECOND
    data_ok: bool = True
    acquiring: bool = False
    yielded: bool = False  # gave the role away (swap, `second`): not retaken from a live peer
    wants_primary: bool = False  # asked the peer to hand over (swap from the secondary side)
    failover_enabled: bool = True
    resources_down: frozenset[str] = frozenset()
    restarts: tuple[float, ...] = field(default=())


Result = tuple[State, list[Action]]

_TO_PRIMARY = [Action.REPL_PRIMARY, Action.ADD_VIP, Action.START_PAYLOAD, Action.START_CHECKERS]


def _go(s: State, role: Role, reason: str, now: float) -> State:
    if role is s.role:
        return replace(s, reason=reason)
    return replace(s, role=role, reason=reason, since=now)


def _leave_primary(s: State, role: Role, reason: str, now: float, fence: bool = False) -> Result:
    actions = [Action.STOP_CHECKERS, Action.FENCE if fence else Action.STOP_PAYLOAD,
               Action.DEL_VIP, Action.RELEASE_LEASE]
    if role is Role.SECOND:
        actions.append(Action.REPL_SECONDARY)
    elif role is Role.STOP:
        actions.append(Action.REPL_STOP)
    return replace(_go(s, role, reason, now), acquiring=False), actions


def _observe(s: State, e: Event) -> State:
    """Fold what the event tells about the world into the state."""
    changes: dict[str, object] = {}
    if e.peer_alive is not None:
        changes["peer_alive"] = e.peer_alive
        if not e.peer_alive:
            changes.update(peer_role=None, peer_in_sync=False)
    if e.peer_role is not None and e.peer_alive is not False:
        changes["peer_role"] = e.peer_role
    for name in ("peer_data_ok", "peer_in_sync", "data_ok"):
        value = getattr(e, name)
        if value is not None:
            changes[name] = value
    t = replace(s, **changes)  # type: ignore[arg-type]
    second = t.peer_alive and t.peer_role is Role.SECOND and t.peer_in_sync
    if not second:
        t = replace(t, peer_second_since=None)
    elif t.peer_second_since is None:
        t = replace(t, peer_second_since=e.now)
    if t.peer_alive and t.peer_role is not None and t.peer_role.primary:
        t = replace(t, yielded=False, wants_primary=False)  # following a live primary again
    return t


def step(s: State, e: Event, p: Policy) -> Result:
    """One transition. Total: every (role, event) pair gives a state and a list of actions."""
    t, actions = _dispatch(_observe(s, e), e, p)
    ended = e.kind is Ev.LEASE_DENIED  # a refusal already ended the request
    if s.acquiring and not t.acquiring and not t.role.primary and not ended \
            and Action.RELEASE_LEASE not in actions:
        # No longer asking: cancel the request, and hand back a grant that may arrive late,
        # or the witness would refuse the real primary's next renewal.
        actions = [*actions, Action.RELEASE_LEASE]
    peer_back = not s.peer_alive and t.peer_alive
    peer_gave_up = (s.peer_role is not None and s.peer_role.primary
                    and not (t.peer_role is not None and t.peer_role.primary))
    if t.role.primary and s.role.primary and (peer_back or peer_gave_up):
        actions = [*actions, Action.ANNOUNCE_VIP]
    return t, actions


def _dispatch(s: State, e: Event, p: Policy) -> Result:
    handler = _HANDLERS.get(e.kind)
    if handler is not None:
        result = handler(s, e, p)
        if result is not None:
            return result
    return _settle(s, e.now, p)


def _settle(s: State, now: float, p: Policy) -> Result:
    """Level-triggered decision from the current view, after any event."""
    if s.role is Role.STOP:
        return s, []
    if s.role.primary:
        return _settle_primary(s, now, p)
    return _settle_standby(s, now, p)


def _settle_primary(s: State, now: float, p: Policy) -> Result:
    if s.resources_down:
        return _leave_primary(s, Role.WAIT, f"resource down: {', '.join(sorted(s.resources_down))}",
                              now)
    if s.peer_alive and s.peer_role is not None and s.peer_role.primary:
        if p.arbitrated:  # we hold the lease; a peer without one fences itself (see leases.py)
            return _go(s, s.role, "the peer claims the primary role without the lease", now), []
        if not p.designated:  # both primary (no witness, or ping witness): one must give way
            return _leave_primary(s, Role.WAIT, "split brain: the peer is primary too", now,
                                  fence=True)
        return _go(s, s.role, "split brain: the peer is primary too (it gives way)", now), []
    in_sync = s.peer_alive and s.peer_role is Role.SECOND and s.peer_in_sync
    if not s.data_ok:  # this copy went bad under the primary (its disk failed: localfault)
        if in_sync:
            return _leave_primary(replace(s, yielded=True), Role.SECOND,
                                  "local data failed (disk I/O error): handing over to the "
                                  "in-sync peer", now)
        return _go(s, Role.ALONE, "local data failed (disk I/O error) and no in-sync peer "
                   "to hand over to: staying; `hvha status` tells the error", now), []
    failback_due = (p.failback and p.peer_preferred and s.peer_second_since is not None
                    and now - s.peer_second_since >= p.stability_window)
    if failback_due:
        return _leave_primary(replace(s, yielded=True), Role.SECOND,
                              "failback to the preferred node", now)
    role = Role.PRIM if in_sync else Role.ALONE
    reason = "the peer is an in-sync secondary" if in_sync else (
        "peer in resync" if s.peer_alive and s.peer_role is Role.SECOND else "peer away")
    return _go(s, role, reason, now), []


def _settle_standby(s: State, now: float, p: Policy) -> Result:
    if s.resources_down:
        return replace(_go(s, Role.WAIT, "resource down: " + ", ".join(sorted(s.resources_down)),
                           now), acquiring=False), []
    peer_primary = s.peer_alive and s.peer_role is not None and s.peer_role.primary
    if peer_primary:
        actions = [] if s.role is Role.SECOND else [Action.REPL_SECONDARY]
        return replace(_go(s, Role.SECOND, "following the primary", now), acquiring=False), actions
    if not s.data_ok:
        return _go(s, Role.WAIT, "data not up to date: `hvha prim --force` promotes it anyway",
                   now), []
    if s.peer_alive:
        peer_gone = s.peer_role in (None, Role.STOP)
        go_first = (p.designated or peer_gone or not s.peer_data_ok
                    or s.role is Role.SECOND or s.wants_primary)
        if s.yielded or not go_first:
            return _go(s, s.role if s.role is Role.SECOND else Role.WAIT,
                       "waiting for the peer to start the module", now), []
    else:
        if not s.failover_enabled or (not p.automatic and s.role is Role.SECOND):
            return _go(s, Role.WAIT, "peer away; failover is off: `hvha prim` starts it here",
                       now), []
    if s.acquiring:
        return s, []
    return replace(_go(s, s.role, "asking the witness for the primary role", now),
                   acquiring=True), [Action.ACQUIRE_LEASE]


def _cmd_start(s: State, e: Event, p: Policy) -> Result | None:
    if s.role is not Role.STOP:
        return None
    return _settle(replace(_go(s, Role.WAIT, "starting", e.now), yielded=False,
                           acquiring=False, restarts=()), e.now, p)


def _cmd_stop(s: State, e: Event, p: Policy) -> Result | None:
    if s.role is Role.STOP:
        return s, []
    if s.role.primary:
        return _leave_primary(s, Role.STOP, "stopped by the operator", e.now)
    actions = [Action.RELEASE_LEASE, Action.REPL_STOP] if s.acquiring else [Action.REPL_STOP]
    return replace(_go(s, Role.STOP, "stopped by the operator", e.now), acquiring=False), actions


def _cmd_prim(s: State, e: Event, p: Policy) -> Result | None:
    if s.role is Role.STOP:
        return s, []
    return _settle(replace(s, data_ok=True, yielded=False, wants_primary=True), e.now, p)


def _cmd_second(s: State, e: Event, p: Policy) -> Result | None:
    if s.role.primary:
        return _leave_primary(replace(s, yielded=True), Role.SECOND, "made secondary by the "
                              "operator", e.now)
    if s.role is Role.STOP:
        return s, []
    release = [Action.RELEASE_LEASE] if s.acquiring else []
    return replace(_go(s, Role.SECOND if s.peer_alive else Role.WAIT, "made secondary by the "
                       "operator", e.now), yielded=True, acquiring=False), release


def _cmd_swap(s: State, e: Event, p: Policy) -> Result | None:
    if s.role.primary:
        if s.peer_alive and s.peer_role is Role.SECOND and s.peer_in_sync:
            return _leave_primary(replace(s, yielded=True), Role.SECOND, "swapped to the peer",
                                  e.now)
        return _go(s, s.role, "swap refused: no in-sync secondary", e.now), []
    if s.role is Role.SECOND and s.data_ok:
        return _go(replace(s, wants_primary=True, yielded=False), s.role,
                   "swap: asked the primary to hand over", e.now), []
    return _go(s, s.role, "swap refused: this node is neither primary nor secondary", e.now), []


def _peer_wants(s: State, e: Event, p: Policy) -> Result | None:
    return _cmd_swap(s, e, p) if s.role.primary else None


def _cmd_restart(s: State, e: Event, p: Policy) -> Result | None:
    if s.role.primary:
        return _go(s, s.role, "restarted by the operator", e.now), [
            Action.STOP_CHECKERS, Action.RESTART_PAYLOAD, Action.START_CHECKERS]
    return s, []


def _lease_granted(s: State, e: Event, p: Policy) -> Result | None:
    if s.role.primary:
        return s, []  # a renewal
    if not s.acquiring:  # a grant that arrived after we stopped asking: hand it back
        return s, [Action.RELEASE_LEASE]
    peer_primary = s.peer_alive and s.peer_role is not None and s.peer_role.primary
    if s.role is Role.STOP or peer_primary or s.resources_down or not s.data_ok:
        return replace(s, acquiring=False), [Action.RELEASE_LEASE]
    t = replace(s, acquiring=False, yielded=False, wants_primary=False)
    role = Role.PRIM if s.peer_alive and s.peer_role is Role.SECOND and s.peer_in_sync \
        else Role.ALONE
    return _go(t, role, "primary: lease granted by the witness", e.now), list(_TO_PRIMARY)


def _lease_denied(s: State, e: Event, p: Policy) -> Result | None:
    if s.role.primary:
        return _lease_lost(s, e, p)
    if s.role is Role.STOP:
        return s, []
    return replace(_go(s, Role.WAIT if s.role is not Role.SECOND or not s.peer_alive else s.role,
                       f"witness refused the primary role{': ' + e.detail if e.detail else ''}",
                       e.now), acquiring=False), []


def _lease_lost(s: State, e: Event, p: Policy) -> Result | None:
    if not s.role.primary:
        return replace(s, acquiring=False), []
    return _leave_primary(s, Role.WAIT, "fenced: lost both the witness lease and the peer",
                          e.now, fence=True)


def _payload_failed(s: State, e: Event, p: Policy) -> Result | None:
    if not s.role.primary:
        return s, []
    what = e.detail or "payload failed"
    if e.action == "stop":
        return _leave_primary(s, Role.STOP, f"{what}: checker action stop", e.now)
    failover = e.action == "failover" and s.peer_alive and s.peer_role is Role.SECOND
    recent = tuple(t for t in s.restarts if e.now - t < p.restart_window)
    if not failover and len(recent) < p.restart_count:
        t = replace(s, restarts=(*recent, e.now))
        return _go(t, s.role, f"{what}: restart {len(recent) + 1} of {p.restart_count}",
                   e.now), [Action.STOP_CHECKERS, Action.RESTART_PAYLOAD, Action.START_CHECKERS]
    if failover:
        return _leave_primary(replace(s, yielded=True, restarts=recent), Role.SECOND,
                              f"{what}: failing over to the peer", e.now)
    return _leave_primary(replace(s, restarts=recent), Role.STOP,
                          f"{what}: restart budget ({p.restart_count}) exhausted", e.now)


def _resource(s: State, e: Event, p: Policy) -> Result | None:
    down = set(s.resources_down)
    (down.add if e.kind is Ev.RESOURCE_DOWN else down.discard)(e.action)
    return _settle(replace(s, resources_down=frozenset(down)), e.now, p)


_HANDLERS = {
    Ev.CMD_START: _cmd_start,
    Ev.CMD_STOP: _cmd_stop,
    Ev.CMD_PRIM: _cmd_prim,
    Ev.CMD_SECOND: _cmd_second,
    Ev.CMD_SWAP: _cmd_swap,
    Ev.CMD_RESTART: _cmd_restart,
    Ev.PEER_WANTS_PRIMARY: _peer_wants,
    Ev.LEASE_GRANTED: _lease_granted,
    Ev.LEASE_DENIED: _lease_denied,
    Ev.LEASE_LOST: _lease_lost,
    Ev.PAYLOAD_FAILED: _payload_failed,
    Ev.RESOURCE_DOWN: _resource,
    Ev.RESOURCE_UP: _resource,
}
