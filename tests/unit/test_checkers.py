"""Checkers: failure counting and edge events with fake time, the set's life cycle, and each
probe type against cheap real things (a listening socket, a child process, /bin/sh)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hvha.agent.checkers import (
    CheckerEvent,
    CheckerSet,
    CheckerSpec,
    count_processes,
    icmp_ping,
    interface_state,
    tcp_connect,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


_DEFAULTS: dict[str, dict[str, Any]] = {
    "tcp": {"host": "127.0.0.1", "port": 1}, "process": {"process": "x"},
    "ping": {"host": "127.0.0.1"}, "interface": {"interface": "lo"},
    "script": {"command": "true"}, "vm_state": {}}


def spec(type_: str = "tcp", *, failures: int = 1, on_failure: str = "restart",
         interval: float = 10.0, timeout: float = 2.0, name: str | None = None,
         **params: Any) -> dict[str, Any]:
    defaults = _DEFAULTS[type_]
    return {"name": name or type_, "type": type_, "interval": interval, "timeout": timeout,
            "failures": failures, "on_failure": on_failure, "params": {**defaults, **params}}


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Scripted:
    """A probe returning a scripted sequence of results (then the last one forever)."""

    def __init__(self, results: list[bool]) -> None:
        self.results = results
        self.calls: list[float] = []
        self.clock: FakeTime | None = None

    async def __call__(self, s: CheckerSpec) -> tuple[bool, str]:
        self.calls.append(self.clock.now if self.clock else 0.0)
        ok = self.results[min(len(self.calls) - 1, len(self.results) - 1)]
        return ok, f"probe {len(self.calls)}"


def test_spec_from_dict_validates() -> None:
    s = CheckerSpec.from_dict(spec("process", process="/nginx: master/", min=1, max=2))
    assert (s.name, s.type, s.params["max"]) == ("process", "process", 2)
    with pytest.raises(ValueError, match="needs host, port"):
        CheckerSpec.from_dict({"type": "tcp", "params": {}})
    with pytest.raises(ValueError, match="unknown type"):
        CheckerSpec.from_dict({"type": "smoke"})
    with pytest.raises(ValueError, match="unique"):
        CheckerSet([spec(), spec()], None, lambda e: None)


def test_failure_counting_fires_once_and_recovery_once() -> None:
    events: list[CheckerEvent] = []
    cs = CheckerSet([spec(failures=3, on_failure="failover")], None, events.append)
    assert cs.record("tcp", False, "a") is None
    assert cs.record("tcp", False, "b") is None
    fired = cs.record("tcp", False, "c")
    assert fired == CheckerEvent("tcp", "tcp", "failover", False, "c (3 consecutive failures)")
    assert cs.record("tcp", False, "d") is None
    assert cs.record("tcp", True, "fine") == CheckerEvent("tcp", "tcp", "failover", True, "fine")
    assert cs.record("tcp", True, "fine") is None
    assert [e.ok for e in events] == [False, True]


def test_a_success_before_the_threshold_resets_the_count() -> None:
    events: list[CheckerEvent] = []
    cs = CheckerSet([spec(failures=2)], None, events.append)
    for ok in (False, True, False, True, False):
        cs.record("tcp", ok, "")
    assert events == []
    assert cs.status()[0]["failures"] == 1


def test_loop_with_fake_time_probes_every_interval_and_fires() -> None:
    t = FakeTime()
    probe = Scripted([True, False, False, True])
    probe.clock = t
    events: list[tuple[float, bool]] = []
    cs = CheckerSet([spec(failures=2, interval=5.0)], None,
                    lambda e: events.append((t.now, e.ok)),
                    clock=t.clock, sleep=t.sleep, probes={"tcp": probe})

    async def scenario() -> None:
        cs.start()
        cs.start()  # idempotent
        while len(probe.calls) < 5:
            await asyncio.sleep(0)
        await cs.stop()
        assert not cs.running
        assert [x for x in asyncio.all_tasks() if x is not asyncio.current_task()] == []

    run(scenario())
    assert probe.calls[:5] == [1005.0, 1010.0, 1015.0, 1020.0, 1025.0]
    assert events == [(1015.0, False), (1020.0, True)]
    assert all(s == 5.0 for s in t.sleeps)


def test_disabled_checkers_do_not_probe_and_restart_counting() -> None:
    t = FakeTime()
    probe = Scripted([False])
    events: list[CheckerEvent] = []
    cs = CheckerSet([spec(failures=2, interval=1.0)], None, events.append,
                    clock=t.clock, sleep=t.sleep, probes={"tcp": probe})

    async def scenario() -> None:
        cs.start()
        while len(probe.calls) < 1:
            await asyncio.sleep(0)
        cs.enabled = False
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(probe.calls) == 1 and events == []
        cs.enabled = True
        assert cs.status()[0]["failures"] == 0
        while len(probe.calls) < 3:
            await asyncio.sleep(0)
        await cs.stop()

    run(scenario())
    assert [e.ok for e in events] == [False]


def test_restart_rearms_but_a_fired_wait_checker_reports_its_recovery() -> None:
    events: list[CheckerEvent] = []
    cs = CheckerSet([spec("tcp"), spec("ping", on_failure="wait")], None, events.append)
    cs.record("tcp", False, "down")
    cs.record("ping", False, "down")

    async def cycle() -> None:
        cs.start()
        await cs.stop()

    run(cycle())
    assert cs.record("tcp", True, "up") is None, "restart checker re-armed: nothing to recover"
    assert cs.record("tcp", False, "down again") is not None, "and it can fire again"
    recovered = cs.record("ping", True, "back")
    assert recovered is not None and recovered.ok and recovered.action == "wait"


def test_hanging_or_broken_probes_count_as_failures() -> None:
    async def hang(s: CheckerSpec) -> tuple[bool, str]:
        await asyncio.sleep(100)
        return True, ""

    async def broken(s: CheckerSpec) -> tuple[bool, str]:
        raise RuntimeError("boom")

    def bad_callback(e: CheckerEvent) -> None:
        raise RuntimeError("callback bug")

    cs = CheckerSet([spec("tcp", timeout=0.05), spec("script")], None, bad_callback,
                    probes={"tcp": hang, "script": broken}, guard=0.0)
    ev = run(cs.check("tcp"))
    assert ev is not None and not ev.ok and "no answer within 0.05s" in ev.detail
    ev = run(cs.check("script"))
    assert ev is not None and "RuntimeError: boom" in ev.detail


# --- real probes ----------------------------------------------------------------------------

def test_tcp_probe_against_a_listening_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        ok, detail = run(tcp_connect("127.0.0.1", port, 2.0))
        assert ok, detail
    ok, detail = run(tcp_connect("127.0.0.1", port, 2.0))
    assert not ok and "refused" in detail.lower()


def test_process_probe_against_our_own_child(tmp_path: Path) -> None:
    name = f"hvhat{os.getpid()}"
    exe = tmp_path / name
    shutil.copy("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "31.4159"])
    try:
        assert count_processes(name) == 1
        assert count_processes(rf"/{name} 31\.4159/") == 1
        assert count_processes(name, same_netns=True) == 1
        cs = CheckerSet([spec("process", process=name, name="one"),
                         spec("process", process=name, min=2, name="two")], None, print)
        assert run(cs.check("one")) is None
        ev = run(cs.check("two"))
        assert ev is not None and "1 process(es)" in ev.detail and "want 2.." in ev.detail
    finally:
        child.kill()
        child.wait()
    assert count_processes(name) == 0


def test_script_probe_true_false_and_timeout(tmp_path: Path) -> None:
    events: list[CheckerEvent] = []
    cs = CheckerSet([spec("script", command="test -f marker", name="file"),
                     spec("script", command="sleep 30", timeout=0.2, name="slow")],
                    None, events.append, cwd=tmp_path, env={"X": "1"})
    assert run(cs.check("file")) is not None and events[-1].ok is False
    (tmp_path / "marker").touch()
    assert run(cs.check("file")) is not None and events[-1].ok is True
    ev = run(cs.check("slow"))
    assert ev is not None and "timed out" in ev.detail


def test_interface_probe() -> None:
    assert interface_state("lo")[0]
    ok, detail = interface_state("nosuchif0")
    assert not ok and "no such interface" in detail


def test_ping_probe_loopback() -> None:
    try:
        rtt = run(icmp_ping("127.0.0.1", 2.0))
    except PermissionError as exc:
        pytest.skip(f"no ICMP socket here: {exc}")
    assert 0 <= rtt < 2.0
    cs = CheckerSet([spec("ping", host="127.0.0.1", failures=1)], None, print)
    assert run(cs.check("ping")) is None


def test_vm_state_probe_asks_the_driver() -> None:
    class Drv:
        up = False

        async def running(self) -> bool:
            return self.up

    events: list[CheckerEvent] = []
    drv = Drv()
    cs = CheckerSet([spec("vm_state")], drv, events.append)  # type: ignore[arg-type]
    run(cs.check("vm_state"))
    drv.up = True
    run(cs.check("vm_state"))
    assert [(e.ok, e.detail.split(" (")[0]) for e in events] == [
        (False, "payload not running"), (True, "payload running")]
    none = CheckerSet([spec("vm_state")], None, events.append)
    assert "no payload driver" in (run(none.check("vm_state")) or events[-1]).detail


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
