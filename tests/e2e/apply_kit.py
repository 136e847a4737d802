"""A lab cluster managed the way users manage one: `hvha apply` over SSH, a witness on the
third host, agents supervised on the nodes. Shared by the apply and replication e2e tests."""

from __future__ import annotations

import os
import shutil
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


def nodes_yaml(lab: Lab, work: Path) -> str:
    """The `nodes:` entries of the lab's two nodes, reached over SSH with the lab's admin key
    (host keys: a copy of the lab's known_hosts in ``work``)."""
    shutil.copy(lab.root / "known_hosts", work / "known_hosts")
    return "".join(
        f"  - name: {n}\n    address: {lab.address(n, 'lan')}\n"
        f"    transport: {{type: ssh, user: root, key_file: {lab.root}/id_ed25519, "
        f"known_hosts: {work}/known_hosts}}\n"
        f"    heartbeat: {{lan: {lab.address(n, 'lan')}, repl: {lab.address(n, 'repl')}}}\n"
        for n in NODES)


def cluster_file(lab: Lab, replicated: str | None = None, name: str = "cluster.yaml") -> Path:
    """A cluster of one app module `web` (a TCP server answering its node's name) with a VIP,
    optionally replicating the directory ``replicated``."""
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
    nodes = nodes_yaml(lab, work)
    lan, repl = lab.topology.networks
    rep = f"    replicated: [{{path: {replicated}}}]\n" if replicated else ""
    path = work / name
    path.write_text(
        f"cluster: {{name: apply, secret: {{file: {work}/cluster.key}}}}\nnodes:\n{nodes}"
        "heartbeat:\n  interval: 300ms\n  timeout: 1500ms\n  networks:\n"
        f"    - {{name: lan, subnet: {lan.subnet}}}\n"
        f"    - {{name: repl, subnet: {repl.subnet}, replication: true}}\n"
        f"witness: {{arbiter: {{address: {lab.address('witness', 'lan')}}}}}\n"
        "modules:\n  - name: web\n    kind: app\n"
        f"    payload: {{start: {work}/start, stop: {work}/stop, status: {work}/status}}\n"
        f"    vip: {{address: {lab.vip}, interface: eth0}}\n{rep}"
        "    failover: {preferred: node1}\n")
    return path


_WHEELS: list[Path] = []


def wheelhouse() -> Path:
    """The package built once per test session and pushed by every apply: the nodes keep one
    build even if the source tree is edited while the tests run (versions decide, as with any
    wheelhouse given by the user)."""
    if not _WHEELS:
        from hvha.apply import package

        _WHEELS.append(package.build().directory)
    return _WHEELS[0]


def hvha(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    if args and args[0] in ("apply", "reconcile"):
        args = (*args, "--wheelhouse", str(wheelhouse()))
    return subprocess.run([*HVHA, *args], capture_output=True, text=True, timeout=timeout)


def status(lab: Lab, node: str) -> dict[str, Any] | None:
    sock = lab.node_path(node, "/var/lib/hvha/control.sock")
    try:
        return call(sock, {"cmd": "status"}, timeout=5)["status"]  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError):
        return None


def module(lab: Lab, node: str, name: str = "web") -> dict[str, Any] | None:
    st = status(lab, node)
    return next((m for m in st["modules"] if m["module"] == name), None) if st else None


def roles(lab: Lab) -> dict[str, str | None]:
    return {n: (m or {}).get("role") for n in NODES for m in [module(lab, n)]}


def wait_roles(lab: Lab, want: dict[str, str | None], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while roles(lab) != want:
        assert time.monotonic() < deadline, f"roles {roles(lab)}, expected {want}"
        time.sleep(0.2)


def client(lab: Lab) -> str:
    ip = str(lab.vip).split("/")[0]
    code = (f"import socket; print(socket.create_connection(('{ip}', 8080), 2)"
            ".recv(64).decode().strip())")
    proc = lab.exec("client", ["python3", "-c", code], stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
    out, _ = proc.communicate(timeout=10)
    return out.strip()


def stop_agent(lab: Lab, node: str, timeout: float = 60) -> None:
    """SIGTERM the node's supervised agent (by its pid file): it hands its modules over."""
    import signal

    pid = int(lab.node_path(node, "/var/lib/hvha/agent.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while status(lab, node) is not None or os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"the agent of {node} did not stop"
        time.sleep(0.1)


def start_agent(lab: Lab, node: str, timeout: float = 30) -> None:
    """Start the node's agent as `hvha apply` does (supervised), without touching the other."""
    from hvha.apply.node import NodePaths

    lab.exec(node, ["setsid", "-f", *NodePaths().supervise_argv()], stdin=subprocess.DEVNULL,
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=10)
    deadline = time.monotonic() + timeout
    while status(lab, node) is None:
        assert time.monotonic() < deadline, f"the agent of {node} did not start"
        time.sleep(0.1)
