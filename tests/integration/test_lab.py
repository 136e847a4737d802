"""End-to-end tests of `hvha lab` with real network namespaces (root and iproute2 needed).

Each session uses its own short lab names (``hvt<pid>``/``hvd<pid>``) and its own /25 subnets
in 198.18.0.0/15, the range reserved for network benchmarking, so it cannot collide with a real
network or with a default lab running on the same machine. Fixtures tear everything down even
when a test fails, and check that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.labkit import force_down, remains, require_netns

from hvha.cli.main import main
from hvha.lab import Lab, LabError

pytestmark = pytest.mark.e2e

_N = os.getpid() % 100000
_NET = os.getpid() % 250


def _new_lab(prefix: str, root: Path, half: int) -> Lab:
    """Lab ``<prefix><pid>`` on the ``half``-th /25 of 198.18.<n>.0/24 (lan), 198.19.<n>.0/24."""
    low = 128 * half
    return Lab.open(
        f"{prefix}{_N}", root, lan=f"198.18.{_NET}.{low}/25", repl=f"198.19.{_NET}.{low}/25"
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab shared by the module, built once; every test leaves it up."""
    require_netns("lab tests")
    the_lab = _new_lab("hvt", tmp_path_factory.mktemp("lab") / "root", 0)
    try:
        assert the_lab.up(), "a fresh lab needs commands"
        yield the_lab
    finally:
        force_down(the_lab)


@pytest.fixture
def spare(tmp_path: Path) -> Iterator[Lab]:
    """A second, not yet built lab that a test may create and destroy."""
    require_netns("lab tests")
    the_lab = _new_lab("hvd", tmp_path / "root", 1)
    try:
        yield the_lab
    finally:
        force_down(the_lab)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_second_up_is_a_no_op_and_status_is_up(lab: Lab) -> None:
    assert lab.up() == []
    st = lab.status()
    assert st["state"] == "up", st["problems"]
    assert st["problems"] == []
    assert {r: h["ping"] for r, h in st["hosts"].items()} == {
        "node1": True, "node2": True, "witness": True, "client": None,
    }
    assert st["hosts"]["node1"]["interfaces"]["repl"]["address"] == f"198.19.{_NET}.11/25"


def test_state_file_and_directory_tree(lab: Lab) -> None:
    assert stat.S_IMODE(lab.state_path.stat().st_mode) == 0o600
    data = json.loads(lab.state_path.read_text())
    assert data["name"] == lab.name
    assert data["hosts"]["node2"]["namespace"] == lab.ns_name("node2")
    assert stat.S_IMODE(lab.root.stat().st_mode) == 0o700
    for role in ("node1", "node2", "witness"):
        for path in lab.dirs(role).values():
            assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert not (lab.root / "client").exists()


def test_inside_view_of_a_node(lab: Lab) -> None:
    out = lab.run("node1", ["ip", "-br", "-4", "addr"]).stdout
    assert f"198.18.{_NET}.11/25" in out and f"198.19.{_NET}.11/25" in out
    assert "eth0" in out and "eth1" in out
    sysctl = lab.run("node1", ["sysctl", "-n", "net.ipv4.conf.all.arp_notify"]).stdout
    assert sysctl.strip() == "1"


def test_ping_across_both_networks(lab: Lab) -> None:
    for src, dst in [("client", "node1"), ("client", "node2"), ("client", "witness"),
                     ("witness", "node2"), ("node1", "node2")]:
        assert lab.ping(src, dst), f"{src} -> {dst} on lan"
    assert lab.ping("node1", "node2", "repl")
    assert lab.ping("node2", "node1", "repl")
    assert not lab.ping("client", "node1", "repl", timeout=0.5), "client is not on repl"


def test_root_namespace_reaches_a_node_over_lan(lab: Lab) -> None:
    """The bridge address lets the admin machine (SSH later) talk to the nodes."""
    server = lab.exec("node1", [sys.executable, "-c", _SERVE_ONCE], stdout=subprocess.PIPE)
    try:
        def greet() -> bool:
            try:
                with socket.create_connection((str(lab.address("node1")), 7777), 1) as conn:
                    return conn.recv(16) == b"hello"
            except OSError:
                return False

        assert _eventually(greet)
    finally:
        server.kill()
        server.communicate()


_SERVE_ONCE = """
import socket
with socket.create_server(("0.0.0.0", 7777)) as srv:
    conn, _ = srv.accept()
    conn.sendall(b"hello")
    conn.close()
"""


def test_vip_added_by_an_agent_is_reachable_and_kept_by_up(lab: Lab) -> None:
    vip = str(lab.vip)
    assert lab.run("node1", ["ip", "addr", "add", vip, "dev", "eth0"]).returncode == 0
    try:
        assert lab.ping("client", str(lab.vip.ip))
        assert lab.up() == []
        assert vip in lab.run("node1", ["ip", "-4", "addr", "show", "eth0"]).stdout
    finally:
        lab.run("node1", ["ip", "addr", "del", vip, "dev", "eth0"])
    assert not lab.ping("client", str(lab.vip.ip), timeout=0.5)
    with pytest.raises(LabError, match="neither a role"):
        lab.ping("client", "nodeX")


def test_cable_pull_and_plug(lab: Lab) -> None:
    try:
        lab.set_link("node2", "repl", up=False)
        assert not lab.ping("node1", "node2", "repl", timeout=0.5)
        assert lab.ping("node1", "node2", "lan"), "the other cable still works"
        st = lab.status(ping=False)
        assert st["state"] == "degraded"
        assert st["hosts"]["node2"]["interfaces"]["repl"]["link_up"] is False
    finally:
        lab.set_link("node2", "repl", up=True)
    assert _eventually(lambda: lab.ping("node1", "node2", "repl"))


def test_kill_all_powers_off_one_namespace_only(lab: Lab) -> None:
    victim = lab.exec("node1", ["sh", "-c", "sleep 300 & exec sleep 300"])
    bystander = lab.exec("node2", ["sleep", "300"])
    try:
        assert _eventually(lambda: len(lab.pids("node1")) == 2)
        assert victim.pid in lab.pids("node1")
        killed = lab.kill_all("node1")
        assert victim.pid in killed and len(killed) == 2
        assert lab.pids("node1") == []
        assert victim.wait(timeout=5) == -9
        assert bystander.poll() is None and lab.pids("node2") == [bystander.pid]
    finally:
        lab.kill_all("node1")
        lab.kill_all("node2")
        victim.wait(timeout=5)
        bystander.wait(timeout=5)


def test_up_repairs_a_half_built_lab(lab: Lab) -> None:
    subprocess.run(["ip", "netns", "del", lab.ns_name("node2")], check=True)
    subprocess.run(["ip", "link", "del", lab.root_veth("witness")], check=True)
    subprocess.run(["ip", "link", "set", lab.topology.network("repl").bridge, "down"], check=True)
    assert lab.status(ping=False)["state"] == "degraded"
    assert lab.up()
    assert lab.up() == []
    assert lab.status()["state"] == "up"
    # node2 and the witness came back with new MACs: neighbours relearn them (gratuitous ARP)
    assert _eventually(lambda: lab.ping("node1", "node2", "repl"))
    assert _eventually(lambda: lab.ping("client", "witness"))


def test_cli_status_json_and_up(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--name", lab.name, "--root", str(lab.root)]
    assert main(["lab", "up", *args]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["lab", "status", *args, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "up" and st["name"] == lab.name
    assert main(["lab", "status", *args, "--no-ping"]) == 0
    assert lab.ns_name("client") in capsys.readouterr().out


def test_up_refuses_a_subnet_already_in_use(lab: Lab, tmp_path: Path) -> None:
    clash = Lab.open(f"hvc{_N}", tmp_path / "c", lan=lab.topology.network("lan").subnet)
    with pytest.raises(LabError, match="clash"):
        clash.up()
    assert remains(clash.name) == []


def test_down_removes_everything_and_can_repeat(spare: Lab) -> None:
    spare.up()
    worker = spare.exec("client", ["sleep", "300"])
    assert spare.down(purge=True, grace=0.5)
    assert worker.wait(timeout=5) < 0
    assert remains(spare.name) == []
    assert not spare.root.exists()
    assert spare.down() == []
    assert spare.status()["state"] == "down"


def test_down_of_a_lab_that_never_existed(spare: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert spare.down(purge=True) == []
    assert main(["lab", "down", "--name", spare.name, "--root", str(spare.root)]) == 0
    assert "was not running" in capsys.readouterr().out
    assert main(["lab", "status", "--name", spare.name, "--root", str(spare.root)]) == 2
