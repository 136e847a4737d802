"""Payload drivers, virtual IP and script runner: how the agent acts on the node.

Why a package of its own: everything here touches the machine (processes, addresses, raw
sockets), while the agent's decisions stay pure; the agent reaches this package only through
:class:`Driver`, :class:`Vip` and :func:`run_script`, which tests can replace with fakes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hvha.drivers.app import ScriptDriver
from hvha.drivers.base import (
    Driver,
    DriverError,
    DriverPayload,
    StopOutcome,
    StopResult,
    StopTimeouts,
    stop_with_timeouts,
)
from hvha.drivers.scripts import ScriptResult, run_script
from hvha.drivers.vip import Vip, VipError

__all__ = [
    "Driver",
    "DriverError",
    "DriverPayload",
    "ScriptDriver",
    "ScriptResult",
    "StopOutcome",
    "StopResult",
    "StopTimeouts",
    "Vip",
    "VipError",
    "driver_for",
    "run_script",
    "stop_with_timeouts",
]

SCRIPT_KINDS = frozenset({"app", "kvm", "hyperv"})


def driver_for(root: Path, module: Mapping[str, Any],
               env: Mapping[str, str] | None = None) -> Driver:
    """The driver of ``module`` (an agent.json module dict) from the bundle at ``root``.

    Every kind known today is script-based (see :mod:`hvha.drivers.base`)."""
    kind = module.get("kind", "app")
    if kind not in SCRIPT_KINDS:
        raise DriverError(f"module {module.get('name')!r}: no driver for kind {kind!r}")
    return ScriptDriver(root, module, env)
