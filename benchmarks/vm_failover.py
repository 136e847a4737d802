"""Benchmark: time from powering off the primary node to the VM answering on the other node.

Why: issue 6's promise is that a VM survives its host's death, restarted from its replicated
disk. What a user waits for is the guest doing useful work again on the survivor. The guest
(tests/guest/build_guest.py) prints ``ACK <n>`` on its serial console each time it has flushed
its counter to disk, so "answering" = the first ACK on the survivor's console after the kill.

    .venv/bin/python benchmarks/vm_failover.py [--trials 5] [--quick] [--name LAB] [--seed N]

Needs root, iproute2, openssh-server, fuse3, qemu-system-x86 and Debian's packages (the guest).
Builds its own lab (``hvw<pid>``, a /25 of 198.18.250-255.x, repl the same in 198.19: reserved
for benchmarks), the cluster of tests/e2e/test_vm_lab.py (heartbeat 500 ms / 2.5 s, witness
lease 2.5 s, one ``kind: kvm`` ``hypervisor: qemu`` module, TCG), applies it, then per trial:

1. wait for a stable pair: primary PRIM with ACKs flowing, secondary SECOND, both in sync;
2. sleep a seeded random 0..1 s (kills land anywhere in the heartbeat period);
3. ``t_kill``, then power off the primary: SIGKILL of every process in its namespace (agent,
   FUSE mirror, QEMU, sshd) and both its cables pulled;
4. on the survivor: *detection* = kill -> its agent's transition to ALONE (the witness granted
   the role; the agent's own history, wall clock), *start* = that -> ``GUEST START`` on its
   console (mirror mounted, start_prim.sh, QEMU, kernel and /init), *first ACK* = that -> the
   first ``ACK`` (module loading, the first flushed write through the mirror); total = kill ->
   first ACK. Consoles are polled every 20 ms. The counter the guest found must be at least the
   last ACK the dead node printed (checked every trial);
5. the dead node is powered on (its agent started as `hvha apply` starts it) and must rejoin as
   an in-sync SECOND (*rejoin*: agent start -> in sync); the next trial kills the other node.

Baseline, same run: the same guest booted by plain QEMU (same command line, no hvha, a local
disk) until its first ACK, alternated with the trials; the heartbeat timeout is the least any
detection needs. Exit status: 0 if every trial failed over with its data, 1 if one did not,
2 if the environment is unfit, 130 on Ctrl-C. Removes everything it started, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.test_vm_lab import (  # noqa: E402
    HEARTBEAT,
    VmCluster,
    open_lab,
    other,
    vm_cluster,
)
from tests.guest.build_guest import (  # noqa: E402
    Guest,
    GuestUnavailable,
    accel,
    build_guest,
    create_disk,
    parse_acks,
    qemu_args,
)
from tests.labkit import force_down  # noqa: E402

from hvha.lab import Lab, LabError  # noqa: E402

POLL = 0.02
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


@dataclass
class Trial:
    index: int
    victim: str
    last_ack: int  # the dead node's last ACK
    detection: float | None = None
    mirror: float | None = None
    boot: float | None = None
    first_ack: float | None = None
    total: float | None = None
    found: int | None = None  # the counter the guest found on the survivor's disk
    rejoin: float | None = None
    power_off: float = 0.0  # kill_all (waits for every process to exit) + cables pulled

    @property
    def ok(self) -> bool:
        return self.total is not None and self.found is not None and self.found >= self.last_ack


def plain_boot(guest: Guest, tmp: Path) -> float:
    """Seconds from spawning plain QEMU (no hvha) to the guest's first ACK: the baseline."""
    tmp.mkdir(parents=True, exist_ok=True)
    disk, log = create_disk(tmp / "disk.img"), tmp / "serial.log"
    log.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(qemu_args(guest, disk, log, accel=accel(guest), cache=None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (log.exists() and parse_acks(log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError("plain QEMU did not boot the guest within 60 s")
            time.sleep(POLL)
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


def _alone_at(vm: VmCluster, node: str, after: float) -> float | None:
    """Wall-clock time of ``node``'s first transition to ALONE after ``after`` (its agent's
    history: the witness granted the role)."""
    m = vm.module(node)
    times = [h["at"] for h in (m or {}).get("history", [])
             if h["role"] == "ALONE" and h["at"] >= after]
    return times[0] if times else None


def _mirror_alone_at(vm: VmCluster, node: str, after: float) -> float | None:
    """Wall-clock time at which ``node``'s mirror gave up on the peer and went on alone (the
    replicator's "writing without <peer>" line in the agent log, local time, ms)."""
    for line in vm.agent_log(node, 400).splitlines():
        m = LOG_LINE.match(line)
        if m is None or "writing without" not in line:
            continue
        at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
        if at >= after:
            return at
    return None


def stable(vm: VmCluster, prim: str) -> bool:
    if not vm.paired(prim):
        return False
    n = len(vm.acks(prim))
    time.sleep(0.6)  # the guest acks every ~0.2 s: it must still be writing
    return len(vm.acks(prim)) > n


def run_trial(vm: VmCluster, index: int, prim: str, rng: random.Random) -> Trial:
    survivor = other(prim)
    vm.wait(f"a stable pair ({prim} primary)", lambda: stable(vm, prim), 120, step=0.2)
    offset = len(vm.serial(survivor))
    time.sleep(rng.random())
    t_kill, wall_kill = time.monotonic(), time.time()
    vm.power_off(prim)
    trial = Trial(index, prim, vm.acks(prim)[-1], power_off=time.monotonic() - t_kill)
    deadline = t_kill + 120
    t_start = None
    while time.monotonic() < deadline:
        text = vm.serial(survivor)[offset:]
        now = time.monotonic()
        if t_start is None and "GUEST START" in text:
            t_start = now
        if parse_acks(text):
            trial.total = now - t_kill
            break
        time.sleep(POLL)
    if trial.total is None:
        return trial
    starts = vm.starts(survivor, since=offset)
    trial.found = starts[0] if starts else None
    alone, mirror = _alone_at(vm, survivor, wall_kill), _mirror_alone_at(vm, survivor, wall_kill)
    if t_start is not None:
        started = t_start - t_kill  # kill -> GUEST START
        trial.first_ack = trial.total - started
        if alone is not None and mirror is not None and alone <= mirror <= wall_kill + started:
            trial.detection = alone - wall_kill
            trial.mirror = mirror - alone
            trial.boot = started - (mirror - wall_kill)
    t_on = time.monotonic()
    vm.power_on(prim, start_agent=True)
    vm.wait(f"{prim} back as an in-sync SECOND", lambda: vm.paired(survivor), 180, step=0.2)
    trial.rejoin = time.monotonic() - t_on
    return trial


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}–{max(xs):.2f})"


def print_table(trials: list[Trial], boots: list[float], load: tuple[str, str]) -> None:
    print("\n| trial | killed | detection | mirror alone | start + boot | first ACK | "
          "total (kill -> ACK) | counter: last ACK -> found | rejoin + resync |")
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for t in trials:
        print(f"| {t.index} | {t.victim} | {_s(t.detection)} | {_s(t.mirror)} | {_s(t.boot)} | "
              f"{_s(t.first_ack)} | {_s(t.total)} | {t.last_ack} -> {t.found} "
              f"{'ok' if t.ok else 'LOST'} | {_s(t.rejoin)} |")

    def col(name: str) -> list[float]:
        return [v for t in trials if (v := getattr(t, name)) is not None]

    total = col("total")
    print(f"\nsummary over {len(trials)} trials (median (min–max)); load average {load[0]} at the "
          f"start, {load[1]} at the end:")
    rows = [("detection (kill -> ALONE granted)", col("detection")),
            ("mirror alone (connect to the dead peer)", col("mirror")),
            ("start + boot (-> GUEST START)", col("boot")),
            ("first ACK after GUEST START", col("first_ack")), ("total: kill -> first ACK", total),
            ("rejoin (agent start -> in sync)", col("rejoin")),
            ("baseline: plain QEMU boot -> first ACK", boots)]
    for name, xs in rows:
        print(f"  {name:42} {_stats(xs)}")
    timeout = _seconds(HEARTBEAT[1])
    if total and boots:
        floor = timeout + statistics.median(boots)
        print(f"  {'floor: heartbeat timeout + plain boot':42} {floor:.2f} s; "
              f"total / floor = {statistics.median(total) / floor:.2f}")
    print(f"  failed over with data: {sum(t.ok for t in trials)}/{len(trials)}")


def _seconds(text: str) -> float:
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 trials (smoke test)")
    parser.add_argument("--name", default=f"hvw{os.getpid() % 100000}",
                        help="lab name, 1-8 chars [a-z][a-z0-9]* (default hvw<pid>)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill-phase delays")
    args = parser.parse_args(argv)
    n = 2 if args.quick else args.trials
    if n < 1:
        parser.error("--trials must be at least 1")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("vm_failover.py needs root and `ip` (iproute2)", file=sys.stderr)
        return 2
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("vm_failover.py needs /dev/fuse and fusermount3: apt-get install fuse3",
              file=sys.stderr)
        return 2
    try:
        guest = build_guest()
    except GuestUnavailable as exc:
        print(f"vm_failover.py: no test guest: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="hvha-vm-failover-"))
    lab: Lab | None = None
    trials: list[Trial] = []
    boots: list[float] = []
    load0 = _load()
    code = 0
    try:
        cands = [(f"198.18.{250 + k // 2}.{128 * (k % 2)}/25",
                  f"198.19.{250 + k // 2}.{128 * (k % 2)}/25") for k in range(11, -1, -1)]
        lab = open_lab(args.name, tmp / "lab", cands)
        print(f"lab {lab.name}: lan {lab.topology.networks[0].subnet}; accel "
              f"{accel(guest)}; load average {load0}", flush=True)
        rng = random.Random(args.seed)
        with vm_cluster(lab, guest) as vm:
            t0 = time.monotonic()
            applied = vm.apply()
            if applied.returncode != 0:
                raise RuntimeError(f"hvha apply failed:\n{applied.stdout}{applied.stderr}")
            print(f"apply: {time.monotonic() - t0:.1f} s", flush=True)
            prim = "node1"
            for i in range(1, n + 1):
                boots.append(plain_boot(guest, tmp / "plain"))
                trial = run_trial(vm, i, prim, rng)
                trials.append(trial)
                print(f"trial {i}/{n}: {prim} off -> first ACK on {other(prim)} after "
                      f"{_s(trial.total)} (counter {trial.last_ack} -> {trial.found}), "
                      f"rejoin {_s(trial.rejoin)}", flush=True)
                if trial.total is None:
                    break
                prim = other(prim)
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the lab down", file=sys.stderr)
        code = 130
    except (LabError, RuntimeError, AssertionError) as exc:
        print(f"vm_failover.py: {exc}", file=sys.stderr)
        code = 1 if trials else 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if lab is not None:
            with contextlib.suppress(AssertionError, LabError):
                force_down(lab)
        shutil.rmtree(tmp, ignore_errors=True)
    if trials:
        print_table(trials, boots, (load0, _load()))
    if code:
        return code
    return 0 if len(trials) == n and all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
