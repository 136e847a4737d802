"""`hvha reload`: a new bundle applied by the running agent, without a restart.

A real `hvha agent` process runs node1 of a two-node cluster on loopback (heartbeats to
127.0.0.2, where no peer answers, and no witness), so its modules run ALONE after the heartbeat
timeout. Each module's payload is a ``sleep`` started by the test's own start script, which logs
every start and stop with the module's ``TAG`` variable: the log shows which configuration's
scripts ran. Bundles are compiled by `hvha compile` and pushed the way `hvha apply` does (a temp
file renamed over the path the agent was started with). Needs no root; the agent and every
payload are killed by pid at the end, even on failure.

The last tests drive :class:`Agent` in-process with fake ports, for what a loopback node cannot
show: the VIP moving while primary, and failover settings taking effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvha.agent.bundle_io import compare, load_bundle
from hvha.agent.control import call
from hvha.compile.bundle import build_bundles, write_bundles
from hvha.config.validate import validate_bytes

HVHA = [sys.executable, "-m", "hvha.cli.main"]

START = """#!/bin/sh
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
echo $! >"$RUN/$HVHA_MODULE.pid"
echo "start $HVHA_MODULE ${TAG:-} $!" >>"$RUN/log"
"""
# A zombie (killed, not reaped: the test's container may not reap orphans) counts as stopped.
ALIVE = """alive() { [ -r "/proc/$p/status" ] &&
  ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status"; }
"""
STOP = """#!/bin/sh
p=$(cat "$RUN/$HVHA_MODULE.pid" 2>/dev/null) || exit 0
""" + ALIVE + """echo "stop $HVHA_MODULE ${TAG:-} $p" >>"$RUN/log"
kill "$p" 2>/dev/null
while alive; do sleep 0.02; done
rm -f "$RUN/$HVHA_MODULE.pid"
"""
STATUS = """#!/bin/sh
p=$(cat "$RUN/$HVHA_MODULE.pid" 2>/dev/null) || exit 1
""" + ALIVE + "alive\n"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def _wait(what: str, pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def module(name: str, tag: str = "v1", checker: str = "true", restart_count: int = 3,
           vip: str | None = None) -> dict[str, Any]:
    """One module of the cluster file (see :meth:`Node.cluster`)."""
    return {"name": name, "tag": tag, "checker": checker, "restart_count": restart_count,
            "vip": vip}


class Node:
    """node1's files: app scripts, cluster file, pushed bundle, state dir; and its agent."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.run = work / "run"
        self.run.mkdir()
        self.key = work / "cluster.key"
        self.key.write_text(os.urandom(32).hex())
        self.key.chmod(0o600)
        for name, text in (("start", START), ("stop", STOP), ("status", STATUS)):
            (work / name).write_text(text)
            (work / name).chmod(0o755)
        self.port = _free_udp_port()
        self.bundle = work / "etc" / "node.bundle"
        self.bundle.parent.mkdir()
        self.state = work / "state"
        self.socket = self.state / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def cluster(self, modules: list[dict[str, Any]], interval: str = "100ms") -> bytes:
        lines = [f"cluster: {{name: rl, secret: {{file: {self.key}}}}}",
                 "nodes:",
                 "  - {name: node1, address: 127.0.0.1, transport: {type: local}}",
                 "  - {name: node2, address: 127.0.0.2, transport: {type: local}}",
                 f"heartbeat: {{interval: {interval}, timeout: 500ms, port: {self.port}, "
                 "networks: [{name: lan, subnet: 127.0.0.0/8}]}",
                 "modules:"]
        w = self.work
        for m in modules:
            lines += [f"  - name: {m['name']}",
                      "    kind: app",
                      f"    payload: {{start: {w}/start, stop: {w}/stop, status: {w}/status}}",
                      "    stop: {graceful_timeout: 3s, forced_timeout: 2s}",
                      f"    variables: {{RUN: {self.run}, TAG: {m['tag']}}}",
                      "    checkers:",
                      f"      - {{name: probe, type: script, command: '{m['checker']}', "
                      "interval: 200ms, timeout: 150ms}",
                      f"    failover: {{restart_budget: {{count: {m['restart_count']}, "
                      "window: 1h}}"]
            if m["vip"]:
                lines.append(f"    vip: {{address: {m['vip']}, interface: lo}}")
        return ("\n".join(lines) + "\n").encode()

    def push(self, modules: list[dict[str, Any]], who: str = "node1", **kw: Any) -> str:
        """Compile and push ``who``'s bundle (temp file + rename, as `hvha apply`); its hash."""
        source = self.cluster(modules, **kw)
        v = validate_bytes(source)
        assert v.cluster is not None, [d.message for d in v.report.items]
        bundles = build_bundles(v.cluster, source)
        out = Path(tempfile.mkdtemp(dir=self.work))
        write_bundles(bundles, out)
        tmp = self.bundle.with_name(".node.bundle.tmp")
        shutil.copy(out / f"{who}.bundle", tmp)
        os.rename(tmp, self.bundle)
        return next(b.hash for b in bundles if b.node == who)

    def start(self) -> None:
        log = open(self.work / "agent.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [*HVHA, "agent", "--bundle", str(self.bundle), "--state-dir", str(self.state),
             "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        log.close()
        _wait("the control socket", self.socket.exists)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HVHA, *args, "--socket", str(self.socket)], capture_output=True,
                              text=True, timeout=60)

    def reload(self) -> dict[str, Any]:
        return call(self.socket, {"cmd": "reload"}, timeout=60)

    def status(self) -> dict[str, Any]:
        reply = call(self.socket, {"cmd": "status"}, timeout=10)
        assert reply["ok"], reply
        status: dict[str, Any] = reply["status"]
        return status

    def module(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["modules"] if m["module"] == name), None)

    def role(self, name: str) -> str | None:
        m = self.module(name)
        return None if m is None else str(m["role"])

    def pid(self, name: str) -> int | None:
        try:
            return int((self.run / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def serving(self, name: str) -> int:
        """Wait until ``name`` runs ALONE with a live payload, settled (its reason no longer
        the lease grant, which the next tick replaces); its pid."""
        def ready() -> bool:
            m = self.module(name)
            return (m is not None and m["role"] == "ALONE" and m["reason"] == "peer away"
                    and (p := self.pid(name)) is not None and _alive(p))

        _wait(f"{name} ALONE with its payload", ready)
        pid = self.pid(name)
        assert pid is not None
        return pid

    def log(self) -> list[str]:
        path = self.run / "log"
        return path.read_text().splitlines() if path.exists() else []

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # hands over: stops every payload
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for path in self.run.glob("*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(path.read_text()), signal.SIGKILL)


@pytest.fixture
def node() -> Iterator[Node]:
    work = Path(tempfile.mkdtemp(prefix="hvr", dir="/tmp"))  # short: unix socket path limit
    n = Node(work)
    try:
        yield n
    finally:
        try:
            n.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _started(node: Node, modules: list[dict[str, Any]]) -> str:
    first = node.push(modules)
    node.start()
    for m in modules:
        node.serving(m["name"])
    assert node.status()["bundle"] == first
    return first


# -- a real agent ------------------------------------------------------------------------------

def test_a_changed_checker_is_applied_without_touching_the_payload(node: Node) -> None:
    _started(node, [module("web")])
    pid, history = node.pid("web"), node.module("web")["history"]  # type: ignore[index]
    probe = node.run / "probed"
    new = node.push([module("web", checker=f"touch {probe}")])
    reply = node.reload()
    assert reply == {"ok": True, "bundle": new, "added": [], "removed": [], "changed": ["web"],
                     "restarted": []}
    _wait("the new checker to run", probe.exists, timeout=5)
    assert node.pid("web") == pid and pid is not None and _alive(pid)
    m = node.module("web")
    assert m is not None and m["role"] == "ALONE" and m["history"] == history
    assert node.status()["bundle"] == new
    assert [line.split()[0] for line in node.log()] == ["start"]  # never stopped
    assert (node.state / "bundle" / "BUNDLE_HASH").read_text().strip() == new


def test_a_changed_payload_restarts_it_stopped_by_the_old_scripts(node: Node) -> None:
    _started(node, [module("web", tag="v1")])
    old = node.pid("web")
    new = node.push([module("web", tag="v2")])
    out = node.cli("reload", "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert (reply["bundle"], reply["changed"], reply["restarted"]) == (new, ["web"], ["web"])
    pid = node.serving("web")
    assert pid != old and old is not None and not _alive(old)
    # Stopped with v1's scripts (TAG=v1), then started with v2's.
    assert [line.split()[:3] for line in node.log()] == [
        ["start", "web", "v1"], ["stop", "web", "v1"], ["start", "web", "v2"]]
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["bundle"] == new
    assert status["modules"][0]["role"] == "ALONE"


def test_added_and_removed_modules_start_and_stop_the_others_untouched(node: Node) -> None:
    _started(node, [module("web")])
    web = node.pid("web")
    added = node.push([module("web"), module("db")])
    assert node.reload() == {"ok": True, "bundle": added, "added": ["db"], "removed": [],
                             "changed": [], "restarted": []}
    db = node.serving("db")
    assert node.pid("web") == web and web is not None and _alive(web)

    removed = node.push([module("web")])
    reply = node.reload()
    assert (reply["ok"], reply["bundle"], reply["removed"], reply["added"]) == (
        True, removed, ["db"], [])
    assert not _alive(db), "the removed module's payload still runs"
    assert [m["module"] for m in node.status()["modules"]] == ["web"]
    assert node.pid("web") == web and _alive(web)
    assert [line.split()[:2] for line in node.log()] == [
        ["start", "web"], ["start", "db"], ["stop", "db"]]


def test_a_stopped_module_added_again_respects_its_stopped_marker(node: Node) -> None:
    _started(node, [module("web")])
    marker = node.state / "modules" / "db" / "stopped"  # `hvha stop db` before it was removed
    marker.parent.mkdir(parents=True)
    marker.touch()
    node.push([module("web"), module("db")])
    assert node.reload()["added"] == ["db"]
    time.sleep(1.0)  # the heartbeat timeout is 0.5 s: time enough to start it, if it would
    assert node.role("db") == "STOP" and node.pid("db") is None


def test_node_level_changes_need_a_restart_and_change_nothing(node: Node) -> None:
    first = _started(node, [module("web")])
    pid = node.pid("web")
    node.push([module("web", tag="v2"), module("db")], interval="150ms")
    out = node.cli("reload")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "heartbeat" in out.stderr and "restart" in out.stderr
    reply = node.reload()
    assert reply["ok"] is False and reply["restart_required"] is True
    assert reply["sections"] == ["heartbeat"]
    assert node.status()["bundle"] == first
    assert [m["module"] for m in node.status()["modules"]] == ["web"]
    assert node.pid("web") == pid and pid is not None and _alive(pid)
    assert len(node.log()) == 1


def test_a_corrupt_bundle_is_refused_and_the_old_one_keeps_running(node: Node) -> None:
    first = _started(node, [module("web")])
    pid = node.pid("web")
    node.bundle.write_bytes(b"not a tar at all")
    reply = node.reload()
    assert reply["ok"] is False and "not a bundle" in reply["error"], reply
    node.push([module("web", tag="v2")], who="node2")  # the other node's bundle
    reply = node.reload()
    assert reply["ok"] is False and "node node2's bundle" in reply["error"], reply
    assert "restart_required" not in reply
    # A well-formed tar whose agent.json was edited after compiling.
    node.push([module("web", tag="v2")])
    with tarfile.open(node.bundle) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                   for m in tar.getmembers()]
    with tarfile.open(node.bundle, "w") as tar:
        for member, data in members:
            if member.name == "agent.json":
                assert data is not None
                data = data.replace(b"v2", b"v3")
                member.size = len(data)
            tar.addfile(member, None if data is None else io.BytesIO(data))
    out = node.cli("reload")
    assert out.returncode == 1 and "does not match its manifest" in out.stderr, out.stderr
    assert node.status()["bundle"] == first
    assert node.pid("web") == pid and pid is not None and _alive(pid)
    assert node.role("web") == "ALONE" and len(node.log()) == 1
    assert json.loads((node.state / "bundle" / "agent.json").read_text())["modules"][0][
        "variables"]["TAG"] == "v1"


def test_sighup_reloads_like_the_request_and_same_bundle_is_no_change(node: Node) -> None:
    first = _started(node, [module("web")])
    assert node.reload() == {"ok": True, "bundle": first, "message": "no change", "added": [],
                             "removed": [], "changed": [], "restarted": []}
    web = node.pid("web")
    new = node.push([module("web"), module("db")])
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    _wait("the SIGHUP reload", lambda: node.status()["bundle"] == new)
    node.serving("db")
    assert node.pid("web") == web and node.proc.poll() is None
    assert b"SIGHUP reload" in (node.work / "agent.log").read_bytes()


# -- the pure comparison -----------------------------------------------------------------------

def _config(node: Node, modules: list[dict[str, Any]], **kw: Any) -> tuple[Any, Any]:
    node.push(modules, **kw)
    b = load_bundle(node.bundle)
    return b.config, b.digests


def test_compare_sorts_changes_by_what_they_need(node: Node) -> None:
    base = _config(node, [module("web"), module("db")])
    plan = compare(*base, *_config(node, [module("web", tag="v2", vip="10.9.0.1/24"),
                                          module("db", restart_count=5), module("new")]))
    assert plan.sections == () and plan.added == ("new",) and plan.removed == ()
    changes = {c.name: c for c in plan.changed}
    assert (changes["web"].restart, changes["web"].vip) == (True, True)
    assert (changes["db"].settings, changes["db"].restart, changes["db"].vip) == (
        True, False, False)
    slower = _config(node, [module("web"), module("db")], interval="150ms")
    assert compare(*base, *slower).sections == ("heartbeat",)
    assert compare(*base, *base).changed == ()


# -- in-process agent with fake ports: VIP and failover policy ---------------------------------

class FakeVip:
    def __init__(self, address: str, log: list[str]) -> None:
        self.address, self.log, self.held = address, log, False

    async def add(self) -> None:
        self.held = True
        self.log.append(f"vip+ {self.address}")

    async def announce(self) -> None:
        return None

    async def remove(self) -> None:
        self.held = False
        self.log.append(f"vip- {self.address}")

    async def present(self) -> bool:
        return self.held


class FakePayload:
    """A payload port; whether the payload runs is the world's (``up``), not the port's."""

    def __init__(self, root: Path, m: dict[str, Any], log: list[str], up: set[str]) -> None:
        self.root, self.name, self.tag, self.log = root, m["name"], m["variables"]["TAG"], log
        self.world = up

    @property
    def up(self) -> bool:
        return self.name in self.world

    @up.setter
    def up(self, value: bool) -> None:
        (self.world.add if value else self.world.discard)(self.name)

    def _bundle_tag(self) -> str:  # which bundle is in place right now
        config = json.loads((self.root / "agent.json").read_text())
        return str(config["modules"][0]["variables"]["TAG"])

    async def start(self) -> None:
        self.up = True
        self.log.append(f"start {self.tag} (bundle {self._bundle_tag()})")

    async def stop(self, *, fence: bool) -> None:
        if self.up:
            self.log.append(f"stop {self.tag} (bundle {self._bundle_tag()})")
        self.up = False

    async def running(self) -> bool:
        return self.up


class FakePorts:
    def __init__(self, root: Path) -> None:
        self.root, self.log, self.up = root, [], set()  # type: ignore[var-annotated]

    def build(self, m: dict[str, Any], agent: Any) -> tuple[Any, Any, Any, Any]:
        from hvha.agent.runtime import NoReplication

        vip = FakeVip(m["vip"]["address"], self.log) if m.get("vip") else None
        return FakePayload(self.root, m, self.log, self.up), vip, None, NoReplication()


def test_in_process_vip_move_payload_order_and_new_policy(node: Node) -> None:
    from hvha.agent.bundle_io import install_bundle
    from hvha.agent.daemon import Agent

    node.push([module("web", vip="10.9.0.1/24")])
    root, config = install_bundle(node.bundle, node.state)

    async def scenario() -> None:
        ports = FakePorts(root)
        agent = Agent(root, config, node.state, b"k" * 32, ports, source=node.bundle)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            deadline = time.monotonic() + 10
            while agent.modules["web"].state.role.value != "ALONE":
                assert time.monotonic() < deadline, agent.status()
                await asyncio.sleep(0.05)
            assert ports.log == ["vip+ 10.9.0.1/24", "start v1 (bundle v1)"]
            ports.log.clear()
            node.push([module("web", vip="10.9.0.2/24", restart_count=7)])
            reply = await agent.reload()
            assert reply["changed"] == ["web"] and reply["restarted"] == []
            assert ports.log == ["vip- 10.9.0.1/24", "vip+ 10.9.0.2/24"]
            runtime = agent.modules["web"]
            assert runtime.policy.restart_count == 7 and runtime.state.role.value == "ALONE"
            ports.log.clear()
            node.push([module("web", tag="v2", vip="10.9.0.2/24", restart_count=7)])
            reply = await agent.reload()
            assert reply["restarted"] == ["web"]
            assert ports.log == ["stop v1 (bundle v1)", "start v2 (bundle v2)"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
