"""ScriptDriver on a real bundle: the compiler renders the app module's scripts, the driver runs
them, and a tiny HTTP server plays the payload.

The payload's own start/stop/status commands are small shell scripts (like the lab's sample
app): start launches the server in the background with a pidfile, stop sends SIGTERM
("graceful") or SIGKILL ("force"), status checks the pid. Variants cover a stop command that
ignores the graceful phase (timeout -> force) and a server that ignores SIGTERM (still running ->
force). Needs no root; every server is killed by its pid at the end, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hvha.agent.checkers import CheckerEvent, CheckerSet
from hvha.compile.bundle import archive, build_bundles, read_archive
from hvha.config.validate import validate_bytes
from hvha.drivers import ScriptDriver, StopOutcome, driver_for, stop_with_timeouts

T = TypeVar("T")

APP = r"""
import http.server, os, signal
if os.environ.get("APP_IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {os.environ['HVHA_NODE']}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), Hello).serve_forever()
"""

START = """#!/bin/sh
"$APP_PY" "$APP_DIR/app.py" >>"$APP_DIR/app.log" 2>&1 </dev/null &
echo $! >"$APP_DIR/app.pid"
"""

# kill -0 would also see a zombie (an orphan whose reaper is slow or absent): check the state.
STATUS = """#!/bin/sh
pid=$(cat "$APP_DIR/app.pid" 2>/dev/null) || exit 1
grep -q '^State:[[:space:]]*[^Z[:space:]]' "/proc/$pid/status" 2>/dev/null
"""

STOP = """#!/bin/sh
pid=$(cat "$APP_DIR/app.pid" 2>/dev/null) || exit 0
alive() { grep -q '^State:[[:space:]]*[^Z[:space:]]' "/proc/$pid/status" 2>/dev/null; }
if [ "$HVHA_STOP_MODE" = force ]; then kill -KILL "$pid" 2>/dev/null
else %(graceful)s
fi
i=0
while alive && [ $i -lt 10 ]; do sleep 0.05; i=$((i + 1)); done
alive && exit 1
rm -f "$APP_DIR/app.pid"
"""
POLITE = 'kill -TERM "$pid" 2>/dev/null'
STUBBORN = "sleep 4242.5  # ignores the graceful phase: only the timeout ends it"

CLUSTER = """
cluster: {name: t, secret: {file: /nonexistent/cluster.key}}
nodes:
  - {name: node1, address: 10.77.0.11}
  - {name: node2, address: 10.77.0.12}
heartbeat: {networks: [{name: lan, subnet: 10.77.0.0/24}]}
witness: {ping: [10.77.0.1]}
modules:
  - name: web
    kind: app
    payload: {start: %(dir)s/start, stop: %(dir)s/stop, status: %(dir)s/status}
    stop: {graceful_timeout: 1s, forced_timeout: 2s}
    variables: {APP_DIR: %(dir)s, APP_PORT: "%(port)d", APP_PY: %(py)s,
                APP_IGNORE_TERM: "%(ignore)d"}
    checkers:
      - {name: http, type: tcp, host: 127.0.0.1, port: %(port)d, timeout: 1s}
      - {name: server, type: process, process: "/%(dir)s/app[.]py/"}
      - {name: pidfile, type: script, command: 'test -s "$APP_DIR/app.pid"'}
"""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class App:
    def __init__(self, tmp_path: Path, graceful: str = POLITE, ignore_term: bool = False):
        self.dir = tmp_path / "app"
        self.dir.mkdir()
        self.port = free_port()
        (self.dir / "app.py").write_text(APP)
        for name, text in (("start", START), ("status", STATUS),
                           ("stop", STOP % {"graceful": graceful})):
            (self.dir / name).write_text(text)
            (self.dir / name).chmod(0o755)
        source = (CLUSTER % {"dir": self.dir, "port": self.port, "py": sys.executable,
                             "ignore": ignore_term}).encode()
        v = validate_bytes(source)
        assert v.cluster is not None, [d.message for d in v.report.items]
        bundle = next(b for b in build_bundles(v.cluster, source) if b.node == "node1")
        self.root = tmp_path / "bundle"
        for rel, (data, mode) in read_archive(archive(bundle)).items():  # as the agent unpacks
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)
            (self.root / rel).chmod(mode)
        self.module: dict[str, Any] = json.loads((self.root / "agent.json").read_text())[
            "modules"][0]
        self.driver = driver_for(self.root, self.module, {"HVHA_TEST": "1"})
        assert isinstance(self.driver, ScriptDriver)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "app.pid").read_text())
        except (OSError, ValueError):
            return None

    def get(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as r:
                return str(r.read().decode())
        except OSError:
            return None

    def wait_serving(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while (body := self.get()) is None:
            assert time.monotonic() < deadline, "the app never answered"
            time.sleep(0.05)
        return body

    def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def apps() -> Iterator[list[App]]:
    made: list[App] = []
    try:
        yield made
    finally:
        for app in made:
            app.kill()


def no_process_with(token: str) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if token.encode() in cmdline and state != "Z":
                return False
    return True


def test_start_check_and_graceful_stop(tmp_path: Path, apps: list[App]) -> None:
    app = App(tmp_path)
    apps.append(app)
    started = time.monotonic()
    run(app.driver.start())
    assert time.monotonic() - started < 3, "start_prim returns while the app keeps running"
    assert app.wait_serving() == "hello from node1\n"
    assert run(app.driver.running())

    events: list[CheckerEvent] = []
    checkers = CheckerSet(app.module["checkers"], app.driver, events.append,
                          env={"APP_DIR": str(app.dir)})

    async def check_all() -> None:
        for c in app.module["checkers"]:
            await checkers.check(c["name"])

    run(check_all())
    assert all(s["ok"] for s in checkers.status()), checkers.status()

    result = run(stop_with_timeouts(app.driver))
    assert result.outcome is StopOutcome.GRACEFUL, result.detail
    assert not run(app.driver.running())
    assert app.get() is None
    run(check_all())
    assert sorted(e.name for e in events) == ["http", "pidfile", "server"]
    assert all(not e.ok and e.action == "restart" for e in events)


def test_stop_ignoring_graceful_times_out_then_force(tmp_path: Path, apps: list[App]) -> None:
    app = App(tmp_path, graceful=STUBBORN)
    apps.append(app)
    run(app.driver.start())
    app.wait_serving()
    started = time.monotonic()
    result = run(stop_with_timeouts(app.driver))
    elapsed = time.monotonic() - started
    assert result.outcome is StopOutcome.FORCED, result.detail
    assert "graceful stop failed (timed out" in result.detail
    assert 1.0 <= elapsed < 6.0
    assert not run(app.driver.running()) and app.get() is None
    assert no_process_with("4242.5"), "the timed-out stop script left its sleep behind"


def test_app_ignoring_sigterm_is_stopped_by_force(tmp_path: Path, apps: list[App]) -> None:
    app = App(tmp_path, ignore_term=True)
    apps.append(app)
    run(app.driver.start())
    app.wait_serving()
    result = run(stop_with_timeouts(app.driver))
    assert result.outcome is StopOutcome.FORCED, result.detail
    assert "exit 1" in result.detail
    assert not run(app.driver.running()) and app.get() is None
