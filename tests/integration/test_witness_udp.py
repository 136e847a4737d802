"""The witness and its clients over real UDP, on loopback addresses only (127.0.0.0/8).

Covers what unit tests cannot: leases granted, refused, expired and released between two nodes
through the kernel; hostile datagrams (wrong key, wrong cluster, replayed captures) dropped and
counted by the witness; forged or stale replies ignored by the client; a witness restart
(acquire refused during the grace, renew allowed); the real `hvha witness` process stopped by
SIGTERM with exit code 0; ICMP echo on loopback. Leases are short but every timing assertion is
a lower bound or has seconds of slack (2 cores, tests in parallel). Warnings are errors, so a
leaked socket or task fails the test.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hvha.agent.frames import FrameKind, cluster_id, decode, derive_key, encode
from hvha.agent.witness import (
    WITNESS_KEY_PURPOSE,
    Arbiter,
    Grant,
    WitnessServer,
    encode_reply,
    encode_request,
    make_claims,
    parse_reply,
    parse_request,
)
from hvha.agent.witness_client import (
    LeaseView,
    PingWitness,
    WitnessClient,
    WitnessUnreachable,
    lease_valid_until,
)

SECRET = b"integration witness secret"
KEY = derive_key(SECRET, WITNESS_KEY_PURPOSE)
CID = cluster_id("lab")
LEASE = 0.5
WITNESS = "127.0.0.1"


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def client(node: str, source: str, port: int, lease: float = LEASE, **kw: float) -> WitnessClient:
    return WitnessClient("lab", node, SECRET, WITNESS, port, lease, source=source,
                         timeout=kw.get("timeout", 1.0))


async def ask(c: WitnessClient, module: str, mode: str) -> LeaseView:
    return (await c.request([(module, mode)]))[module]


async def until(probe: Callable[[], Awaitable[bool]], within: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if await probe():
                return True
        except WitnessUnreachable:
            pass
        await asyncio.sleep(every)
    return False


def request_frame(sender: str, incarnation: int, seq: int, nonce: str, *, key: bytes = KEY,
                  cid: bytes = CID) -> bytes:
    payload = encode_request(nonce, make_claims([("probe", "release")]))
    return encode(key, cluster_id=cid, sender=sender, incarnation=incarnation, seq=seq,
                  sent_ms=1, payload=payload, kind=FrameKind.WITNESS_REQUEST)


async def recv(sock: socket.socket, within: float) -> bytes | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            data, _ = await loop.sock_recvfrom(sock, 65535)
            return data
    except TimeoutError:
        return None


def udp(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((address, 0))
    return sock


def assert_no_leaked_tasks() -> None:
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


# -- two nodes, one in-process witness -------------------------------------------------------


async def two_nodes_share_one_witness() -> None:
    port = free_port(WITNESS)
    server = WitnessServer(Arbiter(LEASE), cluster="lab", secret=SECRET, host=WITNESS, port=port)
    node1, node2 = client("node1", "127.0.0.2", port), client("node2", "127.0.0.3", port)
    async with server:
        # after the start-up grace (0.6 s) node1 gets m1
        assert await until(lambda: _granted(node1, "m1", "acquire"), 5.0)
        got = await ask(node1, "m1", "renew")
        assert got.granted and got.holder == "node1" and got.ttl == LEASE
        assert got.valid_until == pytest.approx(lease_valid_until(got.sent_at, LEASE, LEASE))
        assert got.valid_until <= got.sent_at + LEASE - LEASE / 5
        last_sent, belief = got.sent_at, got.valid_until

        denied = await ask(node2, "m1", "acquire")
        assert not denied.granted and denied.holder == "node1" and 0 < denied.ttl <= LEASE
        assert denied.valid_until == -float("inf")
        assert not (await ask(node2, "m1", "renew")).granted  # renew never steals either

        # node1 falls silent: node2 gets m1 once node1's lease expired at the witness
        assert await until(lambda: _granted(node2, "m1", "acquire"), LEASE + 5.0)
        got_at = time.monotonic()
        assert got_at >= last_sent + LEASE  # never before the lease could have ended
        assert got_at >= belief + LEASE / 5  # node1 stopped believing a margin earlier
        assert (await ask(node1, "m1", "renew")).holder == "node2"

        released = await ask(node2, "m1", "release")
        assert released == LeaseView(False, None, 0.0, released.sent_at, -float("inf"))
        assert (await ask(node1, "m1", "acquire")).granted  # at once, no expiry wait

        # 1024 modules in one call: split into several frames, all granted
        before = node1.counters.requests_sent
        many = await node1.request([(f"vm-{i:04d}", "acquire") for i in range(1024)])
        assert len(many) == 1024 and all(v.granted for v in many.values())
        assert node1.counters.requests_sent - before >= 3
        assert server.counters.replies_sent == server.counters.received_ok
        assert node1.counters.ignored_wrong_nonce == node1.counters.ignored_bad_frame == 0
    assert_no_leaked_tasks()


async def _granted(c: WitnessClient, module: str, mode: str) -> bool:
    return (await ask(c, module, mode)).granted


def test_two_nodes_share_one_witness() -> None:
    asyncio.run(two_nodes_share_one_witness())
    gc.collect()  # an unclosed socket would surface here as a ResourceWarning error


async def hostile_requests_are_dropped() -> None:
    port = free_port(WITNESS)
    server = WitnessServer(Arbiter(LEASE), cluster="lab", secret=SECRET, host=WITNESS, port=port,
                           incarnation=7)
    attacker = udp("127.0.0.9")
    target = (WITNESS, port)
    try:
        async with server:
            c = server.counters
            valid = request_frame("node3", 1, 100, "ab" * 16)
            attacker.sendto(valid, target)
            reply = await recv(attacker, 2.0)
            assert reply is not None
            frame = decode(KEY, reply, cluster_id=CID)
            assert (frame.kind, frame.sender, frame.incarnation) == (FrameKind.WITNESS_REPLY,
                                                                     "witness", 7)
            assert parse_reply(frame.payload) == ("ab" * 16, {"probe": Grant(False, None, 0.0)})
            assert c.received_ok == 1

            hostile = [
                (valid, "dropped_replay"),  # a captured request, re-sent
                (request_frame("node3", 1, 30, "cd" * 16), "dropped_replay"),  # behind window
                (request_frame("node3", 0, 200, "cd" * 16), "dropped_replay"),  # older incarn.
                (request_frame("node3", 1, 106, "ef" * 16, key=b"k" * 32), "dropped_bad_mac"),
                (request_frame("node3", 1, 107, "ef" * 16, cid=cluster_id("x")),
                 "dropped_wrong_cluster"),
                (b"hello", "dropped_malformed"),
                (encode(KEY, cluster_id=CID, sender="node3", incarnation=1, seq=108, sent_ms=1,
                        payload=b"{}", kind=FrameKind.WITNESS_REQUEST), "dropped_malformed"),
                (encode(KEY, cluster_id=CID, sender="node3", incarnation=1, seq=109, sent_ms=1,
                        payload=reply, kind=FrameKind.WITNESS_REPLY), "dropped_malformed"),
            ]
            for data, counter in hostile:
                before = getattr(c, counter)
                attacker.sendto(data, target)
                counted = _const(lambda n=counter, b=before: getattr(c, n) == b + 1)
                assert await until(counted, 2.0), counter
            assert await recv(attacker, 0.3) is None  # nothing answered
            assert c.received_ok == 1 and c.replies_sent == 1

            # still served: an unseen seq inside the window (a late datagram) is accepted
            attacker.sendto(request_frame("node3", 1, 99, "12" * 16), target)
            assert await recv(attacker, 2.0) is not None
    finally:
        attacker.close()
    assert_no_leaked_tasks()


def _const(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return predicate()

    return probe


def test_hostile_requests_are_dropped_and_counted() -> None:
    asyncio.run(hostile_requests_are_dropped())
    gc.collect()


async def witness_restart_has_a_grace_period() -> None:
    port = free_port(WITNESS)
    node1, node2 = client("node1", "127.0.0.2", port), client("node2", "127.0.0.3", port)
    first = WitnessServer(Arbiter(LEASE), cluster="lab", secret=SECRET, host=WITNESS, port=port)
    async with first:
        assert await until(lambda: _granted(node1, "m1", "acquire"), 5.0)
    # The witness restarts and has forgotten node1's lease; a longer lease (grace 2.4 s) keeps
    # the in-grace assertions far from the deadline on a loaded machine.
    restarted_at = time.monotonic()
    second = WitnessServer(Arbiter(2.0), cluster="lab", secret=SECRET, host=WITNESS, port=port)
    async with second:
        fresh = await ask(node2, "m2", "acquire")
        assert not fresh.granted and fresh.holder is None  # nobody holds it, but grace
        renewed = await ask(node1, "m1", "renew")
        assert renewed.granted and renewed.ttl == 2.0
        assert renewed.valid_until == pytest.approx(lease_valid_until(renewed.sent_at, 2.0, LEASE))
        assert (await ask(node2, "m1", "acquire")).holder == "node1"
        assert (await ask(node2, "m1", "renew")).holder == "node1"
        assert time.monotonic() - restarted_at < 2.4, "too slow to test the grace period"

        assert await until(lambda: _granted(node2, "m2", "acquire"), 6.0, every=0.1)
        assert time.monotonic() >= restarted_at + 2.4
    assert_no_leaked_tasks()


def test_witness_restart_denies_acquire_during_grace_but_allows_renew() -> None:
    asyncio.run(witness_restart_has_a_grace_period())
    gc.collect()


# -- the client against a fake witness ---------------------------------------------------


async def client_ignores_forged_and_stale_replies() -> None:
    fake, other = udp("127.0.0.4"), udp("127.0.0.5")
    port = fake.getsockname()[1]
    c = WitnessClient("lab", "node1", SECRET, "127.0.0.4", port, LEASE, timeout=2.0,
                      source="127.0.0.2", incarnation=42)
    loop = asyncio.get_running_loop()

    def reply(nonce: str, *, key: bytes = KEY, kind: int = FrameKind.WITNESS_REPLY,
              sender: str = "witness") -> bytes:
        payload = encode_reply(nonce, {"m": Grant(True, "node1", LEASE)})
        return encode(key, cluster_id=CID, sender=sender, incarnation=1, seq=1, sent_ms=1,
                      payload=payload, kind=kind)

    async def fake_witness() -> None:
        data, addr = await loop.sock_recvfrom(fake, 65535)
        frame = decode(KEY, data, cluster_id=CID)
        assert (frame.sender, frame.incarnation, frame.kind) == ("node1", 42,
                                                                 FrameKind.WITNESS_REQUEST)
        nonce, claims = parse_request(frame.payload)
        assert claims == make_claims([("m", "acquire")]) and len(nonce) == 32
        fake.sendto(reply("00" * 16), addr)  # authentic, but an old nonce
        other.sendto(reply(nonce), addr)  # right nonce, wrong source
        fake.sendto(reply(nonce, key=b"k" * 32), addr)  # forged
        fake.sendto(data, addr)  # the request reflected back
        fake.sendto(reply(nonce, sender="node2"), addr)  # not from the witness
        await asyncio.sleep(0.05)
        fake.sendto(reply(nonce), addr)

    try:
        responder = asyncio.create_task(fake_witness())
        got = await c.request([("m", "acquire")])
        await responder
        assert got["m"].granted and got["m"].holder == "node1"
        assert c.counters.as_dict() == {
            "requests_sent": 1, "send_errors": 0, "recv_errors": 0, "replies_ok": 1,
            "timeouts": 0, "ignored_wrong_source": 1, "ignored_bad_frame": 3,
            "ignored_wrong_nonce": 1,
        }

        # silence: a specific exception after the timeout, nothing else
        quiet = WitnessClient("lab", "node1", SECRET, "127.0.0.4", port, LEASE, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(WitnessUnreachable, match="no answer"):
            await quiet.request([("m", "renew")])
        assert time.monotonic() - started >= 0.3 and quiet.counters.timeouts == 1

        # network errors become WitnessUnreachable, never OSError
        cases = [
            ("127.255.255.255", None),  # sendto: EACCES (broadcast)
            ("127.0.0.4", "192.0.2.1"),  # bind: EADDRNOTAVAIL, not a local address
        ]
        for address, source in cases:
            broken = WitnessClient("lab", "node1", SECRET, address, port, LEASE, timeout=0.3,
                                   source=source)
            with pytest.raises(WitnessUnreachable, match="cannot"):
                await broken.request([("m", "renew")])
            assert broken.counters.send_errors == 1
        assert await c.request([]) == {}
    finally:
        fake.close()
        other.close()
    assert_no_leaked_tasks()


def test_client_ignores_forged_and_stale_replies() -> None:
    asyncio.run(client_ignores_forged_and_stale_replies())
    gc.collect()


# -- the real `hvha witness` process ---------------------------------------------------------

SHIM = (
    "import sys, hvha.cli.main as m\n"
    "if 'witness' not in m.COMMAND_MODULES:\n"
    "    m.COMMAND_MODULES = (*m.COMMAND_MODULES, 'witness')\n"
    "sys.exit(m.main(sys.argv[1:]))\n"
)


def start_cli(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-c", SHIM, "witness", *args],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)


def stop_cli(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


async def cli_round(port: int) -> None:
    node1, node2 = client("node1", "127.0.0.2", port), client("node2", "127.0.0.3", port)
    # the first answer comes within the grace (lease 2 s: grace 2.4 s): acquire refused
    answers: list[LeaseView] = []

    async def probe() -> bool:
        answers.append(await ask(node2, "m2", "acquire"))
        return True

    assert await until(probe, 20.0, every=0.1), "the witness never answered"
    assert not answers[0].granted and answers[0].holder is None
    # allowed in grace; after the restart it is how node1 keeps the module it held
    assert (await ask(node1, "m1", "renew")).granted
    denied = await ask(node2, "m1", "acquire")
    assert not denied.granted and denied.holder == "node1"


def test_real_cli_process_serves_restarts_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_bytes(SECRET + b"\n")  # a trailing newline is not part of the secret
    key.chmod(0o600)
    state, log = tmp_path / "state", tmp_path / "witness.log"
    port = free_port(WITNESS)
    args = ["--cluster", "lab", "--secret-file", str(key), "--listen", WITNESS,
            "--port", str(port), "--lease", "2s", "--state-dir", str(state)]
    for round_no in (1, 2):
        proc = start_cli(args, log)
        try:
            asyncio.run(cli_round(port))
        finally:
            code = stop_cli(proc)
        assert code == 0, log.read_text()
        assert (state / "incarnation").read_text().strip() == str(round_no)
    gc.collect()
    text = log.read_text()
    assert text.count("listening on 127.0.0.1 port") == 2
    assert "module m1: renew granted to node1" in text
    assert "module m2: acquire denied to node2 (start-up grace" in text
    assert "module m1: acquire denied to node2 (held by node1" in text
    assert text.count("witness stopping") == 2
    assert SECRET.decode() not in text and "Traceback" not in text
    assert os.stat(key).st_mode & 0o777 == 0o600


# -- ping witness ----------------------------------------------------------------------------


def test_ping_witness_on_loopback() -> None:
    async def run() -> tuple[bool, bool]:
        assert_no_leaked_tasks()
        ping = PingWitness(["127.0.0.1", "127.0.0.2"], timeout=3.0)
        ok = await ping.reachable()
        assert_no_leaked_tasks()
        return ok, ping.replies == 1

    ok, counted = asyncio.run(run())
    gc.collect()
    if not ok:
        pytest.skip("no ICMP socket here (ping_group_range excludes us and no CAP_NET_RAW)")
    assert counted


def test_ping_witness_without_icmp_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class NoIcmp(socket.socket):
        def __init__(self, family: int = -1, kind: int = -1, proto: int = -1,
                     fileno: int | None = None) -> None:
            if proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6):
                raise PermissionError(1, "Operation not permitted")
            super().__init__(family, kind, proto, fileno)

    monkeypatch.setattr(socket, "socket", NoIcmp)
    ping = PingWitness(["127.0.0.1", "::1"], timeout=0.5)
    assert asyncio.run(ping.reachable()) is False
    assert asyncio.run(ping.reachable()) is False
    warnings = [r for r in caplog.records if "no ICMP socket" in r.getMessage()]
    assert len(warnings) == 1  # warned once, not at every check
