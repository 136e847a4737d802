"""The driver of every script-based module kind: run the scripts the compiler rendered.

Why one driver for apps and VMs: the per-kind knowledge (systemd unit or shell command,
``virsh`` or QEMU + QMP, Hyper-V cmdlets) already lives in the rendered ``start_prim``,
``stop_prim``, ``status`` and ``prepare`` scripts of the bundle, which share one contract:

* ``start_prim``: exit 0 once the payload is started (it may leave it running in the
  background, in the script's process group);
* ``stop_prim graceful|force``: exit 0 once stopped (apps also get ``$HVHA_STOP_MODE``);
* ``status``: exit 0 while the payload runs on this node;
* ``prepare`` (VM kinds): idempotent host preparation, run at install on both nodes.

So this driver only locates a script in the extracted bundle, picks its interpreter by suffix
(``/bin/sh`` for ``.sh``, PowerShell for ``.ps1``), applies the module's timeouts and turns a
failure into a :class:`DriverError` carrying the script's last output line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hvha.drivers.base import DriverError, StopTimeouts
from hvha.drivers.scripts import ScriptResult, run_script

log = logging.getLogger("hvha.drivers")

STATUS_TIMEOUT = 5.0
PREPARE_MIN_TIMEOUT = 60.0


class ScriptDriver:
    """Runs one module's rendered scripts.

    ``root`` is the extracted bundle directory: ``module["scripts"]`` maps a script name to a
    path relative to it (``modules/web/start_prim.sh``). A module's own directory is accepted
    too (the file is then looked up by its base name). ``env`` is added to the scripts'
    environment (they source their ``env.sh``/``env.ps1`` themselves).
    """

    def __init__(self, root: Path, module: Mapping[str, Any],
                 env: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.module = module
        self.name = str(module.get("name", "module"))
        self.env = dict(env or {})
        self.timeouts = StopTimeouts.from_module(module)
        self.scripts: dict[str, str] = dict(module.get("scripts") or {})
        payload = module.get("payload") or {}
        kind = module.get("kind", "app")
        # An app without unit or status command renders a status script that always exits 0.
        self.has_status = kind != "app" or bool(payload.get("unit") or payload.get("status"))
        self.last_result: dict[str, ScriptResult] = {}

    def script_path(self, script: str) -> Path | None:
        """Where script ``script`` (start_prim, stop_prim, status, prepare) is; None if the
        module kind has none."""
        rel = self.scripts.get(script)
        if rel is None:
            return None
        path = self.root / rel
        if not path.exists() and (self.root / Path(rel).name).exists():
            path = self.root / Path(rel).name
        return path

    async def _run(self, script: str, args: list[str], timeout: float,
                   *, kill_leftovers: bool = False) -> ScriptResult | None:
        path = self.script_path(script)
        if path is None:
            return None
        if not path.is_file():
            raise DriverError(f"{self.name}: {script} script {path} is missing from the bundle")
        try:
            result = await run_script(path, args, self.env, timeout, cwd=path.parent,
                                      kill_leftovers=kill_leftovers)
        except OSError as exc:
            raise DriverError(f"{self.name}: cannot run {path.name}: {exc}") from exc
        self.last_result[script] = result
        level = logging.DEBUG if result.ok else logging.WARNING
        log.log(level, "%s: %s %s: %s (%.2fs)", self.name, path.name, " ".join(args),
                result.describe(), result.duration)
        return result

    def _check(self, what: str, result: ScriptResult | None) -> None:
        if result is not None and not result.ok:
            raise DriverError(f"{self.name}: {what} failed ({result.describe()})")

    async def prepare(self) -> None:
        timeout = max(PREPARE_MIN_TIMEOUT, self.timeouts.graceful)
        self._check("prepare", await self._run("prepare", [], timeout))

    async def start(self) -> None:
        result = await self._run("start_prim", [], self.timeouts.graceful)
        if result is None:
            raise DriverError(f"{self.name}: the bundle has no start_prim script")
        self._check("start", result)

    async def stop(self, force: bool) -> None:
        mode = "force" if force else "graceful"
        timeout = self.timeouts.forced if force else self.timeouts.graceful
        result = await self._run("stop_prim", [mode], timeout)
        if result is None:
            raise DriverError(f"{self.name}: the bundle has no stop_prim script")
        self._check(f"{mode} stop", result)

    async def running(self) -> bool:
        result = await self._run("status", [], STATUS_TIMEOUT, kill_leftovers=True)
        if result is None:
            raise DriverError(f"{self.name}: the bundle has no status script")
        if result.timed_out:
            raise DriverError(f"{self.name}: status {result.describe()}")
        return result.returncode == 0
