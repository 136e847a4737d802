"""Rendering a plan: Terraform-style text (pinned by the golden cases), JSON, exit codes.

The golden text is rendered from the golden ``plan.json`` (see test_plan_diff.py), so the text
is pinned for saved plans too. Regenerate with ``HVHA_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from tests.conftest import ROOT

from hvha.plan import (
    Action,
    Change,
    NodePlan,
    Plan,
    PlanError,
    detailed_exitcode,
    render_json,
    render_text,
)
from hvha.plan.model import FORMAT_VERSION

GOLDEN = ROOT / "tests" / "golden" / "plan"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "plan.json").exists())
UPDATE = os.environ.get("HVHA_UPDATE_GOLDEN") == "1"
NODES = {"node1": NodePlan("a" * 64, "0.1.0", "d" * 64), "node2": NodePlan("b" * 64, "0.1.0",
                                                                             "e" * 64)}


def _plan(*changes: Change) -> Plan:
    return Plan(changes, NODES)


def _change(action: Action, address: str = "driver/web", node: str = "node1",
            **kw: Any) -> Change:
    return Change(address, node, action, kw.pop("before", {"x": 1}), kw.pop("after", {"x": 2}),
                  kw.pop("reason", "x changed"), **kw)


@pytest.mark.parametrize("case", CASES)
def test_golden_plan_text(case: str) -> None:
    p = Plan.from_json((GOLDEN / case / "plan.json").read_text())
    path = GOLDEN / case / "plan.txt"
    actual = render_text(p)
    if UPDATE:
        path.write_text(actual)
    assert actual == path.read_text(), f"{case}/plan.txt differs from the golden copy"


@pytest.mark.parametrize("case", CASES)
def test_markup_shows_the_same_characters_as_plain_text(case: str) -> None:
    p = Plan.from_json((GOLDEN / case / "plan.json").read_text())
    assert _through_rich(render_text(p, markup=True)) == render_text(p)


def _through_rich(markup: str) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=400, color_system=None, highlight=False, emoji=False,
                      soft_wrap=True)
    console.print(markup, end="")
    return buf.getvalue()


def test_text_that_looks_like_markup_is_escaped() -> None:
    p = _plan(_change(Action.UPDATE, before={"start": "[bold]x[/]"}, after={"start": "[red]"},
                      reason="payload [x] changed", disruptive=True, disruption="[b]oom"))
    assert _through_rich(render_text(p, markup=True)) == render_text(p)
    assert '~ start = "[bold]x[/]" -> "[red]"' in render_text(p)


def test_summary_line_uses_terraform_wording_and_counts_replace_twice() -> None:
    assert _plan().summary_line() == "No changes."
    p = _plan(_change(Action.CREATE, before=None), _change(Action.UPDATE),
              _change(Action.REPLACE), _change(Action.DELETE, after=None),
              _change(Action.DELETE, after=None))
    assert p.summary_line() == "Plan: 2 to add, 1 to change, 3 to destroy."
    assert render_text(p).endswith("Plan: 2 to add, 1 to change, 3 to destroy.\n")


def test_no_changes_text_and_exit_codes() -> None:
    assert render_text(_plan()) == "No changes. Every node runs what the configuration says.\n"
    assert detailed_exitcode(_plan()) == 0
    assert detailed_exitcode(_plan(_change(Action.UPDATE))) == 2


def test_field_level_lines() -> None:
    text = render_text(_plan(_change(Action.UPDATE, before={"a": 1, "gone": True, "same": 0},
                                     after={"a": 2, "new": [], "same": 0})))
    assert "      ~ a = 1 -> 2\n" in text
    assert "      + new = []\n" in text
    assert "      - gone = true\n" in text
    assert "same" not in text


def test_disruptive_changes_carry_a_warning_line_and_a_count() -> None:
    text = render_text(_plan(_change(Action.UPDATE, disruptive=True,
                                     disruption="restarts web on node1")))
    assert "  # WARNING: restarts web on node1\n  ~ driver/web\n" in text
    assert "Warning: 1 change disturbs running modules" in text


def test_replace_symbol_is_aligned() -> None:
    text = render_text(_plan(_change(Action.REPLACE), _change(Action.CREATE, "vip/web",
                                                              before=None)))
    assert "\n-/+ driver/web\n" in text and "\n  + vip/web\n" in text


def test_json_is_versioned_ordered_and_round_trips() -> None:
    p = _plan(_change(Action.UPDATE, drift=True, reason="drift: agent stopped"),
              _change(Action.DELETE, "module/web", "node2", after=None, disruptive=True,
                      disruption="stops web on node2"))
    doc = json.loads(render_json(p))
    assert list(doc) == ["format_version", "nodes", "changes", "summary"]
    assert doc["format_version"] == FORMAT_VERSION == 1
    assert list(doc["changes"][0]) == ["node", "address", "action", "symbol", "reason", "drift",
                                       "disruptive", "disruption", "before", "after"]
    assert doc["summary"] == {"add": 0, "change": 1, "destroy": 1, "disruptive": 1, "drift": 1}
    assert Plan.from_json(render_json(p)) == p


@pytest.mark.parametrize(("text", "message"), [
    ("", "invalid JSON"),
    ("[1]", "no format_version"),
    ('{"format_version": 2}', "plan format 2 is not supported"),
    ('{"format_version": 1}', "damaged plan file"),
    ('{"format_version": 1, "nodes": [], "changes": []}', "damaged plan file"),
    ('{"format_version": 1, "nodes": {}, "changes": [{"action": "explode"}]}', "damaged"),
    ('{"format_version": 1, "nodes": {}, "changes": [], "summary": {"add": 3}}',
     "summary does not match"),
])
def test_damaged_plan_files_are_plan_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Plan.from_json(text)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=15)
CHANGE = st.fixed_dictionaries({}, optional={
    k: JSON for k in ("node", "address", "reason", "before", "after", "drift", "disruptive")}
    | {"action": st.sampled_from([a.value for a in Action] + ["x"])})
DOC = st.fixed_dictionaries({"format_version": st.just(1)}, optional={
    "nodes": st.dictionaries(st.text(max_size=4), JSON, max_size=2) | JSON,
    "changes": st.lists(CHANGE, max_size=3) | JSON, "summary": JSON})


@settings(max_examples=300, deadline=None)
@given(doc=DOC)
def test_any_plan_document_loads_or_is_a_plan_error(doc: dict[str, Any]) -> None:
    try:
        p = Plan.from_json(json.dumps(doc))
    except PlanError:
        return
    render_text(p)
    render_text(p, markup=True)
