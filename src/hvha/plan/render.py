"""A plan for people (Terraform-style text, plain or with rich markup) and for machines (JSON).

Plain text is the reference: it goes to files and CI logs, and the golden tests pin it. The
markup variant only adds colour tags around the same characters (``Console.print`` it), so what
a terminal shows and what a log holds never disagree. Nothing here prints or exits; the CLI does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.markup import escape

from hvha.plan.diff import flatten
from hvha.plan.model import Action, Change, Plan

HEADER = "hvha will perform the following actions:"
NO_CHANGES = "No changes. Every node runs what the configuration says."
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COLOURS = {Action.CREATE: "green", Action.UPDATE: "yellow", Action.DELETE: "red",
            Action.REPLACE: "red", Action.NOOP: "dim"}


class _Out:
    """Collects lines; in markup mode, escapes text and colours the marked parts."""

    def __init__(self, markup: bool) -> None:
        self.markup = markup
        self.lines: list[str] = []

    def text(self, s: str) -> str:
        return escape(s) if self.markup else s

    def tag(self, style: str, s: str) -> str:
        return f"[{style}]{escape(s)}[/]" if self.markup else s

    def add(self, line: str = "") -> None:
        self.lines.append(line)


def render_text(plan: Plan, *, markup: bool = False) -> str:
    """The plan as text: per node, per address, field-level changes, warnings, summary line."""
    out = _Out(markup)
    for name, node in plan.nodes.items():
        for note in node.notes:
            out.add(out.tag("yellow", f"Note: {name}: {note}"))
    if not plan.has_changes:
        if out.lines:
            out.add()
        out.add(out.tag("green", NO_CHANGES))
        return "\n".join(out.lines) + "\n"
    if out.lines:
        out.add()
    out.add(out.text(HEADER))
    names = list(plan.nodes) + sorted({c.node for c in plan.changes} - set(plan.nodes))
    for name in names:
        changes = [c for c in plan.for_node(name) if c.action is not Action.NOOP]
        if not changes:
            continue
        out.add()
        out.add(out.tag("bold", name))
        for i, change in enumerate(changes):
            if i:
                out.add()
            _change(out, change)
    summary = plan.summary
    out.add()
    if summary.disruptive:
        n = summary.disruptive
        out.add(out.tag("bold red", f"Warning: {n} change{'s' * (n != 1)} disturb"
                        f"{'s' * (n == 1)} running modules (marked WARNING above)."))
    out.add(out.tag("bold", plan.summary_line()))
    return "\n".join(out.lines) + "\n"


def _change(out: _Out, c: Change) -> None:
    out.add(out.tag("dim", f"  # {c.address}: {c.reason}"))
    if c.disruptive:
        out.add(out.tag("bold red", f"  # WARNING: {c.disruption}"))
    sym = _symbol(out, c.action)
    out.add(f"{sym} {out.tag('bold', c.address)}")
    for line in _fields(out, c):
        out.add(f"      {line}")


def _symbol(out: _Out, action: Action) -> str:
    pad = " " * (3 - len(action.symbol))
    if out.markup and action is Action.REPLACE:
        return f"{pad}[red]-[/]/[green]+[/]"
    return pad + out.tag(_COLOURS[action], action.symbol)


def _fields(out: _Out, c: Change) -> list[str]:
    """Field-level lines: every field of a new resource, the changed ones of an update."""
    if c.action in (Action.DELETE, Action.NOOP):
        return []
    old, new = flatten(c.before), flatten(c.after)
    lines = []
    for path in list(new) + [p for p in old if p not in new]:
        if path not in old:
            lines.append(f"{out.tag('green', '+')} {out.text(path)} = {out.text(_v(new[path]))}")
        elif path not in new:
            lines.append(f"{out.tag('red', '-')} {out.text(path)} = {out.text(_v(old[path]))}")
        elif old[path] != new[path]:
            lines.append(f"{out.tag('yellow', '~')} {out.text(path)} = "
                         f"{out.text(_v(old[path]))} -> {out.text(_v(new[path]))}")
    return lines


def _v(value: Any) -> str:
    """A value as JSON; a sha256 shortened to 12 digits like git does (JSON keeps it whole)."""
    if isinstance(value, str) and _SHA256.fullmatch(value):
        return json.dumps(value[:12] + "…", ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def render_json(plan: Plan) -> str:
    """The versioned machine format (see :mod:`hvha.plan.model`), for ``hvha plan --json``."""
    return plan.to_json()


def detailed_exitcode(plan: Plan) -> int:
    """``--detailed-exitcode``: 0 when there is nothing to do, 2 when there are changes.

    1 (error) is not decided here: an error means there is no plan to look at.
    """
    return 2 if plan.has_changes else 0
