"""Semantic rules: what the schema cannot say (two nodes, unique names, VIP placement, paths...).

Each rule reads the defaults-applied data and reports through :class:`Ctx` with its own code.
Rules are defensive about types: a value the schema already rejected is skipped, so a file with
both a shape error and a meaning error gets both reported in one run.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hvha.config.diagnostics import Path, Severity
from hvha.config.loader import Document
from hvha.model.units import parse_duration

WIN_ABS = re.compile(r"^(?:[A-Za-z]:\\|\\\\[^\\]+\\[^\\]+)")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class Ctx:
    doc: Document
    data: dict[str, Any]
    applied: list[tuple[str, Any]] = field(default_factory=list)

    def err(self, code: str, path: Path, message: str, hint: str, at_key: bool = False,
            severity: Severity = Severity.ERROR) -> None:
        pos = self.doc.key_position(path) if at_key else self.doc.position(path)
        self.doc.report.add(code, message, hint, pos, path, severity)

    def items(self, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
        value = self.data.get(key)
        if isinstance(value, list):
            yield from ((i, v) for i, v in enumerate(value) if isinstance(v, dict))

    def nodes(self) -> list[tuple[int, dict[str, Any]]]:
        return list(self.items("nodes"))

    def node_names(self) -> list[str]:
        return [n["name"] for _, n in self.nodes() if isinstance(n.get("name"), str)]

    def networks(self) -> list[tuple[int, dict[str, Any]]]:
        hb = self.data.get("heartbeat")
        nets = hb.get("networks") if isinstance(hb, dict) else None
        if not isinstance(nets, list):
            return []
        return [(i, n) for i, n in enumerate(nets) if isinstance(n, dict)]


def is_host(value: str) -> bool:
    """A DNS host name; digits-and-dots (a mistyped IPv4 address) is not one."""
    return bool(_HOSTNAME.match(value)) and not re.fullmatch(r"[0-9.]+", value)


def _ip(value: Any) -> IP | None:
    try:
        return ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        return None


def node_addresses(ctx: Ctx) -> list[tuple[str, IP, Path]]:
    """(node name, address, path) for every IP a node uses (management and heartbeat)."""
    out: list[tuple[str, IP, Path]] = []
    for i, node in ctx.nodes():
        name = str(node.get("name"))
        ip = _ip(node.get("address"))
        if ip is not None:
            out.append((name, ip, ("nodes", i, "address")))
        hb = node.get("heartbeat")
        for net, addr in (hb.items() if isinstance(hb, dict) else []):
            ip = _ip(addr)
            if ip is not None and (name, ip) not in [(n, a) for n, a, _ in out]:
                out.append((name, ip, ("nodes", i, "heartbeat", net)))
    return out


def rule_node_count(ctx: Ctx) -> None:
    nodes = ctx.data.get("nodes")
    if isinstance(nodes, list) and len(nodes) != 2:
        ctx.err("HV301", ("nodes",), f"a cluster has exactly two nodes; this one has {len(nodes)}",
                "list two nodes under `nodes:` (hvha mirrors between a pair of servers)",
                at_key=True)


def _unique(ctx: Ctx, items: list[tuple[Path, Any]], what: str) -> None:
    first: dict[str, Path] = {}
    for path, name in items:
        if not isinstance(name, str):
            continue
        if name in first:
            where = ctx.doc.position(first[name])
            at = f" (first at line {where.line})" if where else ""
            ctx.err("HV302", path, f"{what} name '{name}' is used twice{at}",
                    f"give each {what} its own name")
        else:
            first[name] = path


def rule_unique_names(ctx: Ctx) -> None:
    _unique(ctx, [(("nodes", i, "name"), n.get("name")) for i, n in ctx.nodes()], "node")
    _unique(ctx, [(("modules", i, "name"), m.get("name")) for i, m in ctx.items("modules")],
            "module")
    _unique(ctx, [(("heartbeat", "networks", i, "name"), n.get("name"))
                  for i, n in ctx.networks()], "network")
    for kind in ("kvm", "hyperv"):  # a hypervisor knows a VM by its name: one module each
        _unique(ctx, [(("modules", i, "payload", "vm"), m["payload"].get("vm"))
                      for i, m in ctx.items("modules")
                      if m.get("kind") == kind and isinstance(m.get("payload"), dict)], "VM")
    for i, mod in ctx.items("modules"):
        checkers = mod.get("checkers")
        if isinstance(checkers, list):
            _unique(ctx, [(("modules", i, "checkers", j, "name"), c.get("name"))
                          for j, c in enumerate(checkers) if isinstance(c, dict)], "checker")


def rule_addresses(ctx: Ctx) -> None:
    """Every address parses; heartbeat addresses are IPs inside their network's subnet."""
    subnets = {}
    for i, net in ctx.networks():
        sub = net.get("subnet")
        if isinstance(sub, str):
            try:
                subnets[net.get("name")] = ipaddress.ip_network(sub, strict=False)
            except ValueError:
                ctx.err("HV206", ("heartbeat", "networks", i, "subnet"),
                        f"`{sub}` is not a network in CIDR form", "write e.g. 10.0.0.0/24")
    for i, node in ctx.nodes():
        addr = node.get("address")
        if isinstance(addr, str) and _ip(addr) is None and not is_host(addr):
            ctx.err("HV206", ("nodes", i, "address"), f"`{addr}` is not an IP address or host name",
                    "write an address such as 192.168.1.10 or a host name such as hv1.example.com")
        hb = node.get("heartbeat")
        for net, value in (hb.items() if isinstance(hb, dict) else []):
            ip = _ip(value)
            path = ("nodes", i, "heartbeat", net)
            if ip is None:
                ctx.err("HV206", path, f"heartbeat address `{value}` is not an IP address",
                        "heartbeats are sent to an IP address: write e.g. 10.0.0.11")
            elif net in subnets and ip not in subnets[net]:
                ctx.err("HV206", path, f"{ip} is not inside network '{net}' ({subnets[net]})",
                        "use this node's address on that network, or fix the network's subnet")
    _check_witness_addresses(ctx)
    for i, mod in ctx.items("modules"):
        checkers = mod.get("checkers")
        for j, c in enumerate(checkers if isinstance(checkers, list) else []):
            host = c.get("host") if isinstance(c, dict) else None
            if isinstance(host, str) and _ip(host) is None and not is_host(host):
                ctx.err("HV206", ("modules", i, "checkers", j, "host"),
                        f"`{host}` is not an IP address or host name",
                        "write the address the checker connects to, e.g. 10.0.0.100")
    for i, mod in ctx.items("modules"):
        vip = mod.get("vip")
        if isinstance(vip, dict) and isinstance(vip.get("address"), str):
            try:
                iface = ipaddress.ip_interface(vip["address"])
                if "/" not in vip["address"]:
                    raise ValueError
                if iface.ip == iface.network.network_address and iface.network.prefixlen < 31:
                    ctx.err("HV206", ("modules", i, "vip", "address"),
                            f"{iface} is the network address of its subnet",
                            "pick a host address inside the subnet")
            except ValueError:
                ctx.err("HV206", ("modules", i, "vip", "address"),
                        f"`{vip['address']}` is not an address with prefix length",
                        "write the virtual IP as address/prefix, e.g. 10.0.0.100/24")


def _check_witness_addresses(ctx: Ctx) -> None:
    witness = ctx.data.get("witness")
    if not isinstance(witness, dict):
        return
    targets: list[tuple[Path, Any]] = []
    if isinstance(witness.get("arbiter"), dict):
        targets.append((("witness", "arbiter", "address"), witness["arbiter"].get("address")))
    if isinstance(witness.get("ping"), list):
        targets += [(("witness", "ping", j), t) for j, t in enumerate(witness["ping"])]
    for path, value in targets:
        if isinstance(value, str) and _ip(value) is None and not is_host(value):
            ctx.err("HV206", path, f"`{value}` is not an IP address or host name",
                    "write the witness host's address, e.g. 10.0.0.3")


def rule_heartbeat_networks(ctx: Ctx) -> None:
    names = [n.get("name") for _, n in ctx.networks()]
    repl = [i for i, n in ctx.networks() if n.get("replication") is True]
    if ctx.networks() and not repl:
        ctx.err("HV314", ("heartbeat", "networks"), "no network carries replication",
                "set `replication: true` on one network (or leave it out everywhere: the first "
                "network is used)", at_key=True)
    if len(repl) > 1:
        for i in repl[1:]:
            ctx.err("HV314", ("heartbeat", "networks", i, "replication"),
                    "more than one network is marked `replication: true`",
                    "mark exactly one network as the replication network")
    for i, node in ctx.nodes():
        hb = node.get("heartbeat")
        if not isinstance(hb, dict):
            continue
        for net in names:
            if isinstance(net, str) and net not in hb:
                ctx.err("HV312", ("nodes", i, "heartbeat"),
                        f"node '{node.get('name')}' has no address on heartbeat network '{net}'",
                        f"add `{net}: <this node's IP on {net}>` under its `heartbeat:`",
                        at_key="heartbeat" in node)
        for net in hb:
            if net not in names:
                ctx.err("HV313", ("nodes", i, "heartbeat", net), f"unknown heartbeat network "
                        f"'{net}'", f"declared networks: {', '.join(map(str, names)) or 'none'}",
                        at_key=True)


def rule_timing(ctx: Ctx) -> None:
    hb = ctx.data.get("heartbeat")
    if isinstance(hb, dict):
        try:
            interval = parse_duration(str(hb.get("interval")))
            timeout = parse_duration(str(hb.get("timeout")))
        except ValueError:
            return
        if interval < 0.1:
            ctx.err("HV321", ("heartbeat", "interval"), f"heartbeat interval {hb['interval']} is "
                    "below the 100ms minimum", "use an interval of 100ms or more")
        if timeout < 3 * interval - 1e-9:  # durations are exact in ms; floats are not
            ctx.err("HV308", ("heartbeat", "timeout"),
                    f"timeout {hb['timeout']} is less than 3 x interval ({hb['interval']}): one "
                    "or two lost packets would declare the peer dead",
                    f"set timeout to at least {round(3 * interval, 3):g}s, or shorten the interval")
    witness = ctx.data.get("witness")
    arbiter = witness.get("arbiter") if isinstance(witness, dict) else None
    if isinstance(arbiter, dict):
        _at_least(ctx, ("witness", "arbiter", "lease"), arbiter.get("lease"), 0.3)
    for i, mod in ctx.items("modules"):
        checkers = mod.get("checkers")
        for j, c in (enumerate(checkers) if isinstance(checkers, list) else []):
            if isinstance(c, dict):
                _at_least(ctx, ("modules", i, "checkers", j, "interval"), c.get("interval"), 0.1)
            try:
                if parse_duration(c["timeout"]) > parse_duration(c["interval"]):
                    ctx.err("HV323", ("modules", i, "checkers", j, "timeout"),
                            f"checker timeout {c['timeout']} is longer than its interval "
                            f"{c['interval']}", "make the timeout shorter than the interval")
            except (ValueError, KeyError, TypeError):
                continue


def _at_least(ctx: Ctx, path: Path, value: Any, minimum: float) -> None:
    try:
        seconds = parse_duration(str(value))
    except ValueError:
        return
    if seconds < minimum:
        ctx.err("HV321", path, f"{value} is below the {minimum:g}s minimum",
                f"use {minimum:g}s or more")


def rule_witness(ctx: Ctx) -> None:
    witness = ctx.data.get("witness")
    if witness is None and "witness" not in ctx.data:
        ctx.err("HV322", (), "no witness: if the nodes lose each other, both may run the "
                "modules (split brain)", "add `witness: {arbiter: {address: ...}}` and run "
                "`hvha witness` on a third machine", severity=Severity.WARNING)
        return
    nodes = {ip: name for name, ip, _ in node_addresses(ctx)}
    named = set(ctx.node_names())
    targets: list[tuple[Path, Any]] = []
    if isinstance(witness, dict) and isinstance(witness.get("arbiter"), dict):
        targets.append((("witness", "arbiter", "address"), witness["arbiter"].get("address")))
    if isinstance(witness, dict) and isinstance(witness.get("ping"), list):
        targets += [(("witness", "ping", j), t) for j, t in enumerate(witness["ping"])]
    addresses = {n.get("address"): n.get("name") for _, n in ctx.nodes()}
    for path, value in targets:
        ip = _ip(value)
        owner = nodes.get(ip) if ip is not None else None
        owner = owner or addresses.get(value) or (value if value in named else None)
        if owner is not None:
            ctx.err("HV309", path, f"the witness `{value}` is node '{owner}': a node cannot "
                    "arbitrate between itself and its peer",
                    "run the witness on a third machine (any small VM or host)")


def rule_vips(ctx: Ctx) -> None:
    node_ips = {ip: name for name, ip, _ in node_addresses(ctx)}
    subnets = []
    for _, net in ctx.networks():
        try:
            subnets.append(ipaddress.ip_network(net.get("subnet"), strict=False))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            continue
    seen: dict[str, Path] = {}
    names = set(ctx.node_names())
    for i, mod in ctx.items("modules"):
        vip = mod.get("vip")
        if not isinstance(vip, dict):
            continue
        path = ("modules", i, "vip", "address")
        try:
            iface = ipaddress.ip_interface(vip.get("address"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            continue
        if iface.ip in node_ips:
            ctx.err("HV303", path, f"the virtual IP {iface.ip} is an address of node "
                    f"'{node_ips[iface.ip]}'", "pick a free address in the same subnet: the VIP "
                    "moves between nodes, a node address does not")
        key = str(iface.ip)
        if key in seen:
            ctx.err("HV315", path, f"the virtual IP {key} is already used by another module",
                    "give each module its own virtual IP")
        seen.setdefault(key, path)
        interface = vip.get("interface")
        in_subnet = any(iface.ip in s for s in subnets) or any(
            ipaddress.ip_interface(f"{ip}/{iface.network.prefixlen}").network == iface.network
            for ip in node_ips if ip.version == iface.version)
        if interface is None and not in_subnet:
            ctx.err("HV304", path, f"the virtual IP {iface} is in none of the nodes' subnets "
                    "and names no interface", "use an address in a node subnet (a VIP moves by "
                    "gratuitous ARP inside one L2 network), or set `vip.interface`")
        if isinstance(interface, dict):
            for node in interface:
                if node not in names:
                    ctx.err("HV311", ("modules", i, "vip", "interface", node),
                            f"'{node}' is not a node of this cluster",
                            f"nodes are: {', '.join(sorted(names))}", at_key=True)
            for node in sorted(names - set(interface)):
                ctx.err("HV311", ("modules", i, "vip", "interface"),
                        f"no interface given for node '{node}'",
                        f"add `{node}: <interface>` or give one name for both nodes")
