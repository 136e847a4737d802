"""The QMP client against a scripted fake QEMU on a unix socket (the real QEMU is exercised in
tests/integration/test_kvm_guest.py): handshake, events skipped, errors, EOF on quit, timeouts,
and the exit codes the module scripts rely on."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvha.drivers import qmp
from hvha.drivers.qmp import (
    AsyncQmpClient,
    QmpClient,
    QmpCommandError,
    QmpError,
    VmStatus,
    decode_message,
    encode_command,
    reply_to,
)

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                    "capabilities": []}}
EVENT = {"event": "RTC_CHANGE", "data": {"offset": 0}, "timestamp": {"seconds": 1}}

Handler = Callable[[dict[str, Any]], list[dict[str, Any]] | None]


def qemu_like(status: str = "running") -> Handler:
    """Answers like QEMU: an event before each reply, ids echoed, quit closes the socket."""
    def handle(cmd: dict[str, Any]) -> list[dict[str, Any]] | None:
        name, ident = cmd["execute"], cmd.get("id")
        if name == "quit":
            return None
        if name == "query-status":
            ret: Any = {"status": status, "running": status == "running", "singlestep": False}
        elif name in ("qmp_capabilities", "system_powerdown", "stop", "cont"):
            ret = {}
        else:
            return [{"error": {"class": "CommandNotFound",
                               "desc": f"The command {name} has not been found"}, "id": ident}]
        return [EVENT, {"return": ret, "id": ident}]
    return handle


class FakeQemu:
    def __init__(self, path: Path, handler: Handler, greeting: dict[str, Any] | None = None,
                 silent: bool = False) -> None:
        self.path, self.handler, self.silent = path, handler, silent
        self.greeting = GREETING if greeting is None else greeting
        self.received: list[dict[str, Any]] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                if self.silent:
                    f.readline()
                    continue
                f.write(json.dumps(self.greeting).encode() + b"\n")
                f.flush()
                for line in f:
                    cmd = json.loads(line)
                    self.received.append(cmd)
                    replies = self.handler(cmd)
                    if replies is None:
                        break
                    for r in replies:
                        f.write(json.dumps(r).encode() + b"\n")
                    f.flush()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeQemu]]:
    made: list[FakeQemu] = []

    def make(handler: Handler | None = None, **kw: Any) -> FakeQemu:
        f = FakeQemu(tmp_path / f"qmp{len(made)}.sock", handler or qemu_like(), **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_encode_and_decode_are_json_lines() -> None:
    line = encode_command("query-status", ident=3)
    assert line.endswith(b"\n") and json.loads(line) == {"execute": "query-status", "id": 3}
    assert json.loads(encode_command("x", {"a": 1}))["arguments"] == {"a": 1}
    assert decode_message(b'{"return": {}}\n') == {"return": {}}
    for bad in (b"", b"[1]\n", b"garbage\n"):
        with pytest.raises(QmpError):
            decode_message(bad)


def test_reply_to_skips_events_and_other_ids_and_raises_errors() -> None:
    assert reply_to(EVENT, "x", 1) == (False, None)
    assert reply_to({"return": 5, "id": 2}, "x", 1) == (False, None)
    assert reply_to({"return": 5, "id": 1}, "x", 1) == (True, 5)
    assert reply_to({"return": 5}, "x", 1) == (True, 5)  # servers that drop the id
    with pytest.raises(QmpCommandError) as exc:
        reply_to({"error": {"class": "GenericError", "desc": "no"}, "id": 1}, "quit", 1)
    assert exc.value.error_class == "GenericError" and "quit" in str(exc.value)


def test_sync_client_handshake_status_and_events(fake: Callable[..., FakeQemu]) -> None:
    server = fake(qemu_like("paused"))
    with QmpClient(str(server.path)) as q:
        assert q.query_status() == VmStatus("paused", False)
        q.system_powerdown()
    assert [c["execute"] for c in server.received] == [
        "qmp_capabilities", "query-status", "system_powerdown"]


def test_sync_client_reports_qemu_errors(fake: Callable[..., FakeQemu]) -> None:
    server = fake()
    with QmpClient(str(server.path)) as q, pytest.raises(QmpCommandError, match="CommandNotFound"):
        q.execute("no-such-command")


def test_quit_accepts_qemu_closing_without_a_reply(fake: Callable[..., FakeQemu]) -> None:
    server = fake()
    with QmpClient(str(server.path)) as q:
        q.quit()
    assert server.received[-1]["execute"] == "quit"


def test_connect_errors_say_what_is_wrong(tmp_path: Path,
                                          fake: Callable[..., FakeQemu]) -> None:
    with pytest.raises(QmpError, match="is QEMU running"):
        QmpClient(str(tmp_path / "missing.sock")).connect()
    server = fake(greeting={"hello": 1})
    with pytest.raises(QmpError, match="no QMP greeting"):
        QmpClient(str(server.path)).connect()
    silent = fake(silent=True)
    with pytest.raises(QmpError, match="no answer"):
        QmpClient(str(silent.path), timeout=0.3).connect()


def test_async_client_matches_the_sync_one(fake: Callable[..., FakeQemu]) -> None:
    server = fake()

    async def go() -> tuple[VmStatus, str]:
        async with AsyncQmpClient(str(server.path)) as q:
            status = await q.query_status()
            try:
                await q.execute("bogus")
            except QmpCommandError as exc:
                err = exc.error_class
            await q.quit()
        return status, err

    status, err = asyncio.run(go())
    assert status.running and err == "CommandNotFound"
    assert [c["execute"] for c in server.received][-1] == "quit"


def test_async_client_times_out(fake: Callable[..., FakeQemu]) -> None:
    silent = fake(silent=True)
    with pytest.raises(QmpError, match="no answer"):
        asyncio.run(AsyncQmpClient(str(silent.path), timeout=0.3).connect())


@pytest.mark.parametrize(("status", "code"), [("running", 0), ("paused", 1), ("io-error", 1)])
def test_cli_running_exit_code_is_the_checker_verdict(fake: Callable[..., FakeQemu],
                                                      status: str, code: int) -> None:
    server = fake(qemu_like(status))
    assert qmp.main([str(server.path), "running"]) == code


def test_cli_codes_for_unreachable_and_refused(tmp_path: Path, fake: Callable[..., FakeQemu],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert qmp.main([str(tmp_path / "none.sock"), "running"]) == qmp.EXIT_UNREACHABLE
    assert "cannot connect" in capsys.readouterr().err
    refusing = fake(lambda cmd: [{"error": {"class": "GenericError", "desc": "busy"}}]
                    if cmd["execute"] == "system_powerdown" else qemu_like()(cmd))
    assert qmp.main([str(refusing.path), "powerdown"]) == qmp.EXIT_REFUSED
    assert "busy" in capsys.readouterr().err
    assert qmp.main([str(refusing.path), "status"]) == 0
    assert capsys.readouterr().out.strip() == "running"


def test_cli_running_wait_keeps_asking_until_the_guest_runs(
        fake: Callable[..., FakeQemu]) -> None:
    answers = iter(["prelaunch", "prelaunch", "running"])
    state = {"now": "prelaunch"}

    def handler(cmd: dict[str, Any]) -> list[dict[str, Any]] | None:
        if cmd["execute"] == "query-status":
            state["now"] = next(answers, "running")
        return qemu_like(state["now"])(cmd)

    server = fake(handler)
    assert qmp.main([str(server.path), "running", "--wait", "5"]) == 0
    assert sum(c["execute"] == "query-status" for c in server.received) == 3
