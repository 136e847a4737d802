"""`hvha validate`, `hvha graph`, `hvha compile`: the declarative core from the command line."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hvha.cli.errors import UserError
from hvha.compile.bundle import build_bundles, write_bundles
from hvha.compile.graph import GraphError, build_graph
from hvha.compile.graph_formats import FORMATS, RENDERERS
from hvha.config.diagnostics import Severity
from hvha.config.validate import Validation, validate_file
from hvha.model.cluster import Cluster


def _short_lived() -> None:
    """Config commands build one large acyclic structure and exit: the cyclic GC would rescan it
    on every allocation burst (1.4x per-module cost at 1024 modules, measured). Refcounting frees
    it; the loader's value budget bounds the memory."""
    gc.set_threshold(500_000, 50, 50)


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="check a cluster file and report every problem")
    p.add_argument("file", help="cluster.yaml")
    p.add_argument("--json", action="store_true", help="diagnostics as JSON on stdout")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("graph", help="show the dependency graph of a cluster's resources")
    p.add_argument("file")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--order", choices=("start", "stop"), default="start")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("compile", help="render one bundle per node into a directory")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True,
                   help="output directory: <node>.bundle (tar) and <node>.bundle.sha256 per node")
    p.add_argument("--expand", action="store_true",
                   help="also write each bundle as a readable tree <node>/")
    p.set_defaults(func=cmd_compile)


def summary(cluster: Cluster) -> str:
    kinds = Counter(m.kind.value for m in cluster.modules)
    mods = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none yet"
    witness = {"arbiter": f"witness {cluster.witness.address}",
               "ping": f"ping witness {', '.join(cluster.witness.targets)}",
               "none": "no witness"}[cluster.witness.kind]
    n = len(cluster.modules)
    nets = len(cluster.heartbeat.networks)
    return (f"cluster '{cluster.name}': nodes {cluster.nodes[0].name} and {cluster.nodes[1].name}, "
            f"{n} module{'s' * (n != 1)} ({mods}), {nets} heartbeat network{'s' * (nets != 1)}, "
            f"{witness}")


def _print_report(v: Validation) -> None:
    for d in v.report:
        sys.stderr.write(d.render() + "\n")
    errors = len(v.report.errors)
    warnings = len(v.report.items) - errors
    if errors:
        sys.stderr.write(f"{v.doc.file}: {errors} error{'s' * (errors != 1)}"
                         f"{f', {warnings} warning' + 's' * (warnings != 1) if warnings else ''}"
                         "; nothing was changed\n")


def _validated(path: str) -> tuple[Validation, Cluster]:
    v = validate_file(path)
    _print_report(v)
    if v.cluster is None:
        raise SystemExit(1)
    return v, v.cluster


def cmd_validate(args: argparse.Namespace) -> int:
    _short_lived()
    v = validate_file(args.file)
    if args.json:
        doc = {"ok": v.cluster is not None,
               "summary": summary(v.cluster) if v.cluster else None,
               "diagnostics": [d.as_dict() for d in v.report]}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0 if v.cluster else 1
    _print_report(v)
    if v.cluster is None:
        return 1
    print(f"ok: {summary(v.cluster)}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    _short_lived()
    _, cluster = _validated(args.file)
    try:
        graph = build_graph(cluster)
    except GraphError as exc:
        raise UserError(f"{args.file}: {exc}") from None
    sys.stdout.write(RENDERERS[args.format](graph, args.order))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    _short_lived()
    _, cluster = _validated(args.file)
    source = Path(args.file).read_bytes()
    try:
        bundles = build_bundles(cluster, source)
    except GraphError as exc:
        raise UserError(f"{args.file}: {exc}") from None
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory: choose another -o")
    try:
        paths = write_bundles(bundles, out, expand=args.expand)
    except OSError as exc:
        raise UserError(f"cannot write bundles to {out}: {exc.strerror or exc}") from None
    for bundle, path in zip(bundles, paths, strict=True):
        print(f"{bundle.node}: {path}  ({len(bundle.files)} files, sha256 {bundle.hash})")
    return 0


__all__ = ["Severity", "register", "summary"]
