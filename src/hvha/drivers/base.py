"""What the agent needs from a payload driver, and the SafeKit stop sequence built on it.

Why a Protocol: the agent's decisions (start on the primary, stop gracefully then by force,
restart after a checker fires) are the same for an application and for a virtual machine; only
*how* to start, stop and probe differs. Every payload kind therefore implements four calls:

* ``prepare()``  - once per bundle install, on both nodes (define/register a VM, make dirs);
* ``start()``    - start the payload on the primary; raises :class:`DriverError` with a message;
* ``stop(force)``- ``force=False`` is the graceful phase (app stop command, ACPI shutdown or
  managed save), ``force=True`` the last resort (SIGKILL, ``virsh destroy``, ``Stop-VM
  -TurnOff``); raises :class:`DriverError` if the step failed or overran its timeout;
* ``running()``  - is the payload up on this node? raises :class:`DriverError` if it cannot tell.

How each kind fits:

* **app** and **kvm** (libvirt or plain QEMU) are both :class:`hvha.drivers.app.ScriptDriver`:
  the compiler renders ``start_prim.sh``/``stop_prim.sh graceful|force``/``status.sh``/
  ``prepare.sh`` per kind, so the driver only runs them with ``/bin/sh``. A native libvirt
  driver (over the libvirt API instead of ``virsh``) can later implement this same Protocol.
* **hyperv** renders the same four scripts as ``.ps1``; the same ScriptDriver runs them with
  ``powershell.exe -File`` (see :func:`hvha.drivers.scripts.interpreter_for`) on the Windows
  node; only the process-group kill in ``run_script`` needs a job-object equivalent there.

:func:`stop_with_timeouts` is the stop policy shared by all of them: graceful within
``stop.graceful_timeout``; if that fails, overruns or the payload still runs, force within
``stop.forced_timeout``; report how it ended. :class:`DriverPayload` adapts a driver to the
agent runtime's ``Payload`` port (``stop(fence=...)``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from hvha.drivers.scripts import KILL_GRACE

log = logging.getLogger("hvha.drivers")

_GUARD = KILL_GRACE + 1.0  # outer bound beyond a phase's own timeout (its kill takes this long)


class DriverError(Exception):
    """A driver step failed; the message says which step and why (shown in ``hvha status``)."""


@dataclass(frozen=True)
class StopTimeouts:
    graceful: float = 60.0
    forced: float = 30.0

    @classmethod
    def from_module(cls, module: Mapping[str, Any]) -> StopTimeouts:
        """From the ``stop`` dict of a module in agent.json (seconds)."""
        stop = module.get("stop") or {}
        return cls(float(stop.get("graceful_timeout", cls.graceful)),
                   float(stop.get("forced_timeout", cls.forced)))


@runtime_checkable
class Driver(Protocol):
    name: str
    timeouts: StopTimeouts
    has_status: bool
    """False when ``running()`` cannot really tell (an app without a status command): the
    stop sequence then trusts the stop script's exit status instead of asking ``running()``."""

    async def prepare(self) -> None: ...
    async def start(self) -> None: ...
    async def stop(self, force: bool) -> None: ...
    async def running(self) -> bool: ...


class StopOutcome(StrEnum):
    GRACEFUL = "graceful"  # the graceful phase stopped it
    FORCED = "forced"  # the graceful phase failed or overran; the forced phase stopped it
    FAILED = "failed"  # still running (or unknown) after the forced phase


@dataclass(frozen=True)
class StopResult:
    outcome: StopOutcome
    detail: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.outcome is not StopOutcome.FAILED


async def _phase(driver: Driver, force: bool, timeout: float) -> str | None:
    """Run one stop phase; None if it succeeded, else why not."""
    try:
        async with asyncio.timeout(timeout + _GUARD):
            await driver.stop(force)
    except TimeoutError:
        return f"{'forced' if force else 'graceful'} stop overran {timeout:g}s"
    except DriverError as exc:
        return str(exc)
    except OSError as exc:
        return f"{'forced' if force else 'graceful'} stop could not run: {exc}"
    return None


async def _still_running(driver: Driver) -> str | None:
    """None if the payload is known to be stopped, else why it is (or may be) still up."""
    if not driver.has_status:
        return None
    try:
        async with asyncio.timeout(5.0 + _GUARD):
            up = await driver.running()
    except (TimeoutError, DriverError, OSError) as exc:
        return f"status unknown ({exc or type(exc).__name__})"
    return "still running" if up else None


async def stop_with_timeouts(driver: Driver, *, force_only: bool = False) -> StopResult:
    """Stop ``driver``'s payload the SafeKit way and say how it ended (never raises
    DriverError: a FAILED result carries the reasons).

    ``force_only`` skips the graceful phase (fencing: the node must let go *now*).
    """
    started = time.monotonic()
    reasons: list[str] = []
    t = driver.timeouts
    if not force_only:
        why = await _phase(driver, False, t.graceful) or await _still_running(driver)
        if why is None:
            return StopResult(StopOutcome.GRACEFUL, "stopped gracefully",
                              time.monotonic() - started)
        reasons.append(f"graceful: {why}")
        log.warning("%s: graceful stop did not finish the job (%s): forcing", driver.name, why)
    why = await _phase(driver, True, t.forced) or await _still_running(driver)
    duration = time.monotonic() - started
    if why is None:
        reasons.append("stopped by force")
        return StopResult(StopOutcome.FORCED, "; ".join(reasons), duration)
    reasons.append(f"force: {why}")
    log.error("%s: forced stop failed: %s", driver.name, why)
    return StopResult(StopOutcome.FAILED, "; ".join(reasons), duration)


class DriverPayload:
    """A :class:`Driver` as the agent runtime's ``Payload`` port.

    ``stop(fence=False)`` is the full graceful-then-forced sequence, ``stop(fence=True)`` the
    forced phase only; both raise :class:`DriverError` when the payload may still be running,
    so the runtime records the error. ``last_stop`` keeps the latest :class:`StopResult`.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.last_stop: StopResult | None = None

    async def prepare(self) -> None:
        await self.driver.prepare()

    async def start(self) -> None:
        await self.driver.start()

    async def stop(self, *, fence: bool) -> None:
        self.last_stop = result = await stop_with_timeouts(self.driver, force_only=fence)
        if not result.ok:
            raise DriverError(f"{self.driver.name}: stop failed: {result.detail}")

    async def running(self) -> bool:
        return await self.driver.running()
