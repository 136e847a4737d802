"""`hvha reconcile`: the GitOps loop, facts -> plan -> apply, round after round.

Each round re-reads the cluster file (a pipeline may have changed it), gathers facts, and
applies what differs. Drift (an edited bundle on a node, a stopped agent, a VIP where the roles
say it must not be) is reported as such and counted. Changes that would move or restart a
running module are reported and *not* applied unless ``--allow-disruptive``: nobody reviews a
plan made at 3 a.m. Errors back off exponentially (up to 10 rounds' worth); SIGTERM ends the
loop cleanly between steps. ``--once`` runs one round: exit 0 converged, 1 error, 2 changes left
undone (disruptive ones withheld).
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from hvha.apply import package
from hvha.apply.run import Applier, ApplyError, gather, open_session
from hvha.plan import desired_from_bundles, plan
from hvha.plan.model import Plan

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_interval(text: str) -> float:
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?(?:ms|s|m|h))+)", text)
    if not parts:
        raise ValueError("write a duration such as 30s, 5m or 1h")
    total = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))
    if total < 1:
        raise ValueError("the interval must be at least 1s")
    return total


def withhold_disruptive(the_plan: Plan) -> tuple[Plan, list[str]]:
    """The plan without the changes that would disturb a running module (and their node's
    service step, which carries them out), plus what was withheld."""
    held = [c for c in the_plan.changes if c.disruptive]
    nodes = {c.node for c in held}
    kept = tuple(c for c in the_plan.changes if not c.disruptive and not (
        c.node in nodes and not c.address.startswith(("node/", "vip/"))
        and any(h.node == c.node for h in held)) and not (
        c.node in nodes and c.address == f"node/{c.node}/service"))
    return replace(the_plan, changes=kept), [f"{c.node} {c.address}: {c.disruption}"
                                             for c in held]


class Reconciler:
    def __init__(self, args: Any, interval: float, load: Callable[[str], Any],
                 say: Callable[[str, str, str], None]) -> None:
        self.args = args
        self.interval = interval
        self.load = load
        self.say = say
        self.stop = threading.Event()
        self.rounds = self.drift = self.errors = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.log(f"signal {signal.Signals(signum).name}: stopping after this step")
        self.stop.set()

    def log(self, message: str) -> None:
        sys.stdout.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} reconcile: {message}\n")
        sys.stdout.flush()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        backoff = self.interval
        while True:
            code = self.round()
            if self.args.once:
                return code
            if self.stop.is_set():
                self.log(f"stopped after {self.rounds} rounds ({self.drift} drifts corrected, "
                         f"{self.errors} errors)")
                return 0
            backoff = self.interval if code != 1 else min(backoff * 2, self.interval * 10)
            if code == 1:
                self.log(f"retrying in {backoff:.0f}s")
            if self.stop.wait(backoff):
                self.log(f"stopped after {self.rounds} rounds ({self.drift} drifts corrected, "
                         f"{self.errors} errors)")
                return 0

    def round(self) -> int:
        self.rounds += 1
        try:
            cluster, bundles = self.load(self.args.file)
            session = open_session(cluster, self.args.accept_new_host_keys)
        except (ApplyError, SystemExit, Exception) as exc:
            return self._error(exc)
        try:
            build = None if self.args.wheelhouse else package.local_build()
            the_plan = plan(desired_from_bundles(bundles, build), gather(session))
            if not the_plan.has_changes:
                self.log("in sync: no changes")
                return 0
            drift = [c for c in the_plan.changes if c.drift]
            for c in drift:
                self.log(f"drift on {c.node}: {c.address}: {c.reason}")
            withheld: list[str] = []
            if not self.args.allow_disruptive:
                the_plan, withheld = withhold_disruptive(the_plan)
                for w in withheld:
                    self.log(f"withheld (would disturb a running module; "
                             f"--allow-disruptive applies it): {w}")
            if not the_plan.has_changes:
                return 2
            self.log(the_plan.summary_line())
            wheels = Path(self.args.wheelhouse) if self.args.wheelhouse else None
            out = Applier(session, bundles, self.say, wheelhouse=wheels,
                          settle_timeout=self.args.settle_timeout).apply(the_plan)
            if not out.ok:
                self.errors += 1
                for step, why in out.failed:
                    self.log(f"error: {step.node} {step.kind.value}: {why}")
                return 1
            self.drift += len(drift)
            self.log(f"converged ({len(drift)} drift corrected)")
            return 2 if withheld else 0
        except (ApplyError, Exception) as exc:
            return self._error(exc)
        finally:
            session.close()

    def _error(self, exc: BaseException) -> int:
        self.errors += 1
        self.log(f"error: {exc}")
        return 1
