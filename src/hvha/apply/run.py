"""Apply a plan to both nodes: connect, gather, then install, push, start/reload, wait.

Order, and why:
1. Both nodes are connected and their facts gathered *before* anything changes: an unreachable
   node stops the run with nothing done on the other (no half-applied pair).
2. Package and bundle steps run on both nodes at once; they change files only, never roles.
   If any fails, no service is touched anywhere.
3. Service steps (start, reload, restart, repair) run node by node in the cluster file's order,
   so a first install brings up the preferred node first and a restart never hits both at once.
4. Apply waits until every module has settled (one primary, the other secondary, or a reason),
   then shows the status of both nodes.

Progress goes to a callback (the CLI prints it); the result is plain data.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvha.apply import package, tls_material
from hvha.apply.node import NodePaths, NodeRunner, StepError
from hvha.apply.steps import Kind, Step, node_steps
from hvha.compile.bundle import Bundle, archive
from hvha.model.cluster import Cluster, Node
from hvha.plan import FactsError, NodeFacts, Plan, facts_command, parse_facts
from hvha.secrets import SecretError, cluster_key
from hvha.transport import Transport, TransportError, connect

Progress = Callable[[str, str, str], None]  # node, step, message
SETTLED = ("PRIM", "ALONE", "SECOND")


class ApplyError(Exception):
    """Apply stopped; the message names the node and step, and says what was left undone."""


@dataclass
class Session:
    """Open transports to every node of the cluster (close with :meth:`close`)."""

    cluster: Cluster
    transports: dict[str, Transport] = field(default_factory=dict)

    def close(self) -> None:
        for t in self.transports.values():
            t.close()
        self.transports.clear()


def open_session(cluster: Cluster, accept_new: bool = False) -> Session:
    """Connect to every node in parallel; the first failure closes all and raises."""
    windows = [n.name for n in cluster.nodes if n.os == "windows"]
    if windows:
        raise ApplyError(
            f"{', '.join(windows)}: Windows nodes cannot be planned or applied yet: the hvha "
            "agent runs on Linux only (Hyper-V modules are compiled and their PowerShell "
            "golden-tested, not run); use `hvha compile` and install by hand\n"
            "  nothing was changed on any node")
    session = Session(cluster)

    def one(node: Node) -> tuple[str, Transport | TransportError]:
        try:
            return node.name, connect(node, accept_new_host_keys=accept_new)
        except TransportError as exc:
            return node.name, exc

    with ThreadPoolExecutor(max_workers=len(cluster.nodes)) as pool:
        results = list(pool.map(one, cluster.nodes))
    errors = []
    for (name, result), node in zip(results, cluster.nodes, strict=True):
        if isinstance(result, TransportError):
            errors.append(f"node {name} ({node.address}): {result}")
        else:
            session.transports[name] = result
    if errors:
        session.close()
        raise ApplyError("\n".join(errors) + "\n  nothing was changed on any node")
    return session


def gather(session: Session) -> dict[str, NodeFacts]:
    """Facts of every node, one command each, in parallel."""
    def one(name: str) -> NodeFacts:
        try:
            result = session.transports[name].run(facts_command(), timeout=60)
        except TransportError as exc:
            raise ApplyError(f"node {name}: {exc}\n  nothing was changed on any node") from None
        try:
            return parse_facts(name, result.stdout)
        except FactsError as exc:
            raise ApplyError(str(exc)) from None

    names = [n.name for n in session.cluster.nodes]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Outcome:
    done: list[tuple[Step, str]] = field(default_factory=list)
    failed: list[tuple[Step, str]] = field(default_factory=list)
    skipped: list[Step] = field(default_factory=list)
    status: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    unsettled: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped and not self.unsettled


class Applier:
    def __init__(self, session: Session, bundles: Sequence[Bundle], progress: Progress,
                 paths: NodePaths | None = None, wheelhouse: Path | None = None,
                 settle_timeout: float = 120.0) -> None:
        self.session = session
        self.bundles = {b.node: b for b in bundles}
        self.progress = progress
        self.paths = paths or NodePaths()
        self.wheelhouse_dir = wheelhouse
        self.settle_timeout = settle_timeout
        self.runners = {name: NodeRunner(name, t, self.paths)
                        for name, t in session.transports.items()}

    def _secret(self) -> tuple[str, bytes] | None:
        ref = self.session.cluster.secret
        if ref.source != "file":
            return None  # an environment variable: the node's service environment provides it
        try:
            return ref.ref, cluster_key(ref) + b"\n"
        except SecretError as exc:
            raise ApplyError(str(exc)) from None

    def _run_step(self, step: Step, out: Outcome, fn: Callable[[], str]) -> bool:
        self.progress(step.node, step.kind.value, "started")
        t0 = time.monotonic()
        try:
            what = fn()
        except (StepError, TransportError, OSError, package.PackageError) as exc:
            out.failed.append((step, str(exc)))
            self.progress(step.node, step.kind.value, f"FAILED: {exc}")
            return False
        out.done.append((step, what))
        self.progress(step.node, step.kind.value, f"{what} [{time.monotonic() - t0:.1f}s]")
        return True

    def apply(self, plan: Plan) -> Outcome:
        out = Outcome()
        steps = {n: node_steps(plan, n) for n in self.runners}
        files = [s for ss in steps.values() for s in ss if s.kind in (Kind.AGENT, Kind.BUNDLE)]
        wheelhouse = None
        if any(s.kind is Kind.AGENT for s in files):
            try:
                wheelhouse = (package.from_directory(self.wheelhouse_dir) if self.wheelhouse_dir
                              else package.build())
            except package.PackageError as exc:
                raise ApplyError(f"{exc}\n  nothing was changed on any node") from None
        secret = self._secret() if any(s.kind is Kind.BUNDLE for s in files) else None
        ca = None
        if tls_material.needed(self.session.cluster) and any(s.kind is Kind.BUNDLE
                                                             for s in files):
            ca = tls_material.ensure_ca(self.session.cluster)
            ca_sha = tls_material.ca_sha256(ca)

        def file_steps(node: str) -> bool:
            runner = self.runners[node]
            version, b = plan.nodes[node].agent_version, self.bundles[node]
            for step in steps[node]:
                if step.kind is Kind.AGENT:
                    assert wheelhouse is not None
                    ok = self._run_step(step, out, lambda: runner.install_agent(wheelhouse,
                                                                                version))
                elif step.kind is Kind.BUNDLE:
                    ok = self._run_step(step, out, lambda: runner.push_bundle(
                        archive(b), b.hash, secret) + (
                        runner.push_tls(ca, ca_sha) if ca is not None else ""))
                else:
                    continue
                if not ok:
                    return False
            return True

        with ThreadPoolExecutor(max_workers=len(self.runners)) as pool:
            fine = all(list(pool.map(file_steps, list(self.runners))))
        service_steps = [s for n in self.runners for s in steps[n]
                         if s.kind not in (Kind.AGENT, Kind.BUNDLE)]
        if not fine:
            out.skipped.extend(service_steps)
            for s in service_steps:
                self.progress(s.node, s.kind.value, "skipped: a file step failed, so no "
                              "service was touched on any node")
            return out
        for step in service_steps:
            runner = self.runners[step.node]
            if step.kind is Kind.START:
                self._run_step(step, out, runner.start)
            elif step.kind is Kind.RESTART:
                self._run_step(step, out, runner.restart)
            elif step.kind is Kind.REPAIR:
                self._run_step(step, out, runner.repair)
            elif step.kind is Kind.RELOAD:
                self._run_step(step, out, lambda r=runner: self._reload(r))  # type: ignore[misc]
        if out.done:
            self.settle(out)
        return out

    def _reload(self, runner: NodeRunner) -> str:
        done, what = runner.reload()
        if done:
            return what
        self.progress(runner.node, "reload", f"{what}: restarting the agent")
        return "restarted: " + runner.restart()

    def settle(self, out: Outcome) -> None:
        """Wait until every module has one primary and, if both agents run, one secondary."""
        deadline = time.monotonic() + self.settle_timeout
        while True:
            out.status = {n: r.status() for n, r in self.runners.items()}
            out.unsettled = unsettled(out.status)
            if not out.unsettled or time.monotonic() > deadline:
                return
            time.sleep(0.3)


def unsettled(status: Mapping[str, dict[str, Any] | None]) -> list[str]:
    """Modules not yet in a stable pair of roles, each with what its nodes say."""
    roles: dict[str, dict[str, str]] = {}
    for node, st in status.items():
        if st is None:
            continue
        for m in st.get("modules", []):
            roles.setdefault(m["module"], {})[node] = f"{m['role']} ({m.get('reason', '')})"
    bad = []
    running = sum(st is not None for st in status.values())
    for module, by_node in sorted(roles.items()):
        names = [r.split()[0] for r in by_node.values()]
        primaries = sum(r in ("PRIM", "ALONE") for r in names)
        # STOP is a settled answer only once the agent has started the module and an operator
        # stopped it; "not started" is an agent still waiting for its peer
        stopped = all(r.startswith("STOP") and "not started" not in r
                      for r in by_node.values())
        # with both agents up, ALONE means the mirror is not in sync yet (a resync runs)
        paired = sorted(names) == ["PRIM", "SECOND"]
        if stopped or paired or (running < 2 and primaries == 1
                                 and all(r in SETTLED for r in names)):
            continue
        bad.append(f"{module}: " + ", ".join(f"{n} {r}" for n, r in sorted(by_node.items())))
    return bad
