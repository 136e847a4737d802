"""The replication wire codec: every op round-trips, and malformed input raises WireError
(never anything else), so a hostile or broken peer cannot crash the applier."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvha.replication import ops, wire

SAMPLES: list[ops.Op] = [
    ops.Create("a/b", 0o644), ops.Write("f", 2**40, b"\0data" * 1000), ops.Truncate("f", 0),
    ops.Fallocate("f", 3, 4096, 8192), ops.Rename("a", "b", 1), ops.Unlink("x"),
    ops.Mkdir("d", 0o755), ops.Rmdir("d"), ops.Symlink("../t", "l"), ops.Link("a", "b"),
    ops.Chmod("f", 0o4755), ops.Chown("f", -1, 1000), ops.Utimens("f", -5, 2**62),
    ops.SetXattr("f", "user.k", b"\xff\0", 1), ops.RemoveXattr("f", "user.k"),
    ops.Fsync(None), ops.Fsync("f", True), ops.Create("caf\udce9", 0o600),  # non-UTF-8 name
]


@pytest.mark.parametrize("op", SAMPLES, ids=lambda o: type(o).__name__)
def test_every_op_round_trips(op: ops.Op) -> None:
    assert wire.decode_op(wire.encode_op(op)) == op
    parts = wire.op_frame_parts(7, op)
    ftype, _, _, seq, length = wire.HEADER.unpack(parts[0])
    assert (ftype, seq, length) == (wire.FrameType.OP, 7, sum(map(len, parts[1:])))


def test_every_op_kind_has_a_sample() -> None:
    assert {type(o) for o in SAMPLES} == set(ops.Op.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("payload", [b"", b"\x63", b"\x01", b"\x01\0\0\0\x05ab",
                                     wire.encode_op(ops.Unlink("x")) + b"!",
                                     b"\x10\x02", b"\x10\x01\0\0\0\x01a\x07"])
def test_malformed_ops_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_op(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzzed_payloads_only_raise_wire_error(payload: bytes) -> None:
    try:
        op = wire.decode_op(payload)
    except wire.WireError:
        return
    assert wire.encode_op(op) == payload


class FakeChannel:
    def __init__(self, chunks: list[bytes | Exception]) -> None:
        self.chunks = chunks

    def recv(self, n: int) -> bytes:
        item = self.chunks.pop(0) if self.chunks else b""
        if isinstance(item, Exception):
            raise item
        return item

    def recv_into(self, buf: memoryview | bytearray) -> int:
        data = self.recv(len(buf))
        buf[:len(data)] = data
        return len(data)

    def pending(self) -> int:
        return 0


def test_reader_keeps_partial_frames_across_timeouts() -> None:
    frame = wire.encode_frame(wire.FrameType.ACK, 42, b"xyz")
    big = wire.encode_frame(wire.FrameType.OP, 9, b"B" * 300_000)
    reader = wire.FrameReader(FakeChannel([frame[:5], TimeoutError(), frame[5:] + big[:1000],
                                           TimeoutError(), big[1000:]]))
    with pytest.raises(TimeoutError):
        reader.read()
    assert reader.read() == wire.Frame(wire.FrameType.ACK, 42, b"xyz")
    with pytest.raises(TimeoutError):
        reader.read()
    assert reader.read() == wire.Frame(wire.FrameType.OP, 9, b"B" * 300_000)
    with pytest.raises(wire.ConnectionClosed):
        reader.read()


def test_reader_refuses_oversized_and_unknown_frames() -> None:
    huge = struct.pack(">BBHQI", 2, 0, 0, 1, wire.MAX_PAYLOAD + 1)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.FrameReader(FakeChannel([huge])).read()
    with pytest.raises(wire.WireError, match="unknown frame type"):
        wire.FrameReader(FakeChannel([struct.pack(">BBHQI", 99, 0, 0, 1, 0)])).read()
    with pytest.raises(wire.WireError):
        wire.header(wire.FrameType.OP, 1, wire.MAX_PAYLOAD + 1)


def test_hello_and_nack() -> None:
    h = wire.Hello("node1", "web", {"current": "ab"}, False, "split brain")
    assert wire.decode_hello(h.encode()) == h
    with pytest.raises(wire.WireError):
        wire.decode_hello(b'{"proto": 99}')
    with pytest.raises(wire.WireError):
        wire.decode_hello(b"\xff")
    assert wire.decode_nack(wire.encode_nack(28, "No space left")) == (28, "No space left")
