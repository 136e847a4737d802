"""The VIP moving between two nodes of a real namespace lab, announced by gratuitous ARP.

The ``Vip`` class runs *inside* node1's or node2's namespace (a small helper started with
``ip netns exec``), as the agent will. The client namespace (``arp_accept=1``) must reach the VIP
on node1, then on node2 within 2 s of node2 adding it, and its ARP cache must then hold node2's
MAC: proof that the announcement, not an ARP timeout, moved the traffic. A sniffer in the client
also checks that both ARP forms (request and reply) arrive. The first tests are pure (frame
layout, interface choice) and need no root.

Lab name ``hvv<pid>`` on 198.19.25x.0/24, apart from the subnets of tests/integration/test_lab.py,
torn down (``down(purge=True)``) even when a test fails.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from tests.labkit import force_down, require_netns

from hvha.drivers.garp import ARP_REPLY, ARP_REQUEST, arp_frame, format_mac, parse_mac
from hvha.drivers.vip import holders, interface_for
from hvha.lab import Lab

_N = os.getpid() % 100000
_OCTET = 250 + os.getpid() % 6
PORT = 7801

# --- pure parts ---------------------------------------------------------------------------


def test_arp_frames_have_the_gratuitous_layout() -> None:
    mac = parse_mac("02:aa:bb:cc:dd:01")
    for op, tha in ((ARP_REQUEST, b"\0" * 6), (ARP_REPLY, mac)):
        frame = arp_frame(mac, "10.77.0.100", op)
        assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
        htype, ptype, hlen, plen, oper, sha, spa, tha_, tpa = struct.unpack(
            "!HHBBH6s4s6s4s", frame[14:42])
        assert (htype, ptype, hlen, plen, oper) == (1, 0x0800, 6, 4, op)
        assert sha == mac and tha_ == tha
        assert spa == tpa == IPv4Address("10.77.0.100").packed
    assert format_mac(mac) == "02:aa:bb:cc:dd:01"


def test_interface_choice_and_holders() -> None:
    links = [
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1",
                                        "prefixlen": 8}]},
        {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "10.77.0.11",
                                          "prefixlen": 24},
                                         {"family": "inet", "local": "10.77.0.100",
                                          "prefixlen": 24}]},
    ]
    vip = IPv4Address("10.77.0.100")
    assert interface_for(vip, links) == "eth0"
    assert interface_for(IPv4Address("10.99.0.1"), links) is None
    assert holders(vip, links) == [("eth0", 24)]
    assert holders(IPv4Address("10.77.0.11"), links[:1]) == []


# --- the lab --------------------------------------------------------------------------------

_VIP_HELPER = r"""
import asyncio, json, sys
from hvha.drivers.vip import Vip, VipError
from hvha.drivers import garp

async def main(op, address, interface):
    vip = Vip(address, interface or None)
    out = {}
    try:
        if op == "add":
            await vip.add()
        elif op == "add-quiet":
            await vip.add(announce=False)
        elif op == "remove":
            await vip.remove()
        out["interface"] = await vip.resolve_interface()
        out["present"] = await vip.present()
        out["mac"] = vip.last_mac
    except VipError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:4]))
"""

_SERVER = r"""
import socket, sys
with socket.create_server(("0.0.0.0", int(sys.argv[2]))) as srv:
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.sendall(sys.argv[1].encode())
        conn.close()
"""

_CLIENT = r"""
import asyncio, socket, sys
from hvha.agent.checkers import icmp_ping
host, port = sys.argv[1], int(sys.argv[2])
try:
    asyncio.run(icmp_ping(host, 1.0))
    ping = "pong"
except (TimeoutError, OSError) as exc:
    ping = "no-pong"
try:
    with socket.create_connection((host, port), 0.5) as conn:
        print(ping, conn.recv(64).decode())
except OSError as exc:
    print(ping, "no-answer")
"""

_SNIFFER = r"""
import json, select, socket, struct, sys, time
vip, seconds = socket.inet_aton(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("eth0", 0))
print("ready", flush=True)
seen, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    if not select.select([s], [], [], max(0.0, end - time.monotonic()))[0]:
        break
    frame = s.recv(2048)
    op, sha, spa, tha, tpa = struct.unpack("!6x H 6s 4s 6s 4s", frame[14:42])
    if spa == tpa == vip:
        seen.append([op, ":".join(f"{b:02x}" for b in sha)])
print(json.dumps(seen), flush=True)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_netns("VIP lab tests")
    the_lab = Lab.open(f"hvv{_N}", tmp_path_factory.mktemp("viplab") / "root",
                       lan=f"198.19.{_OCTET}.0/25", repl=f"198.19.{_OCTET}.128/25")
    try:
        the_lab.up()
        yield the_lab
    finally:
        force_down(the_lab)


def _python(lab: Lab, role: str, script: str, *args: str) -> str:
    res = lab.run(role, [sys.executable, "-c", script, *args], timeout=20)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _vip(lab: Lab, role: str, op: str, interface: str = "") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(_python(lab, role, _VIP_HELPER, op, str(lab.vip), interface))
    return out


def _mac(lab: Lab, role: str) -> str:
    links = json.loads(lab.run(role, ["ip", "-j", "link", "show", "eth0"]).stdout)
    return str(links[0]["address"])


def _neigh_mac(lab: Lab) -> str | None:
    out = lab.run("client", ["ip", "-j", "neigh", "show", str(lab.vip.ip), "dev", "eth0"]).stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def _client(lab: Lab) -> str:
    return _python(lab, "client", _CLIENT, str(lab.vip.ip), str(PORT))


def _eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start(lab: Lab, role: str, script: str, *args: str) -> subprocess.Popen[str]:
    proc = lab.exec(role, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                    text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
        proc.communicate()


@pytest.mark.e2e
def test_vip_moves_from_node1_to_node2_with_gratuitous_arp(lab: Lab) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        procs += [_start(lab, n, _SERVER, n, str(PORT)) for n in ("node1", "node2")]
        mac1, mac2 = _mac(lab, "node1"), _mac(lab, "node2")

        added = _vip(lab, "node1", "add")
        assert added == {"interface": "eth0", "present": True, "mac": mac1}
        assert _vip(lab, "node1", "add")["present"], "a second add is a no-op"
        addrs = lab.run("node1", ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
        assert addrs.count(f"{lab.vip.ip}/") == 1
        assert _client(lab) == "pong node1"
        assert _neigh_mac(lab) == mac1

        assert _vip(lab, "node1", "remove")["present"] is False
        assert _vip(lab, "node1", "remove")["present"] is False, "a second remove is a no-op"

        # Control: added without announcement, the client still maps the VIP to node1.
        assert _vip(lab, "node2", "add-quiet")["present"]
        assert _neigh_mac(lab) == mac1

        sniffer = _start(lab, "client", _SNIFFER, str(lab.vip.ip), "1.5")
        procs.append(sniffer)
        started = time.monotonic()
        assert _vip(lab, "node2", "add")["mac"] == mac2
        assert _eventually(lambda: _neigh_mac(lab) == mac2, 2.0 - (time.monotonic() - started))
        assert _eventually(lambda: _client(lab) == "pong node2", 2.0)
        assert time.monotonic() - started < 4.0

        seen, _ = sniffer.communicate(timeout=10)
        frames = json.loads(seen)
        assert [op for op, _ in frames].count(ARP_REQUEST) >= 3
        assert [op for op, _ in frames].count(ARP_REPLY) >= 3
        assert {sha for _, sha in frames} == {mac2}
    finally:
        _stop(procs)
        for node in ("node1", "node2"):
            lab.run(node, ["ip", "addr", "del", str(lab.vip), "dev", "eth0"])


@pytest.mark.e2e
def test_vip_placement_errors(lab: Lab) -> None:
    err = _vip(lab, "node1", "add", "nosuch0")
    assert "nosuch0" in err["error"] and "failed" in err["error"]
    res = lab.run("witness", [sys.executable, "-c", _VIP_HELPER, "add", "203.0.113.9/24", ""])
    assert "no interface has an IPv4 subnet containing 203.0.113.9" in res.stdout
