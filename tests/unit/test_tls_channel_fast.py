"""tls.Channel over loopback: timeouts (changed between calls), EOF, shutdown waking a blocked
reader, and one reading plus one writing thread at once on each end."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from hvha.replication import tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.NodeCreds]:
    base = tmp_path_factory.mktemp("tls")
    tls.create_ca(base / "ca")
    return {n: tls.issue_node_cert(base / "ca", n, base / n) for n in ("node1", "node2")}


@contextlib.contextmanager
def node2_server(certs: dict[str, tls.NodeCreds]) -> Iterator[tuple[tuple[str, int],
                                                                   dict[str, tls.Channel]]]:
    """A listening socket whose first connection (from node1) is accepted as node2, in a
    thread: yields (address, {"server": channel} once the client has connected)."""
    srv = socket.create_server(("127.0.0.1", 0))
    got: dict[str, tls.Channel] = {}

    def accept() -> None:
        raw, _ = srv.accept()
        got["server"] = tls.accept(raw, tls.server_context(certs["node2"]), "node1", 10)

    t = threading.Thread(target=accept)
    t.start()
    try:
        yield srv.getsockname(), got
    finally:
        t.join(10)
        srv.close()


@pytest.fixture
def pair(certs: dict[str, tls.NodeCreds]) -> Iterator[tuple[tls.Channel, tls.Channel]]:
    with node2_server(certs) as (address, got):
        client = tls.connect(address, tls.client_context(certs["node1"]), "node2", 10)
    server = got["server"]
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def recv_exactly(chan: tls.Channel, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = chan.recv_into(view[got:])
        assert k, "unexpected end of stream"
        got += k
    return bytes(buf)


def test_timeout_loses_nothing_and_follows_changes(pair: tuple[tls.Channel, tls.Channel]
                                                   ) -> None:
    client, server = pair
    server.timeout = 0.2
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        server.recv(100)
    assert 0.15 < time.monotonic() - t0 < 2
    client.sendall(b"hello")
    assert recv_exactly(server, 5) == b"hello"
    # None: wait for data that comes later than the previous timeout
    server.timeout = None
    timer = threading.Timer(0.4, client.sendall, (b"late",))
    timer.start()
    assert recv_exactly(server, 4) == b"late"
    timer.join()
    # back to a short timeout: honoured again
    server.timeout = 0.05
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        server.recv(100)
    assert time.monotonic() - t0 < 1
    server.timeout = 0
    with pytest.raises(TimeoutError):
        server.recv(100)
    assert server.pending() == 0
    client.sendall(b"x" * 10)
    server.timeout = 5
    assert recv_exactly(server, 10) == b"x" * 10


def test_buffered_records_are_read_without_the_socket(pair: tuple[tls.Channel, tls.Channel]
                                                      ) -> None:
    client, server = pair
    for i in range(50):
        client.sendall(bytes([i]) * 100)
    server.timeout = 5
    assert recv_exactly(server, 5000) == b"".join(bytes([i]) * 100 for i in range(50))
    server.timeout = 0.05
    with pytest.raises(TimeoutError):
        server.recv(1)


def test_end_of_stream_reads_zero(pair: tuple[tls.Channel, tls.Channel]) -> None:
    client, server = pair
    client.sendall(b"last")
    client.shutdown()
    server.timeout = 5
    assert recv_exactly(server, 4) == b"last"
    assert server.recv(10) == b""
    assert server.recv(10) == b""


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_shutdown_wakes_a_blocked_reader(pair: tuple[tls.Channel, tls.Channel],
                                         timeout: float | None) -> None:
    _, server = pair
    server.timeout = timeout
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(server.recv(100))
        except OSError as exc:
            outcome.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    server.shutdown()
    t.join(5)
    assert not t.is_alive()
    assert outcome and (outcome[0] == b"" or isinstance(outcome[0], OSError))


def test_one_reader_and_one_writer_per_end(pair: tuple[tls.Channel, tls.Channel]) -> None:
    client, server = pair
    client.timeout = server.timeout = 10
    size = 4 * 1024 * 1024
    data = {c: os.urandom(size) for c in ("up", "down")}
    digests: dict[str, str] = {}
    errors: list[BaseException] = []

    def send(chan: tls.Channel, payload: bytes) -> None:
        try:
            view = memoryview(payload)
            for i in range(0, len(view), 37_000):
                chan.sendall(view[i:i + 37_000])
        except BaseException as exc:
            errors.append(exc)

    def receive(chan: tls.Channel, name: str) -> None:
        try:
            digests[name] = hashlib.sha256(recv_exactly(chan, size)).hexdigest()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(client, data["up"])),
               threading.Thread(target=send, args=(server, data["down"])),
               threading.Thread(target=receive, args=(server, "up")),
               threading.Thread(target=receive, args=(client, "down"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert digests == {c: hashlib.sha256(d).hexdigest() for c, d in data.items()}


def test_handshake_times_out_on_a_silent_peer(certs: dict[str, tls.NodeCreds]) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            tls.connect(srv.getsockname(), tls.client_context(certs["node1"]), "node2", 0.3)
        assert time.monotonic() - t0 < 3
    finally:
        srv.close()
