"""`hvha agent`: one process per node running every module of its bundle.

Wiring only: heartbeats (peer liveness, the peer's view of each module), the lease manager
(witness), one :class:`ModuleRuntime` per module, a tick for timers, and the control socket.
Modules start in the bundle's start order once the peer has been heard or the heartbeat timeout
has passed (so a node starting alone does not race a live peer it has not heard yet).

The bundle is installed at start and again by :meth:`Agent.reload` (``hvha reload``, SIGHUP,
``hvha apply``), which applies module changes in place: added modules start, removed ones stop,
changed ones keep their state and get new ports (the payload restarts only if what it was
started with changed), unchanged ones are not touched. Node-level changes (heartbeat, witness,
node, peer, cluster, replication) are refused with ``restart_required``: only a service restart
applies them, and stopping the agent hands its primary modules to the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from hvha.agent.bundle_io import (
    BundleError,
    ModuleChange,
    commit,
    compare,
    discard,
    edited_files,
    extract,
    load_bundle,
    running_digests,
    running_hash,
)
from hvha.agent.fences import valid_gen
from hvha.agent.frames import HEARTBEAT_KEY_PURPOSE, Frame, derive_key
from hvha.agent.fsm import Ev, Policy, Role
from hvha.agent.heartbeat import (
    HeartbeatConfig,
    HeartbeatNetwork,
    HeartbeatService,
)
from hvha.agent.incarnation import next_incarnation
from hvha.agent.leases import LeaseManager, NoWitness, WitnessPort
from hvha.agent.liveness import Reciprocity
from hvha.agent.ports import GuardPipe, ReplicationChanged
from hvha.agent.runtime import ModuleRuntime

log = logging.getLogger("hvha.agent")


class Agent:
    def __init__(self, root: Path, config: dict[str, Any], state_dir: Path, secret: bytes,
                 ports: Any, witness: WitnessPort | None = None,
                 source: Path | None = None) -> None:
        self.root = root
        self.config = config
        self.state_dir = state_dir
        self.ports = ports
        self.source = source  # the bundle file `reload` reads again
        self.node = config["node"]["name"]
        self.peer = config["peer"]["name"]
        hb = config["heartbeat"]
        self.interval = float(hb["interval"])
        self.timeout = float(hb["timeout"])
        lease = config["witness"].get("lease") or self.timeout
        self.started_at = time.monotonic()
        self.wall_started = time.time()
        self.last_vouch: float | None = None
        self.reciprocity = Reciprocity(self.timeout)  # does the peer still hear this node?
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
        self.guard = GuardPipe(root)
        self.modules: dict[str, ModuleRuntime] = {}
        for m in sorted(config["modules"], key=lambda m: m["start_rank"]):
            self.modules[m["name"]] = self._runtime(m, ports.build(m, self))
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self._startup_task: asyncio.Task[None] | None = None

    def _policy(self, m: dict[str, Any]) -> Policy:
        f = m["failover"]
        preferred = f.get("preferred")
        names = sorted([self.node, self.peer])
        return Policy(
            automatic=f["automatic"], arbitrated=self.config["witness"]["kind"] == "arbiter",
            designated=preferred == self.node if preferred else names[0] == self.node,
            peer_preferred=preferred == self.peer, failback=f["failback"],
            stability_window=f["stability_window"], restart_count=f["restart_count"],
            restart_window=f["restart_window"])

    def _runtime(self, m: dict[str, Any], ports: tuple[Any, Any, Any, Any]) -> ModuleRuntime:
        payload, vip, checkers, replicator = ports
        return ModuleRuntime(m["name"], self._policy(m), payload, vip, checkers, replicator,
                             self.leases, guard=self.guard.set)

    # -- Poster, for the lease manager ---------------------------------------------------
    def post_to(self, module: str, kind: Ev, **fields: Any) -> None:
        runtime = self.modules.get(module)
        if runtime is not None:  # a late verdict for a module a reload removed is dropped
            runtime.post(kind, **fields)

    def generation(self, module: str) -> str | None:
        """The module's data generation for lease claims (None: it replicates nothing)."""
        runtime = self.modules.get(module)
        gen = runtime.replicator.generation() if runtime is not None else None
        return gen if valid_gen(gen) else None

    def outdate_blocking(self, module: str, gen: str, timeout: float) -> bool:
        """From a replication thread: record at the witness that this node writes ``module``
        alone from ``gen`` on; blocks until answered (the writes wait: DRBD's fence-peer)."""
        loop = self._loop
        if loop is None:
            return False
        fut = asyncio.run_coroutine_threadsafe(self.leases.outdate(module, gen), loop)
        try:
            return fut.result(timeout)
        except Exception:  # timeout, loop closed: not recorded
            fut.cancel()
            return False

    def primaries(self) -> list[str]:
        return [n for n, m in self.modules.items() if m.state.role.primary]

    def peer_reachable(self) -> bool:
        """The peer is alive and hears this node: the link works both ways."""
        return bool(self.heartbeat.peer_alive()) and self.reciprocity.hears_us()

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
        hears = self.reciprocity.hears_us()
        self.reciprocity.report(heard_ms)
        if hears != self.reciprocity.hears_us():
            log.warning("peer %s %s", self.peer, "hears this node again" if not hears else
                        "no longer hears this node, though this node hears it (one-way "
                        "partition?): its replication acks will not come")
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
            self.reciprocity.reset()
            for runtime in self.modules.values():
                runtime.post(Ev.PEER, peer_alive=False)

    # -- life cycle ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from hvha.agent.control import ControlServer  # the socket server is an edge

        self._loop = asyncio.get_running_loop()
        self.guard.start()
        for runtime in self.modules.values():
            runtime.start()
        await self.heartbeat.start()
        self.leases.start()
        control = ControlServer(self, self.state_dir / "control.sock")
        await control.start()
        self._startup_task = asyncio.create_task(self._startup(), name="startup")
        self._tasks = [self._startup_task, asyncio.create_task(self._ticks(), name="ticks")]
        log.info("agent %s up: %d modules, peer %s", self.node, len(self.modules), self.peer)
        try:
            await stop.wait()
            self._stopping = True
            async with self._reload_lock:  # a reload in progress finishes first
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
            closer = getattr(self.ports, "close", None)
            if closer is not None:
                await closer()  # unmount mirrors, stop the replication listeners
            self.guard.stop()

    async def _hand_over(self) -> None:
        """Orderly shutdown: stop every module here (payload, VIP, lease) and let the peer hear
        it, so the peer takes over at once instead of after the heartbeat timeout. An agent
        never exits leaving a payload or VIP that nothing would fence."""
        for task in self._tasks:
            task.cancel()
        for runtime in self.modules.values():
            runtime.post(Ev.CMD_STOP)
        await self._settle(list(self.modules.values()), "stop")
        await self.leases.round()  # send the releases now
        await asyncio.sleep(2 * self.interval)  # the peer hears STOP before we go silent

    async def _settle(self, runtimes: list[ModuleRuntime], what: str) -> None:
        """Wait for the modules to handle their events, within their stop timeouts."""
        stops = {m["name"]: m["stop"] for m in self.config["modules"]}
        budget = max((stops[r.name]["graceful_timeout"] + stops[r.name]["forced_timeout"]
                      for r in runtimes if r.name in stops), default=0.0) + 5
        try:
            await asyncio.wait_for(asyncio.gather(*(r.settle() for r in runtimes)), budget)
        except TimeoutError:
            log.error("modules %s did not %s within %.0fs", ", ".join(r.name for r in runtimes),
                      what, budget)

    def stopped_marker(self, module: str) -> Path:
        return self.state_dir / "modules" / module / "stopped"

    async def _startup(self) -> None:
        deadline = self.started_at + self.timeout
        while not self.heartbeat.peer_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.heartbeat.peer_alive():
            await asyncio.sleep(self.interval)  # let the peer's module views arrive first
        await self._start_modules(list(self.modules.values()))

    async def _start_modules(self, runtimes: list[ModuleRuntime]) -> None:
        await asyncio.gather(*(self._clean(r) for r in runtimes))
        for runtime in runtimes:
            if self.stopped_marker(runtime.name).exists():  # `hvha stop` outlives restarts
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
        return running_hash(self.root)

    # -- reload --------------------------------------------------------------------------
    async def repair(self) -> dict[str, Any]:
        """Put each VIP where the module's role says (drift found by `hvha plan`): on a primary
        that lost it, add and announce it; on a node that is not primary, remove it."""
        fixed = []
        for name, runtime in self.modules.items():
            vip = runtime.vip
            if vip is None:
                continue
            present, primary = await vip.present(), runtime.state.role.primary
            if primary and not present:
                await vip.add()
                fixed.append(f"{name}: VIP added")
            elif not primary and present:
                await vip.remove()
                fixed.append(f"{name}: VIP removed")
        return {"ok": True, "repaired": fixed}

    async def reload(self) -> dict[str, Any]:
        """Read the bundle file again and apply its module changes in place (module doc).

        Replies ``{"ok": True, "bundle", "added", "removed", "changed", "restarted"}``, or
        ``ok: False`` with ``error`` (and ``restart_required`` for node-level changes); a
        refused reload leaves the running configuration untouched.
        """
        if self.source is None:
            return {"ok": False, "error": "this agent was not started from a bundle file: "
                    "restart it to load a new configuration"}
        if self._stopping:
            return {"ok": False, "error": "the agent is stopping: start it again instead"}
        async with self._reload_lock:
            if self._startup_task is not None:  # modules start before they are reloaded
                await asyncio.wait({self._startup_task})
            return await self._reload(self.source)

    async def _reload(self, source: Path) -> dict[str, Any]:
        running = self.bundle_hash()
        try:
            new = await asyncio.to_thread(load_bundle, source)
        except BundleError as exc:
            return {"ok": False, "bundle": running, "error": f"reload refused: {exc} (the "
                    f"agent keeps running bundle {str(running)[:12]})"}
        none: list[str] = []
        if new.hash == running:
            edited = await asyncio.to_thread(edited_files, self.root, new.digests)
            message = "no change"
            if edited:  # drift: restore the files the scripts run from
                tmp = await asyncio.to_thread(extract, new, self.state_dir)
                self.root = await asyncio.to_thread(commit, tmp, self.state_dir)
                message = f"restored files edited on the node: {', '.join(edited)}"
                log.warning("reload: %s", message)
            return {"ok": True, "bundle": running, "message": message, "added": none,
                    "removed": none, "changed": none, "restarted": none}
        node = new.config.get("node", {}).get("name")
        if node != self.node:
            return {"ok": False, "bundle": running, "error": f"reload refused: {source} is "
                    f"node {node}'s bundle and this is {self.node}: push {self.node}.bundle"}
        plan = compare(self.config, running_digests(self.root), new.config, new.digests)
        if plan.sections:
            what = ", ".join(plan.sections)
            return {"ok": False, "restart_required": True, "bundle": running,
                    "sections": list(plan.sections),
                    "error": f"bundle {new.hash[:12]} changes node-level settings ({what}), "
                    "which a reload cannot apply: restart the hvha service to load it "
                    "(stopping the agent hands this node's primary modules to the peer); "
                    f"nothing was changed, the agent keeps running bundle {str(running)[:12]}"}
        want = {m["name"]: m for m in new.config["modules"]}
        redo = [c for c in plan.changed if c.settings]
        try:  # build everything first: a module that cannot be built refuses the reload
            built = {n: self.ports.build(want[n], self) for n in [*plan.added,
                                                                   *(c.name for c in redo)]}
        except ReplicationChanged as exc:
            return {"ok": False, "restart_required": True, "bundle": running,
                    "sections": ["replicated"], "error": f"{exc}; nothing was changed"}
        except Exception as exc:
            return {"ok": False, "bundle": running, "error": f"reload refused: cannot set up "
                    f"the new modules: {exc}; nothing was changed"}
        tmp = await asyncio.to_thread(extract, new, self.state_dir)
        try:
            restarted = await self._apply(new.config, tmp, plan.removed, redo, built)
        except BundleError as exc:
            return {"ok": False, "bundle": running, "error": f"reload failed: {exc}"}
        finally:
            discard(tmp)  # gone already once committed
        added = [self._runtime(want[n], built[n]) for n in plan.added]
        for runtime in added:
            self.modules[runtime.name] = runtime
            runtime.start()
        rank = {m["name"]: m["start_rank"] for m in new.config["modules"]}
        self.modules = dict(sorted(self.modules.items(), key=lambda kv: rank[kv[0]]))
        await self._start_modules(added)
        for change in redo:
            self.modules[change.name].post(Ev.TICK)  # a new policy decides at once
        await self._settle([*added, *(self.modules[c.name] for c in redo)], "settle")
        log.info("reload: bundle %s -> %s: added %s, removed %s, changed %s, restarted %s",
                 str(running)[:12], new.hash[:12], list(plan.added), list(plan.removed),
                 [c.name for c in plan.changed], restarted)
        return {"ok": True, "bundle": new.hash, "added": list(plan.added),
                "removed": list(plan.removed), "changed": [c.name for c in plan.changed],
                "restarted": restarted}

    async def _apply(self, config: dict[str, Any], tmp: Path, removed: tuple[str, ...],
                     redo: list[ModuleChange], built: dict[str, Any]) -> list[str]:
        """Stop what goes or restarts (old scripts), swap the bundle dir, start with the new."""
        gone = [self.modules[n] for n in removed]
        for runtime in gone:
            runtime.post(Ev.CMD_STOP)
        await self._settle(gone, "stop")
        if gone:
            await self.leases.round()  # hand their leases back now
        async with contextlib.AsyncExitStack() as stack:
            changed = [self.modules[c.name] for c in redo]
            for runtime in changed:
                await stack.enter_async_context(runtime.paused())
            restarted = [c.name for c, r in zip(redo, changed, strict=True)
                         if c.restart and r.state.role.primary]
            stopped = await asyncio.gather(*(r.leave_ports(restart=c.restart, vip=c.vip)
                                             for c, r in zip(redo, changed, strict=True)))
            try:
                await asyncio.to_thread(commit, tmp, self.state_dir)
            except OSError as exc:  # put back what phase 1 stopped, with the old ports
                await asyncio.gather(*(r.take_ports(
                    r.policy, r.payload, r.vip, r.checkers, None, restart=c.restart,
                    vip_changed=c.vip, stopped=ok) for c, r, ok in zip(redo, changed, stopped,
                                                                        strict=True)))
                raise BundleError(f"cannot install the new bundle in {self.state_dir}: {exc}"
                                  f"; the old one still runs (removed modules {list(removed)} "
                                  "were stopped: `hvha start` them)") from None
            self.config = config
            old_guard = self.guard.renew()
            want = {m["name"]: m for m in config["modules"]}
            for runtime in gone:
                await runtime.close()
                release = getattr(self.ports, "release", None)
                if release is not None:
                    await release(runtime.name)
                del self.modules[runtime.name]
                self.peer_seen.pop(runtime.name, None)
                self.guard.armed.discard(runtime.name)
            await asyncio.gather(*(self._take(r, c, want[c.name], built[c.name], ok)
                                   for c, r, ok in zip(redo, changed, stopped, strict=True)))
        if old_guard is not None:
            await asyncio.to_thread(self.guard.stop, old_guard)
        return restarted

    async def _take(self, runtime: ModuleRuntime, change: ModuleChange, m: dict[str, Any],
                    ports: tuple[Any, Any, Any, Any], stopped: bool) -> None:
        payload, vip, checkers, replicator = ports
        old_vip = runtime.vip
        await runtime.take_ports(
            self._policy(m), payload, vip if change.vip else old_vip, checkers,
            replicator if change.replication else None, restart=change.restart,
            vip_changed=change.vip, stopped=stopped)

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node, "peer": self.peer, "cluster": self.config["cluster"]["name"],
            "bundle": self.bundle_hash(), "started": self.wall_started,
            "peer_alive": self.heartbeat.peer_alive(), "heartbeat": self.heartbeat.status(),
            "peer_hears_us": self.reciprocity.hears_us(),
            "witness": {"mode": self.config["witness"]["kind"],
                        "reachable": self.leases.unreachable_since is None,
                        "requests": self.leases.requests, "failures": self.leases.failures},
            "modules": [m.status() for m in self.modules.values()],
        }
