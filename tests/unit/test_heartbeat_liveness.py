"""Liveness on a fake monotonic clock, config checks, and frame handling without sockets."""

from __future__ import annotations

import logging

import pytest

from hvha.agent.frames import HEARTBEAT_KEY_PURPOSE, cluster_id, derive_key, encode
from hvha.agent.heartbeat import (
    HeartbeatConfig,
    HeartbeatNetwork,
    HeartbeatService,
)
from hvha.agent.liveness import LinkState, Liveness, Reciprocity


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_never_heard_is_not_alive() -> None:
    clock = FakeClock()
    live = Liveness(["lan", "crossover"], timeout=5.0, clock=clock)
    assert not live.peer_alive()
    assert live.last_heard() is None
    assert live.age("lan") is None
    assert live.state("lan") is LinkState.DOWN


def test_one_silent_network_keeps_peer_alive() -> None:
    clock = FakeClock()
    live = Liveness(["lan", "crossover"], timeout=5.0, clock=clock)
    for _ in range(20):  # only "lan" carries frames, for 20 s
        live.heard("lan")
        clock.advance(1.0)
    assert live.peer_alive()
    assert live.state("lan") is LinkState.UP
    assert live.state("crossover") is LinkState.DOWN
    assert live.age("lan") == pytest.approx(1.0)
    assert live.snapshot()["crossover"] == {"state": "down", "age": None}


def test_all_networks_silent_past_timeout_is_dead_then_alive_again() -> None:
    clock = FakeClock()
    live = Liveness(["lan", "crossover"], timeout=5.0, clock=clock)
    live.heard("lan")
    clock.advance(0.5)
    live.heard("crossover")
    last = clock.now
    clock.advance(4.9)
    assert live.peer_alive()  # crossover heard 4.9 s ago
    assert live.state("lan") is LinkState.DOWN  # lan silent for 5.4 s
    clock.advance(0.2)
    assert not live.peer_alive()
    assert live.last_heard() == last
    assert {live.state(n) for n in live.networks} == {LinkState.DOWN}
    live.heard("crossover")
    assert live.peer_alive()
    assert live.state("crossover") is LinkState.UP


def test_explicit_now_and_stale_now_ignored() -> None:
    live = Liveness(["lan"], timeout=3.0, clock=lambda: 0.0)
    live.heard("lan", now=100.0)
    live.heard("lan", now=90.0)  # out-of-order caller: never moves last-heard backwards
    assert live.last_heard() == 100.0
    assert live.peer_alive(now=102.9)
    assert not live.peer_alive(now=103.0)


def test_unknown_network_is_a_caller_bug() -> None:
    live = Liveness(["lan"], timeout=3.0)
    with pytest.raises(KeyError):
        live.heard("wifi")


NETS = [("lan", "10.0.0.1", "10.0.0.2"), ("crossover", "192.168.9.1", "192.168.9.2")]


def config(**overrides: object) -> HeartbeatConfig:
    fields: dict[str, object] = {
        "node": "a",
        "peer": "b",
        "cluster": "lab",
        "key": b"k" * 32,
        "networks": NETS,
    }
    fields.update(overrides)
    return HeartbeatConfig(**fields)  # type: ignore[arg-type]


def test_config_defaults_and_normalised_networks() -> None:
    cfg = config()
    assert (cfg.interval, cfg.timeout, cfg.port) == (1.0, 5.0, 4800)
    assert cfg.networks == (
        HeartbeatNetwork("lan", "10.0.0.1", "10.0.0.2"),
        HeartbeatNetwork("crossover", "192.168.9.1", "192.168.9.2"),
    )
    assert "k" * 32 not in repr(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"interval": 0.05}, "interval must be at least 0.1 s"),
        ({"interval": float("nan")}, "interval must be at least 0.1 s"),
        ({"interval": 1.0, "timeout": 2.9}, r"timeout \(2.9 s\) must be at least 3 x"),
        ({"port": 0}, "port"),
        ({"peer": "a"}, "must differ"),
        ({"node": "n" * 65}, "node name"),
        ({"key": b"short"}, "at least 16 bytes"),
        ({"networks": []}, "at least one heartbeat network"),
        ({"networks": [NETS[0], NETS[0]]}, "unique"),
        ({"networks": [("lan", "eth0", "10.0.0.2")]}, "'lan'"),
        ({"networks": [("lan", "10.0.0.1", "fe80::2")]}, "IP versions differ"),
        ({"networks": [("lan", "10.0.0.1", "0.0.0.0")]}, "unicast"),
    ],
)
def test_config_rejections(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_config_minimum_ratio_accepted() -> None:
    cfg = config(interval=0.1, timeout=0.3)  # 3 * 0.1 is 0.30000000000000004 in floats
    assert cfg.timeout == 0.3


# -- HeartbeatService datagram handling, without sockets -----------------------------------


def test_dropped_frames_are_counted_and_logged_once_per_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    key = derive_key(b"secret", HEARTBEAT_KEY_PURPOSE)
    service = HeartbeatService(config(key=key), incarnation=1, clock=clock, log_every=10.0)
    lan = service._links[0]
    with caplog.at_level(logging.WARNING, logger="hvha.agent.heartbeat"):
        for _ in range(100):
            service._on_datagram(lan, b"junk", ("10.0.0.2", 4800))
        clock.advance(10.0)
        service._on_datagram(lan, b"junk", ("10.0.0.2", 4800))
    assert service.counters.dropped_malformed == 101
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "(99 similar suppressed)" in messages[1]


def test_service_classifies_authentic_frames() -> None:
    clock = FakeClock()
    key = derive_key(b"secret", HEARTBEAT_KEY_PURPOSE)
    got: list[tuple[str, bytes]] = []
    states: list[bool] = []
    service = HeartbeatService(
        config(key=key),
        incarnation=1,
        clock=clock,
        on_peer_payload=lambda net, f: got.append((net, f.payload)),
        on_peer_state=states.append,
    )
    lan, crossover = service._links

    def frame(sender: str, seq: int, incarnation: int = 4) -> bytes:
        cid = cluster_id("lab")
        return encode(
            key, cluster_id=cid, sender=sender, incarnation=incarnation, seq=seq, sent_ms=0
        )

    service._on_datagram(lan, frame("b", 1), None)
    service._on_datagram(crossover, frame("b", 1), None)  # same seq, other network
    service._on_datagram(lan, frame("b", 1), None)  # re-sent capture
    service._on_datagram(lan, frame("a", 9), None)  # our own name: reflected
    service._on_datagram(lan, frame("b", 2, incarnation=3), None)  # older incarnation
    c = service.counters
    assert (c.received_ok, c.dropped_duplicate, c.dropped_replay, c.dropped_wrong_sender) == (
        1,
        1,
        2,
        1,
    )
    assert got == [("lan", b"")] and states == [True]
    assert service.status()["networks"]["crossover"]["state"] == "up"  # credited by the copy
    clock.advance(5.0)
    service._update_states()
    assert states == [True, False] and not service.peer_alive()


def test_failing_payload_callback_keeps_last_good_payload() -> None:
    answers: list[object] = [b"v1", RuntimeError("agent bug"), b"x" * 70_000]

    def payload() -> bytes:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, bytes)
        return answer

    service = HeartbeatService(config(), incarnation=1, payload=payload, clock=FakeClock())
    assert [service._current_payload() for _ in range(3)] == [b"v1", b"v1", b"v1"]
    assert service.payload_errors == 2


# ------------------------------------------------------------ Reciprocity (one-way partitions)
def test_a_peer_that_keeps_hearing_us_is_reciprocal() -> None:
    clock = FakeClock()
    r = Reciprocity(timeout=1.5, clock=clock)
    assert r.hears_us()  # nothing reported yet: benefit of the doubt
    for _ in range(50):
        clock.advance(0.3)
        r.report(250)
        assert r.hears_us()


def test_a_peer_that_stops_hearing_us_is_given_up_after_the_timeout() -> None:
    """A one-way partition: the peer's heartbeats still arrive, each saying it last heard
    this node longer ago."""
    clock = FakeClock()
    r = Reciprocity(timeout=1.5, clock=clock)
    for _ in range(10):  # a link that worked for a while
        r.report(100)
        clock.advance(0.3)
    r.report(100)
    cut = clock.now - 0.1
    deaf = []
    for _ in range(10):
        clock.advance(0.3)
        r.report(int(1000 * (clock.now - cut)))
        deaf.append((round(clock.now - cut, 1), r.hears_us()))
    assert deaf[:4] == [(0.4, True), (0.7, True), (1.0, True), (1.3, True)]
    assert all(not h for t, h in deaf if t >= 1.5), deaf
    clock.advance(0.3)
    r.report(50)  # the link healed
    assert r.hears_us()


def test_a_peer_that_never_heard_us_is_given_up_after_the_timeout_from_its_first_report(
        ) -> None:
    clock = FakeClock()
    r = Reciprocity(timeout=1.5, clock=clock)
    r.report(-1)
    clock.advance(1.4)
    r.report(-1)
    assert r.hears_us()
    clock.advance(0.2)
    r.report(-1)
    assert not r.hears_us()
    r.reset()  # the peer died: its next life starts with the benefit of the doubt
    assert r.hears_us()
    r.report(-1)
    assert r.hears_us()


def test_late_reports_never_move_the_last_hearing_back() -> None:
    clock = FakeClock()
    r = Reciprocity(timeout=1.5, clock=clock)
    r.report(0)
    clock.advance(1.0)
    r.report(5000)  # a report from before (reordered), or from another network
    clock.advance(0.4)
    assert r.hears_us()
    clock.advance(0.2)
    assert not r.hears_us()


def test_a_peer_that_last_heard_our_previous_life_gets_the_grace_period() -> None:
    """This agent restarted: the peer's first heartbeats still say it last heard this node a
    minute ago (its previous incarnation); that is no one-way partition yet."""
    clock = FakeClock()
    r = Reciprocity(timeout=1.5, clock=clock)
    r.report(60_000)
    assert r.hears_us()
    clock.advance(0.3)
    r.report(60_300)
    assert r.hears_us()
    clock.advance(0.3)
    r.report(100)  # it hears this node's new life (0.1 s ago)
    clock.advance(1.3)
    assert r.hears_us()
    clock.advance(0.2)
    assert not r.hears_us()  # and then not for the timeout: deaf again
