"""run_script (timeouts kill the whole process group, bounded output, background children),
the SafeKit stop sequence, and ScriptDriver on small real scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hvha.drivers import base
from hvha.drivers.app import ScriptDriver
from hvha.drivers.base import (
    DriverError,
    DriverPayload,
    StopOutcome,
    StopTimeouts,
    stop_with_timeouts,
)
from hvha.drivers.scripts import TAIL_BYTES, interpreter_for, run_script

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def live_in_group(pgid: int) -> list[int]:
    """Non-zombie processes of group ``pgid``, straight from /proc (independent of the code)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(name))
    return pids


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def script(tmp_path: Path, name: str, body: str, mode: int = 0o700) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def test_exit_status_output_and_env(tmp_path: Path) -> None:
    s = script(tmp_path, "s.sh", 'echo "out $FOO $1"; echo err >&2; exit 3\n')
    res = run(run_script(s, ["arg"], {"FOO": "bar"}, 5))
    assert (res.returncode, res.stdout_tail, res.stderr_tail) == (3, "out bar arg\n", "err\n")
    assert not res.timed_out and not res.ok
    assert res.describe() == "exit 3: err"


def test_sh_scripts_run_without_exec_bit_and_cwd(tmp_path: Path) -> None:
    s = script(tmp_path, "s.sh", "pwd\n", mode=0o600)
    res = run(run_script(s, [], None, 5, cwd=tmp_path))
    assert res.ok and res.stdout_tail.strip() == str(tmp_path)
    assert interpreter_for("x.ps1")[0].startswith("powershell")
    assert interpreter_for("/bin/true") == []


def test_missing_program_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        run(run_script(tmp_path / "nope", [], None, 1))


def test_timeout_kills_the_whole_group_even_term_resistant_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    s = script(tmp_path, "s.sh", f"""echo $$ > {pidfile}
sleep 1000 &
sleep 1000 &
sh -c 'trap "" TERM; sleep 1000' &
echo started
wait
""")
    pgid = 0
    try:
        started = time.monotonic()
        res = run(run_script(s, [], None, 0.5, kill_grace=0.5))
        pgid = int(pidfile.read_text())
        assert res.timed_out and not res.ok
        assert res.returncode == -signal.SIGTERM
        assert "started" in res.stdout_tail
        assert time.monotonic() - started < 4
        assert live_in_group(pgid) == []
    finally:
        if pgid:
            kill_group(pgid)


def test_cancelling_kills_the_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    s = script(tmp_path, "s.sh", f"echo $$ > {pidfile}\nsleep 1000 &\nwait\n")

    async def scenario() -> None:
        task = asyncio.create_task(run_script(s, [], None, 60))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    pgid = 0
    try:
        run(scenario())
        pgid = int(pidfile.read_text())
        deadline = time.monotonic() + 2
        while live_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live_in_group(pgid) == []
    finally:
        if pgid:
            kill_group(pgid)


def test_output_is_bounded_to_the_tail(tmp_path: Path) -> None:
    s = script(tmp_path, "s.sh", "i=0; while [ $i -lt 3000 ]; do echo line-$i-xxxxxxxxxxxxxxxxxx;"
               " i=$((i+1)); done; echo END; head -c 50000 /dev/zero | tr '\\0' e >&2\n")
    res = run(run_script(s, [], None, 20))
    assert res.ok
    assert len(res.stdout_tail.encode()) <= TAIL_BYTES
    assert res.stdout_tail.endswith("END\n") and "line-2999" in res.stdout_tail
    assert res.stderr_tail == "e" * TAIL_BYTES


def test_background_child_keeps_running_and_does_not_block(tmp_path: Path) -> None:
    """A start script leaving the payload behind (holding our pipes) still returns at once."""
    pidfile = tmp_path / "pid"
    s = script(tmp_path, "s.sh", f"echo $$ > {pidfile}\nsleep 1000 &\necho done\n")
    pgid = 0
    try:
        started = time.monotonic()
        res = run(run_script(s, [], None, 10))
        pgid = int(pidfile.read_text())
        assert res.ok and res.stdout_tail == "done\n"
        assert time.monotonic() - started < 2
        assert len(live_in_group(pgid)) == 1, "the background child is the payload: kept"
    finally:
        if pgid:
            kill_group(pgid)


def test_kill_leftovers_cleans_up_after_a_normal_exit(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    s = script(tmp_path, "s.sh", f"echo $$ > {pidfile}\nsleep 1000 &\nexit 0\n")
    pgid = 0
    try:
        res = run(run_script(s, [], None, 10, kill_leftovers=True, kill_grace=0.5))
        pgid = int(pidfile.read_text())
        assert res.ok and live_in_group(pgid) == []
    finally:
        if pgid:
            kill_group(pgid)


# --- stop sequence with a fake driver -------------------------------------------------------

class FakeDriver:
    name = "fake"
    has_status = True

    def __init__(self, graceful: str = "ok", force: str = "ok", up_after: bool = False) -> None:
        self.timeouts = StopTimeouts(0.1, 0.1)
        self.behaviour = {False: graceful, True: force}
        self.up_after = up_after
        self.calls: list[str] = []
        self.up = True

    async def prepare(self) -> None:
        return None

    async def start(self) -> None:
        self.up = True

    async def stop(self, force: bool) -> None:
        self.calls.append("force" if force else "graceful")
        what = self.behaviour[force]
        if what == "hang":
            await asyncio.sleep(100)
        if what == "fail":
            raise DriverError(f"{self.calls[-1]} said no")
        self.up = self.up_after and not force

    async def running(self) -> bool:
        return self.up


def test_stop_graceful_ok() -> None:
    d = FakeDriver()
    res = run(stop_with_timeouts(d))
    assert res.outcome is StopOutcome.GRACEFUL and res.ok and d.calls == ["graceful"]


@pytest.mark.parametrize("graceful", ["fail", "hang"])
def test_stop_graceful_fails_or_overruns_then_force(
    graceful: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "_GUARD", 0.0)
    d = FakeDriver(graceful=graceful)
    res = run(stop_with_timeouts(d))
    assert res.outcome is StopOutcome.FORCED and res.ok
    assert d.calls == ["graceful", "force"]
    assert ("said no" if graceful == "fail" else "overran") in res.detail


def test_stop_still_running_after_graceful_is_forced() -> None:
    d = FakeDriver(up_after=True)
    res = run(stop_with_timeouts(d))
    assert res.outcome is StopOutcome.FORCED and "still running" in res.detail


def test_stop_force_failure_is_reported_and_payload_raises() -> None:
    d = FakeDriver(graceful="fail", force="fail")
    res = run(stop_with_timeouts(d))
    assert res.outcome is StopOutcome.FAILED and not res.ok
    with pytest.raises(DriverError, match="stop failed"):
        run(DriverPayload(FakeDriver(graceful="fail", force="fail")).stop(fence=False))


def test_fence_skips_the_graceful_phase() -> None:
    d = FakeDriver()
    payload = DriverPayload(d)
    run(payload.stop(fence=True))
    assert d.calls == ["force"]
    assert payload.last_stop is not None and payload.last_stop.outcome is StopOutcome.FORCED


# --- ScriptDriver on a small bundle ---------------------------------------------------------

def bundle(tmp_path: Path, stop_body: str, status_body: str = "exit 1\n",
           payload: dict[str, Any] | None = None) -> ScriptDriver:
    mod = tmp_path / "modules" / "m"
    mod.mkdir(parents=True)
    script(mod, "start_prim.sh", 'echo "starting $HVHA_X"\n')
    script(mod, "stop_prim.sh", stop_body)
    script(mod, "status.sh", status_body)
    module = {
        "name": "m", "kind": "app", "payload": payload or {"status": "x"},
        "stop": {"mode": None, "graceful_timeout": 0.3, "forced_timeout": 1.0},
        "scripts": {n: f"modules/m/{n}.sh" for n in ("start_prim", "stop_prim", "status")},
    }
    return ScriptDriver(tmp_path, module, {"HVHA_X": "1"})


def test_script_driver_graceful_timeout_goes_to_force(tmp_path: Path) -> None:
    d = bundle(tmp_path, '[ "$1" = force ] && exit 0\nsleep 100\n')
    run(d.start())
    assert d.last_result["start_prim"].stdout_tail == "starting 1\n"
    res = run(stop_with_timeouts(d))
    assert res.outcome is StopOutcome.FORCED
    assert "timed out" in res.detail
    assert not run(d.running())


def test_script_driver_without_status_trusts_the_stop_script(tmp_path: Path) -> None:
    d = bundle(tmp_path, "exit 0\n", status_body="exit 0\n", payload={"start": "x"})
    assert not d.has_status
    assert run(stop_with_timeouts(d)).outcome is StopOutcome.GRACEFUL


def test_script_driver_errors(tmp_path: Path) -> None:
    d = bundle(tmp_path, "echo cannot stop >&2; exit 4\n")
    with pytest.raises(DriverError, match=r"graceful stop failed.*exit 4: cannot stop"):
        run(d.stop(False))
    run(d.prepare())  # app modules have no prepare script: nothing to do
    (tmp_path / "modules" / "m" / "status.sh").unlink()
    with pytest.raises(DriverError, match="missing"):
        run(d.running())
