"""Each lab node has its own /opt/hvha, /etc/hvha, /var/lib/hvha, /run/hvha and /srv/hvha, as two
servers would: what one node (or its sshd session) writes there, the other node and the host do
not see; `down` releases the namespaces and removes only the mount points the lab created."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.labkit import force_down, require_netns

from hvha.lab import Lab, nodefs

pytestmark = pytest.mark.e2e


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_netns("node file-system tests")
    n, net = os.getpid() % 100000, 1 + (os.getpid() + 31) % 250
    the_lab = Lab.open(f"hvf{n}", tmp_path / "root", lan=f"198.18.{net}.128/25",
                       repl=f"198.19.{net}.128/25")
    try:
        the_lab.up()
        yield the_lab
    finally:
        force_down(the_lab)


def _sh(lab: Lab, role: str, script: str) -> str:
    proc = lab.exec(role, ["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    return out


def test_each_node_sees_only_its_own_hvha_paths(lab: Lab) -> None:
    host_had = os.path.exists("/etc/hvha/who")
    for role in nodefs.NODES:
        _sh(lab, role, f"echo {role} > /etc/hvha/who && mkdir -p /srv/hvha/d")
    assert _sh(lab, "node1", "cat /etc/hvha/who") == "node1\n"
    assert _sh(lab, "node2", "cat /etc/hvha/who") == "node2\n"
    assert lab.node_path("node2", "/etc/hvha/who").read_text() == "node2\n"
    assert os.path.exists("/etc/hvha/who") == host_had  # the host's own path is untouched
    # sysfs of the node's network namespace, as `ip netns exec` gives
    assert sorted(_sh(lab, "node1", "ls /sys/class/net").split()) == ["eth0", "eth1", "lo"]


def test_down_releases_the_node_namespaces(lab: Lab) -> None:
    files = [nodefs.ns_file(lab.name, r) for r in nodefs.NODES]
    assert all(nodefs.is_mountpoint(f) for f in files)
    lab.down(purge=True, grace=0.5)
    assert not any(f.exists() for f in files)
    assert not nodefs.ns_dir(lab.name).exists()
