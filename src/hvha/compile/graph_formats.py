"""Renderings of the resource graph: text, Graphviz dot, Mermaid, JSON. Pure functions."""

from __future__ import annotations

import json

import networkx as nx

from hvha.compile.graph import start_order, stop_order

FORMATS = ("text", "dot", "mermaid", "json")


def _order(g: nx.DiGraph, order: str) -> list[str]:
    return stop_order(g) if order == "stop" else start_order(g)


def to_text(g: nx.DiGraph, order: str = "start") -> str:
    names = _order(g, order)
    width = max((len(n) for n in names), default=0)
    rel = "needed by" if order == "stop" else "after"
    lines = [f"# {order} order of {g.number_of_nodes()} resources ({g.number_of_edges()} edges)"]
    for i, name in enumerate(names, 1):
        near = g.successors(name) if order == "stop" else g.predecessors(name)
        deps = sorted(near, key=names.index)
        tail = f"  ({rel}: {', '.join(deps)})" if deps else ""
        lines.append(f"{i:>5}  {name:<{width}}{tail}".rstrip())
    return "\n".join(lines) + "\n"


def _dot_id(name: str) -> str:
    return json.dumps(name)


def to_dot(g: nx.DiGraph, order: str = "start") -> str:
    lines = [f"digraph {_dot_id(str(g.graph.get('name', 'cluster')))} {{", "  rankdir=LR;"]
    for name in _order(g, order):
        lines.append(f"  {_dot_id(name)} [shape=box, label={_dot_id(name)}];")
    for a, b in sorted(g.edges()):
        lines.append(f"  {_dot_id(a)} -> {_dot_id(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(g: nx.DiGraph, order: str = "start") -> str:
    ids = {name: f"n{i}" for i, name in enumerate(_order(g, order))}
    lines = ["flowchart LR"]
    for name, ident in ids.items():
        lines.append(f'  {ident}["{name}"]')
    for a, b in sorted(g.edges()):
        lines.append(f"  {ids[a]} --> {ids[b]}")
    return "\n".join(lines) + "\n"


def to_json(g: nx.DiGraph, order: str = "start") -> str:
    names = _order(g, order)
    doc = {
        "format_version": 1,
        "cluster": g.graph.get("name"),
        "order": order,
        "resources": [{"name": n, **{k: v for k, v in sorted(g.nodes[n].items())
                                     if k != "order"}} for n in names],
        "edges": [{"before": a, "after": b} for a, b in sorted(g.edges())],
        "sequence": names,
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


RENDERERS = {"text": to_text, "dot": to_dot, "mermaid": to_mermaid, "json": to_json}
