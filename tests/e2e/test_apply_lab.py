"""`hvha apply`, `reconcile` and `destroy` over real SSH against the lab.

Each lab node has its own /opt/hvha, /etc/hvha and /var/lib/hvha (hvha.lab.nodefs), so apply
really installs two nodes: the package built here is pushed over SFTP into a venv on each node,
the agent runs as a supervised process (no systemd in these namespaces), the module comes up
PRIM on one node and SECOND on the other, and a client reaches the app through the VIP. Drift
is injected by hand (an agent stopped, a bundle edited, a VIP deleted) and `reconcile --once`
must correct it; `destroy` must leave nothing running or installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvha.agent.control import call
from hvha.lab import Lab
from tests.e2e.cluster_lab import HVHA, SERVER, _script
from tests.labkit import force_down, require_netns

pytestmark = pytest.mark.e2e
NODES = ("node1", "node2")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_netns("apply-over-SSH tests", sshd=True)
    n, net = os.getpid() % 100000, 1 + (os.getpid() + 11) % 250
    the_lab = Lab.open(f"hva{n}", tmp_path_factory.mktemp("alab") / "root",
                       lan=f"198.18.{net}.128/25", repl=f"198.19.{net}.128/25")
    witness = None
    try:
        the_lab.up(sshd=True)
        work = the_lab.root / "work"
        work.mkdir()
        key = work / "cluster.key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        witness = the_lab.exec("witness", [*HVHA, "witness", "--cluster", "apply", "--secret-file",
                                           str(key), "--state-dir", str(work / "witness")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield the_lab
    finally:
        if witness is not None:
            witness.kill()
            witness.wait()
        force_down(the_lab)


def _cluster(lab: Lab) -> Path:
    work = lab.root / "work"
    (work / "server.py").write_text(SERVER)
    pid = "/run/hvha/app.pid"  # private to each node
    _script(work / "start", f'mkdir -p /run/hvha; setsid {sys.executable} {work}/server.py '
            f'"$HVHA_NODE" >/dev/null 2>&1 </dev/null &\necho $! > {pid}\n')
    alive = ('alive() { [ -r "/proc/$p/status" ] && '
             '! grep -q "^State:[[:space:]]*Z" "/proc/$p/status"; }\n')
    _script(work / "stop", f'p=$(cat {pid} 2>/dev/null) || exit 0\n{alive}kill "$p"\n'
            f'while alive; do sleep 0.05; done\nrm -f {pid}\n')
    _script(work / "status", f'p=$(cat {pid} 2>/dev/null) || exit 1\n{alive}alive\n')
    shutil.copy(lab.root / "known_hosts", work / "known_hosts")
    nodes = "".join(
        f"  - name: {n}\n    address: {lab.address(n, 'lan')}\n"
        f"    transport: {{type: ssh, user: root, key_file: {lab.root}/id_ed25519, "
        f"known_hosts: {work}/known_hosts}}\n"
        f"    heartbeat: {{lan: {lab.address(n, 'lan')}, repl: {lab.address(n, 'repl')}}}\n"
        for n in NODES)
    lan, repl = lab.topology.networks
    path = work / "cluster.yaml"
    path.write_text(
        f"cluster: {{name: apply, secret: {{file: {work}/cluster.key}}}}\nnodes:\n{nodes}"
        "heartbeat:\n  interval: 300ms\n  timeout: 1500ms\n  networks:\n"
        f"    - {{name: lan, subnet: {lan.subnet}}}\n"
        f"    - {{name: repl, subnet: {repl.subnet}, replication: true}}\n"
        f"witness: {{arbiter: {{address: {lab.address('witness', 'lan')}}}}}\n"
        "modules:\n  - name: web\n    kind: app\n"
        f"    payload: {{start: {work}/start, stop: {work}/stop, status: {work}/status}}\n"
        f"    vip: {{address: {lab.vip}, interface: eth0}}\n"
        "    failover: {preferred: node1}\n")
    return path


def _hvha(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HVHA, *args], capture_output=True, text=True, timeout=timeout)


def _status(lab: Lab, node: str) -> dict[str, Any] | None:
    sock = lab.node_path(node, "/var/lib/hvha/control.sock")
    try:
        return call(sock, {"cmd": "status"})
    except OSError:
        return None


def _roles(lab: Lab) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in NODES:
        st = _status(lab, n)
        mods = st["status"]["modules"] if st else []
        out[n] = next((m["role"] for m in mods if m["module"] == "web"), None)
    return out


def _wait_roles(lab: Lab, want: dict[str, str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _roles(lab) != want:
        assert time.monotonic() < deadline, f"roles {_roles(lab)}, expected {want}"
        time.sleep(0.2)


def _client(lab: Lab) -> str:
    ip = str(lab.vip).split("/")[0]
    code = (f"import socket; print(socket.create_connection(('{ip}', 8080), 2)"
            ".recv(64).decode().strip())")
    proc = lab.exec("client", ["python3", "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    return out.strip()


def test_apply_reconcile_destroy(lab: Lab) -> None:
    cluster = str(_cluster(lab))
    first = _hvha("apply", cluster, "--auto-approve")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Apply complete! Resources: 12 added" in first.stdout
    assert "node1: agent: hvha" in first.stdout and "wheels sent" in first.stdout
    _wait_roles(lab, {"node1": "PRIM", "node2": "SECOND"})
    assert _client(lab) == "node1"
    # each node has its own installation (nothing shared through the host)
    for n in NODES:
        assert lab.node_path(n, "/opt/hvha/venv/bin/hvha").exists()
        assert oct(lab.node_path(n, "/etc/hvha/node.bundle").stat().st_mode & 0o777) == "0o600"

    second = _hvha("apply", cluster, "--auto-approve")
    assert second.returncode == 0 and "No changes." in second.stdout, second.stdout
    plan = _hvha("plan", cluster, "--detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr

    # drift 1: the agent on node2 is stopped (SIGTERM to its supervisor, by pid)
    pid = int(lab.node_path("node2", "/var/lib/hvha/agent.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _status(lab, "node2") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # drift 2: node1's pushed bundle replaced by another file (its .sha256 left alone)
    b1 = lab.node_path("node1", "/etc/hvha/node.bundle")
    b1.write_bytes(lab.node_path("node2", "/etc/hvha/node.bundle").read_bytes())
    drifted = _hvha("plan", cluster, "--json")
    changes = json.loads(drifted.stdout)["changes"]
    assert {(c["address"], c["drift"]) for c in changes} >= {
        ("node/node2/service", True), ("node/node1/bundle", True)}
    fixed = _hvha("reconcile", cluster, "--once")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "drift on node2: node/node2/service" in fixed.stdout
    assert "converged" in fixed.stdout
    _wait_roles(lab, {"node1": "PRIM", "node2": "SECOND"})
    assert _client(lab) == "node1"
    # drift 3: the VIP deleted on the primary, a script of its running bundle edited
    lab.exec("node1", ["ip", "addr", "del", str(lab.vip), "dev", "eth0"]).wait(timeout=10)
    script = lab.node_path("node1", "/var/lib/hvha/bundle/modules/web/start_prim.sh")
    original = script.read_bytes()
    script.write_bytes(original + b"\necho edited by hand\n")
    fixed = _hvha("reconcile", cluster, "--once")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "drift on node1: vip/web" in fixed.stdout
    assert "files of the running bundle were edited" in fixed.stdout
    assert script.read_bytes() == original
    assert _client(lab) == "node1"
    again = _hvha("reconcile", cluster, "--once")
    assert again.returncode == 0 and "in sync: no changes" in again.stdout, again.stdout

    # unreachable node: nothing is done on the other
    lab.set_link("node2", "lan", up=False)
    try:
        down = _hvha("apply", cluster, "--auto-approve", timeout=120)
    finally:
        lab.set_link("node2", "lan", up=True)
    assert down.returncode == 1 and "node2" in down.stderr
    assert "nothing was changed" in down.stderr and "Traceback" not in down.stderr

    gone = _hvha("destroy", cluster, "--auto-approve")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    for n in NODES:
        assert _status(lab, n) is None
        assert not lab.node_path(n, "/opt/hvha/venv").exists()
        assert not lab.node_path(n, "/etc/hvha/node.bundle").exists()
    assert _roles(lab) == {"node1": None, "node2": None}
    fresh = _hvha("plan", cluster, "--detailed-exitcode")
    assert fresh.returncode == 2 and "not installed" in fresh.stdout
