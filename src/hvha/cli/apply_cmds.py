"""`hvha apply`, `hvha reconcile`, `hvha destroy`, and the node-side `hvha supervise`.

Wiring and printing only: the plan is :func:`hvha.plan.plan`, the execution
:class:`hvha.apply.run.Applier`, the loop :mod:`hvha.apply.reconcile`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from hvha.apply import package
from hvha.apply.run import Applier, ApplyError, Outcome, Session, file_sha256, gather, open_session
from hvha.cli.errors import UserError
from hvha.compile.bundle import Bundle, build_bundles
from hvha.config.validate import validate_file
from hvha.model.cluster import Cluster
from hvha.plan import Plan, PlanError, desired_from_bundles, plan, render_text


def register(sub: Any) -> None:
    p = sub.add_parser("apply", help="install, configure and start hvha on both nodes")
    p.add_argument("file", help="cluster.yaml, or a plan saved with `hvha plan -out`")
    p.add_argument("--auto-approve", action="store_true",
                   help="do not ask for confirmation (needed when not run from a terminal)")
    _common(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("reconcile", help="keep the nodes converged to cluster.yaml (GitOps loop)")
    p.add_argument("file", help="cluster.yaml")
    p.add_argument("--interval", default="30s", help="time between rounds (default %(default)s)")
    p.add_argument("--once", action="store_true", help="one round, then exit (cron, pipelines)")
    p.add_argument("--allow-disruptive", action="store_true",
                   help="also apply changes that move or restart a running module")
    _common(p)
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("destroy", help="stop and remove the modules and the agent on both nodes")
    p.add_argument("file", help="cluster.yaml")
    p.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    p.add_argument("--purge", action="store_true",
                   help="also delete the modules' replicated data on both nodes")
    p.add_argument("--accept-new-host-keys", action="store_true")
    p.set_defaults(func=cmd_destroy)

    p = sub.add_parser("supervise", help="(node side) keep a command running, like systemd")
    p.add_argument("--pid-file", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- command ...")
    p.set_defaults(func=cmd_supervise)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="record SSH host keys not yet in known_hosts (changed keys are refused)")
    p.add_argument("--wheelhouse", help="push these wheels instead of building hvha's")
    p.add_argument("--settle-timeout", type=float, default=120.0,
                   help="seconds to wait for modules to settle after a change")


def _say(node: str, step: str, message: str) -> None:
    sys.stdout.write(f"{node}: {step}: {message}\n")
    sys.stdout.flush()


def load(path: str) -> tuple[Cluster, list[Bundle]]:
    gc.set_threshold(500_000, 50, 50)
    v = validate_file(path)
    for d in v.report:
        sys.stderr.write(d.render() + "\n")
    if v.cluster is None:
        raise UserError(f"{path} is not valid: nothing was changed")
    return v.cluster, build_bundles(v.cluster)


def _saved_plan(path: Path) -> Plan | None:
    head = path.read_bytes()[:4096].lstrip()
    if not head.startswith(b"{"):
        return None
    try:
        return Plan.from_json(path.read_bytes())
    except PlanError as exc:
        raise UserError(f"{path}: {exc}") from None


def _connect(cluster: Cluster, accept_new: bool) -> Session:
    try:
        return open_session(cluster, accept_new)
    except ApplyError as exc:
        raise UserError(str(exc)) from None


def _confirm(auto: bool, verb: str, alternative: str = "") -> None:
    """Terraform's confirmation: a terminal answers 'yes', anything else needs --auto-approve."""
    if auto:
        return
    if not sys.stdin.isatty():
        raise UserError(f"asked to {verb} without a terminal to confirm it: pass "
                        f"--auto-approve{alternative}; nothing was changed")
    sys.stdout.write(f"\nDo you want to {verb}? Only 'yes' will be accepted.\n  Enter a value: ")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "yes":
        raise UserError(f"{verb} cancelled: nothing was changed")


def cmd_apply(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        saved = _saved_plan(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    cluster_file = path
    if saved is not None:
        if saved.source is None:
            raise UserError(f"{path} was saved by an hvha that did not record its cluster file: "
                            "re-run `hvha plan -out`")
        cluster_file = Path(saved.source["file"])
        if not cluster_file.is_file() or file_sha256(cluster_file) != saved.source["sha256"]:
            raise UserError(f"{cluster_file} changed since the plan in {path} was made: run "
                            "`hvha plan -out` again and review it; nothing was changed")
    cluster, bundles = load(str(cluster_file))
    session = _connect(cluster, args.accept_new_host_keys)
    try:
        try:
            facts = gather(session)
        except ApplyError as exc:
            raise UserError(str(exc)) from None
        build = None if args.wheelhouse else package.local_build()
        fresh = plan(desired_from_bundles(bundles, build), facts)
        if saved is not None:
            stale = [n for n, np in saved.nodes.items()
                     if n not in fresh.nodes or fresh.nodes[n].facts_digest != np.facts_digest
                     or fresh.nodes[n].bundle != np.bundle]
            if stale:
                raise UserError(f"the nodes changed since the plan in {path} was made "
                                f"({', '.join(stale)}): run `hvha plan -out` again; "
                                "nothing was changed")
            the_plan = saved
        else:
            the_plan = fresh
            if the_plan.has_changes:
                sys.stdout.write(render_text(the_plan))
            _confirm(args.auto_approve or not the_plan.has_changes, "perform these actions",
                     ", or apply a saved plan (`hvha plan -out plan.json`)")
        if not the_plan.has_changes:
            sys.stdout.write("No changes. Your cluster matches the configuration.\n")
            return 0
        out = _execute(session, bundles, the_plan, args)
    finally:
        session.close()
    return _report(the_plan, out)


def _execute(session: Session, bundles: list[Bundle], the_plan: Plan,
             args: argparse.Namespace) -> Outcome:
    applier = Applier(session, bundles, _say,
                      wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
                      settle_timeout=args.settle_timeout)
    try:
        return applier.apply(the_plan)
    except ApplyError as exc:
        raise UserError(str(exc)) from None


def status_lines(out: Outcome) -> list[str]:
    rows: dict[str, dict[str, str]] = {}
    for node, st in out.status.items():
        if st is None:
            continue
        for m in st.get("modules", []):
            rows.setdefault(m["module"], {})[node] = m["role"]
    nodes = sorted(out.status)
    return [f"  {module:<20} " + "  ".join(f"{n} {roles.get(n, '-'):<6}" for n in nodes)
            for module, roles in sorted(rows.items())]


def _report(the_plan: Plan, out: Outcome) -> int:
    s = the_plan.summary
    for step, why in out.failed:
        sys.stderr.write(f"error: {step.node}: {step.kind.value} failed: {why}\n")
    if out.skipped:
        sys.stderr.write(f"error: {len(out.skipped)} step(s) skipped: "
                         + ", ".join(f"{st.node} {st.kind.value}" for st in out.skipped) + "\n")
    if out.status:
        sys.stdout.write("Status:\n" + "\n".join(status_lines(out)) + "\n")
    for line in out.unsettled:
        sys.stderr.write(f"warning: not settled: {line}\n")
    if not out.ok:
        sys.stderr.write("Apply incomplete: run `hvha plan` to see what is left.\n")
        return 1
    sys.stdout.write(f"Apply complete! Resources: {s.add} added, {s.change} changed, "
                     f"{s.destroy} destroyed.\n")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from hvha.apply.reconcile import Reconciler, parse_interval

    try:
        interval = parse_interval(args.interval)
    except ValueError as exc:
        raise UserError(f"--interval {args.interval!r}: {exc}") from None
    return Reconciler(args, interval, load, _say).run()


def cmd_destroy(args: argparse.Namespace) -> int:
    from hvha.apply.node import NodePaths, NodeRunner, StepError
    from hvha.transport import TransportError

    cluster, _ = load(args.file)
    session = _connect(cluster, args.accept_new_host_keys)
    try:
        facts = gather(session)
        data = sorted({r.path for m in cluster.modules for r in m.replicated}) if args.purge else []
        sys.stdout.write("hvha will be stopped and removed from "
                         + " and ".join(n.name for n in cluster.nodes)
                         + (f"; replicated data DELETED: {', '.join(data)}" if data else
                            "; replicated data is kept (--purge deletes it)") + "\n")
        _confirm(args.auto_approve, "destroy hvha on these nodes")
        # stop secondaries first, so primaries are not handed over only to be stopped
        def primaries(name: str) -> int:
            st = facts[name].status
            return 0 if st is None else sum(m.role.primary for m in st.modules)

        order = sorted((n.name for n in cluster.nodes), key=primaries)
        for name in order:
            runner = NodeRunner(name, session.transports[name], NodePaths())
            t0 = time.monotonic()
            _say(name, "stop", runner.stop())
            _say(name, "remove", f"{runner.remove(data)} [{time.monotonic() - t0:.1f}s]")
    except (ApplyError, StepError, TransportError) as exc:
        raise UserError(f"{exc}\n  destroy stopped: run it again to finish") from None
    finally:
        session.close()
    sys.stdout.write("Destroy complete!\n")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    from hvha.agent.supervise import Supervisor

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UserError("supervise needs a command after --")
    os.umask(0o077)
    return Supervisor(argv, Path(args.pid_file), Path(args.log)).run()
