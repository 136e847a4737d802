"""Benchmark: `hvha plan` and a no-change `hvha apply` over real SSH, against the lab.

Why: a GitOps pipeline runs `plan` on every pull request and `apply` on every merge; the goals
are plan < 2 s and a no-change apply < 3 s for 32 modules. Both must at least reach both nodes
over SSH and validate the file, so the baseline (same run, interleaved) is two OpenSSH client
round trips (``ssh -i key -o UserKnownHostsFile=... root@node true``, one per node) plus
`hvha validate` of the same file; the ratio printed is hvha time / that baseline.

    .venv/bin/python benchmarks/plan.py [--quick] [--trials N] [--name LAB]

Needs root, iproute2, openssh-server + client. Builds its own lab (``hvb<pid>``, a /25 of
198.18.200-249.x, repl the same in 198.19: reserved for benchmarks), an sshd per node, a witness,
and clusters of 32 and 128 ``kind: app`` modules (``/bin/true`` start/stop, no VIPs; the 128 are
the 32 plus 96 more); removes everything at the end, also on failure, Ctrl-C or SIGTERM. Order
(medians of N trials each):

1. fresh nodes (nothing installed): plan 32, plan 128;
2. first apply of 32 (builds/pushes the wheelhouse, creates the venv; reported once, no goal);
3. installed 32: plan 32, ``apply --auto-approve`` with no changes;
4. apply of the 128-module file (adds 96 modules; once); installed 128: plan 128; destroy (once).

Every run's result is checked (plan's ``--detailed-exitcode``: 2 on fresh nodes, 0 when
installed; "No changes." from apply), so a broken run cannot pass for a fast one. Exit status:
0 if both goals are met, 1 if one is missed, 2 if the environment is unfit or a step failed,
130 on Ctrl-C. "CPU" is the controller's CPU time of that process (interpreter start included).
Also shown, as a diagnostic and not a baseline: the facts script that `plan` runs on each node,
run on node1 through the OpenSSH client, so the on-node share of a plan is visible.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvha.lab import Lab, LabError  # noqa: E402
from hvha.plan import facts_command  # noqa: E402

HVHA = [sys.executable, "-m", "hvha.cli.main"]
NODES = ("node1", "node2")
CLUSTER = "bench"
SIZES = (32, 128)
GOALS = {"plan": 2.0, "apply": 3.0}  # seconds, for 32 modules
CANDIDATES = 100  # /25s in 198.18.200.0-198.18.249.255


class BenchError(Exception):
    """A step did not give the result the measurement needs; the message says which."""


def cluster_yaml(n: int, nodes: Sequence[tuple[str, str, str]], *, secret: Path, key: Path,
                 known_hosts: Path, lan: str, repl: str, witness: str) -> str:
    """A cluster of ``n`` cheap app modules (app0..app<n-1>) on ``nodes`` (name, lan address,
    repl address), reached over SSH as root."""
    lines = [f"# benchmarks/plan.py: {n} modules",
             f"cluster: {{name: {CLUSTER}, secret: {{file: {secret}}}}}", "nodes:"]
    for name, addr, repl_addr in nodes:
        lines += [f"  - name: {name}", f"    address: {addr}",
                  f"    transport: {{type: ssh, user: root, key_file: {key}, "
                  f"known_hosts: {known_hosts}}}",
                  f"    heartbeat: {{lan: {addr}, repl: {repl_addr}}}"]
    lines += ["heartbeat:", "  interval: 1s", "  timeout: 5s", "  networks:",
              f"    - {{name: lan, subnet: {lan}}}",
              f"    - {{name: repl, subnet: {repl}, replication: true}}",
              f"witness: {{arbiter: {{address: {witness}}}}}", "modules:"]
    for i in range(n):
        lines += [f"  - name: app{i}", "    kind: app",
                  "    payload: {start: /bin/true, stop: /bin/true}",
                  f"    failover: {{preferred: {nodes[i % len(nodes)][0]}}}"]
    return "\n".join(lines) + "\n"


@dataclass
class Sample:
    wall: float
    cpu: float


@dataclass
class Series:
    """Repeated timings of one command."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [s.wall for s in self.samples]

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)


@dataclass(frozen=True)
class Row:
    what: str
    modules: int
    timed: Series
    baseline: float  # median of (ssh node1 + ssh node2 + validate), same phase
    goal: float | None = None

    @property
    def ratio(self) -> float:
        return self.timed.median / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.timed.median < self.goal


def baseline(ssh: Series, validate: Series) -> float:
    """Median over trials of two SSH round trips (one per node, summed) + validate."""
    per_trial = [a.wall + b.wall + v.wall for a, b, v in
                 zip(ssh.samples[0::2], ssh.samples[1::2], validate.samples, strict=True)]
    return statistics.median(per_trial)


Extra = tuple[str, Series]  # a figure shown without baseline or goal


def render(rows: Sequence[Row], extra: Sequence[Extra], n: int) -> str:
    head = (f"{'measurement':<36} {'median s':>8} {'min s':>6} {'max s':>6} {'CPU s':>6} "
            f"{'baseline s':>10} {'ratio':>6}  goal")
    out = [f"medians of {n} trials; baseline = 2 OpenSSH round trips (one per node) + "
           "`hvha validate` of the same file, same phase", head, "-" * len(head)]
    for r in rows:
        t = r.timed
        goal = "" if r.goal is None else f"< {r.goal:.0f} s: {'met' if r.met else 'MISSED'}"
        out.append(f"{r.what + f' ({r.modules})':<36} {t.median:>8.2f} {min(t.walls):>6.2f} "
                   f"{max(t.walls):>6.2f} {t.cpu:>6.2f} {r.baseline:>10.2f} "
                   f"{r.ratio:>5.1f}x  {goal}")
    out.append("-" * len(head))
    for what, s in extra:
        out.append(f"{what:<36} {s.median:>8.2f} {min(s.walls):>6.2f} {max(s.walls):>6.2f} "
                   f"{s.cpu:>6.2f}")
    return "\n".join(out) + "\n"


def timed(argv: Sequence[str], *, rc: int = 0, expect: str | None = None,
          timeout: float = 600) -> Sample:
    """Run ``argv`` once; its wall time and CPU time, or BenchError if the result is not
    the one wanted (exit code ``rc``, ``expect`` in stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != rc or (expect is not None and expect not in res.stdout):
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-12:])
        want = f"{rc}{f' and {expect!r} in its output' if expect else ''}"
        shown = " ".join(argv[2:] if argv[:2] == HVHA[:2] else argv)
        raise BenchError(f"`{shown}` exited {res.returncode} (wanted {want}):\n{tail}")
    return Sample(wall, cpu)


class Bench:
    """The lab, its files, and the commands timed against it."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.key = lab.root / "id_ed25519"
        self.known_hosts = work / "known_hosts"
        shutil.copy(lab.root / "known_hosts", self.known_hosts)
        self.secret = secret = work / "cluster.key"
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
        lan_net, repl_net = lab.topology.networks
        nodes = [(n, str(lab.address(n, "lan")), str(lab.address(n, "repl"))) for n in NODES]
        self.files: dict[int, str] = {}
        for n in SIZES:
            path = work / f"cluster-{n}.yaml"
            path.write_text(cluster_yaml(
                n, nodes, secret=secret, key=self.key, known_hosts=self.known_hosts,
                lan=str(lan_net.subnet), repl=str(repl_net.subnet),
                witness=str(lab.address("witness", "lan"))))
            self.files[n] = str(path)

    def ssh(self, node: str, command: str = "true") -> Sample:
        """One OpenSSH client round trip (connect, authenticate, run ``command``)."""
        return timed(["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "BatchMode=yes",
                      "-o", f"UserKnownHostsFile={self.known_hosts}",
                      "-o", "StrictHostKeyChecking=yes", f"root@{self.lab.address(node, 'lan')}",
                      command], timeout=60, expect=None if command == "true" else '"facts_format"')

    def validate(self, n: int) -> Sample:
        return timed([*HVHA, "validate", self.files[n]], expect="ok: ")

    def plan(self, n: int, installed: bool) -> Sample:
        return timed([*HVHA, "plan", self.files[n], "--detailed-exitcode"],
                     rc=0 if installed else 2, timeout=120)

    def apply(self, n: int, *, unchanged: bool = False) -> Sample:
        return timed([*HVHA, "apply", self.files[n], "--auto-approve"],
                     expect="No changes." if unchanged else "Apply complete!")

    def destroy(self, n: int) -> Sample:
        return timed([*HVHA, "destroy", self.files[n], "--auto-approve"],
                     expect="Destroy complete!")


def lab_candidates(name: str, root: Path) -> Iterator[Lab]:
    """The lab on each /25 of 198.18.200-249.x (repl: the same in 198.19), starting at one
    picked by pid so that concurrent runs rarely collide; ``up`` refuses taken ones."""
    first = os.getpid() % CANDIDATES
    for i in range(CANDIDATES):
        k = (first + i) % CANDIDATES
        octet, low = 200 + k // 2, 128 * (k % 2)
        yield Lab.open(name, root, lan=f"198.18.{octet}.{low}/25",
                       repl=f"198.19.{octet}.{low}/25")


def teardown(lab: Lab) -> list[str]:
    """Remove the lab whatever state it is in; the namespaces of it that `ip netns` still lists."""
    with contextlib.suppress(LabError):
        lab.down(purge=True, grace=0.5)
    for ifname in lab.topology.root_interfaces:  # by exact name, never by pattern
        subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)
    for ns in lab.topology.namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    return sorted({ln.split()[0] for ln in out.splitlines() if ln.strip()}
                  & set(lab.topology.namespaces))


def unfit() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if os.geteuid() != 0:
        return "plan.py needs root (network namespaces, an sshd per node)"
    for tool, hint in (("ip", "iproute2"), ("ssh", "openssh-client"),
                       ("/usr/sbin/sshd", "openssh-server")):
        if shutil.which(tool) is None:
            return f"plan.py needs `{tool}`: apt-get install -y {hint}"
    return None


def machine() -> str:
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")), "0")
    return (f"{os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB, kernel {os.uname().release}, "
            "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def measure(b: Bench, n: int, say: Callable[[str], None]) -> tuple[list[Row], list[Extra]]:
    """Every figure, phase by phase; in a phase the timed command and its baseline alternate,
    so both see the same machine state (BENCHMARKING.md)."""
    small, big = SIZES
    runs: dict[str, Series] = {}

    def rec(key: str, *samples: Sample) -> None:
        runs.setdefault(key, Series()).samples.extend(samples)

    def trial(phase: str, sizes: Sequence[int], installed: bool) -> None:
        rec(f"ssh {phase}", b.ssh("node1"), b.ssh("node2"))  # one pair per trial
        # not a baseline: what gathering one node's facts costs, seen from the OpenSSH client
        rec(f"facts {phase}", b.ssh("node1", facts_command()))
        for size in sizes:
            rec(f"validate {phase} {size}", b.validate(size))
            rec(f"plan {phase} {size}", b.plan(size, installed))

    for t in range(n):
        say(f"fresh nodes, trial {t + 1}/{n}")
        trial("fresh", SIZES, installed=False)
    say(f"first apply of {small} modules (installs the venv on both nodes)")
    rec("first apply", b.apply(small))
    for t in range(n):
        say(f"installed {small}, trial {t + 1}/{n}")
        trial("inst", [small], installed=True)
        rec("apply nochange", b.apply(small, unchanged=True))
    say(f"apply of the {big}-module file (adds {big - small} modules)")
    rec("grow", b.apply(big))
    for t in range(n):
        say(f"installed {big}, trial {t + 1}/{n}")
        trial("inst-big", [big], installed=True)
    say("destroy")
    rec("destroy", b.destroy(big))

    def row(what: str, key: str, phase: str, size: int, goal: float | None = None) -> Row:
        base = baseline(runs[f"ssh {phase}"], runs[f"validate {phase} {size}"])
        return Row(what, size, runs[key], base, goal)

    def joined(*keys: str) -> Series:
        return Series([s for k in keys for s in runs[k].samples])

    rows = [row("plan, fresh nodes", f"plan fresh {small}", "fresh", small, GOALS["plan"]),
            row("plan, fresh nodes", f"plan fresh {big}", "fresh", big),
            row("plan, installed", f"plan inst {small}", "inst", small, GOALS["plan"]),
            row("plan, installed", f"plan inst-big {big}", "inst-big", big),
            row("apply, no changes", "apply nochange", "inst", small, GOALS["apply"])]
    extra = [("baseline: ssh root@node true", joined("ssh fresh", "ssh inst", "ssh inst-big")),
             (f"baseline: validate ({small})",
              joined(f"validate fresh {small}", f"validate inst {small}")),
             (f"baseline: validate ({big})",
              joined(f"validate fresh {big}", f"validate inst-big {big}")),
             ("facts script via ssh, fresh", runs["facts fresh"]),
             (f"facts script via ssh, installed {small}", runs["facts inst"]),
             (f"facts script via ssh, installed {big}", runs["facts inst-big"]),
             (f"once: first apply ({small}, venv)", runs["first apply"]),
             (f"once: apply +{big - small} modules ({big})", runs["grow"]),
             (f"once: destroy ({big})", runs["destroy"])]
    return rows, extra


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per figure (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 trials per figure (smoke test)")
    parser.add_argument("--name", default=f"hvb{os.getpid() % 100000}",
                        help="lab name, 1-8 chars [a-z][a-z0-9]* (default hvb<pid>)")
    args = parser.parse_args(argv)
    n = 2 if args.quick else args.trials
    if n < 1:
        parser.error("--trials must be at least 1")
    if (why := unfit()) is not None:
        print(why, file=sys.stderr)
        return 2

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    print(f"machine: {machine()}", flush=True)
    wall0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="hvha-planbench-"))
    lab: Lab | None = None
    witness: subprocess.Popen[bytes] | None = None
    code = 0
    result: tuple[list[Row], list[Extra]] | None = None
    try:
        for cand in lab_candidates(args.name, tmp / "lab"):
            lab = cand
            try:
                lab.up(sshd=True)
                break
            except LabError as exc:
                if "clash" not in str(exc):
                    raise
        else:
            raise BenchError("every candidate subnet in 198.18.200-249.x is in use")
        assert lab is not None
        work = tmp / "work"
        work.mkdir()
        bench = Bench(lab, work)
        print(f"lab {lab.name}: lan {lab.topology.networks[0].subnet}", flush=True)
        witness = lab.exec("witness", [*HVHA, "witness", "--cluster", CLUSTER, "--secret-file",
                                       str(bench.secret), "--state-dir", str(work / "witness")],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
        result = measure(bench, n, lambda m: print(f"  {m}", flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the lab down", file=sys.stderr)
        code = 130
    except (BenchError, LabError, subprocess.TimeoutExpired) as exc:
        print(f"plan.py: {exc}", file=sys.stderr)
        code = 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
        if witness is not None:
            witness.kill()  # by its own pid, the process we started
            witness.wait()
        left = teardown(lab) if lab is not None else []
        shutil.rmtree(tmp, ignore_errors=True)
        if left:
            print(f"plan.py: could not remove namespaces {left}", file=sys.stderr)
            code = code or 2
    if code or result is None:
        return code or 2
    rows, extra = result
    print("\n" + render(rows, extra, n), end="")
    print(f"wall {time.monotonic() - wall0:.0f} s; machine after the run: {machine()}")
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
