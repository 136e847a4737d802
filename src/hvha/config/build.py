"""Turn validated, defaults-applied data into the typed :class:`~hvha.model.cluster.Cluster`.

Only called when validation reported no error, so lookups here may assume the shape.
"""

from __future__ import annotations

from typing import Any

from hvha.model.cluster import (
    Checker,
    Cluster,
    Failover,
    Heartbeat,
    Kind,
    Module,
    Network,
    Node,
    Replicated,
    Replication,
    SecretRef,
    Stop,
    Transport,
    Vip,
    Witness,
)
from hvha.model.units import parse_duration, parse_size

_CHECKER_PARAMS = ("process", "min", "max", "host", "port", "interface", "command")


def _secret(d: dict[str, Any]) -> SecretRef:
    source = next(iter(d))
    return SecretRef(source, str(d[source]))


def _node(d: dict[str, Any]) -> Node:
    t = d["transport"]
    transport = Transport(
        type=t["type"], user=t["user"], port=t.get("port"), key_file=t.get("key_file"),
        password=_secret(t["password"]) if "password" in t else None,
        known_hosts=t.get("known_hosts"), auth=t.get("auth"))
    return Node(name=d["name"], address=d["address"], os=d["os"], transport=transport,
                heartbeat=tuple(sorted(d["heartbeat"].items())))


def _witness(d: dict[str, Any] | None) -> Witness:
    if not d:
        return Witness("none")
    if "arbiter" in d:
        a = d["arbiter"]
        return Witness("arbiter", address=a["address"], port=a["port"],
                       lease=parse_duration(a["lease"]))
    return Witness("ping", targets=tuple(d["ping"]))


def _checker(d: dict[str, Any]) -> Checker:
    params = tuple((k, d[k]) for k in _CHECKER_PARAMS if k in d and (k != "min" or
                                                                     d["type"] == "process"))
    return Checker(name=d["name"], type=d["type"], interval=parse_duration(d["interval"]),
                   timeout=parse_duration(d["timeout"]), failures=d["failures"],
                   on_failure=d["on_failure"], params=params)


def _payload_item(value: Any) -> str | tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else str(value)


def _module(d: dict[str, Any], cluster_port: int, nodes: list[str]) -> Module:
    vip = None
    if "vip" in d:
        iface = d["vip"].get("interface")
        pairs = (tuple(sorted(iface.items())) if isinstance(iface, dict)
                 else tuple((n, iface) for n in nodes) if iface else ())
        vip = Vip(address=d["vip"]["address"], interfaces=pairs)
    f = d["failover"]
    budget = f["restart_budget"]
    failover = Failover(
        automatic=f["automatic"], preferred=None if f["preferred"] == "none" else f["preferred"],
        failback=f["failback"], stability_window=parse_duration(f["stability_window"]),
        restart_count=budget["count"], restart_window=parse_duration(budget["window"]))
    s = d["stop"]
    stop = Stop(mode=s.get("mode"), graceful_timeout=parse_duration(s["graceful_timeout"]),
                forced_timeout=parse_duration(s["forced_timeout"]))
    return Module(
        name=d["name"], kind=Kind(d["kind"]),
        payload=tuple(sorted((k, _payload_item(v)) for k, v in d["payload"].items())),
        replicated=tuple(Replicated(r["path"], tuple(r["exclude"])) for r in d["replicated"]),
        vip=vip, checkers=tuple(_checker(c) for c in d["checkers"]), failover=failover,
        stop=stop, replication_port=d["replication"].get("port", cluster_port),
        variables=tuple(sorted((k, _scalar_text(v)) for k, v in d["variables"].items())),
        depends_on=tuple(d["depends_on"]))


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_cluster(data: dict[str, Any], applied: list[tuple[str, Any]]) -> Cluster:
    hb = data["heartbeat"]
    heartbeat = Heartbeat(
        interval=parse_duration(hb["interval"]), timeout=parse_duration(hb["timeout"]),
        port=hb["port"], networks=tuple(Network(n["name"], n.get("subnet"), n["replication"])
                                        for n in hb["networks"]))
    r = data["replication"]
    replication = Replication(port=r["port"], streams=r["streams"],
                              zone_size=parse_size(r["zone_size"]))
    nodes = [_node(n) for n in data["nodes"]]
    names = [n.name for n in nodes]
    return Cluster(
        name=data["cluster"]["name"], secret=_secret(data["cluster"]["secret"]),
        nodes=(nodes[0], nodes[1]), heartbeat=heartbeat, witness=_witness(data.get("witness")),
        replication=replication,
        modules=tuple(_module(m, replication.port, names) for m in data["modules"]),
        defaults_applied=tuple(applied))
