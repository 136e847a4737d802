"""`hvha plan`: connect to both nodes, gather facts in one round trip each, show the diff.

All I/O is here (transports); the decision is :func:`hvha.plan.plan`, a pure function. Both
nodes are reached before anything is shown: an unreachable node is an error naming it, and
nothing is planned on the other as if the pair were whole.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from hvha.apply import package
from hvha.apply.run import ApplyError, file_sha256, open_session
from hvha.apply.run import gather as gather_session
from hvha.cli.errors import UserError
from hvha.compile.bundle import build_bundles
from hvha.config.validate import validate_file
from hvha.plan import (
    NodeFacts,
    Plan,
    desired_from_bundles,
    detailed_exitcode,
    plan,
    render_json,
    render_text,
)


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
    """Facts of every node, connected to and asked in parallel; any failure stops the plan."""
    try:
        session = open_session(cluster, accept_new)
        try:
            return gather_session(session)
        finally:
            session.close()
    except ApplyError as exc:
        raise UserError(str(exc)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    gc.set_threshold(500_000, 50, 50)  # short-lived, one large acyclic structure (see compile)
    v = validate_file(args.file)
    for d in v.report:
        sys.stderr.write(d.render() + "\n")
    if v.cluster is None:
        return 1
    desired = desired_from_bundles(build_bundles(v.cluster), package.local_build())
    the_plan: Plan = plan(desired, gather(v.cluster, args.accept_new_host_keys))
    if args.out:
        the_plan = replace(the_plan, source={"file": str(Path(args.file).resolve()),
                                             "sha256": file_sha256(args.file)})
        out = Path(args.out)
        try:
            out.write_text(the_plan.to_json())
            out.chmod(0o600)
        except OSError as exc:
            raise UserError(f"cannot write the plan to {out}: {exc.strerror}") from None
    text = render_json(the_plan) if args.json else render_text(the_plan)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return detailed_exitcode(the_plan) if args.detailed_exitcode else 0
