"""Semantic rules about modules: replicated paths, ports, policy references, dependencies."""

from __future__ import annotations

import ntpath
import posixpath
from typing import Any

import networkx as nx

from hvha.config.diagnostics import Path
from hvha.config.rules import WIN_ABS, Ctx, node_addresses


def _norm(path: str, windows: bool) -> tuple[str, ...]:
    if windows:
        parts = ntpath.normpath(path).rstrip("\\").lower().split("\\")
    else:
        parts = posixpath.normpath(path).rstrip("/").split("/")
    return tuple(p for p in parts if p)


class _DirIndex:
    """Replicated directories seen so far, indexed by every prefix: overlap checks in O(depth)."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, ...], str] = {}
        self.below: dict[tuple[str, ...], str] = {}  # prefix -> module owning a dir under it

    def add(self, ctx: Ctx, key: tuple[str, ...], path: Path, text: str, module: str) -> None:
        def who(owner: str) -> str:
            return "another directory of this module" if owner == module else f"module '{owner}'"

        if key in self.exact:
            ctx.err("HV305", path, f"`{text}` is already replicated by {who(self.exact[key])}",
                    "replicate each directory once, in one module")
            return
        outer = next((key[:n] for n in range(len(key) - 1, 0, -1) if key[:n] in self.exact),
                     None)
        if outer is not None:
            ctx.err("HV306", path, f"`{text}` is nested inside a directory of "
                    f"{who(self.exact[outer])}",
                    "replicated directories must not overlap: move one of them")
        elif key in self.below:
            ctx.err("HV306", path, f"a directory of {who(self.below[key])} is nested inside "
                    f"`{text}`", "replicated directories must not overlap: move one of them")
        self.exact[key] = module
        for n in range(1, len(key)):
            self.below.setdefault(key[:n], module)


def rule_paths(ctx: Ctx) -> None:
    """Path style per kind; no directory replicated twice or nested in another one."""
    index = _DirIndex()
    for i, mod in ctx.items("modules"):
        kind = mod.get("kind")
        windows = kind == "hyperv"
        payload = mod.get("payload") if isinstance(mod.get("payload"), dict) else {}
        assert isinstance(payload, dict)
        paths: list[tuple[Path, Any]] = [(("modules", i, "payload", k), payload.get(k))
                                         for k in ("directory", "domain_xml") if k in payload]
        replicated = mod.get("replicated")
        rep = [(j, r) for j, r in enumerate(replicated if isinstance(replicated, list) else [])
               if isinstance(r, dict) and isinstance(r.get("path"), str)]
        defaulted = ("modules", i, "replicated") not in ctx.doc.positions
        if not defaulted:  # a defaulted path is the VM directory, checked above
            paths += [(("modules", i, "replicated", j, "path"), r["path"]) for j, r in rep]
        for path, value in paths:
            if not isinstance(value, str):
                continue
            if windows and not WIN_ABS.match(value):
                ctx.err("HV307", path, f"`{value}` is not an absolute Windows path; Hyper-V "
                        "modules run on Windows", r"write it like D:\VMs\vm1 (quote it in YAML)")
            elif not windows and not value.startswith("/"):
                ctx.err("HV307", path, f"`{value}` is not an absolute POSIX path; {kind} modules "
                        "run on Linux", "write it like /var/lib/vms/vm1")
        name = str(mod.get("name"))
        for j, r in rep:
            if windows == bool(WIN_ABS.match(r["path"])):
                where = (("modules", i, "payload", "directory") if defaulted
                         else ("modules", i, "replicated", j, "path"))
                index.add(ctx, _norm(r["path"], windows), where, r["path"], name)
        directory = payload.get("directory")
        if kind in ("kvm", "hyperv") and isinstance(directory, str) and rep:
            d = _norm(directory, windows)
            if not any(d[: len(_norm(r["path"], windows))] == _norm(r["path"], windows)
                       for _, r in rep):
                ctx.err("HV320", ("modules", i, "payload", "directory"),
                        f"the VM directory `{directory}` is not replicated: the VM could not "
                        "start on the other node", "add it to `replicated:` (or leave "
                        "`replicated:` out: it defaults to the VM directory)")


def rule_ports(ctx: Ctx) -> None:
    used: dict[int, tuple[str, Path]] = {}

    def claim(port: Any, what: str, path: Path) -> None:
        if not isinstance(port, int) or isinstance(port, bool):
            return
        if port in used and used[port][0] != what:
            other_what, other_path = used[port]
            if path not in ctx.doc.positions and other_path in ctx.doc.positions:
                path, what, other_what = other_path, other_what, what  # point at what was written
            ctx.err("HV310", path, f"port {port} ({what}) is already used by {other_what}",
                    "give each listener on the nodes its own port")
        used.setdefault(port, (what, path))

    hb, repl = ctx.data.get("heartbeat"), ctx.data.get("replication")
    if isinstance(hb, dict):
        claim(hb.get("port"), "heartbeat", ("heartbeat", "port"))
    if isinstance(repl, dict):
        claim(repl.get("port"), "replication", ("replication", "port"))
    for i, mod in ctx.items("modules"):
        mr = mod.get("replication")
        if isinstance(mr, dict) and "port" in mr:
            claim(mr["port"], f"replication of module '{mod.get('name')}'",
                  ("modules", i, "replication", "port"))


def rule_references(ctx: Ctx) -> None:
    """Preferred primary is a node; dependencies name modules and form no cycle."""
    names = set(ctx.node_names())
    modules = {m.get("name"): i for i, m in ctx.items("modules") if isinstance(m.get("name"), str)}
    graph = nx.DiGraph()
    for i, mod in ctx.items("modules"):
        failover = mod.get("failover")
        pref = failover.get("preferred") if isinstance(failover, dict) else None
        if isinstance(pref, str) and pref != "none" and pref not in names:
            ctx.err("HV311", ("modules", i, "failover", "preferred"), f"preferred primary "
                    f"'{pref}' is not a node of this cluster",
                    f"use one of: {', '.join(sorted(names))}, or none")
        deps = mod.get("depends_on")
        for j, dep in enumerate(deps if isinstance(deps, list) else []):
            if not isinstance(dep, str):
                continue
            if dep not in modules or dep == mod.get("name"):
                why = "itself" if dep == mod.get("name") else f"unknown module '{dep}'"
                ctx.err("HV317", ("modules", i, "depends_on", j), f"depends on {why}",
                        f"modules are: {', '.join(sorted(map(str, modules)))}")
            else:
                graph.add_edge(dep, mod.get("name"))
    for cycle in nx.simple_cycles(graph):
        first = min(cycle, key=lambda m: modules[m])
        ring = " -> ".join(f"module/{m}" for m in [*cycle, cycle[0]])
        ctx.err("HV316", ("modules", modules[first], "depends_on"), f"dependency cycle: {ring}",
                "remove one of these `depends_on` entries", at_key=True)


def rule_kinds(ctx: Ctx) -> None:
    """Checkers fit the module kind; VM kinds run on nodes of the right OS."""
    oses = {str(n.get("name")): n.get("os") for _, n in ctx.nodes()}
    for i, mod in ctx.items("modules"):
        kind = mod.get("kind")
        checkers = mod.get("checkers")
        for j, c in enumerate(checkers if isinstance(checkers, list) else []):
            if isinstance(c, dict) and c.get("type") == "vm_state" and kind == "app":
                ctx.err("HV318", ("modules", i, "checkers", j, "type"), "a vm_state checker "
                        "watches a VM; this module runs an application",
                        "use a process, tcp or script checker for an app")
        want = {"hyperv": "windows", "kvm": "linux"}.get(str(kind))
        for node, os_name in oses.items():
            if want and os_name != want:
                ctx.err("HV324", ("modules", i, "kind"), f"a {kind} module needs {want} nodes; "
                        f"node '{node}' is {os_name}", "put this module in a cluster of "
                        f"{want} nodes, or set the node's `os:`/transport correctly")


_CHECKER_KEYS = {"process": {"process", "min", "max"}, "tcp": {"host", "port"},
                 "ping": {"host"}, "interface": {"interface"}, "script": {"command"},
                 "vm_state": set()}
_ALL_CHECKER_KEYS = set().union(*_CHECKER_KEYS.values())


def rule_options(ctx: Ctx) -> None:
    """Options that mean nothing for this kind or type are mistakes, not silent no-ops."""
    for i, mod in ctx.items("modules"):
        kind, payload, stop = mod.get("kind"), mod.get("payload"), mod.get("stop")
        if kind == "app" and isinstance(stop, dict) and "mode" in stop:
            ctx.err("HV325", ("modules", i, "stop", "mode"), "`stop.mode` (shutdown/save/off) "
                    "is for VMs; an app is stopped by its stop command or unit",
                    "remove `mode:`; set `graceful_timeout`/`forced_timeout` instead", at_key=True)
        if kind == "kvm" and isinstance(payload, dict):
            other = {"libvirt": "command", "qemu": "domain_xml"}.get(str(payload.get("hypervisor")))
            if other and other in payload and (i, other) not in _defaulted(ctx, i):
                ctx.err("HV325", ("modules", i, "payload", other), f"`{other}` is not used with "
                        f"hypervisor {payload.get('hypervisor')}",
                        "remove it, or change `hypervisor:`", at_key=True)
        checkers = mod.get("checkers")
        for j, c in enumerate(checkers if isinstance(checkers, list) else []):
            if not isinstance(c, dict) or c.get("type") not in _CHECKER_KEYS:
                continue
            path = ("modules", i, "checkers", j)
            for key in sorted(_ALL_CHECKER_KEYS & set(c) - _CHECKER_KEYS[c["type"]]):
                if (key, c["type"]) == ("min", "process"):
                    continue
                ctx.err("HV325", (*path, key), f"`{key}` has no meaning for a {c['type']} "
                        "checker", "remove it, or change the checker's `type:`", at_key=True)
            low, high = c.get("min"), c.get("max")
            if isinstance(low, int) and isinstance(high, int) and low > high:
                ctx.err("HV204", (*path, "max"), f"max {high} is below min {low}",
                        "make max at least min")


def _defaulted(ctx: Ctx, i: int) -> set[tuple[int, str]]:
    """Payload keys of module ``i`` that hvha filled in (not the user's doing)."""
    prefix = f"modules[{i}].payload."
    return {(i, p[len(prefix):]) for p, _ in ctx.applied if p.startswith(prefix)}


def rule_duplicate_addresses(ctx: Ctx) -> None:
    owners: dict[Any, tuple[str, Path]] = {}
    for name, ip, path in node_addresses(ctx):
        if ip in owners and owners[ip][0] != name:
            ctx.err("HV319", path, f"address {ip} is also used by node '{owners[ip][0]}'",
                    "each node needs its own addresses")
        owners.setdefault(ip, (name, path))
