"""Frame codec, replay window and incarnation counter: the security-relevant pure parts."""

from __future__ import annotations

import hashlib
import hmac
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvha.agent.frames import (
    HEARTBEAT_KEY_PURPOSE,
    MAX_PAYLOAD_SIZE,
    MIN_FRAME_SIZE,
    Frame,
    FrameBadMac,
    FrameBadMagic,
    FrameBadVersion,
    FrameError,
    FrameKind,
    FrameMalformed,
    FrameTooShort,
    FrameWrongCluster,
    ReplayWindow,
    Verdict,
    cluster_id,
    decode,
    derive_key,
    encode,
)
from hvha.agent.incarnation import next_incarnation

KEY = derive_key(b"correct horse battery staple", HEARTBEAT_KEY_PURPOSE)
CID = cluster_id("lab")


def frame_bytes(key: bytes = KEY, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "cluster_id": CID,
        "sender": "node-b",
        "incarnation": 7,
        "seq": 42,
        "sent_ms": 123456,
        "payload": b'{"vm1": "PRIM"}',
    }
    fields.update(overrides)
    return encode(key, **fields)  # type: ignore[arg-type]


def test_derive_key_separates_purposes_and_secrets() -> None:
    assert len(KEY) == 32
    assert derive_key(b"s", b"a") != derive_key(b"s", b"b")
    assert derive_key(b"s", b"a") != derive_key(b"t", b"a")
    assert derive_key(b"s", b"a") == derive_key(b"s", b"a")
    with pytest.raises(ValueError):
        derive_key(b"", b"a")


def test_round_trip() -> None:
    data = frame_bytes()
    assert data[:4] == b"HVHB"
    frame = decode(KEY, data, cluster_id=CID)
    assert frame == Frame(
        kind=FrameKind.HEARTBEAT,
        cluster_id=CID,
        sender="node-b",
        incarnation=7,
        seq=42,
        sent_ms=123456,
        payload=b'{"vm1": "PRIM"}',
    )
    # Encoding is deterministic: re-encoding a decoded frame gives the same bytes.
    assert frame_bytes() == data


def test_largest_payload_and_longest_name_fit() -> None:
    data = frame_bytes(sender="é" * 32, payload=b"x" * MAX_PAYLOAD_SIZE, seq=2**64 - 1)
    frame = decode(KEY, data, cluster_id=CID)
    assert frame.sender == "é" * 32 and len(frame.payload) == MAX_PAYLOAD_SIZE
    with pytest.raises(ValueError):
        frame_bytes(payload=b"x" * (MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(ValueError):
        frame_bytes(sender="n" * 65)
    with pytest.raises(ValueError):
        frame_bytes(seq=2**64)


@given(
    sender=st.text(min_size=1, max_size=16),
    incarnation=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    sent_ms=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=512),
)
def test_round_trip_any_fields(
    sender: str, incarnation: int, seq: int, sent_ms: int, payload: bytes
) -> None:
    data = frame_bytes(
        sender=sender, incarnation=incarnation, seq=seq, sent_ms=sent_ms, payload=payload
    )
    frame = decode(KEY, data, cluster_id=CID)
    assert (frame.sender, frame.incarnation, frame.seq, frame.sent_ms, frame.payload) == (
        sender,
        incarnation,
        seq,
        sent_ms,
        payload,
    )


def test_forged_frame_wrong_key_is_bad_mac() -> None:
    forged = frame_bytes(key=derive_key(b"guessed secret", HEARTBEAT_KEY_PURPOSE))
    with pytest.raises(FrameBadMac) as info:
        decode(KEY, forged, cluster_id=CID)
    assert info.value.reason == "bad_mac"


def test_altered_payload_is_bad_mac() -> None:
    data = bytearray(frame_bytes())
    data[-40] ^= 0x01  # inside the payload
    with pytest.raises(FrameBadMac):
        decode(KEY, bytes(data), cluster_id=CID)


@pytest.mark.parametrize(
    ("mutate", "error", "reason"),
    [
        (lambda d: d[:10], FrameTooShort, "too_short"),
        (lambda d: b"", FrameTooShort, "too_short"),
        (lambda d: b"XXXX" + d[4:], FrameBadMagic, "bad_magic"),
        (lambda d: d[:4] + b"\x02" + d[5:], FrameBadVersion, "bad_version"),
        (lambda d: d[:6] + cluster_id("other") + d[14:], FrameWrongCluster, "wrong_cluster"),
        (lambda d: d[:-1], FrameBadMac, "bad_mac"),
        (lambda d: d + b"\x00", FrameBadMac, "bad_mac"),
        (lambda d: d[: MIN_FRAME_SIZE + 3], FrameBadMac, "bad_mac"),
    ],
)
def test_rejections(mutate: object, error: type[FrameError], reason: str) -> None:
    data = mutate(frame_bytes())  # type: ignore[operator]
    with pytest.raises(error) as info:
        decode(KEY, data, cluster_id=CID)
    assert info.value.reason == reason


def test_truncated_frames_all_rejected() -> None:
    data = frame_bytes()
    for size in range(len(data)):
        with pytest.raises(FrameError):
            decode(KEY, data[:size], cluster_id=CID)


def _signed(body: bytes) -> bytes:
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


@pytest.mark.parametrize(
    "body",
    [
        # authentic but inconsistent lengths: a buggy or incompatible sender
        b"HVHB\x01\x01" + CID + b"\x00" + struct.pack(">QQQI", 1, 1, 1, 0),
        b"HVHB\x01\x01" + CID + b"\x05node" + struct.pack(">QQQI", 1, 1, 1, 0),
        b"HVHB\x01\x01" + CID + b"\xf0node" + struct.pack(">QQQI", 1, 1, 1, 0) + b"x" * 300,
        b"HVHB\x01\x01" + CID + b"\x04node" + struct.pack(">QQQI", 1, 1, 1, 9) + b"x",
        b"HVHB\x01\x01" + CID + b"\x04node" + struct.pack(">QQQI", 1, 1, 1, 0) + b"x",
        b"HVHB\x01\x01" + CID + b"\x02\xff\xfe" + struct.pack(">QQQI", 1, 1, 1, 0),
    ],
)
def test_authentic_but_malformed(body: bytes) -> None:
    with pytest.raises(FrameMalformed):
        decode(KEY, _signed(body), cluster_id=CID)


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_only_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode(KEY, data, cluster_id=CID)


@settings(max_examples=500)
@given(st.data())
def test_fuzz_bit_flips_only_raise_frame_error(data: st.DataObject) -> None:
    frame = frame_bytes(payload=data.draw(st.binary(max_size=64)))
    bits = data.draw(st.sets(st.integers(0, len(frame) * 8 - 1), min_size=1, max_size=8))
    flipped = bytearray(frame)
    for bit in bits:
        flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameError):
        decode(KEY, bytes(flipped), cluster_id=CID)


@settings(max_examples=300)
@given(st.data())
def test_fuzz_valid_prefix_with_garbage(data: st.DataObject) -> None:
    frame = frame_bytes()
    cut = data.draw(st.integers(0, len(frame)))
    junk = data.draw(st.binary(max_size=80))
    mangled = frame[:cut] + junk
    if mangled == frame:
        return
    with pytest.raises(FrameError):
        decode(KEY, mangled, cluster_id=CID)


# -- replay window -------------------------------------------------------------------------


def test_window_in_order_then_replay() -> None:
    w = ReplayWindow()
    assert w.observe(1, 1, "lan") is Verdict.NEW
    assert w.observe(1, 2, "lan") is Verdict.NEW
    assert w.observe(1, 2, "lan") is Verdict.REPLAY
    assert w.observe(1, 1, "lan") is Verdict.REPLAY


def test_window_same_seq_on_second_network_is_duplicate_not_replay() -> None:
    w = ReplayWindow()
    assert w.observe(1, 10, "lan") is Verdict.NEW
    assert w.observe(1, 10, "crossover") is Verdict.DUPLICATE
    assert w.observe(1, 10, "crossover") is Verdict.REPLAY  # third copy: re-sent capture
    assert w.observe(1, 10, "lan") is Verdict.REPLAY
    # the second network is behind: its copy of an older seq is still a duplicate
    assert w.observe(1, 11, "lan") is Verdict.NEW
    assert w.observe(1, 12, "lan") is Verdict.NEW
    assert w.observe(1, 11, "crossover") is Verdict.DUPLICATE
    assert Verdict.DUPLICATE.fresh_on_network and not Verdict.DUPLICATE.accepted


def test_window_reorder_within_window_accepted_once() -> None:
    w = ReplayWindow(size=64)
    assert w.observe(1, 100, "lan") is Verdict.NEW
    assert w.observe(1, 98, "lan") is Verdict.LATE
    assert w.observe(1, 99, "crossover") is Verdict.LATE
    assert w.observe(1, 98, "lan") is Verdict.REPLAY
    assert w.observe(1, 37, "lan") is Verdict.LATE  # offset 63: last slot of the window
    assert w.observe(1, 36, "lan") is Verdict.REPLAY  # offset 64: older than the window
    assert Verdict.LATE.accepted and not Verdict.REPLAY.fresh_on_network


def test_window_big_jump_clears_and_is_cheap() -> None:
    w = ReplayWindow()
    assert w.observe(1, 5, "lan") is Verdict.NEW
    assert w.observe(1, 2**63, "lan") is Verdict.NEW
    assert w.observe(1, 5, "lan") is Verdict.REPLAY
    assert w.observe(1, 2**63 - 1, "lan") is Verdict.LATE


def test_window_old_incarnation_rejected_higher_resets() -> None:
    w = ReplayWindow()
    assert w.observe(5, 1000, "lan") is Verdict.NEW
    assert w.observe(4, 5000, "lan") is Verdict.REPLAY
    assert w.observe(6, 1, "lan") is Verdict.NEW  # peer restarted: seq starts again
    assert w.incarnation == 6 and w.highest_seq == 1
    assert w.observe(6, 2, "lan") is Verdict.NEW
    assert w.observe(5, 1001, "lan") is Verdict.REPLAY


def test_window_min_incarnation_refuses_recordings_after_local_restart() -> None:
    w = ReplayWindow(min_incarnation=5)
    assert w.observe(4, 9, "lan") is Verdict.REPLAY
    assert w.incarnation is None
    assert w.observe(5, 1, "lan") is Verdict.NEW


def test_window_size_validated() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size=0)


# -- incarnation counter -------------------------------------------------------------------


def test_next_incarnation_strictly_increases_and_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    values = [next_incarnation(state) for _ in range(5)]
    assert values == [1, 2, 3, 4, 5]
    counter = state / "incarnation"
    assert stat.S_IMODE(counter.stat().st_mode) == 0o600
    assert counter.read_text() == "5\n"
    assert sorted(p.name for p in state.iterdir()) == ["incarnation"]  # no temp files left


def test_next_incarnation_refuses_corrupt_counter(tmp_path: Path) -> None:
    (tmp_path / "incarnation").write_text("12abc\n")
    with pytest.raises(ValueError, match="corrupt incarnation"):
        next_incarnation(tmp_path)
    assert (tmp_path / "incarnation").read_text() == "12abc\n"
