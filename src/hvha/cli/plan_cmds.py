"""`hvha plan`: connect to both nodes, gather facts in one round trip each, show the diff.

All I/O is here (transports); the decision is :func:`hvha.plan.plan`, a pure function. Both
nodes are reached before anything is shown: an unreachable node is an error naming it, and
nothing is planned on the other as if the pair were whole.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

from hvha.cli.errors import UserError
from hvha.compile.bundle import build_bundles
from hvha.config.validate import validate_file
from hvha.plan import (
    FactsError,
    NodeFacts,
    Plan,
    desired_from_bundles,
    detailed_exitcode,
    facts_command,
    parse_facts,
    plan,
    render_json,
    render_text,
)
from hvha.transport import TransportError, connect


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="show what `apply` would change on each node (dry run)")
    p.add_argument("file", help="cluster.yaml")
    p.add_argument("--json", action="store_true", help="the plan as JSON (documented format)")
    p.add_argument("--detailed-exitcode", action="store_true",
                   help="exit 0 with no changes, 2 with changes (1 on errors)")
    p.add_argument("-out", "--out", dest="out", help="save the plan (JSON) for `hvha apply`")
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="record SSH host keys not yet in known_hosts (changed keys are refused)")
    p.set_defaults(func=cmd_plan)


def gather(cluster: Any, accept_new: bool) -> dict[str, NodeFacts]:
    """Facts of every node, one connection and one command each; the first failure stops."""
    facts: dict[str, NodeFacts] = {}
    for node in cluster.nodes:
        try:
            with connect(node, accept_new_host_keys=accept_new) as transport:
                result = transport.run(facts_command(), timeout=60)
        except TransportError as exc:
            raise UserError(f"node {node.name} ({node.address}): {exc}\n  nothing was changed "
                            "on any node") from None
        try:
            facts[node.name] = parse_facts(node.name, result.stdout)
        except FactsError as exc:
            raise UserError(str(exc)) from None
    return facts


def cmd_plan(args: argparse.Namespace) -> int:
    gc.set_threshold(500_000, 50, 50)  # short-lived, one large acyclic structure (see compile)
    v = validate_file(args.file)
    for d in v.report:
        sys.stderr.write(d.render() + "\n")
    if v.cluster is None:
        return 1
    desired = desired_from_bundles(build_bundles(v.cluster))
    the_plan: Plan = plan(desired, gather(v.cluster, args.accept_new_host_keys))
    if args.out:
        out = Path(args.out)
        try:
            out.write_text(the_plan.to_json())
            out.chmod(0o600)
        except OSError as exc:
            raise UserError(f"cannot write the plan to {out}: {exc.strerror}") from None
    text = render_json(the_plan) if args.json else render_text(the_plan)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return detailed_exitcode(the_plan) if args.detailed_exitcode else 0
