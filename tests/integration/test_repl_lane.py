"""The native lane's session (lane.py, native/lane.c) over real TLS on loopback.

Why these tests: the lane keeps a frame that a read timeout interrupted and resumes it, lets
one thread read while others send (memory BIOs under a lock), and may be closed by one thread
while another is blocked in it; each of those, done wrong, loses or corrupts a frame or
crashes the agent. The peer is Python's own TLS (tls.Channel + wire.FrameReader), which also
shows the two implementations interoperate frame for frame. The full replication paths run
through the lane in test_repl_stream.py and the e2e tests.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_repl_stream import make_pair, random_ops, tree_digest, use_data_path
from tests.unit.test_tls_channel_fast import node2_server

from hvha.replication import lane, ops, tls, wire
from hvha.replication.lane import Lane
from hvha.replication.stream import Mode
from hvha.replication.wire import FrameType

MIB = 1 << 20

pytestmark = pytest.mark.skipif(not lane.available()[0],
                                reason=f"native lane not built: {lane.available()[1]}")


@pytest.fixture
def pair(certs: dict[str, tls.NodeCreds]) -> Iterator[tuple[Lane, tls.Channel]]:
    """A Lane client (node1) connected to a Python TLS server (node2)."""
    with node2_server(certs) as (address, got):
        client = Lane.connect(address, certs["node1"], "node2", 10)
    tls.check_peer(client, "node2")
    try:
        yield client, got["server"]
    finally:
        client.close()
        got["server"].close()


def test_a_frame_cut_by_a_read_timeout_is_resumed(pair: tuple[Lane, tls.Channel]) -> None:
    client, server = pair
    client.timeout = 0.2
    cases = [(b"small" * 100, [10, 100]),  # inside the header, inside the payload
             (random.Random(1).randbytes(3 * MIB + 5), [100, 200_000, 2 * MIB])]  # large
    for payload, cuts in cases:
        raw = wire.encode_frame(FrameType.REPLY, 42, payload)
        for a, b in zip([0, *cuts], cuts, strict=False):
            server.sendall(raw[a:b])  # part of the frame, then nothing for a while
            with pytest.raises(TimeoutError):
                client.read()
        server.sendall(raw[cuts[-1]:])
        assert client.read() == wire.Frame(FrameType.REPLY, 42, payload)


def test_one_thread_reads_while_others_send(pair: tuple[Lane, tls.Channel]) -> None:
    """The server echoes every frame; three threads send through the lane at once while the
    main thread reads the echoes: every frame comes back intact (each thread's in order)."""
    client, server = pair
    reader = wire.FrameReader(server)
    n_each = 300

    def echo() -> None:
        for _ in range(3 * n_each):
            f = reader.read()
            server.sendall(wire.encode_frame(f.type, f.seq, bytes(f.payload)))

    def send(k: int) -> None:
        rng = random.Random(k)
        for i in range(n_each):
            size = rng.choice([0, 16, 4096, 70_000, 300_000])
            client.sendall(wire.encode_frame(FrameType.OP, k * 10_000 + i,
                                             bytes([k]) * size))

    threads = [threading.Thread(target=echo)] + [
        threading.Thread(target=send, args=(k,)) for k in (1, 2, 3)]
    for t in threads:
        t.start()
    last = {1: -1, 2: -1, 3: -1}
    for _ in range(3 * n_each):
        f = client.read()
        k, i = divmod(f.seq, 10_000)
        assert i == last[k] + 1, f"thread {k}'s frames out of order"
        assert f.payload == bytes([k]) * len(f.payload)
        last[k] = i
    for t in threads:
        t.join(10)


def test_closing_from_another_thread_wakes_a_blocked_read(
        pair: tuple[Lane, tls.Channel]) -> None:
    client, _server = pair
    client.timeout = None
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            client.read()
        except BaseException as exc:  # what the read raised is the result
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    client.close()  # the handle is freed once the blocked call returns, not under it
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert len(errors) == 1 and isinstance(errors[0], (wire.ConnectionClosed, ConnectionError))
    with pytest.raises(wire.ConnectionClosed):
        client.read()
    with pytest.raises(wire.ConnectionClosed):
        client.sendall(b"x")


def test_the_server_must_name_the_expected_node(certs: dict[str, tls.NodeCreds]) -> None:
    srv = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        raw, _ = srv.accept()
        with contextlib.suppress(OSError, tls.PeerRejected):
            tls.accept(raw, tls.server_context(certs["node3"]), "node1", 5)

    t = threading.Thread(target=accept)
    t.start()
    with pytest.raises(OSError, match="handshake"):
        Lane.connect(srv.getsockname(), certs["node1"], "node2", 5)  # node3 answers
    t.join(10)
    srv.close()


@pytest.mark.parametrize("which", ["native-primary", "native-secondary"])
def test_nodes_with_and_without_the_lane_replicate_to_each_other(
        tmp_path: Path, certs: dict[str, tls.NodeCreds], monkeypatch: pytest.MonkeyPatch,
        which: str) -> None:
    """Nodes of different builds (one without the lane), as during an upgrade: same TLS 1.3,
    same frames, the same result."""
    use_data_path(which, monkeypatch)
    with make_pair(tmp_path, certs) as pair:
        pair.stream.connect()
        assert isinstance(pair.stream._sock, Lane) == (which == "native-primary")
        assert pair.stream.try_mark_in_sync()
        random_ops(pair, random.Random(11), 300)
        pair.do(ops.Fsync(None))
        assert (pair.applier.served_by == "native lane") == (which == "native-secondary")
        st = pair.stream.status()
        assert st.mode is Mode.CONNECTED and st.in_sync and pair.dirty.is_clean()
        assert tree_digest(pair.prim) == tree_digest(pair.sec)


def _payload(case: str) -> bytes:
    if case == "fsync flag 2":  # an Fsync whose "path present" byte is neither 0 nor 1
        good = wire.encode_op(ops.Fsync(None))  # tag, 0 (no path), 0 (not datasync)
        return good[:1] + b"\x02" + good[2:]
    if case == "write length":  # a Write whose data length disagrees with the frame's
        good = wire.encode_op(ops.Write("f", 0, b"x" * 300_000))
        return good[:-1]
    path = {"escape": "../escape", "absolute": "/abs", "through a symlink": "link/escape"}[case]
    return wire.encode_op(ops.Write(path, 0, b"y" * 200_000))


@pytest.mark.parametrize("case", ["fsync flag 2", "write length", "escape", "absolute",
                                  "through a symlink"])
def test_the_native_secondary_refuses_what_the_python_one_refuses(
        tmp_path: Path, certs: dict[str, tls.NodeCreds], case: str) -> None:
    """Malformed ops end the session with a protocol error; unsafe paths are never written
    (the lane leaves anything it does not fully understand to the Python applier)."""
    from hvha.replication.applier import Applier
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "f").write_bytes(b"")
    (root / "link").symlink_to(outside)
    with Applier(root, node="node2", peer="node1", module="m",
                 ctx=tls.server_context(certs["node2"])) as app:
        chan = tls.connect(app.address, tls.client_context(certs["node1"]), "node2", 5)
        with chan:
            chan.sendall(wire.encode_frame(FrameType.HELLO, 0,
                                           wire.Hello("node1", "m", {}).encode()))
            reader = wire.FrameReader(chan)
            assert wire.decode_hello(reader.read().payload).accept
            chan.sendall(wire.encode_frame(FrameType.OP, 1, _payload(case)))
            got = reader.read()
        assert app.served_by == "native lane"
    if case in ("fsync flag 2", "write length"):
        assert got.type == FrameType.ERROR, got
    else:
        assert got.type in (FrameType.NACK, FrameType.SKIPPED), got
    assert list(outside.iterdir()) == [] and (root / "f").read_bytes() == b""
    assert sorted(p.name for p in root.iterdir()) == ["f", "link"]
