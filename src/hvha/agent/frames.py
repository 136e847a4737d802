"""Authenticated heartbeat frames and replay protection (pure: no I/O, no clocks).

Why this exists: a two-node cluster fails over on the *absence* of the peer's heartbeats, so
whoever can put packets on a heartbeat network must be unable to fake the peer's presence
(which would block a failover) or its module states (which would drive wrong decisions).
Every frame therefore carries an HMAC-SHA256 tag under a key derived from the cluster secret,
plus an incarnation number (bumped and persisted on every agent start) and a sequence number,
which the receiver runs through a ReplayWindow. Keeping this module free of sockets, files and
clocks lets it be fuzzed and unit-tested exhaustively; side effects live in
``hvha.agent.heartbeat``.

Frame layout, version 1, all integers big-endian (``struct``)::

    offset  size  field
    0       4     magic b"HVHB"
    4       1     version (1)
    5       1     kind (1 = heartbeat)
    6       8     cluster id: sha256(cluster name, utf-8)[:8]
    14      1     n = length of the sender node name (1..64)
    15      n     sender node name, utf-8
    15+n    8     incarnation (u64)
    23+n    8     sequence number (u64)
    31+n    8     sender's monotonic clock in ms (u64, informational: hosts' clocks differ)
    39+n    4     m = payload length (u32)
    43+n    m     payload (opaque here; the agent puts module state summaries in it)
    43+n+m  32    HMAC-SHA256(heartbeat key, every byte before the tag)

The whole frame is at most MAX_FRAME_SIZE (60 KiB), safely below the 65507-byte UDP limit.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = b"HVHB"
VERSION = 1
HEARTBEAT_KEY_PURPOSE = b"hvha heartbeat v1"
CLUSTER_ID_SIZE = 8
MAX_SENDER_BYTES = 64
TAG_SIZE = 32
MAX_FRAME_SIZE = 60 * 1024
U64_MAX = 2**64 - 1

_HEAD = struct.Struct(">4sBB8sB")  # magic, version, kind, cluster id, sender length
_TAIL = struct.Struct(">QQQI")  # incarnation, seq, sent_ms, payload length
MIN_FRAME_SIZE = _HEAD.size + _TAIL.size + TAG_SIZE
#: Largest payload that fits whatever the sender name's length.
MAX_PAYLOAD_SIZE = MAX_FRAME_SIZE - MIN_FRAME_SIZE - MAX_SENDER_BYTES


class FrameKind(enum.IntEnum):
    HEARTBEAT = 1
    WITNESS_REQUEST = 2  # node -> witness, see hvha.agent.witness
    WITNESS_REPLY = 3  # witness -> node


class FrameError(Exception):
    """A received datagram is not a frame we accept; ``reason`` is a stable counter key."""

    reason = "invalid"


class FrameTooShort(FrameError):
    reason = "too_short"


class FrameBadMagic(FrameError):
    reason = "bad_magic"


class FrameBadVersion(FrameError):
    reason = "bad_version"


class FrameWrongCluster(FrameError):
    reason = "wrong_cluster"


class FrameBadMac(FrameError):
    reason = "bad_mac"


class FrameMalformed(FrameError):
    reason = "malformed"


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    cluster_id: bytes
    sender: str
    incarnation: int
    seq: int
    sent_ms: int
    payload: bytes


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, so one cluster secret can key several channels apart."""
    if not secret:
        raise ValueError("the cluster secret is empty")
    if not purpose:
        raise ValueError("a key purpose is required")
    return hmac.new(secret, purpose, hashlib.sha256).digest()


def cluster_id(cluster_name: str) -> bytes:
    """Tells frames of two clusters sharing a network apart before any MAC is computed."""
    return hashlib.sha256(cluster_name.encode("utf-8")).digest()[:CLUSTER_ID_SIZE]


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} {value} is not an unsigned 64-bit integer")


def encode(
    key: bytes,
    *,
    cluster_id: bytes,
    sender: str,
    incarnation: int,
    seq: int,
    sent_ms: int,
    payload: bytes = b"",
    kind: int = FrameKind.HEARTBEAT,
) -> bytes:
    """The wire form of one frame; raises ValueError on arguments that cannot be encoded."""
    if not key:
        raise ValueError("the frame key is empty")
    if len(cluster_id) != CLUSTER_ID_SIZE:
        raise ValueError(f"cluster id must be {CLUSTER_ID_SIZE} bytes")
    name = sender.encode("utf-8")
    if not 1 <= len(name) <= MAX_SENDER_BYTES:
        raise ValueError(f"sender name must be 1..{MAX_SENDER_BYTES} bytes of utf-8: {sender!r}")
    if not 0 <= kind <= 255:
        raise ValueError(f"frame kind {kind} does not fit in a byte")
    for field_name, value in (("incarnation", incarnation), ("seq", seq), ("sent_ms", sent_ms)):
        _check_u64(field_name, value)
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    body = b"".join(
        (
            _HEAD.pack(MAGIC, VERSION, kind, cluster_id, len(name)),
            name,
            _TAIL.pack(incarnation, seq, sent_ms, len(payload)),
            payload,
        )
    )
    return body + _mac(key, body)


def decode(key: bytes, data: bytes, *, cluster_id: bytes) -> Frame:
    """The frame in ``data``, authenticated; raises a FrameError subclass and nothing else.

    Cheap unauthenticated checks (size, magic, version, cluster) come first only to classify
    junk for the counters; every field that is *used* is read after the MAC has been verified,
    so length fields an attacker controls are never trusted.
    """
    size = len(data)
    if size < MIN_FRAME_SIZE:
        raise FrameTooShort(f"{size} bytes, a frame has at least {MIN_FRAME_SIZE}")
    if size > MAX_FRAME_SIZE:
        raise FrameMalformed(f"{size} bytes, a frame has at most {MAX_FRAME_SIZE}")
    magic, version, kind, frame_cluster, name_len = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameBadMagic(f"magic {magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise FrameBadVersion(f"version {version}, this node speaks {VERSION}")
    if frame_cluster != cluster_id:
        raise FrameWrongCluster(f"cluster id {frame_cluster.hex()} is not {cluster_id.hex()}")
    body, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
    if not hmac.compare_digest(tag, _mac(key, body)):
        raise FrameBadMac("authentication tag does not match (wrong key or altered frame)")
    # Authentic from here on: an inconsistency means a buggy or incompatible sender.
    name_end = _HEAD.size + name_len
    if not 1 <= name_len <= MAX_SENDER_BYTES or name_end + _TAIL.size > len(body):
        raise FrameMalformed(f"sender name length {name_len} does not fit the frame")
    try:
        sender = bytes(body[_HEAD.size : name_end]).decode("utf-8")
    except UnicodeDecodeError:
        raise FrameMalformed("sender name is not utf-8") from None
    incarnation, seq, sent_ms, payload_len = _TAIL.unpack_from(body, name_end)
    start = name_end + _TAIL.size
    if start + payload_len != len(body):
        raise FrameMalformed(f"payload length {payload_len} does not match the frame size")
    return Frame(
        kind=kind,
        cluster_id=bytes(frame_cluster),
        sender=sender,
        incarnation=incarnation,
        seq=seq,
        sent_ms=sent_ms,
        payload=bytes(body[start:]),
    )


class Verdict(enum.Enum):
    """What a ReplayWindow made of one authentic frame."""

    NEW = "new"  # newest (incarnation, seq) so far: accept, deliver its payload
    LATE = "late"  # unseen, inside the window, older than the newest: accept, do not deliver
    DUPLICATE = "duplicate"  # already accepted via another network: first copy on this one
    REPLAY = "replay"  # older incarnation, older than the window, or again on the same network

    @property
    def accepted(self) -> bool:
        return self in (Verdict.NEW, Verdict.LATE)

    @property
    def fresh_on_network(self) -> bool:
        """The first copy of this seq on the network it arrived on (credits that link)."""
        return self is not Verdict.REPLAY


class ReplayWindow:
    """Replay and duplicate filter for the frames of ONE sender, shared by all its networks.

    Why shared rather than one window per network: the peer sends the same (incarnation, seq)
    on every network, so a shared window sees the second copy as a duplicate (the payload is
    delivered once, in order) and a frame captured on network A cannot be injected on network
    B as a new payload. Inside the shared window one bitmap per network remembers where each
    seq was already received, which keeps two cases apart:

    * DUPLICATE - the seq was accepted on another network, this is its first copy here: benign
      and expected; it still proves that this network carries the peer's traffic;
    * REPLAY - the seq was already received on this very network, is older than the window, or
      belongs to an older incarnation: never credited to liveness, so re-sent captures cannot
      keep a dead peer looking alive.

    A higher incarnation means the peer restarted and resets the window. ``min_incarnation``
    lets an agent that persisted the peer's last incarnation refuse older recordings after its
    own restart (an empty window otherwise accepts the first authentic frame it sees).
    """

    def __init__(self, size: int = 64, *, min_incarnation: int = 0) -> None:
        if not 1 <= size <= 4096:
            raise ValueError(f"replay window size must be 1..4096, got {size}")
        self._size = size
        self._mask = (1 << size) - 1
        self._min_incarnation = min_incarnation
        self._incarnation: int | None = None
        self._highest = 0
        # Bit i of _seen[net] is set when seq (_highest - i) was received on network net.
        self._seen: dict[str, int] = {}

    @property
    def size(self) -> int:
        return self._size

    @property
    def incarnation(self) -> int | None:
        return self._incarnation

    @property
    def highest_seq(self) -> int | None:
        return None if self._incarnation is None else self._highest

    def observe(self, incarnation: int, seq: int, network: str) -> Verdict:
        """Classify an authentic frame's counters and remember them (mutates the window)."""
        if incarnation < self._min_incarnation:
            return Verdict.REPLAY
        if self._incarnation is None or incarnation > self._incarnation:
            self._incarnation, self._highest, self._seen = incarnation, seq, {network: 1}
            return Verdict.NEW
        if incarnation < self._incarnation:
            return Verdict.REPLAY
        if seq > self._highest:
            shift = seq - self._highest
            # Guard the shift: a jump of 2**60 must not build a 2**60-bit integer.
            self._seen = {
                net: (bits << shift) & self._mask if shift < self._size else 0
                for net, bits in self._seen.items()
            }
            self._seen[network] = self._seen.get(network, 0) | 1
            self._highest = seq
            return Verdict.NEW
        offset = self._highest - seq
        if offset >= self._size:
            return Verdict.REPLAY
        bit = 1 << offset
        here = self._seen.get(network, 0)
        if here & bit:
            return Verdict.REPLAY
        elsewhere = any(bits & bit for bits in self._seen.values())
        self._seen[network] = here | bit
        return Verdict.DUPLICATE if elsewhere else Verdict.LATE
