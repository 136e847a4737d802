"""Build each module's ports (payload driver, VIP, checkers, replication) and the witness port
from a bundle's agent configuration. The only place that knows which concrete driver serves
which module kind. Also the agent's end of the dead-agent guard (:class:`GuardPipe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hvha.agent.fsm import Ev
from hvha.agent.incarnation import next_incarnation
from hvha.agent.leases import NoWitness, PingWitness, Verdict, WitnessPort, WitnessUnreachableError
from hvha.agent.runtime import NoReplication, Replicator
from hvha.agent.witness_client import WitnessClient, WitnessUnreachable
from hvha.drivers.app import ScriptDriver
from hvha.drivers.base import DriverPayload

log = logging.getLogger("hvha.agent")


class ArbiterWitness:
    """The lease client as the lease manager's witness port."""

    def __init__(self, client: WitnessClient) -> None:
        self.client = client

    async def request(self, claims: list[tuple[str, ...]]) -> dict[str, Verdict]:
        try:
            views = await self.client.request(claims)
        except WitnessUnreachable as exc:
            raise WitnessUnreachableError(str(exc)) from None
        return {m: Verdict(v.granted, v.valid_until, v.holder, v.ttl, v.why)
                for m, v in views.items()}


def witness_for(config: dict[str, Any], secret: bytes, state_dir: Path) -> WitnessPort:
    w = config["witness"]
    lease = float(w.get("lease") or config["heartbeat"]["timeout"])
    if w["kind"] == "arbiter":
        return ArbiterWitness(WitnessClient(
            config["cluster"]["name"], config["node"]["name"], secret, w["address"],
            int(w["port"]), lease=lease, incarnation=next_incarnation(state_dir / "witness")))
    if w["kind"] == "ping":
        from hvha.agent.witness_client import PingWitness as Pinger

        pinger = Pinger(list(w["targets"]))
        return PingWitness(pinger.reachable, float(config["heartbeat"]["timeout"]))
    return NoWitness()


class AnnouncedVip:
    """A VIP whose first gratuitous ARP goes out before ``add`` returns and whose repeats go
    out in the background, so the payload's start is not held up by the announcement train."""

    def __init__(self, vip: Any) -> None:
        self.vip = vip
        self._repeats: asyncio.Task[None] | None = None

    async def add(self) -> None:
        await self.vip.add(announce=False)
        await self.announce()

    async def announce(self) -> None:
        """One gratuitous ARP now, the repeats in the background."""
        from hvha.drivers import garp

        if self._repeats is not None:
            self._repeats.cancel()
        ifname = await self.vip.resolve_interface()
        try:
            await garp.announce(ifname, self.vip.ip, count=1)
        except garp.GarpError as exc:
            log.warning("VIP %s: gratuitous ARP failed: %s", self.vip.ip, exc)

        async def repeats() -> None:
            with contextlib.suppress(garp.GarpError):
                await asyncio.sleep(self.vip.garp_interval)
                await garp.announce(ifname, self.vip.ip, count=max(1, self.vip.garp_count - 1),
                                    interval=self.vip.garp_interval)

        self._repeats = asyncio.create_task(repeats(), name="garp")

    async def remove(self) -> None:
        if self._repeats is not None:
            self._repeats.cancel()
        await self.vip.remove()

    async def present(self) -> bool:
        return bool(await self.vip.present())


class PendingReplication(NoReplication):
    """Replicated directories without the mirror (replication is a separate issue): the local
    copy counts as good only after the operator named this node with `hvha prim`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def data_ok(self) -> bool:
        return self.marker.exists()

    def in_sync(self) -> bool:
        return False

    def generation(self) -> str:
        return "unknown"

    async def become_primary(self) -> None:
        self.marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.marker.touch()


class GuardPipe:
    """The pipe to the dead-agent guard (agent/guard.py), told which payloads may run.

    A guard reads the bundle's agent.json once, so a reload starts a new one (:meth:`renew`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.armed: set[str] = set()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hvha.agent.guard", str(self.root)], stdin=subprocess.PIPE,
            start_new_session=True)

    def set(self, module: str, armed: bool) -> None:
        """The runtimes' ``guard`` callback: arm before a payload may run, disarm after."""
        if (module in self.armed) == armed or self._proc is None:
            return
        (self.armed.add if armed else self.armed.discard)(module)
        if not self._tell(f"{'arm' if armed else 'disarm'} {module}"):
            log.error("the dead-agent guard is gone: restarting it")
            self._arm_new()

    def renew(self) -> subprocess.Popen[bytes] | None:
        """Start a guard for the bundle now at ``root``, armed like the running one; return
        the old one, for :meth:`stop` once the new one runs."""
        old = self._proc
        if old is not None:
            self._arm_new()
        return old

    def _arm_new(self) -> None:
        self.start()
        for name in sorted(self.armed):
            self._tell(f"arm {name}")

    def _tell(self, line: str) -> bool:
        stdin = self._proc.stdin if self._proc is not None else None
        try:
            assert stdin is not None
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except OSError:
            return False
        return True

    def stop(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Orderly exit of ``proc`` (default: the current guard): it fences nothing."""
        proc = proc or self._proc
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


class ReplicationChanged(Exception):
    """A reload would change a module's replicated directories: only a restart can do that."""


class Ports:
    def __init__(self, root: Path, config: dict[str, Any], state_dir: Path) -> None:
        self.root = root
        self.config = config
        self.state_dir = state_dir
        self._replicators: dict[str, tuple[str, Replicator]] = {}

    def env(self, m: dict[str, Any]) -> dict[str, str]:
        return {"HVHA_MODULE": m["name"], "HVHA_NODE": self.config["node"]["name"],
                "HVHA_PEER": self.config["peer"]["name"],
                "HVHA_PYTHON": sys.executable}  # scripts reach hvha helpers (QMP) through it

    def build(self, m: dict[str, Any], agent: Any) -> tuple[Any, Any, Any, Replicator]:
        from hvha.agent.checkers import CheckerSet
        from hvha.drivers.vip import Vip

        driver = ScriptDriver(self.root, m, self.env(m))
        payload = DriverPayload(driver)
        vip = None
        if m.get("vip"):
            vip = AnnouncedVip(Vip(m["vip"]["address"], m["vip"].get("interface")))
        name = m["name"]

        def on_event(event: Any) -> None:
            runtime = agent.modules.get(name)
            if runtime is None:  # removed by a reload while a probe was in flight
                return
            if event.action == "wait":
                runtime.post(Ev.RESOURCE_UP if event.ok else Ev.RESOURCE_DOWN,
                             action=event.name, detail=event.detail)
            elif not event.ok:
                runtime.post(Ev.PAYLOAD_FAILED, action=event.action,
                             detail=f"checker {event.name}: {event.detail}")

        # Count only processes in this node's network namespace (the lab's nodes share one
        # pid namespace; on a real server this is every process).
        checkers = (CheckerSet(m["checkers"], driver, on_event, env=self.env(m),
                               same_netns=True) if m["checkers"] else None)
        return payload, vip, checkers, self.replicator(m, agent)

    def replicator(self, m: dict[str, Any], agent: Any = None) -> Replicator:
        """The module's mirror (one per module for the agent's life: its appliers hold the
        replication ports, so a reload that keeps the directories keeps the same object), or
        :class:`PendingReplication` when this node has no replication TLS credentials."""
        name = m["name"]
        if not m["replicated"]:
            return NoReplication()
        key = json.dumps([m["replicated"], m.get("replication_port"),
                          self.config.get("replication")], sort_keys=True)
        cached = self._replicators.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None:
            raise ReplicationChanged(f"module {name}: its replicated directories changed, which "
                                     "needs the module restarted on the new mount: restart "
                                     "the hvha service")
        from hvha.replication import stale
        from hvha.replication.build import build_replicator

        built: Replicator | None = None
        try:
            for rep in m["replicated"]:
                stale.clear(rep["path"])  # a killed agent's mirror or read-only guard
                if not os.path.isdir(rep["path"]):
                    log.warning("module %s: creating the replicated directory %s", name,
                                rep["path"])
                    os.makedirs(rep["path"], mode=0o755, exist_ok=True)
            fence = peer_alive = None
            if agent is not None and self.config["witness"]["kind"] == "arbiter":
                timeout = float(self.config["heartbeat"]["timeout"])

                def fence(gen: str) -> bool:
                    return bool(agent.outdate_blocking(name, gen, timeout))
            if agent is not None:
                def peer_alive() -> bool:  # and hears this node: its acks can come back
                    return bool(agent.peer_reachable())
            built = build_replicator(m, self.config, self.state_dir, fence=fence,
                                     peer_alive=peer_alive)
        except OSError as exc:  # the module waits for an operator rather than kill the agent
            log.error("module %s: cannot set up replication: %s (the module waits for "
                      "`hvha prim`)", name, exc)
        replicator = built if built is not None else PendingReplication(
            self.state_dir / "modules" / name / "data-ok")
        self._replicators[name] = (key, replicator)
        return replicator

    async def release(self, name: str) -> None:
        """A module removed by a reload: stop serving its replication port and its guard."""
        cached = self._replicators.pop(name, None)
        closer = getattr(cached[1], "aclose", None) if cached is not None else None
        if closer is not None:
            await closer()

    async def close(self) -> None:
        for name in list(self._replicators):
            await self.release(name)

