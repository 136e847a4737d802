"""The pure parts of apply: plan -> steps, what reconcile withholds, when modules count as
settled, the supervisor's backoff, and interval parsing."""

from __future__ import annotations

import pytest
from tests.unit.test_plan_diff import load_case

from hvha.agent.supervise import BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER, next_backoff
from hvha.apply.reconcile import parse_interval, withhold_disruptive
from hvha.apply.run import unsettled
from hvha.apply.steps import Kind, node_steps
from hvha.plan import plan
from hvha.plan.model import Action, Change, NodePlan, Plan


def _kinds(p: Plan, node: str) -> list[Kind]:
    return [s.kind for s in node_steps(p, node)]


def test_fresh_nodes_install_push_and_start() -> None:
    p = plan(*load_case("fresh-nodes"))
    assert _kinds(p, "node1") == [Kind.AGENT, Kind.BUNDLE, Kind.START]
    start = node_steps(p, "node1")[-1]
    assert "module/web" in start.addresses  # the module comes up with the service


def test_a_module_change_is_a_bundle_push_and_a_reload() -> None:
    p = plan(*load_case("payload-changed-prim"))
    assert _kinds(p, "node1") == [Kind.BUNDLE, Kind.RELOAD]


def test_a_stopped_agent_is_started_again() -> None:
    p = plan(*load_case("agent-stopped"))
    assert Kind.START in [s.kind for n in p.nodes for s in node_steps(p, n)]


def test_no_change_no_step() -> None:
    p = plan(*load_case("up-to-date"))
    assert not p.has_changes
    assert all(node_steps(p, n) == [] for n in p.nodes)


def _change(addr: str, node: str = "node1", disruptive: bool = False, drift: bool = False,
            action: Action = Action.UPDATE) -> Change:
    return Change(addr, node, action, {"a": 1}, {"a": 2}, "why", disruptive,
                  "moves web" if disruptive else "", drift)


def test_vip_drift_case_is_repaired_by_the_agent() -> None:
    p = plan(*load_case("vip-drift"))
    assert {n: _kinds(p, n) for n in p.nodes} == {"node1": [Kind.REPAIR], "node2": [Kind.REPAIR]}


def test_vip_drift_alone_is_repaired_in_place() -> None:
    p = Plan((_change("vip/web", drift=True),), {"node1": NodePlan("b", "v", "d")})
    assert [s.kind for s in node_steps(p, "node1")] == [Kind.REPAIR]


def test_reconcile_withholds_disruptive_changes_and_their_service_step() -> None:
    p = Plan((_change("node/node1/bundle"), _change("node/node1/service"),
              _change("driver/web", disruptive=True), _change("node/node2/bundle", "node2"),
              _change("node/node2/service", "node2")),
             {"node1": NodePlan("b", "v", "d"), "node2": NodePlan("b", "v", "d")})
    kept, held = withhold_disruptive(p)
    assert [c.address for c in kept.changes] == [
        "node/node1/bundle", "node/node2/bundle", "node/node2/service"]
    assert held == ["node1 driver/web: moves web"]
    assert _kinds(kept, "node1") == [Kind.BUNDLE]  # pushed, not loaded: nothing moves


def _st(*mods: tuple[str, str, str]) -> dict[str, object]:
    return {"modules": [{"module": m, "role": r, "reason": why} for m, r, why in mods]}


def test_settled_means_one_primary_and_one_secondary() -> None:
    assert unsettled({"node1": _st(("web", "PRIM", "")),
                      "node2": _st(("web", "SECOND", ""))}) == []
    assert unsettled({"node1": _st(("web", "WAIT", "asking")),
                      "node2": _st(("web", "SECOND", ""))}) != []
    # both starting up is not "stopped by the operator"
    assert unsettled({"node1": _st(("web", "STOP", "not started")),
                      "node2": _st(("web", "STOP", "not started"))}) != []
    assert unsettled({"node1": _st(("web", "STOP", "stopped by the operator")),
                      "node2": _st(("web", "STOP", "stopped by the operator"))}) == []
    assert unsettled({"node1": _st(("web", "PRIM", "")),
                      "node2": _st(("web", "PRIM", ""))}) != []  # never settled: dual primary
    assert unsettled({"node1": _st(("web", "ALONE", "")), "node2": None}) == []
    assert unsettled({"node1": _st(("web", "ALONE", "peer in resync")),
                      "node2": _st(("web", "SECOND", ""))}) != []


def test_supervisor_backoff_doubles_then_resets() -> None:
    d = next_backoff(0.0, 0.5)
    assert d == BACKOFF_FIRST
    for _ in range(10):
        d = next_backoff(d, 0.5)
    assert d == BACKOFF_MAX
    assert next_backoff(d, STABLE_AFTER + 1) == BACKOFF_FIRST


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("1m30s", 90), ("1h", 3600)])
def test_interval(text: str, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["30", "0s", "abc", "-1s"])
def test_bad_interval(text: str) -> None:
    with pytest.raises(ValueError):
        parse_interval(text)


def test_same_version_built_from_other_source_is_reinstalled_and_restarted() -> None:
    from dataclasses import replace

    desired, facts = load_case("up-to-date")
    rebuilt = {n: replace(d, agent_build="newsource") for n, d in desired.items()}
    p = plan(rebuilt, facts)
    agent = next(c for c in p.changes if c.address == "node/node1/agent")
    assert "rebuilt from other source" in agent.reason
    assert _kinds(p, "node1") == [Kind.AGENT, Kind.RESTART]
    same = {n: replace(d, agent_build=None) for n, d in desired.items()}
    assert not plan(same, facts).has_changes  # without a source tree: versions only


def test_windows_nodes_are_refused_before_any_connection(capsys: pytest.CaptureFixture[str]) \
        -> None:
    from hvha.cli.main import main

    assert main(["plan", "examples/hyperv-two-vms.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Windows nodes cannot be planned or applied yet" in err and "Traceback" not in err
