"""Peer liveness from heartbeat arrivals: pure, on an injected monotonic clock.

The peer is dead only when *every* heartbeat network has been silent for the timeout.
`Reciprocity` adds the other direction: whether the peer still hears this node, from what its
own heartbeats say (a one-way partition leaves the peer alive here while it hears nothing).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from typing import Any

Clock = Callable[[], float]


class LinkState(enum.Enum):
    UP = "up"
    DOWN = "down"


class Liveness:
    """When the peer was last heard on each network, and whether it counts as alive.

    The peer is alive while at least one network carried an authentic fresh frame less than
    ``timeout`` seconds ago. A peer never heard is NOT alive: startup grace belongs to the
    agent's WAIT state, not here. Times come from the injected monotonic clock (or ``now``).
    """

    def __init__(
        self, networks: Iterable[str], timeout: float, clock: Clock = time.monotonic
    ) -> None:
        self._timeout = timeout
        self._clock = clock
        self._last: dict[str, float | None] = dict.fromkeys(networks)
        if not self._last:
            raise ValueError("Liveness needs at least one network")

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(self._last)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def heard(self, network: str, now: float | None = None) -> None:
        last = self._last[network]  # KeyError for an unknown network: a caller bug
        t = self._now(now)
        if last is None or t > last:
            self._last[network] = t

    def age(self, network: str, now: float | None = None) -> float | None:
        """Seconds since ``network`` last carried the peer, None if it never did."""
        last = self._last[network]
        return None if last is None else max(0.0, self._now(now) - last)

    def state(self, network: str, now: float | None = None) -> LinkState:
        age = self.age(network, now)
        return LinkState.UP if age is not None and age < self._timeout else LinkState.DOWN

    def last_heard(self) -> float | None:
        """Clock time of the latest frame on any network, None if the peer was never heard."""
        heard = [t for t in self._last.values() if t is not None]
        return max(heard) if heard else None

    def peer_alive(self, now: float | None = None) -> bool:
        last = self.last_heard()
        return last is not None and self._now(now) - last < self._timeout

    def snapshot(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        t = self._now(now)
        return {n: {"state": self.state(n, t).value, "age": self.age(n, t)} for n in self._last}


class Reciprocity:
    """Whether the peer still hears this node, from the age its heartbeats report.

    Each heartbeat of the peer says how long ago it last heard this node (-1: never). In a
    one-way partition this node keeps hearing a live peer while the peer hears nothing: the
    peer then considers this node dead, and anything waiting on the peer's answers here (the
    replication stream's acks) waits in vain. `hears_us()` turns False once the peer has
    reported for ``timeout`` seconds that it does not hear this node: so the stream gives the
    peer up after about the heartbeat timeout instead of its own, longer, ack timeout. Until
    the first report, and within ``timeout`` of it, the peer is given the benefit of the doubt
    (startup: the first heartbeats may cross)."""

    def __init__(self, timeout: float, clock: Clock = time.monotonic) -> None:
        self._timeout = timeout
        self._clock = clock
        self._first: float | None = None  # first report since the peer (re)appeared
        self._heard_at: float | None = None  # when the peer last heard this node

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def report(self, heard_ms: int, now: float | None = None) -> None:
        """A heartbeat of the peer arrived, saying it heard this node `heard_ms` ago."""
        t = self._now(now)
        if self._first is None:
            self._first = t
        if heard_ms >= 0:
            at = t - heard_ms / 1000
            if self._heard_at is None or at > self._heard_at:
                self._heard_at = at

    def reset(self) -> None:
        """The peer is dead: its next life starts with the benefit of the doubt again."""
        self._first = self._heard_at = None

    def hears_us(self, now: float | None = None) -> bool:
        if self._first is None:
            return True
        # the first reports may still speak of this node's previous life (an agent restart):
        # they count from when they began, not from the old hearing they report
        ref = self._first if self._heard_at is None else max(self._heard_at, self._first)
        return self._now(now) - ref < self._timeout
