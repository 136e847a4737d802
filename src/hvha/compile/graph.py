"""The resource graph: every named thing a cluster runs, and what must be up before what.

Names are stable across runs and releases (``module/vm1``, ``rfs/vm1/0``, ``vip/vm1``,
``checker/vm1/http``, ``driver/vm1``, ``heartbeat/lan``, ``witness``, ``node/hv1``): plans,
logs and status refer to them. An edge ``a -> b`` means "a must be up before b". The graph is
built by small steps, one per concern, like Terraform's graph transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import networkx as nx

from hvha.model.cluster import Cluster, Module


class GraphError(Exception):
    """A cycle or conflict in the graph, named by the resources involved."""


def _add(g: nx.DiGraph, name: str, kind: str, order: int, **attrs: Any) -> None:
    g.add_node(name, kind=kind, order=order, **attrs)


def _nodes_and_networks(g: nx.DiGraph, c: Cluster) -> None:
    for i, node in enumerate(c.nodes):
        _add(g, f"node/{node.name}", "node", i, address=node.address)
    for i, net in enumerate(c.heartbeat.networks):
        _add(g, f"heartbeat/{net.name}", "heartbeat", i, replication=net.replication)
        for node in c.nodes:
            g.add_edge(f"node/{node.name}", f"heartbeat/{net.name}")
    if c.witness.kind != "none":
        _add(g, "witness", "witness", 0, mode=c.witness.kind)


def _module(g: nx.DiGraph, c: Cluster, m: Module, index: int) -> None:
    mod, drv = f"module/{m.name}", f"driver/{m.name}"
    _add(g, mod, "module", index, module_kind=m.kind.value)
    _add(g, drv, "driver", index, module=m.name, driver=m.kind.value)
    for net in c.heartbeat.networks:
        g.add_edge(f"heartbeat/{net.name}", mod)
    if c.witness.kind != "none":
        g.add_edge("witness", mod)
    for j, rep in enumerate(m.replicated):
        rfs = f"rfs/{m.name}/{j}"
        _add(g, rfs, "rfs", index, module=m.name, path=rep.path)
        g.add_edge(mod, rfs)
        g.add_edge(rfs, drv)
    if m.vip is not None:
        vip = f"vip/{m.name}"
        _add(g, vip, "vip", index, module=m.name, address=m.vip.address)
        g.add_edge(mod, vip)
        g.add_edge(vip, drv)
    g.add_edge(mod, drv)
    for checker in m.checkers:
        name = f"checker/{m.name}/{checker.name}"
        _add(g, name, "checker", index, module=m.name, type=checker.type)
        g.add_edge(drv, name)


def _modules(g: nx.DiGraph, c: Cluster) -> None:
    for i, m in enumerate(c.modules):
        _module(g, c, m, i)


def _dependencies(g: nx.DiGraph, c: Cluster) -> None:
    for m in c.modules:
        for dep in m.depends_on:
            g.add_edge(f"driver/{dep}", f"module/{m.name}")


STEPS: tuple[Callable[[nx.DiGraph, Cluster], None], ...] = (
    _nodes_and_networks,
    _modules,
    _dependencies,
)


def build_graph(cluster: Cluster) -> nx.DiGraph:
    g = nx.DiGraph(name=cluster.name)
    for step in STEPS:
        step(g, cluster)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return g
    ring = " -> ".join([str(a) for a, _ in cycle] + [str(cycle[0][0])])
    raise GraphError(f"dependency cycle: {ring}")


_KIND_RANK = {k: i for i, k in enumerate(
    ("node", "heartbeat", "witness", "module", "rfs", "vip", "driver", "checker"))}


def _key(g: nx.DiGraph) -> Callable[[str], tuple[int, int, int, str]]:
    """Cluster-wide resources first by kind; then each module's resources together."""

    def key(name: str) -> tuple[int, int, int, str]:
        data = g.nodes[name]
        rank = _KIND_RANK[data["kind"]]
        if rank < _KIND_RANK["module"]:
            return (0, rank, data["order"], name)
        return (1, data["order"], rank, name)

    return key


def start_order(g: nx.DiGraph) -> list[str]:
    """A deterministic order in which every resource comes after what it needs."""
    return list(nx.lexicographical_topological_sort(g, key=_key(g)))


def stop_order(g: nx.DiGraph) -> list[str]:
    """The reverse of the start order: nothing is stopped while something needs it."""
    return list(reversed(start_order(g)))


def module_order(g: nx.DiGraph) -> list[str]:
    """Module names in start order (what the agent and ``apply`` bring up first)."""
    return [n.split("/", 1)[1] for n in start_order(g) if g.nodes[n]["kind"] == "module"]
