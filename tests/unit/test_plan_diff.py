"""``plan(desired, facts)``: golden cases (facts in, plan out) and the rules one by one.

Golden cases live in ``tests/golden/plan/<case>/``: ``case.json`` names an example and the text
edits that make the *desired* and the *installed* configuration; ``facts.json`` is what each
node's facts script printed, where ``@bundle``, ``@config`` and ``@version`` stand for the
installed bundle's hash, its agent.json and this hvha's version (so the data survives template
changes). Expected: ``plan.json`` here, ``plan.txt`` in test_plan_render.py. To accept an
intended change: ``HVHA_UPDATE_GOLDEN=1 pytest tests/unit/test_plan_diff.py
tests/unit/test_plan_render.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import EXAMPLES, ROOT

from hvha import __version__
from hvha.compile.bundle import build_bundles
from hvha.config.validate import validate_bytes
from hvha.plan import (
    Action,
    DesiredNode,
    FactsError,
    NodeFacts,
    Plan,
    PlanError,
    desired_from_bundles,
    facts_digest,
    parse_facts,
    plan,
    render_text,
)

GOLDEN = ROOT / "tests" / "golden" / "plan"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.json").exists())
UPDATE = os.environ.get("HVHA_UPDATE_GOLDEN") == "1"


def compile_lab(edits: list[list[str]] | None = None,
                example: str = "lab.yaml") -> dict[str, DesiredNode]:
    text = (EXAMPLES / example).read_text()
    for old, new in edits or []:
        assert old in text, f"edit {old!r} does not apply to {example}"
        text = text.replace(old, new)
    v = validate_bytes(text.encode(), example)
    assert v.cluster is not None, [d.render() for d in v.report]
    return desired_from_bundles(build_bundles(v.cluster, text.encode()))


def _resolve(value: Any, installed: DesiredNode) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, installed) for k, v in value.items()}
    if value == "@bundle":
        return installed.bundle_hash
    if value == "@config":
        return {**installed.config, "modules": list(installed.modules),
                "start_order": list(installed.start_order)}
    if isinstance(value, str):
        return value.replace("@version", __version__)
    return value


def load_case(name: str) -> tuple[dict[str, DesiredNode], dict[str, NodeFacts]]:
    case = json.loads((GOLDEN / name / "case.json").read_text())
    desired = compile_lab(case["desired_edits"], case["example"])
    installed = compile_lab(case["installed_edits"], case["example"])
    raw = json.loads((GOLDEN / name / "facts.json").read_text())
    facts = {node: parse_facts(node, json.dumps(_resolve(doc, installed[node])).encode())
             for node, doc in raw.items()}
    return desired, facts


def check_golden(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"missing golden file {path}: run with HVHA_UPDATE_GOLDEN=1"
    assert actual == path.read_text(), f"{path.parent.name}/{path.name} differs from golden"


@pytest.mark.parametrize("case", CASES)
def test_golden_plan_json(case: str) -> None:
    desired, facts = load_case(case)
    p = plan(desired, facts)
    check_golden(GOLDEN / case / "plan.json", p.to_json())
    assert render_text(Plan.from_json(p.to_json())) == render_text(p)


# -- the rules, one by one ---------------------------------------------------------------------

def _by_address(p: Plan, node: str) -> dict[str, Any]:
    return {c.address: c for c in p.for_node(node)}


def test_up_to_date_is_no_changes_and_deterministic() -> None:
    desired, facts = load_case("up-to-date")
    p = plan(desired, facts)
    assert p.changes == () and not p.has_changes
    assert p.summary_line() == "No changes."
    assert plan(desired, facts).to_json() == p.to_json()


def test_fresh_nodes_create_everything_in_graph_order_without_disruption() -> None:
    desired, facts = load_case("fresh-nodes")
    p = plan(desired, facts)
    assert {c.action for c in p.changes} == {Action.CREATE}
    assert not any(c.disruptive for c in p.changes)
    assert [c.address for c in p.for_node("node1")] == [
        "node/node1/agent", "node/node1/bundle", "node/node1/service",
        "module/web", "rfs/web/0", "vip/web", "driver/web", "checker/web/http"]
    assert p.summary_line() == "Plan: 16 to add, 0 to change, 0 to destroy."


def test_payload_change_restarts_only_where_primary() -> None:
    p = plan(*load_case("payload-changed-prim"))
    one, two = _by_address(p, "node1")["driver/web"], _by_address(p, "node2")["driver/web"]
    assert (one.action, one.reason) == (Action.UPDATE, "payload.start changed")
    assert one.disruptive and one.disruption == "restarts web on node1"
    assert not two.disruptive and two.disruption == ""


def test_a_module_change_is_reloaded_in_place_without_moving_anything() -> None:
    p = plan(*load_case("payload-changed-prim"))
    service = _by_address(p, "node1")["node/node1/service"]
    assert service.reason.startswith("reload bundle ") and not service.disruptive


def test_restarting_the_agent_moves_its_primaries_to_a_live_secondary() -> None:
    desired, facts = load_case("payload-changed-prim")
    heartbeat = dict(desired["node1"].config["heartbeat"], timeout=9.0)
    desired = {**desired, "node1": replace(
        desired["node1"], config={**desired["node1"].config, "heartbeat": heartbeat})}
    service = _by_address(plan(desired, facts), "node1")["node/node1/service"]
    assert "heartbeat changed" in service.reason
    assert service.disruptive and service.disruption == (
        "moves web to node2 while the agent restarts")
    assert not _by_address(plan(desired, facts), "node2")["node/node2/service"].disruptive


def test_vip_change_moves_the_vip_on_the_primary() -> None:
    p = plan(*load_case("vip-changed"))
    vip = _by_address(p, "node1")["vip/web"]
    assert vip.disruption == "moves VIP 10.77.0.100/24 -> 10.77.0.101/24 on node1"
    assert vip.before["address"] == "10.77.0.100/24" and vip.after["address"] == "10.77.0.101/24"


def test_removed_module_stops_where_primary_and_deletes_its_resources() -> None:
    p = plan(*load_case("module-removed"))
    gone = [c for c in p.for_node("node1") if "api" in c.address]
    assert [c.address for c in gone] == ["module/api", "driver/api", "checker/api/port"]
    assert {c.action for c in gone} == {Action.DELETE}
    assert gone[0].disruption == "stops api on node1"
    assert not any(c.disruptive for c in gone[1:])
    assert not _by_address(p, "node2")["module/api"].disruptive


def test_checker_interval_change_is_not_disruptive_by_itself() -> None:
    p = plan(*load_case("checker-interval"))
    checker = _by_address(p, "node1")["checker/web/http"]
    assert (checker.action, checker.reason, checker.disruptive) == (
        Action.UPDATE, "interval changed", False)


def test_agent_upgrade() -> None:
    p = plan(*load_case("agent-upgrade"))
    agent = _by_address(p, "node1")["node/node1/agent"]
    assert agent.reason == f"agent 0.0.9 -> {__version__}"
    assert _by_address(p, "node1")["node/node1/service"].reason == (
        f"restart to run agent {__version__}")


def test_drift_is_marked_and_explained() -> None:
    p = plan(*load_case("bundle-drift"))
    (service,) = p.changes
    assert service.drift and service.reason.startswith("drift: the agent runs bundle 0f0f")
    p = plan(*load_case("agent-stopped"))
    (service,) = p.changes
    assert (service.address, service.drift) == ("node/node2/service", True)
    assert service.reason == "drift: agent failed (systemd: failed)"
    p = plan(*load_case("vip-drift"))
    assert [(c.node, c.reason) for c in p.changes] == [
        ("node1", "drift: VIP 10.77.0.100/24 missing on node1 where web is PRIM"),
        ("node2", "drift: VIP 10.77.0.100/24 held by node2 where web is SECOND")]
    assert p.summary.drift == 2


def test_unknown_roles_are_assumed_disruptive() -> None:
    p = plan(*load_case("status-unavailable"))
    driver = _by_address(p, "node1")["driver/web"]
    assert driver.disruptive and driver.disruption.startswith("possibly restarts web on node1")
    assert _by_address(p, "node1")["node/node1/service"].disruptive


def test_new_module_and_kind_change() -> None:
    base = compile_lab()
    added = compile_lab([["      failback: true\n", "      failback: true\n  - name: api\n"
                          "    kind: app\n    payload: {unit: api.service}\n"]])
    facts = _running(base)
    p = plan(added, facts)
    new = [c for c in p.for_node("node1") if "api" in c.address]
    assert {(c.action, c.reason, c.disruptive) for c in new} == {
        (Action.CREATE, "new module", False)}
    replaced = {k: DesiredNode(d.node, d.bundle_hash, d.agent_version,
                               ({**d.modules[0], "kind": "kvm"},), d.start_order, d.config)
                for k, d in base.items()}
    driver = _by_address(plan(replaced, facts), "node1")["driver/web"]
    assert driver.action is Action.REPLACE and driver.disruption == (
        "restarts web on node1 as kvm")


def test_replicated_directories_restart_a_running_payload() -> None:
    base = compile_lab()
    more = {k: DesiredNode(d.node, d.bundle_hash, d.agent_version,
                           ({**d.modules[0], "replicated": [{"path": "/srv/web",
                                                             "exclude": []}]},),
                           d.start_order, d.config)
            for k, d in base.items()}
    rfs = _by_address(plan(more, _running(base)), "node1")["rfs/web/0"]
    # the lab example replicates /srv/hvha/web: moving it to /srv/web replaces the mount
    assert (rfs.action, rfs.disruption) == (Action.REPLACE, "restarts web on node1 to mount "
                                                            "/srv/web")


def test_no_facts_for_a_node_is_an_error() -> None:
    desired = compile_lab()
    with pytest.raises(PlanError, match="no facts for node2"):
        plan(desired, {"node1": NodeFacts("node1")})


def test_facts_digest_ignores_noise_and_sees_roles() -> None:
    desired, facts = load_case("up-to-date")
    raw = json.loads((GOLDEN / "up-to-date" / "facts.json").read_text())
    doc = _resolve(raw["node1"], compile_lab()["node1"])
    doc["status"]["modules"][0]["history"] = [{"at": 1.0, "role": "PRIM", "reason": "x"}]
    doc["status"]["started"] = 123.0
    assert facts_digest(parse_facts("node1", json.dumps(doc).encode())) == facts_digest(
        facts["node1"])
    doc["status"]["modules"][0]["role"] = "SECOND"
    assert facts_digest(parse_facts("node1", json.dumps(doc).encode())) != facts_digest(
        facts["node1"])
    assert plan(desired, facts).nodes["node1"].facts_digest == facts_digest(facts["node1"])


def _running(installed: dict[str, DesiredNode]) -> dict[str, NodeFacts]:
    raw = json.loads((GOLDEN / "up-to-date" / "facts.json").read_text())
    return {n: parse_facts(n, json.dumps(_resolve(raw[n], installed[n])).encode())
            for n in installed}


# -- no traceback, whatever the nodes say ------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
KEYS = ["hvha", "version", "bundle_pushed", "bundle_running", "systemd", "pid", "pid_alive",
        "addresses", "config", "status", "uid", "host"]
MODULE = st.fixed_dictionaries({"name": st.sampled_from(["web", "api", "x"])},
                               optional={k: JSON for k in ("vip", "checkers", "replicated",
                                                           "payload", "kind")})
STATUS_MODULE = st.fixed_dictionaries({}, optional={
    "module": st.sampled_from(["web", "api", 3]), "role": st.sampled_from(
        ["PRIM", "ALONE", "SECOND", "STOP", "WAIT", "??", None]),
    "peer_role": st.sampled_from(["SECOND", "PRIM", None, 1])})
FIELD = {
    "hvha": st.booleans() | JSON, "version": st.sampled_from(["hvha 0.1.0", "hvha", ""]) | JSON,
    "systemd": st.sampled_from(["LoadState=loaded ActiveState=active", "LoadState=loaded",
                                "=", "LoadState=not-found"]) | JSON,
    "addresses": st.sampled_from(["eth0=10.77.0.100/24", "x=y z", "eth0=::1/128"]) | JSON,
    "config": st.fixed_dictionaries({}, optional={"modules": st.lists(MODULE | JSON, max_size=3),
                                                  "start_order": JSON, "node": JSON}) | JSON,
    "status": st.fixed_dictionaries({}, optional={"modules": st.lists(STATUS_MODULE | JSON,
                                                                      max_size=3),
                                                  "peer_alive": JSON, "peer": JSON}) | JSON,
}
_LAB = compile_lab()
DOC = st.fixed_dictionaries({"facts_format": st.just(1)},
                            optional={k: FIELD.get(k, JSON) for k in KEYS})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(one=DOC, two=DOC)
def test_any_facts_document_plans_without_a_traceback(one: dict[str, Any],
                                                      two: dict[str, Any]) -> None:
    desired = _LAB
    facts = {}
    for node, doc in (("node1", one), ("node2", two)):
        try:
            facts[node] = parse_facts(node, json.dumps(doc).encode())
        except FactsError:
            return
    p = plan(desired, facts)
    text = p.to_json()
    assert Plan.from_json(text).to_json() == text  # NaN != NaN: compare the serialisations


def test_a_comment_edit_changes_nothing() -> None:
    """Bundles carry effective values only: editing a comment must not restart anything."""
    edited = compile_lab([["# The two-node lab", "# The 2-node lab"]])
    p = plan(edited, _running(compile_lab()))
    assert p.changes == () or not [c for c in p.changes if c.action.value != "noop"]
    assert p.summary_line() == "No changes."
