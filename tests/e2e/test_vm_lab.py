"""Issue 6's proof: a real VM fails over between two lab nodes and comes home, data intact.

Everything is the real product: the lab (network namespaces, an sshd and private /srv/hvha,
/run/hvha... per node), `hvha apply` over SSH installing and starting the agents, the witness,
the FUSE mirror replicating the VM directory synchronously, and the `kind: kvm` `hypervisor:
qemu` module scripts booting the tiny test guest (tests/guest/build_guest.py) from that
directory. The guest counts on its virtio disk and prints ``ACK <n>`` on its serial console only
after the write was flushed, so every ACK is a value the host promised was durable.

The story checked (:func:`test_vm_fails_over_rejoins_and_swaps_home`):
1. node1 holds kernel, initrd and disk image before apply; node2 starts with nothing. Apply;
   the first resync copies the directory; node1 PRIM, node2 SECOND, both in sync; ACKs flow.
2. node1 is powered off (every process SIGKILLed, both cables pulled): node2 takes over and
   boots the VM from its replicated copy; the counter goes on from the last ACK node1 printed.
3. node1 is powered on (no mounts left, cables, sshd) and its supervised agent started with the
   argv `hvha apply` uses: it rejoins as SECOND and resyncs what changed while it was away.
4. `swap` (control socket): the VM powers off on node2 and boots on node1, counter monotonic.

The serial log is a plain file in each node's private /run/hvha, so each log says which node
wrote it. The harness (:class:`VmCluster`, :func:`vm_cluster`) is reused by
benchmarks/vm_failover.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hvha.agent.control import call
from hvha.apply.node import SUPERVISED_LOG, NodePaths
from hvha.lab import Lab, LabError
from tests.e2e.apply_kit import nodes_yaml
from tests.e2e.cluster_lab import HVHA
from tests.guest.build_guest import (
    Guest,
    GuestUnavailable,
    accel,
    build_guest,
    create_disk,
    parse_acks,
    qemu_args,
)
from tests.labkit import force_down, require_netns

pytestmark = pytest.mark.e2e
NODES = ("node1", "node2")
MODULE = "vm1"
VM_DIR = "/srv/hvha/vm1"  # replicated (the VM directory of a kvm module is, by default)
SERIAL = "/run/hvha/vm1-console.log"  # node-private: each node's log says who wrote it
HEARTBEAT = ("500ms", "2500ms")  # interval, timeout (= the witness lease)
START_RE = re.compile(r"^GUEST START (\d+)\r?$", re.MULTILINE)
POWERDOWN_RE = re.compile(r"^POWERDOWN (\d+)\r?$", re.MULTILINE)


def other(node: str) -> str:
    return NODES[1 - NODES.index(node)]


@dataclasses.dataclass
class VmCluster:
    """A two-node cluster in ``lab`` running one qemu VM module, and ways to watch it."""

    lab: Lab
    work: Path
    guest: Guest
    procs: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    @property
    def cluster_file(self) -> Path:
        return self.work / "cluster.yaml"

    # -- observation ---------------------------------------------------------------------
    def serial(self, node: str) -> str:
        path = self.lab.node_path(node, SERIAL)
        return path.read_text(errors="replace") if path.exists() else ""

    def acks(self, node: str, since: int = 0) -> list[int]:
        """ACKs printed on ``node``'s console after character offset ``since``."""
        return parse_acks(self.serial(node)[since:])

    def starts(self, node: str, since: int = 0) -> list[int]:
        """Counter values the guest found on its disk at each boot on ``node``."""
        return [int(m) for m in START_RE.findall(self.serial(node)[since:])]

    def disk(self, node: str) -> Path:
        """The image as stored on ``node`` (the backing file, under any mount of the node)."""
        return self.lab.node_path(node, f"{VM_DIR}/disk.img")

    def module(self, node: str) -> dict[str, Any] | None:
        sock = self.lab.node_path(node, "/var/lib/hvha/control.sock")
        try:
            reply = call(sock, {"cmd": "status"}, timeout=5)
        except (OSError, ValueError):
            return None
        mods = reply.get("status", {}).get("modules", [])
        found: dict[str, Any] | None = next((m for m in mods if m["module"] == MODULE), None)
        return found

    def role(self, node: str) -> str | None:
        m = self.module(node)
        return None if m is None else str(m["role"])

    def paired(self, prim: str) -> bool:
        """``prim`` PRIM, the other SECOND, and both say the copies are in sync."""
        a, b = self.module(prim), self.module(other(prim))
        return (a is not None and b is not None and a["role"] == "PRIM"
                and b["role"] == "SECOND" and bool(a["in_sync"]) and bool(b["in_sync"]))

    def agent_log(self, node: str, lines: int = 40) -> str:
        path = self.lab.node_path(node, f"/var/lib/hvha/{SUPERVISED_LOG}")
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    def describe(self) -> str:
        out = []
        for n in NODES:
            m = self.module(n)
            brief = None if m is None else {k: m.get(k) for k in (
                "role", "reason", "in_sync", "last_error", "replication")}
            out.append(f"--- {n}: {json.dumps(brief, default=str)[:1500]}\n"
                       f"serial tail: {self.serial(n)[-300:]!r}\n"
                       f"agent log:\n{self.agent_log(n)}")
        return "\n".join(out)

    def wait(self, what: str, pred: Callable[[], bool], timeout: float,
             step: float = 0.1) -> float:
        """Seconds until ``pred()``; fails with both nodes' state after ``timeout``."""
        start = time.monotonic()
        while not pred():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                     + self.describe())
            time.sleep(step)
        return time.monotonic() - start

    # -- actions -------------------------------------------------------------------------
    def hvha(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HVHA, *args], capture_output=True, text=True, timeout=timeout)

    def apply(self) -> subprocess.CompletedProcess[str]:
        return self.hvha("apply", str(self.cluster_file), "--auto-approve")

    def swap(self, node: str) -> dict[str, Any]:
        sock = self.lab.node_path(node, "/var/lib/hvha/control.sock")
        return call(sock, {"cmd": "swap", "module": MODULE}, timeout=120)

    def power_off(self, node: str) -> None:
        """Every process of the node killed (agent, FUSE daemon, QEMU, sshd), cables pulled."""
        self.lab.kill_all(node, signal.SIGKILL)
        for net in ("lan", "repl"):
            self.lab.set_link(node, net, False)

    def power_on(self, node: str, *, start_agent: bool) -> None:
        """A boot: no mounts left from before, cables back in, the node's sshd started;
        ``start_agent`` also starts the supervised agent as `hvha apply` does (same argv).

        The lab keeps a node's mount namespace across a "power off", so the dead FUSE mirror
        and the read-only guard of the killed agent would still be mounted on VM_DIR; a real
        reboot has none, so they are lazily unmounted here."""
        self.lab.run(node, ["sh", "-c", f"i=0; while [ $i -lt 5 ] && umount -l {VM_DIR} "
                            "2>/dev/null; do i=$((i + 1)); done"], timeout=30)
        for net in ("lan", "repl"):
            self.lab.set_link(node, net, True)
        self.lab.up(sshd=True)
        if start_agent:
            p = NodePaths()
            argv = [p.hvha, "supervise", "--pid-file", p.pid_file, "--log",
                    f"{p.state}/{SUPERVISED_LOG}", "--", *p.agent_argv()]
            self.procs.append(self.lab.exec(node, argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True))

    def close(self) -> None:
        for node in NODES:
            with contextlib.suppress(LabError, OSError):
                self.lab.kill_all(node, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def write_cluster(lab: Lab, work: Path, guest: Guest, *, interval: float = 0.2) -> Path:
    """cluster.yaml: two ssh nodes, an arbiter witness, module vm1 (kind kvm, qemu)."""
    vm = dataclasses.replace(guest, kernel=Path(f"{VM_DIR}/vmlinuz"),
                             initrd=Path(f"{VM_DIR}/initrd.img"))
    args = qemu_args(vm, Path(f"{VM_DIR}/disk.img"), Path(SERIAL), accel=accel(guest),
                     cache=None, interval=interval)
    i = args.index("-serial")  # append on restart, instead of truncating the log
    args[i:i + 2] = ["-chardev", f"file,id=console,path={SERIAL},append=on", "-serial",
                     "chardev:console"]
    nodes = nodes_yaml(lab, work)
    lan, repl = lab.topology.networks
    path = work / "cluster.yaml"
    path.write_text(
        f"cluster: {{name: vmlab, secret: {{file: {work}/cluster.key}}}}\nnodes:\n{nodes}"
        f"heartbeat:\n  interval: {HEARTBEAT[0]}\n  timeout: {HEARTBEAT[1]}\n  networks:\n"
        f"    - {{name: lan, subnet: '{lan.subnet}'}}\n"
        f"    - {{name: repl, subnet: '{repl.subnet}', replication: true}}\n"
        f"witness: {{arbiter: {{address: {lab.address('witness', 'lan')}}}}}\n"
        f"modules:\n  - name: {MODULE}\n    kind: kvm\n"
        f"    payload:\n      vm: tiny\n      directory: {VM_DIR}\n      hypervisor: qemu\n"
        f"      command: {json.dumps(args)}\n"
        "    stop: {mode: shutdown, graceful_timeout: 20s, forced_timeout: 10s}\n"
        "    checkers:\n"
        "      - {name: vm, type: vm_state, interval: 4s, timeout: 3500ms, failures: 2}\n"
        "    failover: {preferred: node1, failback: false}\n")
    return path


def open_lab(name: str, root: Path, candidates: Sequence[tuple[str, str]]) -> Lab:
    """The lab ``name`` up with sshd, on the first (lan, repl) pair of subnets that is free."""
    errors = []
    for lan, repl in candidates:
        lab = Lab.open(name, root, lan=lan, repl=repl)
        try:
            lab.up(sshd=True)
            return lab
        except LabError as exc:
            errors.append(str(exc))
            force_down(lab)
            if "clash" not in str(exc):
                break
    raise LabError("no lab could be built: " + "; ".join(errors))


@contextlib.contextmanager
def vm_cluster(lab: Lab, guest: Guest, *, interval: float = 0.2) -> Iterator[VmCluster]:
    """Witness up, VM files on node1 only, cluster.yaml written (not applied yet).

    On exit every process started in the lab is killed by namespace (QEMU, agents, FUSE
    daemons, witness); tearing the lab down is the caller's job (:func:`force_down`)."""
    work = lab.root / "work"
    work.mkdir(exist_ok=True)
    key = work / "cluster.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    vm_dir = lab.node_path("node1", VM_DIR)
    vm_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest.kernel, vm_dir / "vmlinuz")
    shutil.copyfile(guest.initrd, vm_dir / "initrd.img")
    create_disk(vm_dir / "disk.img")
    write_cluster(lab, work, guest, interval=interval)
    cluster = VmCluster(lab, work, guest)
    try:
        cluster.procs.append(lab.exec(
            "witness", [*HVHA, "witness", "--cluster", "vmlab", "--secret-file", str(key),
                        "--lease", HEARTBEAT[1], "--state-dir", str(work / "witness")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield cluster
    finally:
        cluster.close()
        with contextlib.suppress(LabError, OSError):
            lab.kill_all("witness", signal.SIGKILL)


def need_guest_and_fuse() -> Guest:
    """Skip, saying why, unless QEMU, the guest and FUSE are all usable here."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("the VM failover test needs /dev/fuse and fusermount3 (apt-get install fuse3)")
    try:
        return build_guest()
    except GuestUnavailable as exc:
        pytest.skip(f"no test guest: {exc}")


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VmCluster]:
    require_netns("VM failover tests", sshd=True)
    guest = need_guest_and_fuse()
    n, net = os.getpid() % 100000, 1 + (os.getpid() + 37) % 250
    candidates = [(f"198.18.{(net + k - 1) % 250 + 1}.0/25", f"198.19.{(net + k - 1) % 250 + 1}"
                   ".0/25") for k in range(0, 40, 7)]
    lab = open_lab(f"hvm{n}", tmp_path / "root", candidates)
    try:
        with vm_cluster(lab, guest) as cluster:
            yield cluster
    finally:
        force_down(lab)


def test_vm_fails_over_rejoins_and_swaps_home(vm: VmCluster) -> None:
    # 1. apply: node1 runs the VM, node2 got the directory through the first resync
    assert not vm.lab.node_path("node2", VM_DIR).exists() or \
        not any(vm.lab.node_path("node2", VM_DIR).iterdir())
    first = vm.apply()
    assert first.returncode == 0, first.stdout + first.stderr + vm.describe()
    vm.wait("node1 PRIM, node2 SECOND, in sync", lambda: vm.paired("node1"), 90)
    vm.wait("3 ACKs on node1's console", lambda: len(vm.acks("node1")) >= 3, 60)
    image = vm.lab.node_path("node1", f"{VM_DIR}/vmlinuz").read_bytes()
    assert vm.lab.node_path("node2", f"{VM_DIR}/vmlinuz").read_bytes() == image
    assert vm.serial("node2") == "", "the VM must not run on the secondary"

    # 2. power off node1 while the guest writes: node2 boots it from its copy
    vm.power_off("node1")
    last1 = vm.acks("node1")[-1]  # the log survives on node1's disk: its last promise
    vm.wait("the VM answering on node2", lambda: len(vm.acks("node2")) >= 2, 90)
    assert vm.role("node2") in ("ALONE", "PRIM")
    start2 = vm.starts("node2")[0]
    assert last1 <= start2 <= last1 + 1, \
        f"node2 booted with counter {start2}, node1 had acknowledged {last1}"
    assert vm.acks("node2")[0] == start2 + 1

    # 3. node1 back, its supervised agent started as apply starts it: it rejoins as SECOND
    # and resyncs what node2 wrote alone (not `hvha apply` here: in a checkout being edited
    # the wheel differs from the first apply's, and apply would also restart node2's agent)
    vm.power_on("node1", start_agent=True)
    vm.wait("node2 PRIM, node1 SECOND, in sync", lambda: vm.paired("node2"), 90)
    ran1 = len(vm.serial("node1"))
    time.sleep(1)
    assert len(vm.serial("node1")) == ran1, "the VM must not run on node1 while SECOND"

    # 4. swap: the VM powers off on node2 and comes home to node1, counter monotonic
    before2 = vm.acks("node2")[-1]
    reply = vm.swap("node2")
    assert reply.get("ok"), reply
    vm.wait("the VM answering on node1 again",
            lambda: len(vm.acks("node1", since=ran1)) >= 2, 90)
    last2 = vm.acks("node2")[-1]
    down = [int(v) for v in POWERDOWN_RE.findall(vm.serial("node2"))]
    assert down and down[-1] == last2, "the swap must power the guest off gracefully"
    home = vm.starts("node1", since=ran1)[0]
    assert home == last2 >= before2, f"node1 booted with {home}, node2 had acknowledged {last2}"
    acks = vm.acks("node1", since=ran1)
    assert acks[0] == home + 1 and acks == sorted(acks)
    vm.wait("node1 PRIM, node2 SECOND, in sync again", lambda: vm.paired("node1"), 60)
