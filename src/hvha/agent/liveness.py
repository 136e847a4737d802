"""Peer liveness from heartbeat arrivals: pure, on an injected monotonic clock.

The peer is dead only when *every* heartbeat network has been silent for the timeout.
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
