"""The agent's control socket: newline-delimited JSON over a Unix socket (mode 0600).

Local only, by design: the CLI on the node (or `hvha apply` through SSH) talks to it; nothing
is exposed on the network. Requests: ``{"cmd": "status"}``, ``{"cmd": "swap", "module": "web"}``
(also start, stop, prim, second, restart), ``{"cmd": "checkers"|"failover", "module": m,
"on": bool}``, ``{"cmd": "reload"}`` (load the bundle file again: see
:meth:`hvha.agent.daemon.Agent.reload` for the reply). A module command answers once the module
has handled it (or after ``wait``). ``{"cmd": "prim", "module": m, "force": true}`` promotes a
node whose copy is half-synced (without ``force`` such a ``prim`` is refused).

Replication (answered by the module's replicator, see hvha.replication.dirops):
``{"cmd": "verify", "module": m}`` -> ``{"ok", "equal", "dirs": [{"path", "resyncing",
"differences": [{"path", "kind", "detail"}]}]}``; ``{"cmd": "resync", "module": m, "full":
true}`` -> ``{"ok", "messages"}``; ``{"cmd": "resolve", "module": m, "discard": node}`` ->
``{"ok", "action": "local"|"peer", "aside": [dirs], "messages"}``. Errors are ``{"ok": false,
"error": what to do}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from hvha.agent.fsm import Ev
from hvha.replication.admin import OperatorError

log = logging.getLogger("hvha.agent")

REPLICATION = ("verify", "resync", "resolve")
COMMANDS = {"start": Ev.CMD_START, "stop": Ev.CMD_STOP, "prim": Ev.CMD_PRIM,
            "second": Ev.CMD_SECOND, "swap": Ev.CMD_SWAP, "restart": Ev.CMD_RESTART}


class ControlServer:
    def __init__(self, agent: Any, path: Path) -> None:
        self.agent = agent
        self.path = path
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            try:
                request = json.loads(line)
                reply = await self.handle(request)
            except (ValueError, TypeError, KeyError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self.agent.status()}
        if cmd == "repair":
            repaired: dict[str, Any] = await self.agent.repair()
            return repaired
        if cmd == "reload":
            try:
                reply: dict[str, Any] = await self.agent.reload()
            except Exception as exc:  # the agent runs on: say so rather than hang up
                log.exception("reload failed")
                return {"ok": False, "error": f"reload failed: {type(exc).__name__}: {exc} "
                        "(see the agent's log)"}
            return reply
        module = request.get("module")
        runtime = self.agent.modules.get(module)
        if runtime is None:
            known = ", ".join(sorted(self.agent.modules))
            return {"ok": False, "error": f"no module '{module}' on this node (modules: {known})"}
        if cmd in REPLICATION:
            return await self._replication(cmd, str(module), runtime, request)
        forced: list[str] = []
        if cmd == "prim":
            try:
                forced = await self._prim_data(str(module), runtime, bool(request.get("force")))
            except OperatorError as exc:
                return {"ok": False, "error": str(exc)}
        marker: Path = self.agent.stopped_marker(module)
        if cmd in COMMANDS:
            if cmd == "stop":
                marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                marker.touch()
            elif cmd == "start":
                marker.unlink(missing_ok=True)
            runtime.post(COMMANDS[cmd])
        elif cmd == "checkers" and runtime.checkers is not None:
            runtime.checkers.enabled = bool(request["on"])
        elif cmd == "failover":
            runtime.state = replace(runtime.state, failover_enabled=bool(request["on"]))
            runtime.post(Ev.TICK)
        elif cmd != "checkers":
            return {"ok": False, "error": f"unknown command '{cmd}'"}
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.settle(), timeout=float(request.get("wait", 600)))
        return {"ok": True, "module": runtime.status(), **({"forced": forced} if forced else {})}

    async def _prim_data(self, module: str, runtime: Any, force: bool) -> list[str]:
        """`prim` on a node whose copy is not good (half-synced): refused without force; with
        it the copy is declared good (the replicator logs a warning). The forced paths."""
        rep = runtime.replicator
        if rep.data_ok():
            return []
        if not force:
            raise OperatorError(f"the data of {module} on this node is not up to date (a "
                                "resync into it did not finish): promoting it loses what it "
                                f"misses; `hvha prim {module} --force` does it anyway")
        log.warning("module %s: prim FORCED by the operator on data that is not up to date",
                    module)
        promote = getattr(rep, "force_promote", None)
        return list(await asyncio.to_thread(promote)) if promote is not None else []

    async def _replication(self, cmd: str, module: str, runtime: Any,
                           request: dict[str, Any]) -> dict[str, Any]:
        rep = runtime.replicator
        if getattr(rep, "verify", None) is None:
            return {"ok": False, "error": f"module {module} replicates no directory here (or "
                    "its replication is not running: see the agent's log)"}
        try:
            if cmd == "verify":
                return {"ok": True, **await asyncio.to_thread(rep.verify)}
            if cmd == "resync":
                if not request.get("full"):
                    return {"ok": False, "error": "only a full resync can be asked for "
                            "(`hvha resync MODULE --full`); incremental ones run by themselves"}
                return {"ok": True, "messages": await asyncio.to_thread(rep.force_full_resync)}
            discard = str(request["discard"])
            return {"ok": True, **await asyncio.to_thread(rep.resolve, discard)}
        except OperatorError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the agent runs on: say so rather than hang up
            log.exception("%s %s failed", cmd, module)
            return {"ok": False, "error": f"{cmd} failed: {type(exc).__name__}: {exc} (see the "
                    "agent's log)"}


def call(path: Path, request: dict[str, Any], timeout: float = 630) -> dict[str, Any]:
    """Client side (blocking): send one request and return the reply."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply
