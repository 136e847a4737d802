"""The lab's per-node sshd: started by ``up(sshd=True)``, idempotent, repaired, stopped by pid.

Root, iproute2 and openssh-server needed. Own lab name (``hvk<pid>``) and subnets (the upper
/25 of 198.18.<n>.0/24, another third octet than ``test_lab.py``); torn down in finalizers,
which also check that no sshd of the lab and no namespace is left.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.labkit import require_netns

from hvha.cli.main import main
from hvha.lab import Lab, LabError
from hvha.lab import sshd as lab_sshd

pytestmark = pytest.mark.e2e

_N = os.getpid() % 100000
_NET = (os.getpid() + 125) % 250


def _our_sshd_alive(pid: int) -> bool:
    try:
        return b"sshd_config" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pids(lab: Lab) -> dict[str, int | None]:
    return {r: lab_sshd.running_pid(lab_sshd.node_sshd(lab.topology, r)) for r in lab_sshd.NODES}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_netns("lab sshd tests", sshd=True)
    the_lab = Lab.open(f"hvk{_N}", tmp_path / "root",
                       lan=f"198.18.{_NET}.128/25", repl=f"198.19.{_NET}.128/25")
    started: set[int] = set()
    try:
        yield the_lab
    finally:
        started |= {p for p in _pids(the_lab).values() if p}
        the_lab.down(purge=True, grace=0.5)
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{the_lab.name}-" not in ns
        assert not [p for p in started if _our_sshd_alive(p)], "sshd left running"


def _banner(address: str) -> bytes:
    with socket.create_connection((address, 22), timeout=3) as s:
        return s.recv(64)


def test_up_starts_one_sshd_per_node_and_is_idempotent(lab: Lab) -> None:
    cmds = lab.up(sshd=True)
    assert [c.argv[0] for c in cmds[-2:]] == [str(lab_sshd.SSHD)] * 2
    first = _pids(lab)
    assert all(first.values())
    for role, pid in first.items():
        assert pid is not None and pid in lab.pids(role), "sshd runs inside the node namespace"
        assert _banner(str(lab.address(role))).startswith(b"SSH-2.0-OpenSSH")
    assert lab.up(sshd=True) == [], "a healthy lab and its sshds need nothing"
    assert _pids(lab) == first, "a healthy sshd is not restarted"
    st = lab.status(ping=False)
    assert {r: h["sshd"] for r, h in st["hosts"].items()} == {
        "node1": True, "node2": True, "witness": None, "client": None}


def test_files_keys_and_config(lab: Lab) -> None:
    lab.up(sshd=True)
    topo = lab.topology
    key = lab_sshd.admin_key(topo)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = " ".join(key.with_name("id_ed25519.pub").read_text().split()[:2])
    known = lab_sshd.known_hosts(topo).read_text().splitlines()
    assert [line.split()[0] for line in known] == [
        str(lab.address("node1")), str(lab.address("node2"))]
    for role, line in zip(lab_sshd.NODES, known, strict=True):
        n = lab_sshd.node_sshd(topo, role)
        assert n.config.parent == lab.dirs(role)["etc"] / "ssh"
        assert n.pid_file.parent == lab.dirs(role)["run"]
        assert stat.S_IMODE(n.host_key.stat().st_mode) == 0o600
        assert line.split(maxsplit=1)[1] == " ".join(
            n.host_key.with_name(n.host_key.name + ".pub").read_text().split()[:2])
        assert n.authorized_keys.read_text().strip() == public
        config = n.config.read_text()
        for setting in (f"ListenAddress {lab.address(role)}:22", "PasswordAuthentication no",
                        "PermitRootLogin prohibit-password", "UsePAM no",
                        f'PidFile "{n.pid_file}"'):
            assert setting in config
    host_keys = {line.split()[2] for line in known}
    assert len(host_keys) == 2, "each node has its own host key"


def test_up_restarts_a_dead_sshd_and_one_in_a_recreated_namespace(lab: Lab) -> None:
    lab.up(sshd=True)
    before = _pids(lab)
    lab.kill_all("node1")  # power off node1: its sshd dies with it
    assert lab.status(ping=False)["hosts"]["node1"]["sshd"] is False
    subprocess.run(["ip", "netns", "del", lab.ns_name("node2")], check=True)
    old2 = before["node2"]
    assert old2 is not None and _our_sshd_alive(old2), "still alive in the orphaned namespace"
    assert lab.status(ping=False)["hosts"]["node2"]["sshd"] is False
    cmds = lab.up(sshd=True)
    assert sum(c.argv[0] == str(lab_sshd.SSHD) for c in cmds) == 2
    after = _pids(lab)
    assert after["node1"] not in (None, before["node1"])
    assert after["node2"] not in (None, old2)
    assert not _our_sshd_alive(old2), "the orphaned sshd was stopped by its pid"
    assert _banner(str(lab.address("node2"))).startswith(b"SSH-2.0-")


def test_down_stops_sshd_by_pid_and_purge_removes_the_keys(lab: Lab) -> None:
    lab.up(sshd=True)
    pids = [p for p in _pids(lab).values() if p]
    assert len(pids) == 2
    lab.down(purge=True, grace=0.5)
    assert not [p for p in pids if _our_sshd_alive(p)]
    assert not lab_sshd.admin_key(lab.topology).exists()
    assert not lab.root.exists()


def test_missing_sshd_is_a_clear_lab_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"apt-get install openssh-server"):
        lab_sshd.check_installed(tmp_path / "sshd")


def test_cli_up_starts_sshd_and_status_shows_it(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--name", lab.name, "--root", str(lab.root),
            "--lan-subnet", str(lab.topology.network("lan").subnet),
            "--repl-subnet", str(lab.topology.network("repl").subnet)]
    assert main(["lab", "up", *args]) == 0
    out = capsys.readouterr().out
    assert f"start sshd in {lab.ns_name('node1')}" in out and "ssh -i" in out
    assert main(["lab", "up", *args]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "start sshd" not in out
    status_args = ["--name", lab.name, "--root", str(lab.root)]
    assert main(["lab", "status", *status_args, "--no-ping"]) == 0
    assert "sshd" in capsys.readouterr().out
    assert main(["lab", "status", *status_args, "--json", "--no-ping"]) == 0
    hosts = json.loads(capsys.readouterr().out)["hosts"]
    assert hosts["node1"]["sshd"] is True and hosts["client"]["sshd"] is None
    assert main(["lab", "up", *args, "--no-sshd"]) == 0
    capsys.readouterr()
