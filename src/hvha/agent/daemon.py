"""`hvha agent`: one process per node running every module of its bundle.

Wiring only: heartbeats (peer liveness, the peer's view of each module), the lease manager
(witness), one :class:`ModuleRuntime` per module, a tick for timers, and the control socket.
Modules start in the bundle's start order once the peer has been heard or the heartbeat timeout
has passed (so a node starting alone does not race a live peer it has not heard yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hvha.agent.frames import HEARTBEAT_KEY_PURPOSE, Frame, derive_key
from hvha.agent.fsm import Ev, Policy, Role
from hvha.agent.heartbeat import (
    HeartbeatConfig,
    HeartbeatNetwork,
    HeartbeatService,
)
from hvha.agent.incarnation import next_incarnation
from hvha.agent.leases import LeaseManager, NoWitness, WitnessPort
from hvha.agent.runtime import ModuleRuntime

log = logging.getLogger("hvha.agent")


class Agent:
    def __init__(self, root: Path, config: dict[str, Any], state_dir: Path, secret: bytes,
                 ports: Any, witness: WitnessPort | None = None) -> None:
        self.root = root
        self.config = config
        self.state_dir = state_dir
        self.node = config["node"]["name"]
        self.peer = config["peer"]["name"]
        hb = config["heartbeat"]
        self.interval = float(hb["interval"])
        self.timeout = float(hb["timeout"])
        lease = config["witness"].get("lease") or self.timeout
        self.started_at = time.monotonic()
        self.wall_started = time.time()
        self.last_vouch: float | None = None
        self.peer_seen: dict[str, dict[str, Any]] = {}
        self.leases = LeaseManager(witness or NoWitness(), float(lease), self)
        networks = tuple(
            HeartbeatNetwork(n["name"], config["node"]["heartbeat"][n["name"]],
                             config["peer"]["heartbeat"][n["name"]])
            for n in hb["networks"])
        self.heartbeat = HeartbeatService(
            HeartbeatConfig(node=self.node, peer=self.peer, cluster=config["cluster"]["name"],
                            key=derive_key(secret, HEARTBEAT_KEY_PURPOSE), networks=networks,
                            interval=self.interval, timeout=self.timeout, port=int(hb["port"])),
            incarnation=next_incarnation(state_dir), payload=self._payload,
            on_peer_payload=self._on_peer_payload, on_peer_state=self._on_peer_state)
        names = sorted([self.node, self.peer])
        self.modules: dict[str, ModuleRuntime] = {}
        for m in sorted(config["modules"], key=lambda m: m["start_rank"]):
            f = m["failover"]
            preferred = f.get("preferred")
            policy = Policy(
                automatic=f["automatic"], arbitrated=config["witness"]["kind"] == "arbiter",
                designated=preferred == self.node if preferred else names[0] == self.node,
                peer_preferred=preferred == self.peer, failback=f["failback"],
                stability_window=f["stability_window"], restart_count=f["restart_count"],
                restart_window=f["restart_window"])
            payload, vip, checkers, replicator = ports.build(m, self)
            self.modules[m["name"]] = ModuleRuntime(m["name"], policy, payload, vip, checkers,
                                                    replicator, self.leases, guard=self._guard)
        self._tasks: list[asyncio.Task[None]] = []
        self._guard_proc: subprocess.Popen[bytes] | None = None
        self._armed: set[str] = set()

    # -- the dead-agent guard (agent/guard.py) --------------------------------------------
    def _start_guard(self) -> None:
        self._guard_proc = subprocess.Popen(
            [sys.executable, "-m", "hvha.agent.guard", str(self.root)], stdin=subprocess.PIPE,
            start_new_session=True)

    def _guard(self, module: str, armed: bool) -> None:
        if (module in self._armed) == armed or self._guard_proc is None:
            return
        (self._armed.add if armed else self._armed.discard)(module)
        if not self._tell_guard(f"{'arm' if armed else 'disarm'} {module}"):
            log.error("the dead-agent guard is gone: restarting it")
            self._start_guard()
            for name in sorted(self._armed):
                self._tell_guard(f"arm {name}")

    def _tell_guard(self, line: str) -> bool:
        stdin = self._guard_proc.stdin if self._guard_proc is not None else None
        try:
            assert stdin is not None
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except OSError:
            return False
        return True

    def _stop_guard(self) -> None:
        proc = self._guard_proc
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.write(b"exit\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- Poster, for the lease manager ---------------------------------------------------
    def post_to(self, module: str, kind: Ev, **fields: Any) -> None:
        self.modules[module].post(kind, **fields)

    def primaries(self) -> list[str]:
        return [n for n, m in self.modules.items() if m.state.role.primary]

    def peer_vouches(self, now: float) -> bool:
        return self.last_vouch is not None and now - self.last_vouch < self.timeout / 3

    # -- heartbeats ----------------------------------------------------------------------
    def _payload(self) -> bytes:
        last = self.heartbeat.liveness.last_heard()
        heard = -1 if last is None else int(1000 * (time.monotonic() - last))
        body = {"h": heard, "m": {n: m.summary() for n, m in self.modules.items()}}
        return json.dumps(body, separators=(",", ":")).encode()

    def _on_peer_payload(self, network: str, frame: Frame) -> None:
        try:
            body = json.loads(frame.payload)
            heard_ms = int(body.get("h", -1))
            modules = body.get("m", {})
        except (ValueError, TypeError, AttributeError):
            log.warning("peer sent an unreadable heartbeat payload")
            return
        if 0 <= heard_ms < 1000 * self.timeout / 3:
            self.last_vouch = time.monotonic()
        for name, runtime in self.modules.items():
            summary = modules.get(name)
            if not isinstance(summary, dict) or summary == self.peer_seen.get(name):
                continue
            before = self.peer_seen.get(name, {})
            self.peer_seen[name] = summary
            try:
                role = Role(str(summary.get("r")))
            except ValueError:
                continue
            runtime.post(Ev.PEER, peer_alive=True, peer_role=role,
                         peer_data_ok=bool(summary.get("d")), peer_in_sync=bool(summary.get("s")))
            if summary.get("w") and not before.get("w"):
                runtime.post(Ev.PEER_WANTS_PRIMARY)

    def _on_peer_state(self, alive: bool) -> None:
        log.info("peer %s is %s", self.peer, "alive" if alive else "DEAD (all networks silent)")
        if not alive:
            self.peer_seen.clear()
            for runtime in self.modules.values():
                runtime.post(Ev.PEER, peer_alive=False)

    # -- life cycle ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from hvha.agent.control import ControlServer  # the socket server is an edge

        self._start_guard()
        for runtime in self.modules.values():
            runtime.start()
        await self.heartbeat.start()
        self.leases.start()
        control = ControlServer(self, self.state_dir / "control.sock")
        await control.start()
        self._tasks = [asyncio.create_task(self._startup(), name="startup"),
                       asyncio.create_task(self._ticks(), name="ticks")]
        log.info("agent %s up: %d modules, peer %s", self.node, len(self.modules), self.peer)
        try:
            await stop.wait()
            await self._hand_over()
        finally:
            log.info("agent %s stopping", self.node)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await control.close()
            await self.leases.close()
            await self.heartbeat.stop()
            for runtime in self.modules.values():
                await runtime.close()
            self._stop_guard()

    async def _hand_over(self) -> None:
        """Orderly shutdown: stop every module here (payload, VIP, lease) and let the peer hear
        it, so the peer takes over at once instead of after the heartbeat timeout. An agent
        never exits leaving a payload or VIP that nothing would fence."""
        for task in self._tasks:
            task.cancel()
        for runtime in self.modules.values():
            runtime.post(Ev.CMD_STOP)
        budget = max((m["stop"]["graceful_timeout"] + m["stop"]["forced_timeout"]
                      for m in self.config["modules"]), default=0.0) + 5
        try:
            await asyncio.wait_for(asyncio.gather(*(r.settle() for r in self.modules.values())),
                                   timeout=budget)
        except TimeoutError:
            log.error("modules did not stop within %.0fs", budget)
        await self.leases.round()  # send the releases now
        await asyncio.sleep(2 * self.interval)  # the peer hears STOP before we go silent

    def stopped_marker(self, module: str) -> Path:
        return self.state_dir / "modules" / module / "stopped"

    async def _startup(self) -> None:
        deadline = self.started_at + self.timeout
        while not self.heartbeat.peer_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.heartbeat.peer_alive():
            await asyncio.sleep(self.interval)  # let the peer's module views arrive first
        await asyncio.gather(*(self._clean(r) for r in self.modules.values()))
        for name, runtime in self.modules.items():
            if self.stopped_marker(name).exists():
                runtime.history.clear()
                continue
            runtime.post(Ev.CMD_START, peer_alive=self.heartbeat.peer_alive())

    async def _clean(self, runtime: ModuleRuntime) -> None:
        """Leftovers of an agent that died while primary: stop its payload, drop its VIP.

        A restarted agent does not adopt a running payload (rolling restarts therefore restart
        the module); it makes sure nothing runs before the state machine decides.
        """
        try:
            if runtime.vip is not None and await runtime.vip.present():
                log.warning("module %s: removing a VIP left by a previous agent", runtime.name)
                await runtime.vip.remove()
            if await runtime.payload.running():
                log.warning("module %s: stopping a payload left by a previous agent",
                            runtime.name)
                await runtime.payload.stop(fence=True)
        except Exception as exc:
            runtime.last_error = f"clean-up at start: {exc}"
            log.error("module %s: clean-up at start failed: %s", runtime.name, exc)

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for runtime in self.modules.values():
                runtime.post(Ev.TICK)

    def bundle_hash(self) -> str | None:
        path = self.root / "BUNDLE_HASH"
        return path.read_text().strip() if path.exists() else None

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node, "peer": self.peer, "cluster": self.config["cluster"]["name"],
            "bundle": self.bundle_hash(), "started": self.wall_started,
            "peer_alive": self.heartbeat.peer_alive(), "heartbeat": self.heartbeat.status(),
            "witness": {"mode": self.config["witness"]["kind"],
                        "reachable": self.leases.unreachable_since is None,
                        "requests": self.leases.requests, "failures": self.leases.failures},
            "modules": [m.status() for m in self.modules.values()],
        }
