"""The node side of arbitration: ask the witness for leases, and the weaker ping witness.

Why the arithmetic matters: the witness's lease for a request received at its time ``r`` ends
at ``r + L``. The node cannot know ``r``, but it knows that it sent the request earlier, at its
own time ``s``; so it believes the lease valid until ``s + min(ttl, L)(1 - ε) - M`` (ε = 1e-3
bounds the clock-rate difference, ``M = L/5`` the time fencing takes). Whatever the network
delays, the node's belief ends at least ``M`` before the witness would grant the module to the
peer (docs/arbitration.md). ``send_time`` is read just before the datagram leaves; replies are
matched by nonce (16 random bytes), so a captured old reply is worthless.

The client never raises on network trouble (ENETUNREACH while a link is down is routine): it
raises :class:`WitnessUnreachable`, which the agent treats as "no lease", and counts the rest.

:class:`PingWitness` is SafeKit's split-brain checker: "a ping target answers" says nothing
about the peer, so when only the link between the nodes fails BOTH nodes may run. It uses an
unprivileged ICMP datagram socket (``net.ipv4.ping_group_range``) and falls back to a raw
socket (root / CAP_NET_RAW); no ping binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hvha.agent.frames import (
    MAX_SENDER_BYTES,
    U64_MAX,
    FrameError,
    FrameKind,
    cluster_id,
    decode,
    derive_key,
    encode,
)
from hvha.agent.witness import (
    DEFAULT_PORT,
    MARGIN_FRACTION,
    WITNESS_KEY_PURPOSE,
    WITNESS_SENDER,
    Claim,
    Clock,
    encode_request,
    make_claims,
    parse_reply,
    split_claims,
    valid_name,
)
from hvha.drivers import icmp

log = logging.getLogger(__name__)

CLOCK_RATE_ERROR = 1e-3  # ε
_RECV_BUFFER = 65535


class WitnessUnreachable(Exception):
    """No authentic answer from the witness within the timeout (or it could not be sent)."""


def lease_valid_until(sent_at: float, ttl: float, lease: float) -> float:
    """Until when (node clock) a lease granted for a request sent at ``sent_at`` is valid."""
    return sent_at + min(ttl, lease) * (1 - CLOCK_RATE_ERROR) - lease * MARGIN_FRACTION


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The witness's answer for one module. ``valid_until`` is on the node's monotonic clock,
    -inf when not granted; ``holder`` and ``ttl`` (seconds) are informational."""

    granted: bool
    holder: str | None
    ttl: float
    sent_at: float
    valid_until: float
    why: str = ""  # "outdated": refused because ``holder`` wrote without this node


class LeaseTable:
    """Per module, the latest answer; pure. An answer to an OLDER request than the one already
    recorded is ignored (replies can arrive out of order).

    Before sending a ``release`` (or stopping a module), call :meth:`revoke` first: if the
    release reaches the witness but its reply is lost, the node must not go on believing it."""

    def __init__(self) -> None:
        self._views: dict[str, LeaseView] = {}

    def update(self, views: Mapping[str, LeaseView]) -> None:
        for module, view in views.items():
            old = self._views.get(module)
            if old is None or view.sent_at >= old.sent_at:
                self._views[module] = view

    def revoke(self, module: str) -> None:
        self._views.pop(module, None)

    def valid(self, module: str, now: float) -> bool:
        view = self._views.get(module)
        return view is not None and view.granted and now < view.valid_until

    def valid_until(self, module: str) -> float:
        view = self._views.get(module)
        return view.valid_until if view is not None and view.granted else -math.inf

    def valid_modules(self, now: float) -> list[str]:
        return sorted(m for m in self._views if self.valid(m, now))


@dataclass
class ClientCounters:
    requests_sent: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    replies_ok: int = 0
    timeouts: int = 0
    ignored_wrong_source: int = 0
    ignored_bad_frame: int = 0
    ignored_wrong_nonce: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address.split("%", 1)[0])


class WitnessClient:
    """Sends lease claims to one witness. One UDP socket per :meth:`request`, so replies to an
    abandoned request can never be mistaken for later ones and nothing needs closing.

    ``incarnation`` must grow across restarts of this node (the witness drops frames of an
    older one): pass the agent's persisted incarnation (``heartbeat.next_incarnation``). The
    default, wall-clock nanoseconds, grows too unless the clock is set back between restarts.
    Keep ONE client per node name: a second client with the same incarnation restarts the
    sequence numbers and the witness drops its frames as replays.
    ``address`` must be an IP literal: name resolution does not belong on the failover path.
    """

    def __init__(
        self, cluster: str, node: str, secret: bytes, address: str, port: int = DEFAULT_PORT,
        lease: float = 5.0, clock: Clock = time.monotonic, timeout: float | None = None, *,
        source: str | None = None, incarnation: int | None = None,
    ) -> None:
        if not valid_name(node) or len(node.encode()) > MAX_SENDER_BYTES:
            raise ValueError(f"invalid node name {node!r}")
        if not (math.isfinite(lease) and lease > 0):
            raise ValueError(f"lease must be a positive number of seconds, got {lease}")
        self.node, self.lease, self.port = node, lease, port
        self.address = _ip(address)  # ValueError for a host name
        self.source = source
        self.timeout = min(1.0, lease / 3) if timeout is None else timeout
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        if not 1 <= self.incarnation <= U64_MAX:
            raise ValueError(f"incarnation must be a positive u64, got {self.incarnation}")
        self.counters = ClientCounters()
        self._key = derive_key(secret, WITNESS_KEY_PURPOSE)
        self._cluster_id = cluster_id(cluster)
        self._clock = clock
        self._seq = 0

    async def request(self, claims: Iterable[tuple[str, ...]]) -> dict[str, LeaseView]:
        """Send ``(module, mode[, generation])`` claims; the witness's answer per module.

        Claims that do not fit one frame are split into several requests sent at once; modules
        whose request got no answer are missing from the result. Raises WitnessUnreachable when
        nothing was answered, ValueError for an invalid claim; never OSError.
        """
        checked = make_claims(claims)
        if not checked:
            return {}
        family = socket.AF_INET6 if self.address.version == 6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            raise WitnessUnreachable(f"cannot open a socket: {exc}") from None
        try:
            sock.setblocking(False)
            if self.source is not None:
                sock.bind((self.source, 0))
            return await self._exchange(sock, split_claims(checked))
        except OSError as exc:
            self.counters.send_errors += 1
            raise WitnessUnreachable(f"cannot use the witness socket: {exc}") from None
        finally:
            sock.close()

    def _frame(self, nonce: str, chunk: Sequence[Claim]) -> bytes:
        self._seq += 1
        return encode(
            self._key, cluster_id=self._cluster_id, sender=self.node,
            incarnation=self.incarnation, seq=self._seq,
            sent_ms=max(0, int(self._clock() * 1000)) & U64_MAX,
            payload=encode_request(nonce, chunk), kind=FrameKind.WITNESS_REQUEST,
        )

    async def _exchange(
        self, sock: socket.socket, chunks: list[list[Claim]]
    ) -> dict[str, LeaseView]:
        target = (str(self.address), self.port)
        pending: dict[str, tuple[list[Claim], float]] = {}
        error: OSError | None = None
        for chunk in chunks:
            nonce = os.urandom(16).hex()
            data = self._frame(nonce, chunk)
            sent_at = self._clock()  # just before sending: the lease starts later at the witness
            try:
                sock.sendto(data, target)
            except OSError as exc:  # ENETUNREACH, EACCES...: this chunk is lost
                self.counters.send_errors += 1
                error = exc
                continue
            self.counters.requests_sent += 1
            pending[nonce] = (chunk, sent_at)
        if not pending:
            raise WitnessUnreachable(f"cannot send to the witness {target}: {error}")
        results: dict[str, LeaseView] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                while pending:
                    self._receive_one(await self._recv(sock), pending, results)
        if pending:
            self.counters.timeouts += 1
        if not results:
            raise WitnessUnreachable(f"no answer from the witness {target} in {self.timeout}s")
        return results

    async def _recv(self, sock: socket.socket) -> tuple[bytes, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, addr = await loop.sock_recvfrom(sock, _RECV_BUFFER)
                return data, addr
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error: keep waiting
                self.counters.recv_errors += 1
                await asyncio.sleep(0.01)

    def _receive_one(
        self, datagram: tuple[bytes, tuple[str, int]],
        pending: dict[str, tuple[list[Claim], float]], results: dict[str, LeaseView],
    ) -> None:
        data, addr = datagram
        if _ip(addr[0]) != self.address or addr[1] != self.port:
            self.counters.ignored_wrong_source += 1
            return
        try:
            frame = decode(self._key, data, cluster_id=self._cluster_id)
            if frame.kind != FrameKind.WITNESS_REPLY or frame.sender != WITNESS_SENDER:
                raise ValueError(f"frame kind {frame.kind} from {frame.sender!r}")
            nonce, grants = parse_reply(frame.payload)
        except (FrameError, ValueError) as exc:
            self.counters.ignored_bad_frame += 1
            log.debug("witness client: ignored a datagram from %s: %s", addr, exc)
            return
        if nonce not in pending:
            self.counters.ignored_wrong_nonce += 1
            return
        chunk, sent_at = pending.pop(nonce)
        self.counters.replies_ok += 1
        for claim in chunk:
            grant = grants.get(claim.module)
            if grant is None:
                continue
            until = -math.inf
            if grant.granted:
                until = lease_valid_until(sent_at, grant.ttl, self.lease)
            results[claim.module] = LeaseView(
                grant.granted, grant.holder, grant.ttl, sent_at, until, grant.why
            )


# -- ping witness ------------------------------------------------------------------------

class PingWitness:
    """Weaker witness (SafeKit parity): reachable when ANY target answers an ICMP echo.

    It cannot tell "the peer is dead" from "the link to the peer is cut": with only the
    inter-node link down, both nodes reach the targets and both may become primary."""

    def __init__(self, targets: Sequence[str], timeout: float = 1.0) -> None:
        if not targets:
            raise ValueError("a ping witness needs at least one target")
        self.targets = [str(_ip(t)) for t in targets]
        self.timeout = timeout
        self.sent = self.send_errors = self.replies = 0
        self._warned = False

    async def reachable(self) -> bool:
        """Whether one target answered within ``timeout``; False (logged) if ICMP is unusable."""
        by_family: dict[socket.AddressFamily, list[str]] = {}
        for target in self.targets:
            fam = socket.AF_INET6 if _ip(target).version == 6 else socket.AF_INET
            by_family.setdefault(fam, []).append(target)
        tasks = [asyncio.create_task(self._ping(fam, ts)) for fam, ts in by_family.items()]
        try:
            for next_done in asyncio.as_completed(tasks):
                if await next_done:
                    return True
            return False
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _open(self, family: socket.AddressFamily) -> tuple[socket.socket, bool] | None:
        try:
            return icmp.open_socket(family)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("ping witness: %s", exc)
            return None

    async def _ping(self, family: socket.AddressFamily, targets: list[str]) -> bool:
        opened = self._open(family)
        if opened is None:
            return False
        sock, raw = opened
        token, ident = os.urandom(16), int.from_bytes(os.urandom(2), "big")
        wanted = {_ip(t) for t in targets}
        loop = asyncio.get_running_loop()
        with sock, contextlib.suppress(TimeoutError):
            sock.setblocking(False)
            sent = 0
            for seq, target in enumerate(targets, 1):
                try:
                    sock.sendto(icmp.echo_request(family, ident, seq, token), (target, 0))
                    sent += 1
                except OSError:  # ENETUNREACH...: try the other targets
                    self.send_errors += 1
            self.sent += sent
            if not sent:
                return False
            async with asyncio.timeout(self.timeout):
                while True:
                    try:
                        data, addr = await loop.sock_recvfrom(sock, _RECV_BUFFER)
                    except OSError:
                        await asyncio.sleep(0.01)
                        continue
                    if _ip(addr[0]) in wanted and icmp.is_echo_reply(
                        family, data, token, ident if raw else None, raw
                    ):
                        self.replies += 1
                        return True
        return False
