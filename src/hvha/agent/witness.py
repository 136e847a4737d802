"""The witness (arbiter): grants each module's primary role to at most one node at a time.

Why it exists: two nodes that lose each other cannot tell a dead peer from a broken link; a
third machine can break the tie. docs/arbitration.md gives the timing argument this module
implements on the witness side: a lease granted on receipt of a request at witness time ``r``
expires at ``r + L``; ``acquire`` is granted only when nobody holds the module, the requester
holds it, or the holder's lease expired; after a (re)start the witness may have forgotten live
leases, so for a grace period ``L + M`` (``M = L/5``) it grants only ``renew`` claims - and
never over another node's unexpired lease.

Layout: the rules live in :class:`Arbiter`, pure (an injected monotonic clock, no I/O) so that
they are unit-tested exhaustively; :class:`WitnessServer` only moves authenticated frames
(``hvha.agent.frames``, kinds WITNESS_REQUEST / WITNESS_REPLY, key
``derive_key(secret, b"hvha witness v1")``) between the socket and the arbiter. The JSON payload
codec below is shared with the client (``hvha.agent.witness_client``)::

    request  {"nonce":"<32 hex>","claims":[{"module":"m1","mode":"acquire"}, ...]}
    reply    {"nonce":"<same>","grants":{"m1":{"granted":true,"holder":"node1","ttl_ms":5000}}}

Requests are protected against replay by a per-sender ReplayWindow (a replayed renewal would
keep a dead node's lease alive); replies need no window because the client matches them by
nonce, which is also why the witness's own incarnation may be random when it has no state dir.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from hvha.agent.fences import FenceTable, valid_gen
from hvha.agent.frames import (
    MAX_PAYLOAD_SIZE,
    U64_MAX,
    FrameError,
    FrameKind,
    ReplayWindow,
    cluster_id,
    decode,
    derive_key,
    encode,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
WITNESS_KEY_PURPOSE = b"hvha witness v1"
WITNESS_SENDER = "witness"
DEFAULT_PORT = 4801
MARGIN_FRACTION = 0.2  # M = L/5
MAX_LEASE = 3600.0
NONCE_HEX_LEN = 32
#: Node and module names, as the cluster schema allows them: never need JSON escaping.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_RECV_BUFFER = 65535
_NONCE_RE = re.compile(r"[0-9a-f]{32}")


class Mode(enum.StrEnum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"
    OUTDATE = "outdate"  # the holder writes alone from generation ``gen`` on (hvha.agent.fences)


class Claim(NamedTuple):
    module: str
    mode: Mode
    gen: str | None = None  # the requester's data generation (replicated modules)


class Grant(NamedTuple):
    """``granted``: the requester holds the lease after this claim (always False for release).
    ``holder``: who holds it now (None: nobody); ``ttl``: seconds left of the holder's lease.
    ``why``: "outdated" when refused because ``holder`` wrote without the requester."""

    granted: bool
    holder: str | None
    ttl: float
    why: str = ""


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def make_claims(claims: Iterable[tuple[str, ...]]) -> list[Claim]:
    """Checked Claims from ``(module, mode[, gen])``; ValueError on a bad name, mode or
    generation, or a module claimed twice."""
    out: list[Claim] = []
    seen: set[str] = set()
    for item in claims:
        module, mode = item[0], item[1]
        gen = item[2] if len(item) > 2 else None
        if not valid_name(module):
            raise ValueError(f"invalid module name {module!r}")
        if module in seen:
            raise ValueError(f"module {module!r} is claimed twice in one request")
        if gen is not None and not valid_gen(gen):
            raise ValueError(f"invalid data generation {gen!r}")
        if Mode(mode) is Mode.OUTDATE and gen is None:
            raise ValueError("an outdate claim needs the writer's generation")
        seen.add(module)
        out.append(Claim(module, Mode(mode), gen))
    return out


# -- payload codec (shared with the client) -------------------------------------------------


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


_REQUEST_OVERHEAD = len(_dumps({"nonce": "0" * NONCE_HEX_LEN, "claims": []}))
_REPLY_OVERHEAD = len(_dumps({"nonce": "0" * NONCE_HEX_LEN, "grants": {}}))
# Largest reply entry for a one-letter module, plus a separating comma.
_REPLY_ENTRY = len(_dumps({"m": {"granted": False, "holder": "h" * 63, "ttl_ms": U64_MAX,
                                  "why": "outdated"}})) - 1


def _request_item(claim: Claim) -> dict[str, str]:
    item = {"module": claim.module, "mode": claim.mode.value}
    if claim.gen is not None:
        item["gen"] = claim.gen
    return item


def fits_one_frame(claims: Sequence[Claim], limit: int = MAX_PAYLOAD_SIZE) -> bool:
    """Whether the request AND the largest possible reply for it fit in one frame payload."""
    return len(split_claims(claims, limit)) <= 1


def split_claims(claims: Sequence[Claim], limit: int = MAX_PAYLOAD_SIZE) -> list[list[Claim]]:
    """Consecutive chunks that each fit one request frame and one reply frame."""
    chunks: list[list[Claim]] = []
    request = reply = 0
    for claim in claims:
        req = len(_dumps(_request_item(claim))) + 1  # +1: the separating comma
        rep = _REPLY_ENTRY + len(claim.module) - 1
        if not chunks or _REQUEST_OVERHEAD + request + req > limit or (
            _REPLY_OVERHEAD + reply + rep > limit
        ):
            chunks.append([])
            request = reply = 0
        chunks[-1].append(claim)
        request, reply = request + req, reply + rep
    return chunks


def encode_request(nonce: str, claims: Sequence[Claim]) -> bytes:
    return _dumps({"nonce": nonce, "claims": [_request_item(c) for c in claims]})


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise ValueError("payload is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("payload is not a JSON object")
    nonce = doc.get("nonce")
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 32 lower-case hex digits")
    return doc


def parse_request(payload: bytes) -> tuple[str, list[Claim]]:
    """(nonce, claims) of a request payload; ValueError if it is not one."""
    doc = _json_object(payload)
    items = doc.get("claims")
    if not isinstance(items, list) or not items:
        raise ValueError("claims must be a non-empty list")
    pairs: list[tuple[Any, ...]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("mode"), str):
            raise ValueError("each claim must be {module, mode}")
        gen = item.get("gen")
        pairs.append((item.get("module"), item["mode"]) + ((gen,) if gen is not None else ()))
    return doc["nonce"], make_claims(pairs)  # make_claims checks the names


def encode_reply(nonce: str, grants: Mapping[str, Grant]) -> bytes:
    body = {
        module: {"granted": g.granted, "holder": g.holder, "ttl_ms": max(0, int(g.ttl * 1000)),
                 **({"why": g.why} if g.why else {})}
        for module, g in grants.items()
    }
    return _dumps({"nonce": nonce, "grants": body})


def parse_reply(payload: bytes) -> tuple[str, dict[str, Grant]]:
    """(nonce, grants) of a reply payload; ValueError if it is not one."""
    doc = _json_object(payload)
    body = doc.get("grants")
    if not isinstance(body, dict):
        raise ValueError("grants must be an object")
    grants: dict[str, Grant] = {}
    for module, g in body.items():
        if not isinstance(g, dict) or not valid_name(module):
            raise ValueError(f"bad grant for {module!r}")
        granted, holder, ttl_ms = g.get("granted"), g.get("holder"), g.get("ttl_ms")
        if not isinstance(granted, bool) or not (holder is None or valid_name(holder)):
            raise ValueError(f"bad grant for {module!r}")
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 0 <= ttl_ms <= U64_MAX:
            raise ValueError(f"bad ttl_ms for {module!r}")
        why = g.get("why", "")
        if why not in ("", "outdated"):
            raise ValueError(f"bad why for {module!r}")
        grants[module] = Grant(granted, holder, ttl_ms / 1000, why)
    return doc["nonce"], grants


# -- the rules ---------------------------------------------------------------------------


class _Lease(NamedTuple):
    holder: str
    expires: float  # witness monotonic clock


class Arbiter:
    """Lease table of one witness: module -> (holder, expiry). Pure: the clock is injected and
    every method takes an optional ``now``; logging is its only side effect."""

    def __init__(self, lease: float, clock: Clock = time.monotonic,
                 fences: FenceTable | None = None,
                 on_fence: Callable[[FenceTable], None] | None = None) -> None:
        if not (math.isfinite(lease) and 0 < lease <= MAX_LEASE):
            raise ValueError(f"lease must be in (0, {MAX_LEASE:g}] seconds, got {lease}")
        self.lease = lease
        self.margin = lease * MARGIN_FRACTION
        self.grace = lease + self.margin
        self._clock = clock
        self.grace_ends = clock() + self.grace
        self._leases: dict[str, _Lease] = {}
        self.fences = fences or FenceTable()
        self._on_fence = on_fence  # persist before the grant is answered
        self._denied: dict[str, set[str]] = {}  # module -> nodes whose denial was logged

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def in_grace(self, now: float | None = None) -> bool:
        return self._now(now) < self.grace_ends

    def _live(self, module: str, now: float) -> _Lease | None:
        lease = self._leases.get(module)
        if lease is not None and now >= lease.expires:
            del self._leases[module]
            self._denied.pop(module, None)
            log.info("module %s: lease of %s expired", module, lease.holder)
            return None
        return lease

    def holder(self, module: str, now: float | None = None) -> Grant:
        """Who holds ``module`` (``granted`` is whether anybody does)."""
        t = self._now(now)
        lease = self._live(module, t)
        return self._view(lease is not None, lease, t)

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget (and log) every expired lease; returns the modules freed."""
        t = self._now(now)
        return [m for m in list(self._leases) if self._live(m, t) is None]

    def handle(
        self, node: str, claims: Iterable[Sequence[Any]], now: float | None = None
    ) -> dict[str, Grant]:
        """Apply ``node``'s claims in order at witness time ``now``; one Grant per module."""
        t = self._now(now)
        grace = t < self.grace_ends
        out: dict[str, Grant] = {}
        for item in claims:
            module, mode = item[0], Mode(item[1])
            gen = item[2] if len(item) > 2 else None
            lease = self._live(module, t)
            fence = None if mode in (Mode.RELEASE, Mode.OUTDATE) else self.fences.blocks(
                module, node, gen)
            if mode is Mode.OUTDATE:
                ok = lease is not None and lease.holder == node and gen is not None
                if ok and gen is not None and self.fences.record(module, node, gen):
                    if self._on_fence is not None:
                        self._on_fence(self.fences)
                    log.warning("module %s: %s writes alone (generation %s): the other copy "
                                "is outdated until it resyncs", module, node, gen)
                out[module] = self._view(ok, lease, t)
            elif fence is not None:
                out[module] = Grant(False, fence.node, 0.0, "outdated")
                logged = self._denied.setdefault(module, set())
                if node not in logged:
                    logged.add(node)
                    log.warning("module %s: %s denied to %s: its data is outdated (%s wrote "
                                "alone, generation %s)", module, mode, node, fence.node,
                                fence.gen)
            elif mode is Mode.RELEASE:
                if lease is not None and lease.holder == node:
                    del self._leases[module]
                    self._denied.pop(module, None)
                    log.info("module %s: released by %s", module, node)
                    lease = None
                out[module] = self._view(False, lease, t)
            elif (mode is Mode.ACQUIRE and grace) or (lease is not None and lease.holder != node):
                out[module] = self._view(False, lease, t)
                logged = self._denied.setdefault(module, set())
                if node not in logged:  # a waiting node asks every L/3: log it once
                    logged.add(node)
                    why = (f"held by {lease.holder} for {lease.expires - t:.3f}s" if lease
                           else f"start-up grace, {self.grace_ends - t:.3f}s left")
                    log.info("module %s: %s denied to %s (%s)", module, mode, node, why)
            else:
                self._leases[module] = new = _Lease(node, t + self.lease)
                if lease is None:  # a new holder: log the next denials again
                    self._denied.pop(module, None)
                out[module] = self._view(True, new, t)
                level = logging.DEBUG if lease is not None else logging.INFO
                log.log(level, "module %s: %s granted to %s for %gs", module, mode, node,
                        self.lease)
        return out

    @staticmethod
    def _view(granted: bool, lease: _Lease | None, now: float) -> Grant:
        if lease is None:
            return Grant(granted, None, 0.0)
        return Grant(granted, lease.holder, max(0.0, lease.expires - now))

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        t = self._now(now)
        self.sweep(t)
        return {
            "lease": self.lease,
            "grace_left": max(0.0, self.grace_ends - t),
            "leases": {m: {"holder": x.holder, "ttl": x.expires - t}
                       for m, x in sorted(self._leases.items())},
        }


# -- the UDP service ---------------------------------------------------------------------


@dataclass
class WitnessCounters:
    received_ok: int = 0
    replies_sent: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    dropped_bad_mac: int = 0
    dropped_replay: int = 0
    dropped_malformed: int = 0
    dropped_bad_version: int = 0
    dropped_wrong_cluster: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_DROP_COUNTER = {"bad_mac": "dropped_bad_mac", "bad_version": "dropped_bad_version",
                 "wrong_cluster": "dropped_wrong_cluster", "replay": "dropped_replay"}


def random_incarnation() -> int:
    """A random positive 63-bit incarnation, for a witness without a state directory."""
    return (int.from_bytes(os.urandom(8), "big") >> 1) or 1


class WitnessServer:
    """Answers authenticated requests on one UDP socket; ``start``/``stop`` or ``async with``.

    ``incarnation`` numbers the witness's own frames; clients match replies by nonce, never by
    sequence, so a random value (the default) is safe even if it is lower after a restart.
    """

    def __init__(
        self, arbiter: Arbiter, *, cluster: str, secret: bytes, host: str = "0.0.0.0",
        port: int = DEFAULT_PORT, incarnation: int | None = None, clock: Clock = time.monotonic,
        log_every: float = 10.0,
    ) -> None:
        self.arbiter = arbiter
        self.host, self.port = host, port
        self.incarnation = random_incarnation() if incarnation is None else incarnation
        if not 1 <= self.incarnation <= U64_MAX:
            raise ValueError(f"incarnation must be a positive u64, got {self.incarnation}")
        self.counters = WitnessCounters()
        self._key = derive_key(secret, WITNESS_KEY_PURPOSE)
        self._cluster_id = cluster_id(cluster)
        self._clock = clock
        self._log_every = log_every
        self._next_warning: dict[str, float] = {}
        self._windows: dict[str, ReplayWindow] = {}
        self._seq = 0
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); only valid once started."""
        if self._sock is None:
            raise RuntimeError("the witness server is not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Bind (OSError if the address is unusable) and start serving."""
        if self._sock is not None:
            raise RuntimeError("the witness server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._tasks = [asyncio.create_task(self._recv_loop(sock), name="hvha-witness-recv"),
                       asyncio.create_task(self._sweep_loop(), name="hvha-witness-sweep")]

    async def stop(self) -> None:
        """Cancel the tasks and close the socket; safe to call more than once."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> WitnessServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def status(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "counters": self.counters.as_dict(),
                **self.arbiter.snapshot()}

    async def _sweep_loop(self) -> None:
        while True:  # logs expiries when they happen, not at the next request
            await asyncio.sleep(self.arbiter.lease / 4)
            self.arbiter.sweep()

    async def _recv_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, addr = await loop.sock_recvfrom(sock, _RECV_BUFFER)
            except OSError as exc:
                self.counters.recv_errors += 1
                self._warn("recv", "witness: receive failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            try:
                self._on_datagram(sock, data, addr)
            except Exception:  # a bug here must not stop the witness
                log.exception("witness: request handling failed")

    def _warn(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()  # at most one warning per key every log_every seconds
        if now >= self._next_warning.get(key, -math.inf):
            self._next_warning[key] = now + self._log_every
            log.warning(msg, *args)

    def _drop(self, reason: str, addr: Any, detail: object) -> None:
        counter = _DROP_COUNTER.get(reason, "dropped_malformed")
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        self._warn(reason, "witness: dropped request from %s (%s): %s", addr, reason, detail)

    def _on_datagram(self, sock: socket.socket, data: bytes, addr: Any) -> None:
        try:
            frame = decode(self._key, data, cluster_id=self._cluster_id)
        except FrameError as exc:
            self._drop(exc.reason, addr, exc)
            return
        if frame.kind != FrameKind.WITNESS_REQUEST or not valid_name(frame.sender):
            self._drop("malformed", addr, f"kind {frame.kind} from {frame.sender!r}")
            return
        try:
            nonce, claims = parse_request(frame.payload)
        except ValueError as exc:
            self._drop("malformed", addr, exc)
            return
        if not fits_one_frame(claims):  # checked before granting: a grant must be answered
            self._drop("malformed", addr, f"{len(claims)} claims: the reply would not fit")
            return
        window = self._windows.setdefault(frame.sender, ReplayWindow())
        if not window.observe(frame.incarnation, frame.seq, "udp").accepted:
            self._drop("replay", addr, f"{frame.sender} {frame.incarnation}/{frame.seq}")
            return
        self.counters.received_ok += 1
        payload = encode_reply(nonce, self.arbiter.handle(frame.sender, claims))
        self._seq += 1
        reply = encode(
            self._key, cluster_id=self._cluster_id, sender=WITNESS_SENDER,
            incarnation=self.incarnation, seq=self._seq,
            sent_ms=max(0, int(self._clock() * 1000)) & U64_MAX, payload=payload,
            kind=FrameKind.WITNESS_REPLY,
        )
        try:
            sock.sendto(reply, addr)
        except OSError as exc:
            self.counters.send_errors += 1
            self._warn("send", "witness: reply to %s failed: %s", addr, exc)
        else:
            self.counters.replies_sent += 1
