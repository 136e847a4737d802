"""Pure tests of the lab planner: every half-built state is repaired, nothing foreign is touched.

A tiny simulator interprets the planner's `ip` commands against an :class:`Observed` so the
central property can be checked without root: after applying ``plan_up`` to any damaged lab,
planning again yields nothing.
"""

from __future__ import annotations

import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvha.lab.netns import parse_links, parse_routes
from hvha.lab.topology import (
    IFNAMSIZ,
    Command,
    LinkState,
    Observed,
    Route,
    Topology,
    conflicts,
    default_topology,
    leftovers,
    plan_down,
    plan_up,
    validate_name,
)

TOPO = default_topology("lab", Path("/srv/lab"))


# --- a simulator of the commands the planner emits -------------------------------------------


class Sim:
    """Just enough of Linux networking to replay planned commands."""

    def __init__(self, obs: Observed) -> None:
        self.ns = set(obs.namespaces) | set(obs.broken)
        self.broken = set(obs.broken)
        self.links: dict[str | None, dict[str, LinkState]] = {None: dict(obs.root_links)}
        for ns, links in obs.ns_links.items():
            self.links[ns] = dict(links)
        self.sysctls = {ns: dict(v) for ns, v in obs.sysctls.items()}
        self.next_index = 1000

    def _new(self, name: str, kind: str) -> LinkState:
        self.next_index += 1
        return LinkState(name, self.next_index, kind, up=False)

    def _del(self, ns: str | None, name: str) -> None:
        link = self.links[ns].pop(name)
        for port in list(self.links[ns].values()):
            if port.master == name:  # a deleted bridge releases its ports
                self.links[ns][port.name] = replace(port, master=None)
        if link.kind == "veth":  # the peer goes too
            for other, links in self.links.items():
                for peer in list(links.values()):
                    if other != ns and peer.index == link.peer_index and peer.kind == "veth":
                        del links[peer.name]

    def run(self, cmd: Command) -> None:
        a = list(cmd.argv)
        assert a.pop(0) == "ip"
        ns: str | None = None
        if a[0] == "-n":
            ns = a[1]
            a = a[2:]
            assert ns in self.ns and ns not in self.broken
        links = self.links.setdefault(ns, {})
        match a:
            case ["netns", "add", name]:
                assert name not in self.ns
                self.ns.add(name)
                self.links[name] = {"lo": LinkState("lo", 1, "", up=False)}
                self.sysctls[name] = {}
            case ["netns", "del", name]:
                self.ns.discard(name)
                self.broken.discard(name)
                for link in list(self.links.get(name, {}).values()):
                    if link.name in self.links[name]:
                        self._del(name, link.name)
                self.links.pop(name, None)
            case ["netns", "exec", name, "sysctl", "-qw", kv]:
                key, value = kv.split("=", 1)
                self.sysctls[name][key] = value
            case ["link", "add", "name", name, "address", mac, "type", "bridge"]:
                assert name not in links
                links[name] = replace(self._new(name, "bridge"), mac=mac)
            case ["link", "add", name, "address", omac, "type", "veth",
                  "peer", "name", peer, "address", imac, "netns", pns]:
                assert name not in links and peer not in self.links[pns]
                outer, inner = self._new(name, "veth"), self._new(peer, "veth")
                links[name] = replace(outer, peer_index=inner.index, mac=omac)
                self.links[pns][peer] = replace(inner, peer_index=outer.index, mac=imac)
            case ["link", "del", name]:
                self._del(ns, name)
            case ["link", "set", name, "master", bridge]:
                assert bridge in links
                links[name] = replace(links[name], master=bridge)
            case ["link", "set", name, "address", mac]:
                links[name] = replace(links[name], mac=mac)
            case ["link", "set", name, "up"]:
                links[name] = replace(links[name], up=True)
            case ["addr", "add", addr, "dev", name]:
                assert addr not in links[name].addresses
                links[name] = replace(links[name], addresses=links[name].addresses | {addr})
            case _:
                raise AssertionError(f"simulator does not know {cmd.argv}")

    def observed(self) -> Observed:
        return Observed(
            namespaces=frozenset(self.ns - self.broken),
            root_links=dict(self.links[None]),
            ns_links={ns: dict(self.links.get(ns, {})) for ns in self.ns - self.broken},
            sysctls={ns: dict(self.sysctls.get(ns, {})) for ns in self.ns - self.broken},
            broken=frozenset(self.broken),
        )


def apply(obs: Observed, cmds: list[Command]) -> Observed:
    sim = Sim(obs)
    for c in cmds:
        sim.run(c)
    return sim.observed()


def complete(topo: Topology = TOPO) -> Observed:
    return apply(Observed(), plan_up(topo, Observed()))


# --- names and topology ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lab", "a", "hvt12345", "x1"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "1lab", "lab-1", "lab_x", "abcdefghi", "la b"])
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match=r"1-8 characters"):
        validate_name(name)


def test_default_topology_matches_the_documented_layout() -> None:
    t = default_topology()
    assert t.root == Path("/var/lib/hvha-lab/lab")
    assert t.namespaces == ("lab-node1", "lab-node2", "lab-witness", "lab-client")
    assert t.address("node1") == IPv4Address("10.77.0.11")
    assert t.address("node2") == IPv4Address("10.77.0.12")
    assert t.address("witness") == IPv4Address("10.77.0.3")
    assert t.address("client") == IPv4Address("10.77.0.50")
    assert t.address("node1", "repl") == IPv4Address("10.78.0.11")
    assert t.address("node2", "repl") == IPv4Address("10.78.0.12")
    assert str(t.vip) == "10.77.0.100/24"
    assert str(t.network("lan").bridge_address) == "10.77.0.1/24"
    assert t.network("repl").bridge_address is None
    assert t.host("node1").attachment("lan").ifname == "eth0"
    assert t.host("node1").attachment("repl").ifname == "eth1"
    assert t.dirs("witness")["data"] == Path("/var/lib/hvha-lab/lab/witness/data")
    with pytest.raises(KeyError, match="not on network"):
        t.host("client").attachment("repl")
    with pytest.raises(KeyError, match="no directory tree"):
        t.dirs("client")


def test_macs_are_stable_unique_and_locally_administered() -> None:
    t = default_topology("abc")
    macs = [n.bridge_mac for n in t.networks]
    macs += [m for h in t.hosts for a in h.attachments for m in (a.mac, a.root_mac)]
    assert len(set(macs)) == len(macs) == 14
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)
    assert default_topology("abc", Path("/elsewhere")).host("node1").attachments == (
        t.host("node1").attachments
    )
    assert default_topology("abd").network("lan").bridge_mac != t.network("lan").bridge_mac


def test_a_changed_mac_is_put_back() -> None:
    obs = complete()
    eth0 = obs.ns_links["lab-node2"]["eth0"]
    obs = _with_ns_link(obs, "lab-node2", replace(eth0, mac="02:00:00:00:00:09"), "eth0")
    mac = TOPO.host("node2").attachment("lan").mac
    assert [c.argv for c in plan_up(TOPO, obs)] == [
        ("ip", "-n", "lab-node2", "link", "set", "eth0", "address", mac)
    ]


def test_longest_name_keeps_interface_names_within_the_kernel_limit() -> None:
    t = default_topology("abcdefgh")
    assert all(len(n) <= IFNAMSIZ for n in t.root_interfaces)
    assert all(n.startswith("abcdefgh-") for n in (*t.root_interfaces, *t.namespaces))
    assert len(set(t.root_interfaces)) == len(t.root_interfaces)


def test_subnets_are_configurable_and_checked() -> None:
    t = default_topology("x", lan=IPv4Network("198.18.5.0/24"), repl=IPv4Network("198.19.5.0/24"))
    assert t.address("client") == IPv4Address("198.18.5.50")
    with pytest.raises(ValueError, match="overlap"):
        default_topology("x", lan=IPv4Network("10.0.0.0/16"), repl=IPv4Network("10.0.5.0/24"))
    with pytest.raises(ValueError, match="too small"):
        default_topology("x", lan=IPv4Network("10.0.0.0/26"))


def test_state_dict_round_trips() -> None:
    t = default_topology("x", Path("/tmp/x"), lan=IPv4Network("198.18.5.0/24"))
    d = t.to_dict()
    assert d["hosts"]["node2"]["interfaces"]["repl"] == {
        "ifname": "eth1", "address": "10.78.0.12/24", "root_veth": "x-n2-1",
        "mac": t.host("node2").attachment("repl").mac,
    }
    assert d["hosts"]["client"]["dirs"] is None
    assert Topology.from_dict(d) == t
    with pytest.raises(ValueError, match="format"):
        Topology.from_dict({**d, "format": 99})


# --- planning up --------------------------------------------------------------------------------


def _targets(cmd: Command) -> list[str]:
    """Root-namespace interface and namespace names a command creates, changes or deletes."""
    a = list(cmd.argv[1:])
    if a[0] == "-n":
        return [a[1]]
    match a:
        case ["netns", _, name, *_]:
            return [name]
        case ["link", "add", "name", name, *_]:
            return [name]
        case ["link", "add", name, *rest]:
            return [name, rest[-1]]
        case ["link", "set", name, "address", _]:
            return [name]
        case ["link", _, name, *rest]:
            return [name, *rest[1:2]] if rest[:1] == ["master"] else [name]
        case ["addr", "add", _, "dev", name]:
            return [name]
    raise AssertionError(cmd.argv)


def test_fresh_lab_plan_builds_everything_and_only_prefixed_names() -> None:
    cmds = plan_up(TOPO, Observed())
    assert [c.argv for c in cmds[:4]] == [("ip", "netns", "add", ns) for ns in TOPO.namespaces]
    assert all(t.startswith("lab-") for c in cmds for t in _targets(c))
    n1 = TOPO.host("node1").attachment("repl")
    assert ("ip", "link", "add", "lab-n1-1", "address", n1.root_mac, "type", "veth", "peer",
            "name", "eth1", "address", n1.mac, "netns", "lab-node1") in [c.argv for c in cmds]
    assert ("ip", "addr", "add", "10.77.0.1/24", "dev", "lab-br0") in [c.argv for c in cmds]
    assert not any("lab-br1" in c.argv and "addr" in c.argv for c in cmds)
    assert all(c.reason for c in cmds)


def test_complete_lab_needs_nothing() -> None:
    obs = complete()
    assert plan_up(TOPO, obs) == []
    assert set(obs.sysctls["lab-node1"]) == {
        "net.ipv4.ping_group_range", "net.ipv4.conf.all.arp_notify",
    }


def test_extra_addresses_such_as_the_vip_are_left_alone() -> None:
    obs = complete()
    links = dict(obs.ns_links["lab-node1"])
    links["eth0"] = replace(links["eth0"], addresses=links["eth0"].addresses | {"10.77.0.100/24"})
    obs = replace(obs, ns_links={**obs.ns_links, "lab-node1": links})
    assert plan_up(TOPO, obs) == []


def test_sysctl_whitespace_is_normalized_and_mismatch_fixed() -> None:
    obs = complete()
    sysctls = {k: dict(v) for k, v in obs.sysctls.items()}
    sysctls["lab-client"]["net.ipv4.ping_group_range"] = "0\t2147483647"
    assert plan_up(TOPO, replace(obs, sysctls=sysctls)) == []
    sysctls["lab-node2"]["net.ipv4.conf.all.arp_notify"] = "0"
    (cmd,) = plan_up(TOPO, replace(obs, sysctls=sysctls))
    assert cmd.argv[:4] == ("ip", "netns", "exec", "lab-node2")
    assert cmd.argv[-1] == "net.ipv4.conf.all.arp_notify=1"


def _without_root(obs: Observed, *names: str) -> Observed:
    return replace(obs, root_links={k: v for k, v in obs.root_links.items() if k not in names})


def _with_ns_link(obs: Observed, ns: str, link: LinkState | None, name: str) -> Observed:
    links = dict(obs.ns_links[ns])
    if link is None:
        links.pop(name)
    else:
        links[name] = link
    return replace(obs, ns_links={**obs.ns_links, ns: links})


def test_pulled_cable_is_plugged_back() -> None:
    obs = complete()
    veth = obs.root_links["lab-n2-1"]
    obs = replace(obs, root_links={**obs.root_links, "lab-n2-1": replace(veth, up=False)})
    assert [c.argv for c in plan_up(TOPO, obs)] == [("ip", "link", "set", "lab-n2-1", "up")]


def test_missing_namespace_is_rebuilt_alone() -> None:
    obs = complete()
    gone = replace(
        _without_root(obs, "lab-w-0"),
        namespaces=obs.namespaces - {"lab-witness"},
        ns_links={k: v for k, v in obs.ns_links.items() if k != "lab-witness"},
        sysctls={k: v for k, v in obs.sysctls.items() if k != "lab-witness"},
    )
    cmds = plan_up(TOPO, gone)
    assert cmds[0].argv == ("ip", "netns", "add", "lab-witness")
    assert all("lab-witness" in c.argv or "lab-w-0" in c.argv for c in cmds)
    assert plan_up(TOPO, apply(gone, cmds)) == []


def test_orphan_inner_end_is_deleted_before_recreating_the_pair() -> None:
    obs = _without_root(complete(), "lab-c-0")
    obs = _with_ns_link(obs, "lab-client", LinkState("eth0", 7, "dummy", up=True), "eth0")
    cmds = plan_up(TOPO, obs)
    assert cmds[0].argv == ("ip", "-n", "lab-client", "link", "del", "eth0")
    assert cmds[0].ok_if_missing
    assert cmds[1].argv[:4] == ("ip", "link", "add", "lab-c-0")
    assert plan_up(TOPO, apply(obs, cmds)) == []


def test_outer_end_without_its_peer_is_recreated() -> None:
    obs = _with_ns_link(complete(), "lab-node1", None, "eth1")
    cmds = plan_up(TOPO, obs)
    assert cmds[0].argv == ("ip", "link", "del", "lab-n1-1")
    assert plan_up(TOPO, apply(obs, cmds)) == []


def test_bridge_of_the_wrong_kind_is_replaced() -> None:
    obs = complete()
    fake = LinkState("lab-br1", 5, "dummy", up=True)
    obs = replace(obs, root_links={**obs.root_links, "lab-br1": fake})
    cmds = plan_up(TOPO, obs)
    assert [c.argv for c in cmds[:2]] == [
        ("ip", "link", "del", "lab-br1"),
        ("ip", "link", "add", "name", "lab-br1", "address", TOPO.network("repl").bridge_mac,
         "type", "bridge"),
    ]
    assert ("ip", "link", "set", "lab-n1-1", "master", "lab-br1") in [c.argv for c in cmds]


def test_broken_namespace_is_recreated() -> None:
    obs = complete()
    obs = replace(
        obs,
        namespaces=obs.namespaces - {"lab-node2"},
        broken=frozenset({"lab-node2"}),
        ns_links={k: v for k, v in obs.ns_links.items() if k != "lab-node2"},
    )
    cmds = plan_up(TOPO, obs)
    assert [c.argv for c in cmds[:2]] == [
        ("ip", "netns", "del", "lab-node2"),
        ("ip", "netns", "add", "lab-node2"),
    ]


_PARTS = st.sets(
    st.sampled_from(
        [*(f"ns:{n}" for n in TOPO.namespaces), *(f"root:{n}" for n in TOPO.root_interfaces),
         *(f"down:{n}" for n in TOPO.root_interfaces), "addr:lab-node1", "lo:lab-client",
         "master:lab-n2-0", "inner:lab-node2", "fake:lab-br0", "fake:lab-br1", "mac:lab-client"]
    )
)


def _damage(obs: Observed, parts: set[str]) -> Observed:
    sim = Sim(obs)
    for part in sorted(parts):
        kind, name = part.split(":")
        if kind == "ns" and name in sim.ns:
            sim.run(Command(("ip", "netns", "del", name), "damage"))
        elif kind == "root" and name in sim.links[None]:
            sim.run(Command(("ip", "link", "del", name), "damage"))
        elif kind == "down" and name in sim.links[None]:
            sim.links[None][name] = replace(sim.links[None][name], up=False)
        elif kind == "addr" and "eth0" in sim.links.get(name, {}):
            sim.links[name]["eth0"] = replace(sim.links[name]["eth0"], addresses=frozenset())
        elif kind == "lo" and name in sim.ns:
            sim.links[name]["lo"] = replace(sim.links[name]["lo"], up=False)
        elif kind == "master" and name in sim.links[None]:
            sim.links[None][name] = replace(sim.links[None][name], master=None)
        elif kind == "mac" and "eth0" in sim.links.get(name, {}):
            sim.links[name]["eth0"] = replace(sim.links[name]["eth0"], mac="02:00:00:00:00:01")
        elif kind == "fake" and name in sim.links[None]:  # someone's dummy under our name
            sim.links[None][name] = replace(sim.links[None][name], kind="dummy")
        elif kind == "inner" and "eth1" in sim.links.get(name, {}):
            sim.run(Command(("ip", "-n", name, "link", "del", "eth1"), "damage"))
    return sim.observed()


@settings(max_examples=200, deadline=None)
@given(_PARTS)
def test_any_damage_is_repaired_by_one_plan(parts: set[str]) -> None:
    damaged = _damage(complete(), parts)
    cmds = plan_up(TOPO, damaged)
    assert all(t.startswith("lab-") for c in cmds for t in _targets(c))
    assert plan_up(TOPO, apply(damaged, cmds)) == []


# --- planning down, conflicts, leftovers -----------------------------------------------------


def test_down_of_nothing_is_empty() -> None:
    assert plan_down(TOPO, Observed()) == []
    assert leftovers(TOPO, Observed()) == []


def test_down_removes_only_lab_objects() -> None:
    obs = complete()
    foreign = LinkState("lab2-br0", 3, "bridge", up=True)
    obs = replace(obs, root_links={**obs.root_links, "lab2-br0": foreign},
                  namespaces=obs.namespaces | {"lab2-node1", "other"})
    cmds = plan_down(TOPO, obs)
    assert all(c.ok_if_missing for c in cmds)
    touched = {c.argv[-1] for c in cmds}
    assert touched == {*TOPO.root_interfaces, *TOPO.namespaces}
    assert [c.argv[1] for c in cmds][-4:] == ["netns"] * 4  # namespaces last
    after = apply(obs, cmds)
    assert leftovers(TOPO, after) == []
    assert "lab2-br0" in after.root_links


def _root(obs: Observed, link: LinkState, *routes: Route) -> Observed:
    return replace(obs, root_links={**obs.root_links, link.name: link}, root_routes=routes)


def test_conflicts_detect_foreign_addresses_and_routes_but_not_the_lab_itself() -> None:
    obs = complete()
    own = replace(obs, root_routes=(Route("10.77.0.0/24", "lab-br0"), Route("default", "eth0")))
    assert conflicts(TOPO, own) == []
    eth = LinkState("eth0", 2, "", up=True, addresses=frozenset({"10.77.0.9/16"}))
    (msg,) = conflicts(TOPO, _root(Observed(), eth, Route("10.77.0.0/16", "eth0")))
    assert "eth0" in msg and "10.77.0.0/24" in msg
    vpn = LinkState("wg0", 4, "wireguard", up=True)
    (msg,) = conflicts(TOPO, _root(Observed(), vpn, Route("10.0.0.0/8", "wg0")))
    assert "route 10.0.0.0/8 dev wg0" in msg
    other = LinkState("eth1", 2, "", up=True, addresses=frozenset({"10.78.0.5/24"}))
    assert conflicts(TOPO, _root(Observed(), other)) == []  # repl has no root address


# --- parsing `ip -j` output ---------------------------------------------------------------------


def test_parse_links_and_routes() -> None:
    data: list[dict[str, Any]] = [
        {"ifindex": 8, "link_index": 2, "ifname": "lab-n1-0", "flags": ["BROADCAST", "UP"],
         "address": "02:4B:FE:44:B4:C6",
         "master": "lab-br0", "link_netnsid": 0, "linkinfo": {"info_kind": "veth"},
         "addr_info": [{"family": "inet6", "local": "fe80::1", "prefixlen": 64}]},
        {"ifindex": 5, "ifname": "lab-br0", "flags": ["BROADCAST"],
         "linkinfo": {"info_kind": "bridge"},
         "addr_info": [{"family": "inet", "local": "10.77.0.1", "prefixlen": 24}]},
        {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP"]},
    ]
    links = parse_links(data)
    assert links["lab-n1-0"] == LinkState(
        "lab-n1-0", 8, "veth", True, "lab-br0", frozenset(), 2, "02:4b:fe:44:b4:c6"
    )
    assert links["lab-br0"].addresses == {"10.77.0.1/24"} and not links["lab-br0"].up
    assert links["lo"].kind == "" and links["lo"].peer_index is None
    routes = parse_routes([
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
        {"type": "local", "dst": "10.77.0.1", "dev": "lab-br0"},
        {"dst": "10.77.0.0/24", "dev": "lab-br0", "protocol": "kernel"},
    ])
    assert routes == (Route("default", "eth0"), Route("10.77.0.0/24", "lab-br0"))


# --- CLI error mapping (no root needed) ----------------------------------------------------------


def test_cli_reports_missing_root_as_a_user_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hvha.cli.main import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["lab", "up", "--name", "t1", "--root", "/nonexistent/t1"]) == 1
    err = capsys.readouterr().err
    assert "needs root" in err and "sudo" in err and "Traceback" not in err


def test_cli_reports_bad_name_as_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    from hvha.cli.main import main

    assert main(["lab", "status", "--name", "Bad-Name"]) == 1
    assert "invalid lab name" in capsys.readouterr().err
