"""Two HeartbeatServices over real UDP, on loopback addresses only (127.0.0.0/8).

Covers what unit tests cannot: sockets bound per network, frames crossing the kernel, hostile
datagrams from a third socket, failure detection after the peer stops, broken networks not
silencing the others, and a clean shutdown (warnings are errors, so a leaked socket fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import Callable, Sequence

from hvha.agent.frames import HEARTBEAT_KEY_PURPOSE, Frame, cluster_id, derive_key, encode
from hvha.agent.heartbeat import HeartbeatConfig, HeartbeatNetwork, HeartbeatService

KEY = derive_key(b"integration secret", HEARTBEAT_KEY_PURPOSE)
CID = cluster_id("lab")
INTERVAL, TIMEOUT = 0.1, 0.5
A_NETS = [("n1", "127.0.0.1", "127.0.0.2"), ("n2", "127.0.0.3", "127.0.0.4")]
B_NETS = [("n1", "127.0.0.2", "127.0.0.1"), ("n2", "127.0.0.4", "127.0.0.3")]


def free_port(addresses: Sequence[str]) -> int:
    """A UDP port free on every address (probed, then released: a tiny race is acceptable)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
            with contextlib.ExitStack() as stack:
                try:
                    for addr in addresses[1:]:
                        s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                        s.bind((addr, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no UDP port free on all test addresses")


def config(
    node: str, peer: str, nets: Sequence[tuple[str, str, str]], port: int
) -> HeartbeatConfig:
    return HeartbeatConfig(
        node=node,
        peer=peer,
        cluster="lab",
        key=KEY,
        networks=tuple(HeartbeatNetwork(*n) for n in nets),
        interval=INTERVAL,
        timeout=TIMEOUT,
        port=port,
    )


async def wait_for(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def assert_no_leaked_tasks() -> None:
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


def frame(sender: str, incarnation: int, seq: int, payload: bytes, **kw: bytes) -> bytes:
    return encode(
        kw.get("key", KEY),
        cluster_id=kw.get("cid", CID),
        sender=sender,
        incarnation=incarnation,
        seq=seq,
        sent_ms=1,
        payload=payload,
    )


async def exchange_inject_and_fail_over() -> None:
    port = free_port(["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"])
    delivered: list[tuple[str, Frame]] = []
    a_states: list[bool] = []
    rounds = iter(range(10**6))
    a = HeartbeatService(
        config("alpha", "beta", A_NETS, port),
        incarnation=3,
        payload=lambda: b"alpha",
        on_peer_payload=lambda net, f: delivered.append((net, f)),
        on_peer_state=a_states.append,
    )
    b = HeartbeatService(
        config("beta", "alpha", B_NETS, port),
        incarnation=9,
        payload=lambda: b"beta-%d" % next(rounds),
    )
    injector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    injector.bind(("127.0.0.9", 0))
    a_addr = dict((n[0], (n[1], port)) for n in A_NETS)
    try:
        await a.start()
        await b.start()
        assert await wait_for(lambda: a.peer_alive() and b.peer_alive(), 3.0)
        await asyncio.sleep(5 * INTERVAL)  # several rounds on both networks

        status = a.status()
        assert status["peer_alive"] and status["peer_incarnation"] == 9
        assert {n: v["state"] for n, v in status["networks"].items()} == {"n1": "up", "n2": "up"}
        total = a.counters
        assert total.received_ok >= 3 and total.sent >= 6 and total.send_errors == 0
        assert total.dropped_duplicate >= 3  # the same seq came on the second network
        assert total.dropped_replay == total.dropped_bad_mac == 0
        assert b.latest_peer_frame is not None and b.latest_peer_frame.payload == b"alpha"

        # Hostile datagrams from a third socket.
        net, captured = delivered[-1]
        replayed = frame("beta", captured.incarnation, captured.seq, captured.payload)
        before = a.counters
        n_delivered = len(delivered)
        hostile = [
            (frame("beta", 10**6, 10**6, b"evil", key=b"w" * 32), "n1"),  # wrong key
            (replayed, net),  # a captured valid frame, re-sent where it was received
            (frame("beta", 2, 10**6, b"evil-old"), "n2"),  # an older incarnation of beta
            (frame("alpha", 10**6, 10**6, b"evil-self"), "n1"),  # our own name reflected
            (frame("beta", 10**6, 10**6, b"evil", cid=cluster_id("x")), "n2"),  # other cluster
            (b"hello", "n1"),
        ]
        for data, net_name in hostile:
            injector.sendto(data, a_addr[net_name])

        def dropped() -> int:
            c = a.counters
            return (
                c.dropped_bad_mac + c.dropped_replay + c.dropped_wrong_sender
                + c.dropped_wrong_cluster + c.dropped_malformed
            )  # fmt: skip

        assert await wait_for(lambda: dropped() == len(hostile), 2.0), a.counters
        after = a.counters
        assert after.dropped_bad_mac - before.dropped_bad_mac == 1
        assert after.dropped_replay - before.dropped_replay == 2
        assert after.dropped_wrong_sender - before.dropped_wrong_sender == 1
        assert after.dropped_wrong_cluster - before.dropped_wrong_cluster == 1
        assert after.dropped_malformed - before.dropped_malformed == 1
        assert await wait_for(lambda: len(delivered) > n_delivered, 1.0)  # real frames flow
        seqs = [f.seq for _, f in delivered]
        assert seqs == sorted(set(seqs))  # delivered once each, in order: no replay got in
        assert all(f.payload.startswith(b"beta-") for _, f in delivered)
        assert a.latest_peer_frame is not None and a.latest_peer_frame.incarnation == 9

        # Stop beta; keep replaying and forging meanwhile: alpha must still see it die.
        await b.stop()
        stopped_at = time.monotonic()

        async def keep_injecting() -> None:
            while True:
                injector.sendto(replayed, a_addr[net])
                injector.sendto(hostile[0][0], a_addr["n1"])
                await asyncio.sleep(INTERVAL / 2)

        noise = asyncio.create_task(keep_injecting())
        try:
            assert await wait_for(lambda: not a.peer_alive(), 5.0)
        finally:
            noise.cancel()
            await asyncio.gather(noise, return_exceptions=True)
        elapsed = time.monotonic() - stopped_at
        assert elapsed <= TIMEOUT + 2 * INTERVAL + 1.0, elapsed  # generous: not a benchmark
        assert await wait_for(lambda: a_states == [True, False], 2 * INTERVAL)
        assert a.status()["networks"]["n1"]["state"] == "down"
    finally:
        await b.stop()
        await a.stop()
        await a.stop()  # idempotent
        injector.close()
    assert_no_leaked_tasks()


def test_two_services_exchange_reject_hostile_frames_and_detect_death() -> None:
    asyncio.run(exchange_inject_and_fail_over())
    gc.collect()  # an unclosed socket would surface here as a ResourceWarning error


async def broken_networks_do_not_silence_the_others() -> None:
    addrs = [f"127.0.0.{i}" for i in range(1, 9)]
    port = free_port(addrs)
    a_nets = [
        ("n1", "127.0.0.1", "127.0.0.2"),
        ("bcast", "127.0.0.5", "127.255.255.255"),  # every send fails with EACCES
        ("late", "127.0.0.6", "127.0.0.7"),  # local address busy at start: bind retried
    ]
    b_nets = [
        ("n1", "127.0.0.2", "127.0.0.1"),
        ("bcast", "127.0.0.8", "127.0.0.5"),
        ("late", "127.0.0.7", "127.0.0.6"),
    ]
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.6", port))
    a = HeartbeatService(config("alpha", "beta", a_nets, port), incarnation=1)
    b = HeartbeatService(config("beta", "alpha", b_nets, port), incarnation=1)
    try:
        await a.start()
        await b.start()
        assert await wait_for(lambda: a.peer_alive() and b.peer_alive(), 3.0)
        per_net = a.network_counters()
        assert await wait_for(lambda: per_net["bcast"].send_errors >= 3, 2.0)
        assert per_net["bcast"].sent == 0
        assert per_net["late"].bind_errors >= 1 and not a.status()["networks"]["late"]["bound"]
        assert per_net["n1"].sent >= 3 and per_net["n1"].send_errors == 0
        # beta reaches alpha on "bcast" even though alpha cannot answer on it
        assert await wait_for(lambda: a.status()["networks"]["bcast"]["state"] == "up", 2.0)
        assert b.status()["networks"]["bcast"]["state"] == "down"

        blocker.close()  # the address frees up: the next round binds it
        assert await wait_for(lambda: a.status()["networks"]["late"]["state"] == "up", 2.0)
        assert await wait_for(lambda: b.status()["networks"]["late"]["state"] == "up", 2.0)
        assert a.peer_alive() and b.peer_alive()
    finally:
        await a.stop()
        await b.stop()
        blocker.close()
    assert_no_leaked_tasks()


def test_broken_networks_do_not_silence_the_others() -> None:
    asyncio.run(broken_networks_do_not_silence_the_others())
    gc.collect()
