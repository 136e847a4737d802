"""Primary-role leases for all modules of a node, and the self-fencing rule.

Every ``L/3`` (and at once when a module asks) the manager sends one request to the witness
carrying every claim: ``renew`` for modules this node runs, ``acquire`` for modules asking for the
role, ``release`` for modules that gave it up. Grants and refusals become FSM events. Between
requests it enforces docs/arbitration.md: a primary module whose lease is not valid, and whose
peer has not vouched for hearing us within ``T/3``, gets ``LEASE_LOST`` (fence now).

Witness modes: ``arbiter`` (leases, safe), ``ping`` (SafeKit's split-brain checker: granted while a
target answers; weaker), ``none`` (always granted; validation warns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hvha.agent.fsm import Ev

log = logging.getLogger("hvha.agent")


@dataclass(frozen=True)
class Verdict:
    granted: bool
    valid_until: float  # node monotonic clock; meaningful when granted
    holder: str | None = None
    ttl: float = 0.0  # refused: seconds left on the holder's lease
    why: str = ""  # "outdated": ``holder`` wrote without this node (hvha.agent.fences)


class WitnessUnreachableError(Exception):
    pass


class WitnessPort(Protocol):
    async def request(self, claims: list[tuple[str, ...]]) -> dict[str, Verdict]: ...


class NoWitness:
    """No arbitration: every claim is granted for ever. Two primaries are possible."""

    async def request(self, claims: list[tuple[str, ...]]) -> dict[str, Verdict]:
        return {c[0]: Verdict(True, float("inf")) for c in claims if c[1] != "release"}


class PingWitness:
    """SafeKit parity: the role is granted while one of the targets answers a ping."""

    def __init__(self, reachable: Callable[[], asyncio.Future[bool] | object],
                 validity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._reachable = reachable
        self._validity = validity
        self._clock = clock

    async def request(self, claims: list[tuple[str, ...]]) -> dict[str, Verdict]:
        now = self._clock()
        result = self._reachable()
        ok = bool(await result) if asyncio.isfuture(result) or asyncio.iscoroutine(result) \
            else bool(result)
        if not ok:
            raise WitnessUnreachableError("no ping target answers")
        return {c[0]: Verdict(True, now + self._validity) for c in claims if c[1] != "release"}


class Poster(Protocol):
    def post_to(self, module: str, kind: Ev, **fields: object) -> None: ...
    def primaries(self) -> list[str]: ...
    def peer_vouches(self, now: float) -> bool: ...


class LeaseManager:
    def __init__(self, witness: WitnessPort, lease: float, poster: Poster,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.witness = witness
        self.lease = lease
        self.poster = poster
        self.clock = clock
        self.valid_until: dict[str, float] = {}
        self.acquiring: set[str] = set()
        self.releasing: set[str] = set()
        self.unreachable_since: float | None = None
        self.requests = 0
        self.failures = 0
        self._fenced: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- the LeasePort used by module runtimes -------------------------------------------
    def want(self, module: str) -> None:
        self.acquiring.add(module)
        self.releasing.discard(module)
        self._wake.set()

    def release(self, module: str) -> None:
        self.acquiring.discard(module)
        self.valid_until.pop(module, None)
        self.releasing.add(module)
        self._wake.set()

    def valid(self, module: str, now: float) -> bool:
        return self.valid_until.get(module, float("-inf")) > now

    # -- loops ---------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._request_loop(), name="leases"),
                       asyncio.create_task(self._fence_loop(), name="fencing")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _request_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.lease / 3)
            self._wake.clear()
            await self.round()

    async def round(self) -> None:
        """One request to the witness with every claim; outcomes become module events."""
        held = [m for m in self.poster.primaries() if m not in self.acquiring]
        claims = ([self._claim(m, "renew") for m in held]
                  + [self._claim(m, "acquire") for m in sorted(self.acquiring)]
                  + [(m, "release") for m in sorted(self.releasing)])
        if not claims:
            return
        self.requests += 1
        try:
            verdicts = await self.witness.request(claims)
        except WitnessUnreachableError as exc:
            self.failures += 1
            if self.unreachable_since is None:
                self.unreachable_since = self.clock()
                log.warning("witness unreachable: %s", exc)
            for module in sorted(self.acquiring):
                self.acquiring.discard(module)
                self.poster.post_to(module, Ev.LEASE_DENIED, detail="witness unreachable")
            return
        if self.unreachable_since is not None:
            log.info("witness reachable again")
        self.unreachable_since = None
        self.releasing -= {c[0] for c in claims if c[1] == "release"}
        for claim in claims:
            module, mode = claim[0], claim[1]
            verdict = verdicts.get(module)
            if mode == "release" or verdict is None:
                continue
            if verdict.granted:
                self.valid_until[module] = verdict.valid_until
                if module in self.acquiring:
                    self.acquiring.discard(module)
                    self.poster.post_to(module, Ev.LEASE_GRANTED)
            else:
                self.valid_until.pop(module, None)
                self.acquiring.discard(module)
                who = f"held by {verdict.holder}" if verdict.holder else "refused"
                if verdict.why == "outdated":
                    who = (f"data outdated: {verdict.holder} wrote without this node; it must "
                           "resync first (`hvha prim --force` accepts losing those writes)")
                self.poster.post_to(module, Ev.LEASE_DENIED, detail=who)
                if verdict.holder and 0 < verdict.ttl <= self.lease:
                    # Ask again the moment the holder's lease runs out, not at the next tick:
                    # after a crash that is what stands between us and the takeover.
                    asyncio.get_running_loop().call_later(
                        verdict.ttl + 0.02, self.poster.post_to, module, Ev.TICK)

    def _claim(self, module: str, mode: str) -> tuple[str, ...]:
        gen = getattr(self.poster, "generation", lambda _m: None)(module)
        return (module, mode, gen) if gen else (module, mode)

    async def outdate(self, module: str, gen: str) -> bool:
        """Tell the witness that this node (the lease holder) writes alone from generation
        ``gen`` on, so the peer's copy counts as outdated (hvha.agent.fences). True once the
        witness recorded it; False if it refused (not the holder) or could not be reached."""
        try:
            verdicts = await self.witness.request([(module, "outdate", gen)])
        except WitnessUnreachableError as exc:
            log.warning("module %s: cannot outdate the peer's copy: %s", module, exc)
            return False
        verdict = verdicts.get(module)
        return verdict is not None and verdict.granted

    async def _fence_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.1, self.lease / 10))
            self.check_fencing(self.clock())

    def check_fencing(self, now: float) -> list[str]:
        """Post LEASE_LOST to every primary module that may no longer run (see module doc)."""
        primaries = set(self.poster.primaries())
        self._fenced &= primaries  # a module that left the primary role may be fenced again
        if self.poster.peer_vouches(now):
            return []
        lost = [m for m in sorted(primaries - self._fenced) if not self.valid(m, now)]
        self._fenced |= set(lost)
        for module in lost:
            log.warning("module %s: no valid lease and the peer does not vouch: fencing", module)
            self.poster.post_to(module, Ev.LEASE_LOST)
        return lost
