"""The replication wire format: frames, the op codec, acks/nacks, hello and queries.

Why a module of its own: the primary's stream, the secondary's applier and the resync code all
speak this format, and keeping it pure (no sockets except the small FrameReader, which only
reads) lets it be fuzzed: a decode error raises WireError, never anything else.

Frame layout, all integers big-endian::

    offset size field
    0      1    type (FrameType)
    1      1    flags (0; reserved)
    2      2    reserved (0)
    4      8    seq: op sequence number (OP, ACK, NACK) or query id (QUERY, REPLY)
    12     4    payload length (at most MAX_PAYLOAD)
    16     n    payload

Acks are cumulative: ACK(seq) means every op with a sequence number <= seq has been applied
(and, for Fsync ops among them, made durable). NACK(seq) means ops < seq were applied and op
seq failed; its payload is errno (u32) + UTF-8 message. The connection ends after a NACK.
While the primary says the pair is resyncing, an op that fails because the secondary's
namespace still differs (ENOENT, EEXIST...) is answered SKIPPED(seq) (same payload) instead:
the primary records it dirty and the resync sends it later. SKIPPED precedes the ACK covering
it.

An op payload is a tag byte and the dataclass's fields in declaration order: strings and
bytes as u32 length + content (paths are encoded with surrogateescape, as os.fsencode does),
integers as i64, optional strings as a presence byte + string, booleans as one byte. A Write's
data is the last field, so the sender can send it without copying it into the header.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, fields
from typing import Any, Protocol

from hvha.replication import ops
from hvha.replication.ops import Op

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 8 * 1024 * 1024
#: Largest Write.data that fits in one frame with its path.
MAX_WRITE = MAX_PAYLOAD - 64 * 1024
HEADER = struct.Struct(">BBHQI")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U8 = struct.Struct(">B")


class FrameType(enum.IntEnum):
    HELLO = 1
    OP = 2
    ACK = 3
    NACK = 4
    QUERY = 5
    REPLY = 6
    ERROR = 7  # fatal protocol error, payload: UTF-8 message; the sender then closes
    SKIPPED = 8  # op seq not applied (namespace divergence while resyncing): record it dirty


_FRAME_TYPES = {int(t): t for t in FrameType}


class WireError(Exception):
    """A frame or payload that does not decode: the connection must be dropped."""


class ConnectionClosed(WireError):
    """The peer closed the connection (EOF)."""


#: A frame's payload: bytes, or (large frames read by a zero-copy FrameReader) the bytearray
#: the frame was received into, owned by the caller from then on.
Payload = bytes | bytearray


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    seq: int
    payload: Payload


_SCHEMA: dict[type, tuple[int, str]] = {
    ops.Create: (1, "sq"), ops.Write: (2, "sqb"), ops.Truncate: (3, "sq"),
    ops.Fallocate: (4, "sqqq"), ops.Rename: (5, "ssq"), ops.Unlink: (6, "s"),
    ops.Mkdir: (7, "sq"), ops.Rmdir: (8, "s"), ops.Symlink: (9, "ss"), ops.Link: (10, "ss"),
    ops.Chmod: (11, "sq"), ops.Chown: (12, "sqq"), ops.Utimens: (13, "sqq"),
    ops.SetXattr: (14, "ssbq"), ops.RemoveXattr: (15, "ss"), ops.Fsync: (16, "o?"),
}
_BY_TAG: dict[int, tuple[type, str]] = {tag: (cls, spec) for cls, (tag, spec) in _SCHEMA.items()}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _SCHEMA}


def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return _U32.pack(len(b)) + b


def encode_op_parts(op: Op) -> list[bytes]:
    """The op's payload as a list of buffers to send in order (a Write's data is not copied)."""
    tag, spec = _SCHEMA[type(op)]
    head = bytearray(_U8.pack(tag))
    tail: list[bytes] = []
    for code, name in zip(spec, _FIELDS[type(op)], strict=True):
        value = getattr(op, name)
        if code == "s":
            head += _enc_str(value)
        elif code == "q":
            head += _I64.pack(value)
        elif code == "b":
            if name == "data":  # Write: data is the last field
                head += _U32.pack(len(value))
                tail.append(value)
            else:
                head += _U32.pack(len(value)) + bytes(value)
        elif code == "o":
            head += b"\0" if value is None else b"\1" + _enc_str(value)
        else:  # "?"
            head += b"\1" if value else b"\0"
    return [bytes(head), *tail]


def encode_op(op: Op) -> bytes:
    return b"".join(encode_op_parts(op))


def op_size(op: Op) -> int:
    """Payload bytes of an op (cheap; used for metrics and flow control)."""
    return len(op.data) + 64 if isinstance(op, ops.Write) else 64


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: Payload) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> Payload:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise WireError("truncated payload")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def i64(self) -> int:
        return int(_I64.unpack(self.take(8))[0])

    def u8(self) -> int:
        return self.take(1)[0]

    def string(self) -> str:
        try:
            return self.take(self.u32()).decode("utf-8", "surrogateescape")
        except UnicodeDecodeError as exc:  # pragma: no cover - surrogateescape accepts all
            raise WireError(f"bad string: {exc}") from None


_WRITE_TAG = _SCHEMA[ops.Write][0]


def decode_write(payload: Payload) -> tuple[str, int, memoryview] | None:
    """A Write op's (path, offset, data) with data a view into `payload` (no copy: the applier
    writes it straight from the received buffer); None if the payload is another op. Raises
    WireError if it is a malformed Write."""
    if not payload or payload[0] != _WRITE_TAG:
        return None
    cur = _Cursor(payload)
    cur.pos = 1
    path = cur.string()
    offset = cur.i64()
    n = cur.u32()
    if cur.pos + n != len(payload):
        raise WireError("bad Write payload length")
    return path, offset, memoryview(payload)[cur.pos:]


def decode_op(payload: Payload) -> Op:
    """Decode one op payload; raise WireError if it is malformed (never anything else)."""
    cur = _Cursor(payload)
    tag = cur.u8()
    if tag not in _BY_TAG:
        raise WireError(f"unknown op tag {tag}")
    cls, spec = _BY_TAG[tag]
    values: list[Any] = []
    for code in spec:
        if code == "s":
            values.append(cur.string())
        elif code == "q":
            values.append(cur.i64())
        elif code == "b":
            values.append(bytes(cur.take(cur.u32())))
        elif code == "o":
            flag = cur.u8()
            if flag > 1:
                raise WireError("bad optional flag")
            values.append(cur.string() if flag else None)
        else:
            flag = cur.u8()
            if flag > 1:
                raise WireError("bad boolean")
            values.append(bool(flag))
    if cur.pos != len(payload):
        raise WireError(f"{len(payload) - cur.pos} trailing bytes after op")
    op: Op = cls(*values)
    return op


def header(ftype: FrameType, seq: int, length: int) -> bytes:
    if length > MAX_PAYLOAD:
        raise WireError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(ftype, 0, 0, seq, length)


def encode_frame(ftype: FrameType, seq: int, payload: bytes = b"") -> bytes:
    return header(ftype, seq, len(payload)) + payload


def op_frame_parts(seq: int, op: Op) -> list[bytes]:
    parts = encode_op_parts(op)
    return [header(FrameType.OP, seq, sum(len(p) for p in parts)), *parts]


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def decode_json(payload: Payload) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"bad JSON payload: {exc}") from None


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame each way: who speaks, for which module, with which data generations."""

    node: str
    module: str
    generations: dict[str, Any]
    accept: bool = True
    reason: str = ""

    def encode(self) -> bytes:
        return encode_json({"proto": PROTOCOL_VERSION, "node": self.node, "module": self.module,
                            "generations": self.generations, "accept": self.accept,
                            "reason": self.reason})


def decode_hello(payload: Payload) -> Hello:
    d = decode_json(payload)
    if not isinstance(d, dict) or d.get("proto") != PROTOCOL_VERSION:
        raise WireError(f"unsupported hello (protocol version {PROTOCOL_VERSION} expected)")
    try:
        hello = Hello(str(d["node"]), str(d["module"]), dict(d["generations"]),
                      bool(d.get("accept", True)), str(d.get("reason", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad hello: {exc}") from None
    return hello


def encode_nack(errno_: int, message: str) -> bytes:
    return _U32.pack(errno_ & 0xFFFFFFFF) + message.encode("utf-8", "replace")


def decode_nack(payload: Payload) -> tuple[int, str]:
    if len(payload) < 4:
        raise WireError("truncated NACK")
    return int(_U32.unpack_from(payload)[0]), payload[4:].decode("utf-8", "replace")


class ByteChannel(Protocol):
    """What FrameReader reads from (tls.Channel)."""

    def recv(self, n: int) -> bytes: ...
    def recv_into(self, buf: memoryview | bytearray) -> int: ...
    def pending(self) -> int: ...


class FrameReader:
    """Reads frames from a TLS channel. A timeout leaves a partial frame buffered, so the
    caller may retry read() after TimeoutError without losing bytes. With zero_copy, a large
    payload is returned as the bytearray it was received into (the applier writes from it)."""

    def __init__(self, sock: ByteChannel, max_payload: int = MAX_PAYLOAD,
                 zero_copy: bool = False):
        self.sock = sock
        self.max_payload = max_payload
        self.zero_copy = zero_copy
        self.buf = bytearray()
        self._rbuf = bytearray(256 * 1024)  # reused for every small read (no allocation)
        self._rview = memoryview(self._rbuf)
        self._big: bytearray | None = None
        self._big_got = 0
        self._head: tuple[FrameType, int, int] | None = None

    def pending(self) -> bool:
        """Bytes already received (here or inside the TLS layer) but not yet returned."""
        return bool(self.buf) or self._head is not None or self.sock.pending() > 0

    def _fill(self, want: int) -> None:
        n = self.sock.recv_into(self._rview)
        if not n:
            raise ConnectionClosed("peer closed the connection")
        self.buf += self._rview[:n]

    def read(self) -> Frame:
        if self._head is None:
            while len(self.buf) < HEADER.size:
                self._fill(HEADER.size - len(self.buf))
            ftype, _flags, _res, seq, length = HEADER.unpack_from(self.buf)
            if length > self.max_payload:
                raise WireError(f"frame of {length} bytes exceeds the {self.max_payload} limit")
            ft = _FRAME_TYPES.get(ftype)  # (FrameType(x) costs an enum call per frame)
            if ft is None:
                raise WireError(f"unknown frame type {ftype}")
            del self.buf[:HEADER.size]
            self._head = (ft, seq, length)
        ft, seq, length = self._head
        if length > 256 * 1024 and len(self.buf) < length:
            return self._read_big(ft, seq, length)
        while len(self.buf) < length:
            self._fill(length - len(self.buf))
        payload = bytes(self.buf[:length])
        del self.buf[:length]
        self._head = None
        return Frame(ft, seq, payload)

    def _read_big(self, ft: FrameType, seq: int, length: int) -> Frame:
        if self._big is None:
            self._big = bytearray(length)
            have = len(self.buf)
            self._big[:have] = self.buf
            self.buf.clear()
            self._big_got = have
        view = memoryview(self._big)
        while self._big_got < length:
            n = self.sock.recv_into(view[self._big_got:])
            if n == 0:
                raise ConnectionClosed("peer closed the connection")
            self._big_got += n
        payload: Payload = self._big if self.zero_copy else bytes(self._big)
        self._big, self._head = None, None
        return Frame(ft, seq, payload)
