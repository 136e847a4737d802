"""One module at run time: events in, :func:`hvha.agent.fsm.step`, actions out through ports.

Events are processed one at a time from a queue, and each step's actions run to completion
before the next event: a module is never half-started by a concurrent decision. The outside
world is reached only through small ports (payload driver, VIP, checkers, replication, leases),
so the runtime can be driven in tests with fakes and in the lab with the real drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from hvha.agent.fsm import Action, Ev, Event, Policy, Role, State, step

log = logging.getLogger("hvha.agent")


class Payload(Protocol):
    async def start(self) -> None: ...
    async def stop(self, *, fence: bool) -> None: ...
    async def running(self) -> bool: ...


class VipPort(Protocol):
    async def add(self) -> None: ...
    async def announce(self) -> None: ...
    async def remove(self) -> None: ...
    async def present(self) -> bool: ...


class CheckerPort(Protocol):
    enabled: bool

    def start(self) -> None: ...
    async def stop(self) -> None: ...


class Replicator(Protocol):
    """What the node runtime needs from replication (issue 4 plugs the mirror in here)."""

    def data_ok(self) -> bool: ...
    def in_sync(self) -> bool: ...
    def generation(self) -> str: ...
    async def become_primary(self) -> None: ...
    async def become_secondary(self) -> None: ...
    async def stop(self) -> None: ...


class LeasePort(Protocol):
    def want(self, module: str) -> None: ...
    def release(self, module: str) -> None: ...


class NoReplication:
    """A module without replicated directories: no data to be stale, always in sync."""

    def data_ok(self) -> bool:
        return True

    def in_sync(self) -> bool:
        return True

    def generation(self) -> str:
        return "none"

    async def become_primary(self) -> None:
        return None

    async def become_secondary(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass(frozen=True)
class Transition:
    at: float  # wall clock, for people reading `hvha status`
    role: Role
    reason: str


class ModuleRuntime:
    def __init__(self, name: str, policy: Policy, payload: Payload, vip: VipPort | None,
                 checkers: CheckerPort | None, replicator: Replicator, leases: LeasePort,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[ModuleRuntime], None] | None = None,
                 guard: Callable[[str, bool], None] | None = None) -> None:
        self.name = name
        self.policy = policy
        self.payload = payload
        self.vip = vip
        self.checkers = checkers
        self.replicator = replicator
        self.leases = leases
        self.clock = clock
        self.on_change = on_change
        self.guard = guard  # told before a payload may run and after it surely stopped
        self.state = State(data_ok=replicator.data_ok())
        self.history: deque[Transition] = deque(maxlen=20)
        self.errors = 0
        self.last_error = ""
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()  # held while an event is handled, or by `paused()`

    # -- events --------------------------------------------------------------------------
    def post(self, kind: Ev, **fields: Any) -> None:
        self._queue.put_nowait(Event(kind, self.clock(), **fields))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"module/{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.checkers is not None:
            await self.checkers.stop()

    async def settle(self) -> None:
        """Wait until every queued event has been handled (tests and commands use it)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                async with self._busy:
                    await self._handle(event)
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("module %s: handling %s failed", self.name, event.kind)
            finally:
                self._queue.task_done()

    async def _handle(self, event: Event) -> None:
        before = self.state
        if event.kind is Ev.DATA or event.kind is Ev.TICK:
            event = replace(event, data_ok=self.replicator.data_ok())
        self.state, actions = step(self.state, event, self.policy)
        if (self.state.role, self.state.reason) != (before.role, before.reason):
            self.history.append(Transition(time.time(), self.state.role, self.state.reason))
            level = logging.INFO if self.state.role is not before.role else logging.DEBUG
            log.log(level, "module %s: %s -> %s (%s)", self.name, before.role, self.state.role,
                    self.state.reason)
            if self.on_change is not None:
                self.on_change(self)
        if self.guard is not None and self.state.role.primary:
            self.guard(self.name, True)
        for action in actions:
            await self._do(action)
        if self.guard is not None and not self.state.role.primary:
            self.guard(self.name, False)

    # -- actions -------------------------------------------------------------------------
    async def _do(self, action: Action) -> None:
        log.debug("module %s: %s", self.name, action)
        if action is Action.ACQUIRE_LEASE:
            self.leases.want(self.name)
        elif action is Action.RELEASE_LEASE:
            self.leases.release(self.name)
        elif action is Action.REPL_PRIMARY:
            await self.replicator.become_primary()
        elif action is Action.REPL_SECONDARY:
            await self.replicator.become_secondary()
        elif action is Action.REPL_STOP:
            await self.replicator.stop()
        elif action is Action.ADD_VIP and self.vip is not None:
            await self.vip.add()
        elif action is Action.DEL_VIP and self.vip is not None:
            await self.vip.remove()
        elif action is Action.ANNOUNCE_VIP and self.vip is not None:
            await self.vip.announce()
        elif action is Action.START_PAYLOAD:
            await self._start_payload()
        elif action in (Action.STOP_PAYLOAD, Action.FENCE):
            await self.payload.stop(fence=action is Action.FENCE)
        elif action is Action.RESTART_PAYLOAD:
            await self.payload.stop(fence=False)
            await self._start_payload()
        elif action is Action.START_CHECKERS and self.checkers is not None:
            self.checkers.start()
        elif action is Action.STOP_CHECKERS and self.checkers is not None:
            await self.checkers.stop()

    async def _start_payload(self) -> None:
        try:
            await self.payload.start()
        except Exception as exc:
            self.last_error = str(exc)
            self.post(Ev.PAYLOAD_FAILED, action="restart", detail=f"start failed: {exc}")

    # -- reload: new ports under a running state machine ----------------------------------
    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold event handling (after the event in progress) while the ports are swapped.
        Events posted meanwhile queue up and are handled afterwards."""
        async with self._busy:
            yield

    async def leave_ports(self, *, restart: bool, vip: bool) -> bool:
        """Reload, phase 1 (inside :meth:`paused`, the old bundle still in place): on a
        primary, stop the checkers, the payload if it restarts (with the old scripts) and the
        VIP if it changes. False if the payload may still run (its stop failed)."""
        if not self.state.role.primary:
            return True
        if self.checkers is not None:
            await self.checkers.stop()
        ok = True
        if restart:
            log.info("module %s: the payload's settings changed: restarting it", self.name)
            try:
                await self.payload.stop(fence=False)
            except Exception as exc:
                self.last_error = f"reload: stopping the payload failed: {exc}"
                log.error("module %s: %s", self.name, self.last_error)
                ok = False
        if vip and self.vip is not None:
            try:
                await self.vip.remove()
            except Exception as exc:
                self.last_error = f"reload: removing the old VIP failed: {exc}"
                log.error("module %s: %s", self.name, self.last_error)
        return ok

    async def take_ports(self, policy: Policy, payload: Payload, vip: VipPort | None,
                         checkers: CheckerPort | None, replicator: Replicator | None, *,
                         restart: bool, vip_changed: bool, stopped: bool) -> None:
        """Reload, phase 2 (inside :meth:`paused`, the new bundle in place): use the new ports
        and policy, keeping state and history. On a primary, add the new VIP if it changed,
        start the payload if it was stopped for the change (``stopped``; if its stop failed,
        the state machine restarts it under its budget) and start the new checkers."""
        old = self.checkers
        if old is not None:
            await old.stop()
            if checkers is not None:
                checkers.enabled = old.enabled  # a maintenance switch survives the reload
        self.policy, self.payload, self.vip, self.checkers = policy, payload, vip, checkers
        if replicator is not None:
            self.replicator = replicator
        if not self.state.role.primary:
            return
        if vip_changed and vip is not None:
            try:
                await vip.add()
            except Exception as exc:
                self.last_error = f"reload: adding the new VIP failed: {exc}"
                log.error("module %s: %s", self.name, self.last_error)
        if restart and stopped:
            if replicator is not None:
                await replicator.become_primary()
            await self._start_payload()
        elif restart:
            self.post(Ev.PAYLOAD_FAILED, action="restart", detail=self.last_error)
        if checkers is not None:
            checkers.start()

    # -- views ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the peer needs to know about this module (sent in every heartbeat)."""
        s = self.state
        return {"r": s.role.value, "d": s.data_ok, "s": self.replicator.in_sync(),
                "w": s.wants_primary}

    def status(self) -> dict[str, Any]:
        s = self.state
        return {
            "module": self.name, "role": s.role.value, "reason": s.reason,
            "since_monotonic": s.since, "peer_alive": s.peer_alive,
            "peer_role": s.peer_role.value if s.peer_role else None,
            "data_ok": s.data_ok, "in_sync": self.replicator.in_sync(),
            "checkers": None if self.checkers is None else self.checkers.enabled,
            "failover": s.failover_enabled, "restarts": len(s.restarts),
            "errors": self.errors, "last_error": self.last_error,
            "history": [{"at": t.at, "role": t.role.value, "reason": t.reason}
                        for t in self.history],
            "replication": self._replication_status(),
        }

    def _replication_status(self) -> dict[str, Any] | None:
        probe = getattr(self.replicator, "status", None)
        if probe is None:
            return None
        try:
            result: dict[str, Any] = probe()
        except Exception as exc:  # status must never break `hvha status`
            return {"error": str(exc)}
        return result
