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
import signal
import time

import pytest

from hvha.lab import Lab
from tests.e2e.apply_kit import NODES, client, cluster_file, hvha, lab, roles, status, wait_roles

pytestmark = pytest.mark.e2e
__all__ = ["lab"]  # the module-scoped fixture


def test_apply_reconcile_destroy(lab: Lab) -> None:
    cluster = str(cluster_file(lab))
    first = hvha("apply", cluster, "--auto-approve")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Apply complete! Resources: 12 added" in first.stdout
    assert "node1: agent: hvha" in first.stdout and "wheels sent" in first.stdout
    wait_roles(lab, {"node1": "PRIM", "node2": "SECOND"})
    assert client(lab) == "node1"
    # each node has its own installation (nothing shared through the host)
    for n in NODES:
        assert lab.node_path(n, "/opt/hvha/venv/bin/hvha").exists()
        assert oct(lab.node_path(n, "/etc/hvha/node.bundle").stat().st_mode & 0o777) == "0o600"

    second = hvha("apply", cluster, "--auto-approve")
    assert second.returncode == 0 and "No changes." in second.stdout, second.stdout
    plan = hvha("plan", cluster, "--detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr

    # drift 1: the agent on node2 is stopped (SIGTERM to its supervisor, by pid)
    pid = int(lab.node_path("node2", "/var/lib/hvha/agent.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while status(lab, "node2") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # drift 2: node1's pushed bundle replaced by another file (its .sha256 left alone)
    b1 = lab.node_path("node1", "/etc/hvha/node.bundle")
    b1.write_bytes(lab.node_path("node2", "/etc/hvha/node.bundle").read_bytes())
    drifted = hvha("plan", cluster, "--json")
    changes = json.loads(drifted.stdout)["changes"]
    assert {(c["address"], c["drift"]) for c in changes} >= {
        ("node/node2/service", True), ("node/node1/bundle", True)}
    fixed = hvha("reconcile", cluster, "--once")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "drift on node2: node/node2/service" in fixed.stdout
    assert "converged" in fixed.stdout
    wait_roles(lab, {"node1": "PRIM", "node2": "SECOND"})
    assert client(lab) == "node1"
    # drift 3: the VIP deleted on the primary, a script of its running bundle edited
    lab.exec("node1", ["ip", "addr", "del", str(lab.vip), "dev", "eth0"]).wait(timeout=10)
    script = lab.node_path("node1", "/var/lib/hvha/bundle/modules/web/start_prim.sh")
    original = script.read_bytes()
    script.write_bytes(original + b"\necho edited by hand\n")
    fixed = hvha("reconcile", cluster, "--once")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "drift on node1: vip/web" in fixed.stdout
    assert "files of the running bundle were edited" in fixed.stdout
    assert script.read_bytes() == original
    assert client(lab) == "node1"
    again = hvha("reconcile", cluster, "--once")
    assert again.returncode == 0 and "in sync: no changes" in again.stdout, again.stdout

    # unreachable node: nothing is done on the other
    lab.set_link("node2", "lan", up=False)
    try:
        down = hvha("apply", cluster, "--auto-approve", timeout=120)
    finally:
        lab.set_link("node2", "lan", up=True)
    assert down.returncode == 1 and "node2" in down.stderr
    assert "nothing was changed" in down.stderr and "Traceback" not in down.stderr

    gone = hvha("destroy", cluster, "--auto-approve")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    for n in NODES:
        assert status(lab, n) is None
        assert not lab.node_path(n, "/opt/hvha/venv").exists()
        assert not lab.node_path(n, "/etc/hvha/node.bundle").exists()
    assert roles(lab) == {"node1": None, "node2": None}
    fresh = hvha("plan", cluster, "--detailed-exitcode")
    assert fresh.returncode == 2 and "not installed" in fresh.stdout
