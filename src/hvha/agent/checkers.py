"""Checkers: periodic probes of what the module's payload needs, turned into agent events.

Why edge-triggered events: the state machine wants to hear "the web checker has failed 3 times
in a row: restart" once, and "it is fine again" once, not a stream of samples. So each checker
counts consecutive failures and :class:`CheckerSet` calls ``on_event`` exactly when the count
reaches the checker's ``failures`` (``ok=False``, ``action`` = its ``on_failure``) and when a
probe succeeds after that (``ok=True``).

Probes (``type`` of the agent.json checker dict; parameters in its ``params``):

* ``process``: live processes in /proc whose name (``comm`` or argv[0]'s base name) equals
  ``process``, or whose command line matches ``/regex/``; their count must lie in [min, max];
* ``tcp``: a TCP connection to host:port opens within the timeout;
* ``ping``: an ICMP echo is answered, over an unprivileged ping socket (SOCK_DGRAM), else a
  raw socket (root) - no ``ping`` binary needed;
* ``interface``: /sys/class/net/IF/operstate is ``up`` (or ``unknown`` with carrier 1);
* ``script``: ``/bin/sh -c command`` exits 0 within the timeout (its process group is killed
  afterwards, so a checker cannot pile up stray processes);
* ``vm_state``: the payload driver's ``running()``.

The first probe runs one interval after ``start()``, giving the payload time to come up. Clock
and sleep are injectable so the loops can be driven with fake time in unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvha.drivers import icmp
from hvha.drivers.base import Driver
from hvha.drivers.scripts import KILL_GRACE, run_script

log = logging.getLogger("hvha.agent.checkers")

TYPES = ("process", "tcp", "ping", "interface", "script", "vm_state")
ACTIONS = ("restart", "failover", "wait", "stop")
_REQUIRED = {"process": ("process",), "tcp": ("host", "port"), "ping": ("host",),
             "interface": ("interface",), "script": ("command",), "vm_state": ()}

Probe = Callable[["CheckerSpec"], Awaitable[tuple[bool, str]]]


@dataclass(frozen=True)
class CheckerSpec:
    name: str
    type: str
    interval: float
    timeout: float
    failures: int
    on_failure: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckerSpec:
        """From a checker of agent.json; ValueError if it cannot be run."""
        spec = cls(name=str(d.get("name") or d["type"]), type=str(d["type"]),
                   interval=float(d.get("interval", 10.0)), timeout=float(d.get("timeout", 5.0)),
                   failures=max(1, int(d.get("failures", 1))),
                   on_failure=str(d.get("on_failure", "restart")),
                   params=dict(d.get("params") or {}))
        if spec.type not in TYPES:
            raise ValueError(f"checker {spec.name}: unknown type {spec.type!r}")
        if spec.on_failure not in ACTIONS:
            raise ValueError(f"checker {spec.name}: unknown on_failure {spec.on_failure!r}")
        missing = [k for k in _REQUIRED[spec.type] if k not in spec.params]
        if missing:
            raise ValueError(f"checker {spec.name}: {spec.type} needs {', '.join(missing)}")
        return spec


@dataclass(frozen=True)
class CheckerEvent:
    name: str
    type: str
    action: str
    ok: bool
    detail: str


# --- probes ---------------------------------------------------------------------------------

def _process_matcher(pattern: str) -> Callable[[str, list[str]], bool]:
    if len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
        rx = re.compile(pattern[1:-1])
        return lambda comm, argv: bool(rx.search(" ".join(argv) if argv else comm))
    return lambda comm, argv: (comm == pattern or comm == pattern[:15]
                               or (bool(argv) and os.path.basename(argv[0]) == pattern))


def count_processes(pattern: str, *, same_netns: bool = False) -> int:
    """Live processes matching ``pattern`` (a name or ``/regex/``), this process excluded.

    ``same_netns`` counts only processes in our network namespace (the lab's nodes share one
    pid namespace, so without it node1 would see node2's payload)."""
    match = _process_matcher(pattern)
    me = os.getpid()
    own_net = os.stat("/proc/self/ns/net").st_ino if same_netns else 0
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            raw = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            if same_netns and os.stat(f"/proc/{entry.name}/ns/net").st_ino != own_net:
                continue
        except OSError:
            continue
        comm = stat[stat.find(b"(") + 1: stat.rfind(b")")].decode(errors="replace")
        if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        count += match(comm, argv)
    return count


async def tcp_connect(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Open and close a TCP connection to ``host:port`` within ``timeout`` s."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return False, f"{host}:{port}: no connection within {timeout:g}s"
    except OSError as exc:
        return False, f"{host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}"
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    return True, f"{host}:{port}: connected"


async def icmp_ping(host: str, timeout: float) -> float:
    """Round-trip time of one ICMP echo (see :mod:`hvha.drivers.icmp`)."""
    return await icmp.ping(host, timeout)


def interface_state(ifname: str) -> tuple[bool, str]:
    """Is ``ifname`` up, per /sys/class/net (of the namespace sysfs was mounted for)?"""
    base = Path("/sys/class/net") / ifname
    try:
        oper = (base / "operstate").read_text().strip()
    except OSError:
        return False, f"{ifname}: no such interface"
    if oper == "up":
        return True, f"{ifname}: up"
    try:
        carrier = (base / "carrier").read_text().strip() == "1"
    except OSError:  # reading carrier of an admin-down interface fails with EINVAL
        carrier = False
    if oper == "unknown" and carrier:
        return True, f"{ifname}: carrier"
    return False, f"{ifname}: {oper}{'' if carrier else ', no carrier'}"


# --- the set --------------------------------------------------------------------------------

@dataclass
class _State:
    spec: CheckerSpec
    failures: int = 0
    fired: bool = False
    last_ok: bool | None = None
    last_detail: str = ""
    last_at: float | None = None


class CheckerSet:
    """The checkers of one module, each probed every ``interval`` s by its own task.

    ``driver`` serves vm_state checkers; ``env``/``cwd`` are given to script checkers;
    ``probes`` replaces the probe of a type (tests, or an agent with its own). ``enabled``
    false (maintenance, "checkers off") skips probes; switching back on starts counting anew.
    ``start()`` and switching on re-arm restart/failover/stop checkers (their action was taken)
    but keep a fired ``wait`` checker fired, so its recovery is still reported.
    """

    def __init__(self, checkers: Iterable[Mapping[str, Any] | CheckerSpec],
                 driver: Driver | None, on_event: Callable[[CheckerEvent], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 same_netns: bool = False, probes: Mapping[str, Probe] | None = None,
                 guard: float = KILL_GRACE + 0.5) -> None:
        specs = [c if isinstance(c, CheckerSpec) else CheckerSpec.from_dict(c) for c in checkers]
        self._states = {s.name: _State(s) for s in specs}
        if len(self._states) != len(specs):
            raise ValueError("checker names must be unique within a module")
        self.driver = driver
        self.on_event = on_event
        self._clock = clock
        self._sleep = sleep
        self.env = dict(env or {})
        self.cwd = cwd
        self.same_netns = same_netns
        self.guard = guard
        self._probes: dict[str, Probe] = {
            "process": self._probe_process, "tcp": self._probe_tcp, "ping": self._probe_ping,
            "interface": self._probe_interface, "script": self._probe_script,
            "vm_state": self._probe_vm_state, **(probes or {})}
        self._enabled = True
        self._tasks: list[asyncio.Task[None]] = []

    # -- switches --------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value and not self._enabled:
            self._rearm()
        self._enabled = value

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        """Start one task per checker (no-op if already started); needs a running loop."""
        if self._tasks:
            return
        self._rearm()
        self._tasks = [asyncio.create_task(self._loop(st), name=f"checker/{name}")
                       for name, st in self._states.items()]

    async def stop(self) -> None:
        """Cancel every checker task and wait for them (a running script probe is killed)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _rearm(self) -> None:
        for st in self._states.values():
            st.failures = 0
            st.fired = st.fired and st.spec.on_failure == "wait"

    # -- one probe -------------------------------------------------------------------------
    async def check(self, name: str) -> CheckerEvent | None:
        """Probe checker ``name`` once and account for the result (see :meth:`record`)."""
        spec = self._states[name].spec
        try:
            async with asyncio.timeout(spec.timeout + self.guard):
                ok, detail = await self._probes[spec.type](spec)
        except TimeoutError:
            ok, detail = False, f"no answer within {spec.timeout:g}s"
        except Exception as exc:  # a broken probe is a failed check
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        if not self._enabled:
            return None  # switched off while probing
        return self.record(name, ok, detail)

    def record(self, name: str, ok: bool, detail: str) -> CheckerEvent | None:
        """Count a result; return (and send to ``on_event``) the event it triggers, if any."""
        st = self._states[name]
        st.last_ok, st.last_detail, st.last_at = ok, detail, self._clock()
        event = None
        if ok:
            st.failures = 0
            if st.fired:
                st.fired = False
                event = CheckerEvent(name, st.spec.type, st.spec.on_failure, True, detail)
        else:
            st.failures += 1
            if st.failures >= st.spec.failures and not st.fired:
                st.fired = True
                event = CheckerEvent(name, st.spec.type, st.spec.on_failure, False,
                                     f"{detail} ({st.failures} consecutive failures)")
        if event is not None:
            log.log(logging.INFO if ok else logging.WARNING, "checker %s: %s", name,
                    "recovered" if ok else f"failed, action {event.action}: {event.detail}")
            try:
                self.on_event(event)
            except Exception:
                log.exception("checker %s: on_event failed", name)
        return event

    async def _loop(self, st: _State) -> None:
        next_at = self._clock()
        while True:
            next_at += st.spec.interval
            now = self._clock()
            next_at = max(next_at, now)  # after an overrun, do not burst to catch up
            await self._sleep(next_at - now)
            if self._enabled:
                await self.check(st.spec.name)

    def status(self) -> list[dict[str, Any]]:
        return [{"name": n, "type": st.spec.type, "ok": st.last_ok, "failures": st.failures,
                 "fired": st.fired, "detail": st.last_detail, "checked_at": st.last_at}
                for n, st in self._states.items()]

    # -- default probes --------------------------------------------------------------------
    async def _probe_process(self, spec: CheckerSpec) -> tuple[bool, str]:
        pattern = str(spec.params["process"])
        low = int(spec.params.get("min", 1))
        high = spec.params.get("max")
        n = await asyncio.to_thread(count_processes, pattern, same_netns=self.same_netns)
        ok = n >= low and (high is None or n <= int(high))
        bounds = f"{low}..{'' if high is None else high}"
        return ok, f"{n} process(es) matching {pattern} (want {bounds})"

    async def _probe_tcp(self, spec: CheckerSpec) -> tuple[bool, str]:
        return await tcp_connect(str(spec.params["host"]), int(spec.params["port"]),
                                 spec.timeout)

    async def _probe_ping(self, spec: CheckerSpec) -> tuple[bool, str]:
        host = str(spec.params["host"])
        try:
            rtt = await icmp_ping(host, spec.timeout)
        except TimeoutError:
            return False, f"{host}: no echo reply within {spec.timeout:g}s"
        except OSError as exc:
            return False, f"{host}: {exc.strerror or exc}"
        return True, f"{host}: reply in {rtt * 1000:.1f} ms"

    async def _probe_interface(self, spec: CheckerSpec) -> tuple[bool, str]:
        return interface_state(str(spec.params["interface"]))

    async def _probe_script(self, spec: CheckerSpec) -> tuple[bool, str]:
        res = await run_script("/bin/sh", ["-c", str(spec.params["command"])], self.env,
                               spec.timeout, cwd=self.cwd, kill_leftovers=True)
        return res.ok, res.describe()

    async def _probe_vm_state(self, spec: CheckerSpec) -> tuple[bool, str]:
        if self.driver is None:
            return False, "no payload driver to ask"
        async with asyncio.timeout(spec.timeout):
            up = await self.driver.running()
        return up, "payload running" if up else "payload not running"
