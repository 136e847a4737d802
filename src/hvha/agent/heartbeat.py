"""UDP heartbeats between the two nodes, and the peer-liveness verdict built on them.

Why it is shaped this way: failover is decided on the *absence* of the peer, so this layer
must (1) keep every heartbeat network independent - a dead link, a missing address or a send
error on one network never silences the others; (2) credit the peer only for authentic, fresh
frames (``frames.decode`` + ``ReplayWindow``), so forged or re-sent packets cannot keep a dead
peer alive; (3) judge silence on a monotonic clock only, because wall clocks jump (NTP, an
operator, a resumed VM). The decision logic (``Liveness``, config checks) is pure and takes an
injected clock; sockets and tasks are confined to ``HeartbeatService``; the only file touched
is the incarnation counter (``next_incarnation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hvha.agent.frames import (
    MAX_PAYLOAD_SIZE,
    MAX_SENDER_BYTES,
    U64_MAX,
    Frame,
    FrameError,
    FrameKind,
    ReplayWindow,
    Verdict,
    cluster_id,
    decode,
    encode,
)
from hvha.agent.liveness import LinkState, Liveness

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_RECV_BUFFER = 65535
_DROP_COUNTER = {
    "too_short": "dropped_malformed",
    "bad_magic": "dropped_malformed",
    "malformed": "dropped_malformed",
    "bad_version": "dropped_bad_version",
    "wrong_cluster": "dropped_wrong_cluster",
    "bad_mac": "dropped_bad_mac",
}


class HeartbeatNetwork(NamedTuple):
    name: str
    local_addr: str
    peer_addr: str


@dataclass(frozen=True)
class HeartbeatConfig:
    """What one node needs to heartbeat its peer; invalid values raise ValueError."""

    node: str
    peer: str
    cluster: str
    key: bytes = field(repr=False)
    networks: tuple[HeartbeatNetwork, ...]
    interval: float = 1.0
    timeout: float = 5.0
    port: int = 4800

    def __post_init__(self) -> None:
        # Accept any sequence of (name, local_addr, peer_addr) and freeze it.
        object.__setattr__(self, "networks", tuple(HeartbeatNetwork(*n) for n in self.networks))
        if not (math.isfinite(self.interval) and self.interval >= 0.1):
            raise ValueError(f"heartbeat interval must be at least 0.1 s, got {self.interval}")
        if not (math.isfinite(self.timeout) and self.timeout >= 3 * self.interval - 1e-9):
            raise ValueError(
                f"heartbeat timeout ({self.timeout} s) must be at least 3 x the interval "
                f"({self.interval} s), so that two lost heartbeats never cause a failover"
            )
        if not 1 <= self.port <= 65535:
            raise ValueError(f"heartbeat port must be 1..65535, got {self.port}")
        for role, name in (("node", self.node), ("peer", self.peer)):
            if not 1 <= len(name.encode("utf-8")) <= MAX_SENDER_BYTES:
                raise ValueError(f"{role} name must be 1..{MAX_SENDER_BYTES} bytes: {name!r}")
        if self.node == self.peer:
            raise ValueError(f"node and peer must differ, both are {self.node!r}")
        if not self.cluster:
            raise ValueError("cluster name is empty")
        if len(self.key) < 16:
            raise ValueError("heartbeat key must be at least 16 bytes (see frames.derive_key)")
        if not self.networks:
            raise ValueError("at least one heartbeat network is required")
        names = [n.name for n in self.networks]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"heartbeat network names must be non-empty and unique: {names}")
        locals_ = [n.local_addr for n in self.networks]
        if len(set(locals_)) != len(locals_):
            raise ValueError(f"two heartbeat networks share a local address: {locals_}")
        for net in self.networks:
            _check_addresses(net)


def _check_addresses(net: HeartbeatNetwork) -> None:
    try:  # literals only: name resolution must not be on the failover path
        local = ipaddress.ip_address(net.local_addr)
        peer = ipaddress.ip_address(net.peer_addr)
    except ValueError as exc:
        raise ValueError(f"heartbeat network {net.name!r}: {exc}") from None
    if local.version != peer.version:
        raise ValueError(f"heartbeat network {net.name!r}: local and peer IP versions differ")
    if local == peer:
        raise ValueError(f"heartbeat network {net.name!r}: local and peer address are equal")
    if peer.is_unspecified or peer.is_multicast or local.is_multicast:
        raise ValueError(f"heartbeat network {net.name!r}: peer must be a unicast address")


@dataclass
class HeartbeatCounters:
    sent: int = 0
    send_errors: int = 0
    received_ok: int = 0
    dropped_bad_mac: int = 0
    dropped_replay: int = 0
    dropped_duplicate: int = 0
    dropped_malformed: int = 0
    dropped_bad_version: int = 0
    dropped_wrong_cluster: int = 0
    dropped_wrong_sender: int = 0
    recv_errors: int = 0
    bind_errors: int = 0

    def bump(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def total(cls, parts: Iterable[HeartbeatCounters]) -> HeartbeatCounters:
        out = cls()
        for part in parts:
            for name, value in part.as_dict().items():
                setattr(out, name, getattr(out, name) + value)
        return out


class _LogLimiter:
    """At most one warning per key every ``every`` seconds, then a count of what was hidden."""

    def __init__(self, every: float, clock: Clock) -> None:
        self._every, self._clock = every, clock
        self._next: dict[str, float] = {}
        self._hidden: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        if now < self._next.get(key, -math.inf):
            self._hidden[key] = self._hidden.get(key, 0) + 1
            return
        self._next[key] = now + self._every
        hidden = self._hidden.pop(key, 0)
        if hidden:
            msg, args = msg + " (%d similar suppressed)", (*args, hidden)
        log.warning(msg, *args)


@dataclass
class _Link:
    net: HeartbeatNetwork
    family: socket.AddressFamily
    counters: HeartbeatCounters = field(default_factory=HeartbeatCounters)
    sock: socket.socket | None = None
    reader: asyncio.Task[None] | None = None
    state: LinkState = LinkState.DOWN


class HeartbeatService:
    """Sends our frame on every network each ``interval`` and judges the peer's frames.

    Callbacks run on the event loop and must not block: ``payload()`` is called once per round
    (the same payload and seq go out on every network); ``on_peer_payload(network, frame)`` gets
    each peer frame that is newer than all before it; ``on_peer_state(alive)`` fires when the
    peer's liveness flips. A callback that raises is logged; heartbeats go on regardless.
    """

    def __init__(
        self,
        config: HeartbeatConfig,
        *,
        incarnation: int,
        payload: Callable[[], bytes] | None = None,
        on_peer_payload: Callable[[str, Frame], None] | None = None,
        on_peer_state: Callable[[bool], None] | None = None,
        peer_min_incarnation: int = 0,
        clock: Clock = time.monotonic,
        log_every: float = 10.0,
    ) -> None:
        if not 1 <= incarnation <= U64_MAX:
            raise ValueError(f"incarnation must be a positive u64, got {incarnation}")
        self.config = config
        self.incarnation = incarnation
        self._payload = payload
        self._on_peer_payload = on_peer_payload
        self._on_peer_state = on_peer_state
        self._clock = clock
        self._cluster_id = cluster_id(config.cluster)
        self._window = ReplayWindow(min_incarnation=peer_min_incarnation)
        self.liveness = Liveness([n.name for n in config.networks], config.timeout, clock)
        self._links = [_Link(n, _family(n.local_addr)) for n in config.networks]
        self._limiter = _LogLimiter(log_every, clock)
        self._seq = 0
        self._last_payload = b""
        self.payload_errors = 0
        self.latest_peer_frame: Frame | None = None
        self._alive = False
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind what can be bound now (the rest is retried every round) and start sending."""
        if self._started:
            raise RuntimeError("HeartbeatService can only be started once")
        self._started = True
        for link in self._links:
            self._bind(link)
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="hvha-heartbeat-send"),
            asyncio.create_task(self._monitor_loop(), name="hvha-heartbeat-monitor"),
        ]

    async def stop(self) -> None:
        """Cancel every task and close every socket; safe to call more than once."""
        tasks = self._tasks + [link.reader for link in self._links if link.reader]
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks = []
            for link in self._links:
                link.reader = None
                if link.sock is not None:
                    link.sock.close()
                    link.sock = None

    async def __aenter__(self) -> HeartbeatService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- status --------------------------------------------------------------------------

    def peer_alive(self) -> bool:
        return self.liveness.peer_alive()

    @property
    def peer_incarnation(self) -> int | None:
        """The peer's current incarnation; persist it to pass back as peer_min_incarnation."""
        return self._window.incarnation

    @property
    def counters(self) -> HeartbeatCounters:
        return HeartbeatCounters.total(link.counters for link in self._links)

    def network_counters(self) -> dict[str, HeartbeatCounters]:
        return {link.net.name: link.counters for link in self._links}

    def status(self) -> dict[str, Any]:
        """Plain data for ``hvha status``."""
        now = self._clock()
        last = self.liveness.last_heard()
        return {
            "node": self.config.node,
            "peer": self.config.peer,
            "incarnation": self.incarnation,
            "seq": self._seq,
            "peer_alive": self.liveness.peer_alive(now),
            "peer_incarnation": self.peer_incarnation,
            "peer_last_heard_age": None if last is None else max(0.0, now - last),
            "payload_errors": self.payload_errors,
            "counters": self.counters.as_dict(),
            "networks": {
                link.net.name: {
                    "state": self.liveness.state(link.net.name, now).value,
                    "age": self.liveness.age(link.net.name, now),
                    "bound": link.sock is not None,
                    "counters": link.counters.as_dict(),
                }
                for link in self._links
            },
        }

    # -- sending -------------------------------------------------------------------------

    def _warn(self, link: _Link, key: str, msg: str, *args: object) -> None:
        name = link.net.name
        self._limiter.warning(f"{key}:{name}", "heartbeat network %s: " + msg, name, *args)

    def _call(self, what: str, callback: Callable[..., object] | None, *args: object) -> None:
        if callback is not None:
            try:
                callback(*args)
            except Exception:  # the agent's bug: log it, keep heartbeating
                log.exception("heartbeat %s callback failed", what)

    def _bind(self, link: _Link) -> bool:
        sock = socket.socket(link.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _set_priority(sock, link.family)
            sock.bind((link.net.local_addr, self.config.port))
        except OSError as exc:
            sock.close()
            link.counters.bind_errors += 1
            self._warn(link, "bind", "cannot bind %s: %s", link.net.local_addr, exc)
            return False
        link.sock = sock
        name = f"hvha-heartbeat-recv-{link.net.name}"
        link.reader = asyncio.create_task(self._recv_loop(link, sock), name=name)
        return True

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval
        due = loop.time()
        while True:
            try:
                self._send_round()
            except Exception:  # a bug here must not silence us: the peer would fail over
                log.exception("heartbeat send round failed")
            now = loop.time()
            due += interval
            if due < now:  # the loop stalled: skip the missed rounds rather than burst
                due += math.ceil((now - due) / interval) * interval
            await asyncio.sleep(due - now)

    def _current_payload(self) -> bytes:
        if self._payload is None:
            return b""
        try:
            payload = bytes(self._payload())
            if len(payload) > MAX_PAYLOAD_SIZE:
                raise ValueError(f"{len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
        except Exception as exc:  # keep beating with the last good payload: we ARE alive
            self.payload_errors += 1
            self._limiter.warning("payload", "heartbeat payload callback failed: %r", exc)
            return self._last_payload
        self._last_payload = payload
        return payload

    def _send_round(self) -> None:
        self._seq += 1
        data = encode(
            self.config.key,
            cluster_id=self._cluster_id,
            sender=self.config.node,
            incarnation=self.incarnation,
            seq=self._seq,
            sent_ms=max(0, int(self._clock() * 1000)) & U64_MAX,
            payload=self._current_payload(),
        )
        for link in self._links:
            if link.sock is None and not self._bind(link):
                continue
            assert link.sock is not None
            try:
                link.sock.sendto(data, (link.net.peer_addr, self.config.port))
            except OSError as exc:  # ENETUNREACH, EAGAIN...: this link only, never blocks
                link.counters.send_errors += 1
                self._warn(link, "send", "send to %s failed: %s", link.net.peer_addr, exc)
            else:
                link.counters.sent += 1

    # -- receiving -----------------------------------------------------------------------

    async def _recv_loop(self, link: _Link, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, addr = await loop.sock_recvfrom(sock, _RECV_BUFFER)
            except OSError as exc:
                link.counters.recv_errors += 1
                self._warn(link, "recv", "receive failed: %s", exc)
                await asyncio.sleep(min(self.config.interval, 0.5))
                continue
            try:
                self._on_datagram(link, data, addr)
            except Exception:  # a bug here must not stop listening
                log.exception("heartbeat network %s: datagram handling failed", link.net.name)

    def _drop(self, link: _Link, counter: str, reason: str, addr: object, detail: object) -> None:
        link.counters.bump(counter)
        self._warn(link, reason, "dropped frame from %s (%s): %s", addr, reason, detail)

    def _on_datagram(self, link: _Link, data: bytes, addr: object) -> None:
        try:
            frame = decode(self.config.key, data, cluster_id=self._cluster_id)
        except FrameError as exc:
            counter = _DROP_COUNTER.get(exc.reason, "dropped_malformed")
            self._drop(link, counter, exc.reason, addr, exc)
            return
        if frame.sender != self.config.peer:  # includes our own frames reflected back at us
            self._drop(link, "dropped_wrong_sender", "wrong_sender", addr, frame.sender)
            return
        if frame.kind != FrameKind.HEARTBEAT:
            self._drop(link, "dropped_malformed", "unknown_kind", addr, frame.kind)
            return
        previous = self._window.incarnation
        verdict = self._window.observe(frame.incarnation, frame.seq, link.net.name)
        if verdict is Verdict.REPLAY:
            detail = f"incarnation {frame.incarnation} seq {frame.seq}"
            self._drop(link, "dropped_replay", "replay", addr, detail)
            return
        if previous is not None and frame.incarnation != previous:
            log.warning("peer %s restarted: incarnation %d", frame.sender, frame.incarnation)
        self.liveness.heard(link.net.name)
        link.counters.bump("received_ok" if verdict.accepted else "dropped_duplicate")
        self._update_states()
        if verdict is Verdict.NEW:
            self.latest_peer_frame = frame
            self._call("on_peer_payload", self._on_peer_payload, link.net.name, frame)

    # -- liveness transitions --------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval / 2)
            try:
                self._update_states()
            except Exception:
                log.exception("heartbeat liveness check failed")

    def _update_states(self) -> None:
        now = self._clock()
        for link in self._links:
            state = self.liveness.state(link.net.name, now)
            if state is not link.state:
                link.state = state
                log.info("heartbeat network %s is %s", link.net.name, state.value)
        alive = self.liveness.peer_alive(now)
        if alive != self._alive:
            self._alive = alive
            log.log(
                logging.INFO if alive else logging.WARNING,
                "peer %s is %s",
                self.config.peer,
                "alive" if alive else "dead: silent on every network",
            )
            self._call("on_peer_state", self._on_peer_state, alive)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _set_priority(sock: socket.socket, family: socket.AddressFamily) -> None:
    """Mark heartbeats DSCP CS6 (network control) so QoS-aware switches keep them flowing."""
    with contextlib.suppress(OSError, AttributeError):
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0xC0)
