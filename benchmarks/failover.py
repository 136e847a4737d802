"""Benchmark: time from "powering off" the primary to the VIP answering from the other node.

Baseline measured in the same run: keepalived (VRRP, advert 1 s) on the same lab, with the same
client, the same kill and the same clock. Reported per system: median/min/max failover seconds
over N trials, dual-primary samples, VIP-left-on-the-dead-node samples, and the ratio of the
hvha median to the keepalived median.

    .venv/bin/python benchmarks/failover.py [--trials 10] [--quick] [--only keepalived|hvha]
                                            [--name LAB] [--seed N]

Needs root, iproute2 and (for the baseline) ``apt-get install -y keepalived``. The benchmark
builds its own lab (``hvf<pid>``, a /25 of 198.18.250-255.x, the range reserved for network
benchmarks, so it never touches a real network nor a lab that tests run) and tears it down at
the end, also on failure, Ctrl-C or SIGTERM. Exit status: 0 if every trial failed over, 1 if one
did not, 2 if the environment is unfit, 130 on Ctrl-C.

How one trial goes (the same for both systems, see :func:`run_trials`):

1. Wait for a stable state: exactly one node holds the VIP, both links are up, and for the
   last 0.5 s every client probe was answered by that node; this held for ``settle`` seconds.
2. Sleep a seeded random 0..1 s, so kills fall uniformly across the 1 s heartbeat/advert phase
   instead of in step with it.
3. ``t_kill = time.monotonic()``, then "power off" the primary: SIGKILL every process in its
   namespace (``lab.kill_all``) and pull both its cables (``lab.set_link(..., False)``). Killing
   alone is not a power-off: ``kill -9`` of keepalived leaves the VIP on the dead node's
   interface, and with the cable in, that node would keep answering ARP for it.
4. Failover time = the end of the first probe answered by the surviving node minus ``t_kill``.
   The prober (``probe.py``, in the client namespace) starts a connection to VIP:8080 every
   20 ms and each node runs a server that answers its own name; all namespaces share
   CLOCK_MONOTONIC, so the prober's times compare with ``t_kill``. Resolution: ~20 ms.
5. Restore the node as a reboot would: delete the VIP that the killed processes left on its
   interface (a rebooted machine has no runtime addresses), plug the cables back in, start its
   software again; then the next trial waits for a stable state.

A role sampler (:class:`RoleSampler`) reads ``ip -j addr show`` in both node namespaces every
100 ms. A *dual-primary* sample is one where both nodes hold the VIP while both links are up;
an answer from the killed node after its cables were pulled also counts as one (the note in
BENCHMARKING.md). A node holding the VIP while its own link is down is harmless to clients and
is reported apart ("VIP on dead node").

Systems run one after the other, not interleaved: a failover time is set by protocol timers
(seconds), not by this VM's memory or cache state, and starting a whole cluster per trial would
cost more than the trials themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvha.lab import LAN, REPL, ROLES, Lab, LabError  # noqa: E402

PROBE = Path(__file__).resolve().with_name("probe.py")
NODES = ("node1", "node2")
APP_PORT = 8080
PROBE_INTERVAL = 0.02  # s between two client connection attempts
PROBE_TIMEOUT = 1.0  # s before one attempt counts as failed
SAMPLE_INTERVAL = 0.1  # s between two role samples
KILL_PHASE = 1.0  # the kill lands at a random point of one heartbeat/advert interval
STABLE_WINDOW = 0.5  # s of client answers that must all come from the primary
MIN_ANSWERS = 10  # ... and at least this many of them
POST_TAKEOVER = 1.0  # s watched after the takeover before the dead node is restored
LAN_CANDIDATES = 12  # /25s in 198.18.250.0-198.18.255.255 (test_lab.py uses .0-.249)


class BenchError(Exception):
    """The lab or a system did not reach the state a trial needs; the message says which."""


def other(role: str) -> str:
    return "node2" if role == "node1" else "node1"


# --- processes the benchmark started --------------------------------------------------------


class Procs:
    """Every Popen this benchmark started, by lab role, so it reaps exactly its own children.

    Processes get a session of their own: a Ctrl-C in the terminal reaches the benchmark only,
    which then tears everything down in order instead of racing its children.
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.by_role: dict[str, list[subprocess.Popen[Any]]] = {r: [] for r in ROLES}

    def start(self, role: str, argv: Sequence[str], log: Path | None = None,
              **popen: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any]
        if log is not None:
            with open(log, "ab") as fh:
                proc = self.lab.exec(role, argv, stdin=subprocess.DEVNULL, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True, **popen)
        else:
            proc = self.lab.exec(role, argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                 **popen)
        self.by_role[role].append(proc)
        return proc

    def reap(self, role: str, timeout: float = 5.0) -> None:
        """Collect the exit status of ``role``'s processes once the namespace was killed."""
        for proc in self.by_role[role]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.by_role[role] = [p for p in self.by_role[role] if p.poll() is None]

    def kill_all(self) -> None:
        """SIGKILL the benchmark's own children (by pid) and reap them."""
        for role, procs in self.by_role.items():
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            self.reap(role)


# --- the client's view: probe records ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeRecord:
    t0: float  # monotonic time the connection attempt started
    t: float  # monotonic time it ended
    node: str | None  # who answered, None on error
    error: str | None


class Prober:
    """``probe.py probe`` in the client namespace; its JSON lines collected by a thread."""

    def __init__(self, lab: Lab, procs: Procs, log: Path) -> None:
        argv = [sys.executable, str(PROBE), "probe", "--target", str(lab.vip.ip),
                "--port", str(APP_PORT), "--interval", str(PROBE_INTERVAL),
                "--timeout", str(PROBE_TIMEOUT)]
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = procs.start("client", argv, stdout=subprocess.PIPE, stderr=self._log)
        self.records: list[ProbeRecord] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="prober-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream: IO[bytes] | None = self.proc.stdout
        assert stream is not None
        for raw in stream:
            try:
                d = json.loads(raw)
                rec = ProbeRecord(float(d["t0"]), float(d["t"]), d.get("node"), d.get("error"))
            except (ValueError, KeyError, TypeError):
                continue
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[ProbeRecord], bool], timeout: float) -> ProbeRecord | None:
        """The first record (from now on or already seen) that satisfies ``pred``, or None."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                hits = [r for r in self.records[seen:] if pred(r)]
                if hits:
                    return min(hits, key=lambda r: r.t)
                seen = len(self.records)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(left)

    def ended_between(self, start: float, end: float) -> list[ProbeRecord]:
        with self._cond:
            return [r for r in self.records if start <= r.t < end]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)
        self._log.close()


# --- the cluster's view: who holds the VIP -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoleSample:
    t: float
    holds: dict[str, bool]  # node -> VIP on its lan interface
    up: dict[str, bool]  # node -> its lan link carries traffic

    def holders(self) -> list[str]:
        return [n for n in NODES if self.holds[n]]

    @property
    def dual(self) -> bool:
        return all(self.holds.values()) and all(self.up.values())

    @property
    def stale(self) -> bool:
        """A node whose cable is out still has the VIP: invisible to clients."""
        return any(self.holds[n] and not self.up[n] for n in NODES)


def vip_state(lab: Lab, role: str) -> tuple[bool, bool]:
    """(holds the VIP, link up) for ``role``, from one ``ip -j addr show`` in its namespace.

    Pulling the root-side veth takes the carrier away from the inside end, whose operstate
    then leaves UP (LOWERLAYERDOWN): the namespace's own view tells both facts in one call.
    """
    ifname = lab.ifname(role, LAN)
    try:
        res = subprocess.run(["ip", "-j", "-n", lab.ns_name(role), "addr", "show", "dev", ifname],
                             capture_output=True, text=True, timeout=5, check=False)
        links = json.loads(res.stdout) if res.returncode == 0 else []
    except (subprocess.TimeoutExpired, ValueError):
        return False, False
    vip = str(lab.vip.ip)
    holds = any(a.get("local") == vip for link in links for a in link.get("addr_info", []))
    up = any(link.get("operstate") == "UP" for link in links)
    return holds, up


class RoleSampler(threading.Thread):
    """Samples both nodes every 100 ms on a fixed grid until stopped."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(name="role-sampler", daemon=True)
        self.lab = lab
        self.samples: list[RoleSample] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        next_t = time.monotonic()
        while not self._stop_event.is_set():
            t = time.monotonic()
            holds, up = {}, {}
            for node in NODES:
                holds[node], up[node] = vip_state(self.lab, node)
            with self._lock:
                self.samples.append(RoleSample(t, holds, up))
            next_t = max(next_t + SAMPLE_INTERVAL, time.monotonic())
            self._stop_event.wait(next_t - time.monotonic())

    def latest(self) -> RoleSample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def between(self, start: float, end: float) -> list[RoleSample]:
        with self._lock:
            return [s for s in self.samples if start <= s.t < end]

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


# --- one system under test -----------------------------------------------------------------


class System(Protocol):
    """What :func:`run_trials` needs from keepalived or hvha: start it, restart one node."""

    name: str
    preferred: str | None  # node that must be primary before a trial (None: either)
    settle: float  # s the stable state must last before a kill
    start_timeout: float  # s allowed to reach a stable state
    max_failover: float  # s after the kill before a trial counts as failed

    def start(self, procs: Procs) -> None:
        """Start the system on both nodes (and whatever else it needs)."""

    def start_node(self, procs: Procs, role: str) -> None:
        """Start ``role`` again after a power-off (its namespace is empty, links are up)."""

    def logs(self) -> list[Path]:
        """Log files worth showing when a trial fails."""


@dataclasses.dataclass
class Trial:
    index: int
    victim: str
    survivor: str
    failover: float | None  # s, None if the survivor never answered
    dual: int = 0  # dual-primary role samples (both links up)
    dead_answers: int = 0  # answers from the killed node after its cables were pulled
    stale: int = 0  # samples of a VIP on a node whose link is down
    window: tuple[float, float] = (0.0, 0.0)  # monotonic span the counts cover


@dataclasses.dataclass
class Result:
    system: str
    trials: list[Trial]
    skipped: str | None = None

    @property
    def times(self) -> list[float]:
        return [t.failover for t in self.trials if t.failover is not None]

    @property
    def failed(self) -> int:
        return sum(t.failover is None for t in self.trials)


class Harness:
    """Prober, role sampler and processes of one system's run, stopped together."""

    def __init__(self, lab: Lab, logdir: Path) -> None:
        self.lab = lab
        self.procs = Procs(lab)
        self.sampler = RoleSampler(lab)
        self.sampler.start()
        self.prober = Prober(lab, self.procs, logdir / "probe.log")

    def close(self) -> None:
        self.prober.stop()
        self.sampler.stop()
        for role in ROLES:  # everything the system started, also its grandchildren
            with contextlib.suppress(LabError):
                self.lab.kill_all(role)
        self.procs.kill_all()

    def describe(self) -> str:
        s = self.sampler.latest()
        now = time.monotonic()
        recent = self.prober.ended_between(now - 1.0, now)
        answers: dict[str, int] = {}
        for r in recent:
            key = r.node or f"error:{r.error}"
            answers[key] = answers.get(key, 0) + 1
        roles = "no sample" if s is None else ", ".join(
            f"{n}: {'VIP' if s.holds[n] else 'no VIP'}, link {'up' if s.up[n] else 'down'}"
            for n in NODES)
        return f"{roles}; client answers in the last second: {answers or 'none'}"

    def wait_stable(self, system: System, timeout: float) -> tuple[str, float]:
        """The primary once the state is stable (see the module doc), and when it was seen."""
        deadline = time.monotonic() + timeout
        since: float | None = None
        primary: str | None = None
        while True:
            now = time.monotonic()
            s = self.sampler.latest()
            holder: str | None = None
            if s is not None and all(s.up.values()) and len(s.holders()) == 1:
                holder = s.holders()[0]
            ok = holder is not None and system.preferred in (None, holder)
            if ok:
                recent = self.prober.ended_between(now - STABLE_WINDOW, now)
                ok = len(recent) >= MIN_ANSWERS and all(r.node == holder for r in recent)
            if not ok or holder != primary:
                since, primary = (now, holder) if ok else (None, None)
            elif since is not None and holder is not None and now - since >= system.settle:
                return holder, now
            if now > deadline:
                raise BenchError(f"{system.name}: no stable primary after {timeout:.0f} s "
                                 f"({self.describe()})")
            time.sleep(SAMPLE_INTERVAL)


def power_off(lab: Lab, role: str) -> None:
    """Kill every process of the node, then pull both its cables (see the module doc)."""
    lab.kill_all(role)
    lab.set_link(role, LAN, False)
    lab.set_link(role, REPL, False)


def power_on(lab: Lab, role: str) -> None:
    """Bring a killed node back as a reboot would: no stale VIP, cables in."""
    subprocess.run(["ip", "-n", lab.ns_name(role), "addr", "del", str(lab.vip), "dev",
                    lab.ifname(role, LAN)], capture_output=True, check=False)
    lab.set_link(role, LAN, True)
    lab.set_link(role, REPL, True)


def _answered_by(node: str, after: float) -> Callable[[ProbeRecord], bool]:
    return lambda r: r.node == node and r.t > after


def run_trials(lab: Lab, system: System, n: int, rng: random.Random, logdir: Path,
               *, restore_last: bool = True,
               report: Callable[[Trial], None] = lambda t: None) -> Result:
    """N power-off trials of ``system`` on ``lab``; the lab is left with no process running."""
    harness = Harness(lab, logdir)
    trials: list[Trial] = []
    try:
        system.start(harness.procs)
        timeout = system.start_timeout
        starts: list[float] = []
        for i in range(n):
            primary, ready = harness.wait_stable(system, timeout)
            timeout = system.start_timeout
            starts.append(ready)
            time.sleep(rng.uniform(0.0, KILL_PHASE))
            survivor = other(primary)
            t_kill = time.monotonic()
            power_off(lab, primary)
            t_dead = time.monotonic()
            harness.procs.reap(primary)
            first = harness.prober.wait_for(_answered_by(survivor, t_kill), system.max_failover)
            trial = Trial(i + 1, primary, survivor, None if first is None else first.t - t_kill)
            time.sleep(POST_TAKEOVER)
            t_restore = time.monotonic()
            trial.dead_answers = sum(
                r.node == primary and r.t0 > t_dead
                for r in harness.prober.ended_between(t_dead, t_restore))
            trials.append(trial)
            if first is None:
                report(trial)
                _show_logs(system, harness)
                break
            if i + 1 < n or restore_last:
                power_on(lab, primary)
                system.start_node(harness.procs, primary)
            report(trial)
        end = time.monotonic()
        for trial, start, stop in zip(trials, starts, [*starts[1:], end], strict=False):
            samples = harness.sampler.between(start, stop)
            trial.window = (start, stop)
            trial.dual = sum(s.dual for s in samples) + trial.dead_answers
            trial.stale = sum(s.stale for s in samples)
    except BenchError as exc:
        print(f"{system.name}: {exc}", file=sys.stderr)
        _show_logs(system, harness)
        return Result(system.name, trials, skipped=f"aborted: {exc}")
    finally:
        harness.close()
        reset_lab(lab)
    return Result(system.name, trials)


def _show_logs(system: System, harness: Harness, lines: int = 15) -> None:
    print(f"{system.name}: state: {harness.describe()}", file=sys.stderr)
    for path in system.logs():
        with contextlib.suppress(OSError):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- last lines of {path}:", *tail, sep="\n  ", file=sys.stderr)


def reset_lab(lab: Lab) -> None:
    """Lab back to its just-built state: nothing running, no VIP, every cable in."""
    for role in ROLES:
        with contextlib.suppress(LabError):
            lab.kill_all(role)
    for node in NODES:
        power_on(lab, node)
    subprocess.run(["ip", "-n", lab.ns_name("client"), "neigh", "flush", "all"],
                   capture_output=True, check=False)


def start_server(lab: Lab, procs: Procs, role: str) -> None:
    """The node-name TCP server on 0.0.0.0:8080 in ``role``'s namespace."""
    procs.start(role, [sys.executable, str(PROBE), "serve", "--name", role,
                       "--port", str(APP_PORT)], log=lab.dirs(role)["log"] / "serve.log")


# --- keepalived, the baseline --------------------------------------------------------------


class Keepalived:
    """keepalived 2.x VRRP, one instance per node, unicast adverts every 1 s.

    Both nodes start as BACKUP with priorities 150 (node1) and 100 (node2), *with* preemption
    (no ``nopreempt``): when the restored node1 comes back it takes the VIP back, so every trial
    starts from node1 as master and kills node1, and every takeover is the same one, by the
    priority-100 backup (master-down interval 3 x 1 s + skew (256-100)/256 s = 3.61 s after
    the last advert heard). With ``nopreempt`` the victim would alternate and so would the
    skew time (0.61 s vs 0.41 s), mixing two distributions into one median. Unicast peers, so
    nothing depends on multicast across the lab bridge.
    """

    name = "keepalived"
    preferred: str | None = "node1"
    settle = 1.0
    start_timeout = 30.0
    max_failover = 30.0
    VRID = 77

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def conf(self, role: str) -> str:
        lab, ifname = self.lab, self.lab.ifname(role, LAN)
        return f"""# generated by benchmarks/failover.py for lab {lab.name}, {role}
global_defs {{
    router_id {lab.name}-{role}
}}
vrrp_instance {lab.name}_web {{
    state BACKUP
    interface {ifname}
    virtual_router_id {self.VRID}
    priority {150 if role == "node1" else 100}
    advert_int 1
    unicast_src_ip {lab.address(role, LAN)}
    unicast_peer {{
        {lab.address(other(role), LAN)}
    }}
    virtual_ipaddress {{
        {lab.vip} dev {ifname}
    }}
}}
"""

    def _files(self, role: str) -> dict[str, Path]:
        d = self.lab.dirs(role)
        return {"conf": d["etc"] / "keepalived.conf", "pid": d["run"] / "keepalived.pid",
                "vrrp_pid": d["run"] / "keepalived-vrrp.pid", "log": d["log"] / "keepalived.log"}

    def start(self, procs: Procs) -> None:
        for role in NODES:
            self.start_node(procs, role)

    def start_node(self, procs: Procs, role: str) -> None:
        f = self._files(role)
        f["conf"].write_text(self.conf(role))
        for key in ("pid", "vrrp_pid"):  # a rebooted machine has an empty /run
            f[key].unlink(missing_ok=True)
        start_server(self.lab, procs, role)
        procs.start(role, ["keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(f["conf"]),
                           "-p", str(f["pid"]), "-r", str(f["vrrp_pid"])], log=f["log"])

    def logs(self) -> list[Path]:
        return [self._files(r)["log"] for r in NODES]


def keepalived_trials(lab: Lab, n: int, rng: random.Random, logdir: Path,
                      **kw: Any) -> Result:
    return run_trials(lab, Keepalived(lab), n, rng, logdir, **kw)


# --- hvha ----------------------------------------------------------------------------------
# Written against the agent's contract while the agent was being built; everything
# hvha-specific is below, so following changes of the agent touches this section only. If
# `hvha --help` lists no `agent` (or no `witness`), hvha_trials reports a skip. Contract:
#   hvha compile CLUSTER.yaml -o DIR          -> DIR/<node>.bundle
#   hvha agent --bundle B --state-dir D       (in each node namespace; runs the module's
#                                              start/stop scripts, holds the VIP when primary)
#   hvha witness --cluster NAME --secret-file F --port 4801 --lease L   (witness namespace)
# Primary = the node holding the VIP, exactly as for keepalived; no agent API is used, so the
# figure is what a client sees, whatever the agents believe.

HVHA_WITNESS_PORT = 4801
HVHA_LEASE = "3s"  # = heartbeat timeout (the documented default), given to both sides


def hvha_argv() -> list[str]:
    """The hvha CLI of this checkout (works inside namespaces: same filesystem, same venv)."""
    return [sys.executable, "-m", "hvha.cli.main"]


def hvha_subcommands() -> set[str]:
    """Sub-commands that ``hvha --help`` lists."""
    res = subprocess.run([*hvha_argv(), "--help"], capture_output=True, text=True, check=False)
    found = set(re.findall(r"^ {4}([a-z][a-z-]*)\s", res.stdout, re.M))
    for group in re.findall(r"\{([a-z,-]+)\}", res.stdout):
        found.update(group.split(","))
    return found


def hvha_missing() -> str | None:
    """Why hvha cannot be benchmarked yet, or None."""
    cmds = hvha_subcommands()
    if "agent" not in cmds:
        return "agent not available yet"
    if "witness" not in cmds:
        return "witness not available yet"
    return None


def hvha_app_scripts(workdir: Path, lab: Lab) -> dict[str, Path]:
    """start/stop/status of module ``web``: the node-name server, one pid file per node.

    The agent runs them inside the node's namespace with ``HVHA_NODE`` set (module env.sh), so
    one set of scripts serves both nodes on the lab's shared filesystem.
    """
    app = workdir / "app"
    app.mkdir(parents=True, exist_ok=True)
    pid = f"{lab.root}/$HVHA_NODE/run/web.pid"
    log = f"{lab.root}/$HVHA_NODE/log/serve.log"
    scripts = {
        "start": f"""#!/bin/sh
# Start the node-name server in the background and return (the agent waits for us).
set -eu
if [ -f "{pid}" ] && kill -0 "$(cat "{pid}")" 2>/dev/null; then exit 0; fi
setsid {sys.executable} {PROBE} serve --name "$HVHA_NODE" --port {APP_PORT} \\
    </dev/null >>"{log}" 2>&1 &
echo $! >"{pid}"
""",
        "stop": f"""#!/bin/sh
# Stop the server; HVHA_STOP_MODE=force means SIGKILL.
set -u
[ -f "{pid}" ] || exit 0
p=$(cat "{pid}")
sig=TERM; [ "${{HVHA_STOP_MODE:-graceful}}" = force ] && sig=KILL
kill -s "$sig" "$p" 2>/dev/null || true
i=0; while kill -0 "$p" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
kill -0 "$p" 2>/dev/null && exit 1
rm -f "{pid}"
""",
        "status": f"""#!/bin/sh
[ -f "{pid}" ] && kill -0 "$(cat "{pid}")" 2>/dev/null
""",
    }
    out = {}
    for name, text in scripts.items():
        path = app / f"web-{name}"
        path.write_text(text)
        path.chmod(0o755)
        out[name] = path
    return out


def hvha_cluster_yaml(lab: Lab, secret_file: Path, scripts: dict[str, Path]) -> str:
    """The cluster file of this lab: node1/node2 on lan+repl, arbiter witness, module ``web``.

    Heartbeat interval 1 s (keepalived's advert_int) and timeout 3 s (keepalived declares the
    master dead after 3 adverts plus skew), so both systems get the same detection budget; the
    witness lease is the timeout too. The checker probes the app on 127.0.0.1, so it judges the
    app and not where the VIP currently is.
    ``failback: false``: the restored node stays secondary, the benchmark then kills whichever
    node is primary (``preferred = None`` in :class:`Hvha`).
    """
    def addr(role: str, net: str = LAN) -> str:
        return str(lab.address(role, net))

    lan, repl = lab.topology.network(LAN).subnet, lab.topology.network(REPL).subnet
    nodes = "\n".join(f"""  - name: {n}
    address: {addr(n)}
    transport: {{type: local}}
    heartbeat:
      lan: {addr(n)}
      repl: {addr(n, REPL)}""" for n in NODES)
    return f"""# generated by benchmarks/failover.py for lab {lab.name}
cluster:
  name: {lab.name}
  secret:
    file: {secret_file}
nodes:
{nodes}
heartbeat:
  interval: 1s
  timeout: 3s
  networks:
    - name: lan
      subnet: {lan}
    - name: repl
      subnet: {repl}
      replication: true
witness:
  arbiter:
    address: {addr("witness")}
    port: {HVHA_WITNESS_PORT}
    lease: {HVHA_LEASE}
modules:
  - name: web
    kind: app
    payload:
      start: {scripts["start"]}
      stop: {scripts["stop"]}
      status: {scripts["status"]}
    vip:
      address: {lab.vip}
      interface: {lab.ifname("node1", LAN)}
    checkers:
      - name: tcp
        type: tcp
        host: 127.0.0.1
        port: {APP_PORT}
    failover:
      preferred: node1
      failback: false
"""


class Hvha:
    """hvha agents on both nodes plus the arbiter witness; see the section comment above."""

    name = "hvha"
    preferred: str | None = None
    settle = 5.0  # > heartbeat timeout: a restarted agent has been heard by its peer
    start_timeout = 60.0
    max_failover = 30.0

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.secret_file = workdir / "cluster.key"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        cluster = workdir / "cluster.yaml"
        cluster.write_text(hvha_cluster_yaml(lab, self.secret_file,
                                             hvha_app_scripts(workdir, lab)))
        out = workdir / "bundles"
        res = subprocess.run([*hvha_argv(), "compile", str(cluster), "-o", str(out)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BenchError(f"hvha compile {cluster} failed:\n{res.stderr.strip()}")
        self.bundles = {}
        for node in NODES:
            dest = lab.dirs(node)["etc"] / f"{node}.bundle"
            shutil.copyfile(out / f"{node}.bundle", dest)
            self.bundles[node] = dest

    def start(self, procs: Procs) -> None:
        procs.start("witness", [*hvha_argv(), "witness", "--cluster", self.lab.name,
                                "--secret-file", str(self.secret_file),
                                "--port", str(HVHA_WITNESS_PORT), "--lease", HVHA_LEASE,
                                "--state-dir", str(self.lab.dirs("witness")["run"])],
                    log=self.lab.dirs("witness")["log"] / "witness.log")
        for node in NODES:
            self.start_node(procs, node)

    def start_node(self, procs: Procs, role: str) -> None:
        d = self.lab.dirs(role)
        (d["run"] / "web.pid").unlink(missing_ok=True)  # a rebooted machine has an empty /run
        procs.start(role, [*hvha_argv(), "agent", "--bundle", str(self.bundles[role]),
                           "--state-dir", str(d["run"]), "--log-level", "info"],
                    log=d["log"] / "agent.log")

    def logs(self) -> list[Path]:
        return [*(self.lab.dirs(n)["log"] / "agent.log" for n in NODES),
                self.lab.dirs("witness")["log"] / "witness.log"]


def hvha_trials(lab: Lab, n: int, rng: random.Random | None = None,
                logdir: Path | None = None, **kw: Any) -> Result:
    """N trials of hvha, or a skipped Result if the agent (or witness) is not there yet."""
    missing = hvha_missing()
    if missing is not None:
        print(f"hvha: {missing} — skipped", flush=True)
        return Result("hvha", [], skipped=missing)
    logdir = logdir if logdir is not None else lab.root
    workdir = Path(tempfile.mkdtemp(prefix="hvha-failover-", dir=logdir))
    try:
        system = Hvha(lab, workdir)
    except BenchError as exc:
        print(f"hvha: {exc}", file=sys.stderr)
        return Result("hvha", [], skipped=str(exc).splitlines()[0])
    return run_trials(lab, system, n, rng or random.Random(0), logdir, **kw)


# --- lab, table, main ----------------------------------------------------------------------


def lab_candidates(name: str, root: Path) -> Iterator[Lab]:
    """The lab on each free-able /25 of 198.18.250-255.x (repl: the same in 198.19), starting
    at one picked by pid so that concurrent runs rarely collide; ``up`` refuses taken ones."""
    first = os.getpid() % LAN_CANDIDATES
    for i in range(LAN_CANDIDATES):
        k = (first + i) % LAN_CANDIDATES
        octet, low = 250 + k // 2, 128 * (k % 2)
        yield Lab.open(name, root, lan=f"198.18.{octet}.{low}/25",
                       repl=f"198.19.{octet}.{low}/25")


def teardown(lab: Lab) -> list[str]:
    """Remove the lab whatever state it is in; return what could not be removed."""
    with contextlib.suppress(LabError):
        lab.down(purge=True, grace=0.5)
    topo = lab.topology
    for ifname in topo.root_interfaces:  # belt and braces, by exact name
        subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)
    for ns in topo.namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    ns_out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout
    names = {line.split()[0] for line in ns_out.splitlines() if line.strip()}
    return sorted(names & set(topo.namespaces))


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def print_table(results: list[Result], n: int) -> None:
    print()
    print(f"VIP failover after powering off the primary (SIGKILL of every process in its "
          f"namespace + both cables out), {n} trials per system")
    print(f"client: a TCP connection to VIP:{APP_PORT} every {PROBE_INTERVAL * 1000:.0f} ms; "
          f"roles sampled every {SAMPLE_INTERVAL * 1000:.0f} ms")
    header = (f"{'system':<11} {'ok':>5} {'median s':>9} {'min s':>6} {'max s':>6} "
              f"{'dual-primary':>12} {'VIP on dead node':>16}")
    print(header)
    print("-" * len(header))
    medians: dict[str, float] = {}
    for r in results:
        if r.skipped is not None and not r.trials:
            print(f"{r.system:<11} skipped: {r.skipped}")
            continue
        times = r.times
        med = statistics.median(times) if times else None
        if med is not None and not r.failed and r.skipped is None:
            medians[r.system] = med
        ok = f"{len(times)}/{len(r.trials)}"
        print(f"{r.system:<11} {ok:>5} {_fmt(med):>9} {_fmt(min(times, default=None)):>6} "
              f"{_fmt(max(times, default=None)):>6} {sum(t.dual for t in r.trials):>12} "
              f"{sum(t.stale for t in r.trials):>16}")
        if r.skipped is not None:
            print(f"{'':<11} {r.skipped}")
    if "hvha" in medians and "keepalived" in medians:
        ratio = medians["hvha"] / medians["keepalived"]
        print(f"ratio hvha/keepalived (median failover): {ratio:.2f}")
    else:
        print("ratio hvha/keepalived (median failover): n/a (needs both medians)")
    print("dual-primary: role samples with the VIP on both nodes while both links are up, "
          "plus answers from the killed node;\nVIP on dead node: samples where a node whose "
          "cable is out still has the VIP (harmless to clients).")


def _report(system: str, n: int) -> Callable[[Trial], None]:
    def report(t: Trial) -> None:
        took = "NO ANSWER" if t.failover is None else f"{t.failover:.3f} s"
        print(f"{system} trial {t.index}/{n}: {t.victim} off -> {t.survivor} answered "
              f"after {took}", flush=True)
    return report


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per system (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 trials per system (smoke test)")
    parser.add_argument("--only", choices=("keepalived", "hvha"), default=None)
    parser.add_argument("--name", default=f"hvf{os.getpid() % 100000}",
                        help="lab name, 1-8 chars [a-z][a-z0-9]* (default hvf<pid>)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill-phase delays")
    args = parser.parse_args(argv)
    n = 2 if args.quick else args.trials
    if n < 1:
        parser.error("--trials must be at least 1")
    if os.geteuid() != 0:
        print("failover.py needs root (network namespaces, veths, bridges)", file=sys.stderr)
        return 2
    if shutil.which("ip") is None:
        print("failover.py needs `ip` from iproute2", file=sys.stderr)
        return 2
    want = [args.only] if args.only else ["keepalived", "hvha"]
    if "keepalived" in want and shutil.which("keepalived") is None:
        print("keepalived is not installed (the baseline): apt-get install -y keepalived",
              file=sys.stderr)
        return 2

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    wall0, cpu0 = time.monotonic(), os.times()
    tmp = Path(tempfile.mkdtemp(prefix="hvha-failover-"))
    lab: Lab | None = None
    results: list[Result] = []
    code = 0
    try:
        for cand in lab_candidates(args.name, tmp / "lab"):
            lab = cand
            try:
                lab.up()
                break
            except LabError as exc:
                if "clash" not in str(exc):
                    raise
        else:
            raise BenchError("every candidate subnet in 198.18.250-255.x is in use")
        assert lab is not None
        print(f"lab {lab.name}: lan {lab.topology.network(LAN).subnet}, VIP {lab.vip}",
              flush=True)
        logdir = tmp / "logs"
        logdir.mkdir()
        restore_last = not args.quick  # the last restore only matters for its dual samples
        for system in want:
            rng = random.Random(args.seed)  # the same kill phases for both systems
            trials = keepalived_trials if system == "keepalived" else hvha_trials
            results.append(trials(lab, n, rng, logdir, restore_last=restore_last,
                                  report=_report(system, n)))
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the lab down", file=sys.stderr)
        code = 130
    except (BenchError, LabError) as exc:
        print(f"failover.py: {exc}", file=sys.stderr)
        code = 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
        left = teardown(lab) if lab is not None else []
        shutil.rmtree(tmp, ignore_errors=True)
        if left:
            print(f"failover.py: could not remove namespaces {left}", file=sys.stderr)
            code = code or 2
    if code:
        return code
    print_table(results, n)
    wall, cpu = time.monotonic() - wall0, os.times()
    used = sum(getattr(cpu, k) - getattr(cpu0, k)
               for k in ("user", "system", "children_user", "children_system"))
    print(f"wall {wall:.1f} s; CPU {used:.1f} s (this process and the children it reaped; "
          "daemons reparented to init are not counted)")
    return 1 if any(r.failed or (r.skipped and r.trials) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
