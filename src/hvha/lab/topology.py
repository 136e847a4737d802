"""The lab's desired shape and the pure planner that reconciles a machine towards it.

Why pure: building network namespaces is easy, *repairing* a half-built lab is where bugs
hide. Keeping the decision ("which `ip` commands bring this observed state to that desired
state?") free of side effects lets unit tests cover every half-built case without root, and
keeps :mod:`hvha.lab.netns` a thin executor. Every name the planner may create or delete is
derived here from the lab name, so the lab can never touch an interface or namespace that
does not carry its prefix.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

DEFAULT_NAME = "lab"
DEFAULT_ROOT_BASE = Path("/var/lib/hvha-lab")
DEFAULT_LAN = IPv4Network("10.77.0.0/24")
DEFAULT_REPL = IPv4Network("10.78.0.0/24")
LAN, REPL = "lan", "repl"
ROLES = ("node1", "node2", "witness", "client")
DIR_ROLES = ("node1", "node2", "witness")
SUBDIRS = ("data", "etc", "run", "log")
STATE_FILE = "lab.json"
STATE_FORMAT = 1
IFNAMSIZ = 15  # Linux interface names are at most 15 characters

_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}\Z")
_SHORT = {"node1": "n1", "node2": "n2", "witness": "w", "client": "c"}
_HOST_OFFSET = {"node1": 11, "node2": 12, "witness": 3, "client": 50}
_GATEWAY_OFFSET = 1
_VIP_OFFSET = 100
_PING_GROUPS = ("net.ipv4.ping_group_range", "0 2147483647")
_ROLE_SYSCTLS: dict[str, tuple[tuple[str, str], ...]] = {
    # announce address changes (the VIP moving) with gratuitous ARP
    "node1": (("net.ipv4.conf.all.arp_notify", "1"),),
    "node2": (("net.ipv4.conf.all.arp_notify", "1"),),
    # let the client learn the VIP's new owner from gratuitous ARP
    "client": (("net.ipv4.conf.all.arp_accept", "1"),),
}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid lab name (``[a-z][a-z0-9]{0,7}``), else raise ValueError."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid lab name {name!r}: use 1-8 characters, a lowercase letter then lowercase "
            "letters or digits (it prefixes interface names, which are limited to 15 characters)"
        )
    return name


def _host_subnet(subnet: IPv4Network, what: str) -> IPv4Network:
    if subnet.prefixlen > 25:
        raise ValueError(f"{what} subnet {subnet} is too small: use a /25 or larger, e.g. a /24")
    return subnet


@dataclass(frozen=True)
class Network:
    """A lab network: a bridge in the root namespace, ``ifname`` inside each attached host."""

    name: str
    subnet: IPv4Network
    bridge: str
    ifname: str
    bridge_address: IPv4Interface | None
    bridge_mac: str


@dataclass(frozen=True)
class Attachment:
    """One host's leg on one network: a veth pair, ``root_veth`` outside, ``ifname`` inside."""

    network: str
    ifname: str
    root_veth: str
    address: IPv4Interface
    mac: str  # inside end
    root_mac: str  # outside end


@dataclass(frozen=True)
class Host:
    """One lab host (a network namespace) and, for nodes and witness, its directory tree."""

    role: str
    namespace: str
    attachments: tuple[Attachment, ...]
    sysctls: tuple[tuple[str, str], ...]
    directory: Path | None

    def attachment(self, network: str) -> Attachment:
        for att in self.attachments:
            if att.network == network:
                return att
        raise KeyError(f"host {self.role} is not on network {network!r}")


@dataclass(frozen=True)
class Topology:
    """The whole desired lab. Build it with :func:`default_topology` or :meth:`from_dict`."""

    name: str
    root: Path
    networks: tuple[Network, ...]
    hosts: tuple[Host, ...]
    vip: IPv4Interface

    def __post_init__(self) -> None:
        prefix = f"{self.name}-"
        for ifname in (*self.root_interfaces, *self.namespaces):
            if not ifname.startswith(prefix):
                raise ValueError(f"lab object {ifname!r} does not carry the prefix {prefix!r}")
        for ifname in self.root_interfaces:
            if len(ifname) > IFNAMSIZ:
                raise ValueError(f"interface name {ifname!r} is longer than {IFNAMSIZ} chars")

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(h.namespace for h in self.hosts)

    @property
    def root_interfaces(self) -> tuple[str, ...]:
        """Every interface the lab owns in the root namespace (bridges and outer veth ends)."""
        veths = tuple(a.root_veth for h in self.hosts for a in h.attachments)
        return (*(n.bridge for n in self.networks), *veths)

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def host(self, role: str) -> Host:
        for h in self.hosts:
            if h.role == role:
                return h
        raise KeyError(f"no host {role!r} in the lab; roles are {', '.join(ROLES)}")

    def network(self, name: str) -> Network:
        for n in self.networks:
            if n.name == name:
                return n
        raise KeyError(f"no network {name!r} in the lab; networks are {LAN}, {REPL}")

    def ns_name(self, role: str) -> str:
        return self.host(role).namespace

    def address(self, role: str, network: str = LAN) -> IPv4Address:
        return self.host(role).attachment(network).address.ip

    def dirs(self, role: str) -> dict[str, Path]:
        """``{"base": <root>/<role>, "data": ..., "etc": ..., "run": ..., "log": ...}``."""
        base = self.host(role).directory
        if base is None:
            raise KeyError(f"host {role!r} has no directory tree")
        return {"base": base, **{sub: base / sub for sub in SUBDIRS}}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``<root>/lab.json``."""
        hosts: dict[str, Any] = {}
        for h in self.hosts:
            hosts[h.role] = {
                "namespace": h.namespace,
                "interfaces": {
                    a.network: {
                        "ifname": a.ifname,
                        "address": str(a.address),
                        "root_veth": a.root_veth,
                        "mac": a.mac,
                    }
                    for a in h.attachments
                },
                "dirs": None
                if h.directory is None
                else {k: str(v) for k, v in self.dirs(h.role).items()},
            }
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "root": str(self.root),
            "vip": str(self.vip),
            "networks": {
                n.name: {
                    "subnet": str(n.subnet),
                    "bridge": n.bridge,
                    "ifname": n.ifname,
                    "bridge_address": None if n.bridge_address is None else str(n.bridge_address),
                    "bridge_mac": n.bridge_mac,
                }
                for n in self.networks
            },
            "hosts": hosts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        """Rebuild a topology from :meth:`to_dict` output (e.g. a lab.json)."""
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported lab state format {data.get('format')!r}")
        nets = data["networks"]
        return default_topology(
            str(data["name"]),
            Path(str(data["root"])),
            lan=IPv4Network(str(nets[LAN]["subnet"])),
            repl=IPv4Network(str(nets[REPL]["subnet"])),
        )


def default_topology(
    name: str = DEFAULT_NAME,
    root: Path | None = None,
    *,
    lan: IPv4Network = DEFAULT_LAN,
    repl: IPv4Network = DEFAULT_REPL,
) -> Topology:
    """The standard lab: node1, node2, witness and client on ``lan``; the nodes also on ``repl``.

    Host addresses are fixed offsets in each subnet (.11 node1, .12 node2, .3 witness,
    .50 client, .1 the root-namespace bridge on lan, .100 the VIP).
    """
    validate_name(name)
    _host_subnet(lan, LAN)
    _host_subnet(repl, REPL)
    if lan.overlaps(repl):
        raise ValueError(f"lan subnet {lan} and repl subnet {repl} overlap")
    root = (root if root is not None else DEFAULT_ROOT_BASE / name).absolute()

    salt = hashlib.sha256(name.encode()).digest()

    def mac(kind: int, role: int, net: int) -> str:
        # locally administered unicast; stable per lab, so a rebuilt host keeps its MAC and
        # its neighbours' ARP caches stay right
        return f"02:{salt[0]:02x}:{salt[1]:02x}:{kind:02x}:{role:02x}:{net:02x}"

    def iface(subnet: IPv4Network, offset: int) -> IPv4Interface:
        return IPv4Interface(f"{subnet.network_address + offset}/{subnet.prefixlen}")

    networks = (
        Network(LAN, lan, f"{name}-br0", "eth0", iface(lan, _GATEWAY_OFFSET), mac(0, 0, 0)),
        Network(REPL, repl, f"{name}-br1", "eth1", None, mac(0, 0, 1)),
    )
    hosts = []
    for r, role in enumerate(ROLES):
        on = networks if role in ("node1", "node2") else networks[:1]
        atts = tuple(
            Attachment(
                n.name,
                n.ifname,
                f"{name}-{_SHORT[role]}-{i}",
                iface(n.subnet, _HOST_OFFSET[role]),
                mac(2, r, i),
                mac(1, r, i),
            )
            for i, n in enumerate(on)
        )
        hosts.append(
            Host(
                role=role,
                namespace=f"{name}-{role}",
                attachments=atts,
                sysctls=(_PING_GROUPS, *_ROLE_SYSCTLS.get(role, ())),
                directory=root / role if role in DIR_ROLES else None,
            )
        )
    return Topology(name, root, networks, tuple(hosts), iface(lan, _VIP_OFFSET))


# --- observed state -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkState:
    """One interface as ``ip -j -d addr show`` reports it."""

    name: str
    index: int
    kind: str  # "veth", "bridge", ... ("" for none)
    up: bool  # administratively up
    master: str | None = None
    addresses: frozenset[str] = frozenset()  # IPv4 "a.b.c.d/len"
    peer_index: int | None = None  # for a veth: the peer's ifindex (in the peer's namespace)
    mac: str = ""


@dataclass(frozen=True)
class Route:
    dst: str
    dev: str | None


@dataclass(frozen=True)
class Observed:
    """What exists now. ``ns_links``/``sysctls`` only cover lab namespaces that could be read;
    ``broken`` are lab namespaces that are listed but cannot be entered."""

    namespaces: frozenset[str] = frozenset()
    root_links: Mapping[str, LinkState] = field(default_factory=dict)
    root_routes: tuple[Route, ...] = ()
    ns_links: Mapping[str, Mapping[str, LinkState]] = field(default_factory=dict)
    sysctls: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    broken: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Command:
    """One ``ip`` invocation and why the planner wants it."""

    argv: tuple[str, ...]
    reason: str
    ok_if_missing: bool = False  # a deletion whose target may already be gone


# --- planning -------------------------------------------------------------------------------


def conflicts(topo: Topology, obs: Observed) -> list[str]:
    """Reasons the lab must not be built here: a subnet the lab addresses in the root namespace
    is already used by an interface or route that is not the lab's."""
    ours = set(topo.root_interfaces)
    found: list[str] = []
    for net in topo.networks:
        if net.bridge_address is None:
            continue
        for link in obs.root_links.values():
            if link.name in ours:
                continue
            for addr in link.addresses:
                if IPv4Interface(addr).network.overlaps(net.subnet):
                    found.append(
                        f"interface {link.name} has {addr}, inside the lab's {net.name} subnet "
                        f"{net.subnet}"
                    )
        reported = {f.split()[1] for f in found}
        for route in obs.root_routes:
            if route.dst in ("default", "0.0.0.0/0") or route.dev in ours | reported:
                continue
            if IPv4Network(route.dst, strict=False).overlaps(net.subnet):
                found.append(
                    f"route {route.dst} dev {route.dev} overlaps the lab's {net.name} subnet "
                    f"{net.subnet}"
                )
    return found


def _cmd(reason: str, *argv: str) -> Command:
    return Command(("ip", *argv), reason)


def _del(reason: str, *argv: str) -> Command:
    return Command(("ip", *argv), reason, ok_if_missing=True)


def _plan_bridge(net: Network, obs: Observed) -> list[Command]:
    cmds: list[Command] = []
    br = obs.root_links.get(net.bridge)
    if br is not None and br.kind != "bridge":
        cmds.append(_del(f"{net.bridge} is a {br.kind or 'plain'} link, not a bridge",
                         "link", "del", net.bridge))
        br = None
    if br is None:
        cmds.append(_cmd(f"create bridge {net.bridge}",
                         "link", "add", "name", net.bridge, "address", net.bridge_mac,
                         "type", "bridge"))
    elif br.mac != net.bridge_mac:
        cmds.append(_cmd(f"MAC {net.bridge_mac} on {net.bridge}",
                         "link", "set", net.bridge, "address", net.bridge_mac))
    if net.bridge_address is not None and (
        br is None or str(net.bridge_address) not in br.addresses
    ):
        cmds.append(_cmd(f"address {net.bridge_address} on {net.bridge}",
                         "addr", "add", str(net.bridge_address), "dev", net.bridge))
    if br is None or not br.up:
        cmds.append(_cmd(f"bring up {net.bridge}", "link", "set", net.bridge, "up"))
    return cmds


def _pair_ok(outer: LinkState | None, inner: LinkState | None) -> bool:
    if outer is None or inner is None or outer.kind != "veth" or inner.kind != "veth":
        return False
    return outer.peer_index == inner.index and inner.peer_index == outer.index


def _plan_attachment(
    topo: Topology, host: Host, att: Attachment, obs: Observed, new_bridges: set[str]
) -> list[Command]:
    ns = host.namespace
    bridge = topo.network(att.network).bridge
    outer = obs.root_links.get(att.root_veth)
    inner = obs.ns_links.get(ns, {}).get(att.ifname)
    cmds: list[Command] = []
    if not _pair_ok(outer, inner):
        # deleting one end of a veth pair deletes the other: both deletions tolerate that
        if outer is not None:
            cmds.append(_del(f"{att.root_veth} is not paired with {ns}/{att.ifname}: recreate",
                             "link", "del", att.root_veth))
        if inner is not None:
            cmds.append(_del(f"{ns}/{att.ifname} is not paired with {att.root_veth}: recreate",
                             "-n", ns, "link", "del", att.ifname))
        cmds.append(_cmd(f"create veth {att.root_veth} <-> {ns}/{att.ifname}",
                         "link", "add", att.root_veth, "address", att.root_mac, "type", "veth",
                         "peer", "name", att.ifname, "address", att.mac, "netns", ns))
        outer = inner = None
    if outer is not None and outer.mac != att.root_mac:
        cmds.append(_cmd(f"MAC {att.root_mac} on {att.root_veth}",
                         "link", "set", att.root_veth, "address", att.root_mac))
    if inner is not None and inner.mac != att.mac:
        cmds.append(_cmd(f"MAC {att.mac} on {ns}/{att.ifname}",
                         "-n", ns, "link", "set", att.ifname, "address", att.mac))
    if outer is None or outer.master != bridge or bridge in new_bridges:
        cmds.append(_cmd(f"attach {att.root_veth} to {bridge}",
                         "link", "set", att.root_veth, "master", bridge))
    if outer is None or not outer.up:
        cmds.append(_cmd(f"bring up {att.root_veth}", "link", "set", att.root_veth, "up"))
    if inner is None or str(att.address) not in inner.addresses:
        cmds.append(_cmd(f"address {att.address} on {ns}/{att.ifname}",
                         "-n", ns, "addr", "add", str(att.address), "dev", att.ifname))
    if inner is None or not inner.up:
        cmds.append(_cmd(f"bring up {ns}/{att.ifname}",
                         "-n", ns, "link", "set", att.ifname, "up"))
    return cmds


def plan_up(topo: Topology, obs: Observed) -> list[Command]:
    """The ``ip`` commands that turn ``obs`` into ``topo``; empty when the lab is complete.

    Never removes what it does not own and never removes extra addresses (the agents add the
    VIP as a secondary address on the nodes' lan interface).
    """
    cmds: list[Command] = []
    fresh: set[str] = set()
    for ns in topo.namespaces:
        if ns in obs.broken:
            cmds.append(_del(f"namespace {ns} cannot be entered: recreate", "netns", "del", ns))
        if ns in obs.broken or ns not in obs.namespaces:
            cmds.append(_cmd(f"create namespace {ns}", "netns", "add", ns))
            fresh.add(ns)
    if fresh:
        # a namespace recreated from scratch has no links: plan as if none were observed
        obs = replace(
            obs,
            namespaces=obs.namespaces | fresh,
            ns_links={k: v for k, v in obs.ns_links.items() if k not in fresh},
            sysctls={k: v for k, v in obs.sysctls.items() if k not in fresh},
            broken=obs.broken - fresh,
        )
    for host in topo.hosts:  # sysctls first, so e.g. arp_notify already covers new links
        current = obs.sysctls.get(host.namespace, {})
        for key, value in host.sysctls:
            if " ".join(current.get(key, "").split()) != " ".join(value.split()):
                cmds.append(_cmd(f"set {key}={value} in {host.namespace}", "netns", "exec",
                                 host.namespace, "sysctl", "-qw", f"{key}={value}"))
    new_bridges: set[str] = set()
    for net in topo.networks:
        bridge_cmds = _plan_bridge(net, obs)
        if any(c.argv[1:3] == ("link", "add") for c in bridge_cmds):
            new_bridges.add(net.bridge)  # a new bridge has no ports yet
        cmds.extend(bridge_cmds)
    for host in topo.hosts:
        ns = host.namespace
        lo = obs.ns_links.get(ns, {}).get("lo")
        if lo is None or not lo.up:
            cmds.append(_cmd(f"bring up {ns}/lo", "-n", ns, "link", "set", "lo", "up"))
        for att in host.attachments:
            cmds.extend(_plan_attachment(topo, host, att, obs, new_bridges))
    return cmds


def plan_down(topo: Topology, obs: Observed) -> list[Command]:
    """The ``ip`` commands that remove every lab object that exists; empty when none does.

    Processes inside the namespaces must be stopped first (see :mod:`hvha.lab.netns`), or the
    kernel keeps a deleted namespace alive.
    """
    cmds: list[Command] = []
    for host in topo.hosts:
        for att in host.attachments:
            if att.root_veth in obs.root_links:
                cmds.append(_del(f"delete {att.root_veth}", "link", "del", att.root_veth))
    for net in topo.networks:
        if net.bridge in obs.root_links:
            cmds.append(_del(f"delete bridge {net.bridge}", "link", "del", net.bridge))
    for ns in topo.namespaces:
        if ns in obs.namespaces or ns in obs.broken:
            cmds.append(_del(f"delete namespace {ns}", "netns", "del", ns))
    return cmds


def leftovers(topo: Topology, obs: Observed) -> list[str]:
    """Lab objects still present (what :func:`plan_down` would remove)."""
    return [
        *(n for n in topo.root_interfaces if n in obs.root_links),
        *(ns for ns in topo.namespaces if ns in obs.namespaces or ns in obs.broken),
    ]
