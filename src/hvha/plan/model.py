"""The plan as data: what would change on each node, why, and whether it disturbs a running module.

A :class:`Plan` is computed by :func:`hvha.plan.diff.plan` (pure), rendered by
:mod:`hvha.plan.render`, saved as JSON for review or CI, and executed by ``apply``. It is plain,
frozen data so that a saved plan means exactly what it showed: ``apply`` re-gathers the facts
and refuses a saved plan whose ``facts_digest`` no longer matches (the nodes moved on since).

JSON format, version 1 (:meth:`Plan.to_json`; keys always in this order)::

    {
      "format_version": 1,
      "nodes": {"<node>": {"bundle": "<desired bundle hash>",
                           "agent_version": "<desired agent version>",
                           "facts_digest": "<sha256 of the facts the plan was made from>",
                           "notes": ["<oddities seen in the facts>"]}},
      "changes": [{"node": "node1", "address": "driver/web",
                   "action": "create|update|delete|replace", "symbol": "+|~|-|-/+",
                   "reason": "payload.start changed", "drift": false,
                   "disruptive": true, "disruption": "restarts web on node1",
                   "before": {...} | null, "after": {...} | null}],
      "summary": {"add": 0, "change": 1, "destroy": 0, "disruptive": 1, "drift": 0},
      "source": {"file": "/abs/cluster.yaml", "sha256": "..."}   (only in saved plans)
    }

``before``/``after`` are JSON objects (keys sorted) or null for "does not exist". ``summary``
counts a replace as one add and one destroy, as Terraform does. Readers must reject a
``format_version`` they do not know; new optional keys may be added within a version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

FORMAT_VERSION = 1

Json = Any  # a decoded JSON value: dict, list, str, int, float, bool or None


class PlanError(Exception):
    """The plan cannot be computed (e.g. a node without facts), or a saved plan is unreadable."""


class Action(StrEnum):
    """What happens to one resource. The value is the JSON spelling; :attr:`symbol` the text."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    REPLACE = "replace"
    NOOP = "noop"

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {Action.CREATE: "+", Action.UPDATE: "~", Action.DELETE: "-", Action.REPLACE: "-/+",
            Action.NOOP: " "}


@dataclass(frozen=True)
class DesiredNode:
    """What one node should run, taken from its compiled bundle (see ``desired_from_bundles``).

    ``modules`` are the module dicts of the bundle's ``agent.json``, as the agent reads them;
    ``config`` the rest of it (heartbeat, witness, node...), used to say why a bundle changed.
    """

    node: str
    bundle_hash: str
    agent_version: str
    modules: tuple[Mapping[str, Json], ...]
    start_order: tuple[str, ...] = ()
    config: Mapping[str, Json] = field(default_factory=dict)
    # the source tree's key when hvha runs from one (see hvha.apply.package): a node whose
    # agent was built from other source is upgraded even though the version is the same
    agent_build: str | None = None


@dataclass(frozen=True)
class Change:
    """One resource on one node that differs from what it should be.

    ``drift`` marks a change that undoes something the nodes did on their own (agent stopped,
    VIP missing, bundle not loaded) rather than a change of the configuration; ``reason`` then
    starts with ``drift:``. ``disruption`` says in words what a running module suffers
    ("restarts web on node1"); it is empty when ``disruptive`` is false.
    """

    address: str
    node: str
    action: Action
    before: Json
    after: Json
    reason: str
    disruptive: bool = False
    disruption: str = ""
    drift: bool = False


@dataclass(frozen=True)
class Summary:
    add: int = 0
    change: int = 0
    destroy: int = 0
    disruptive: int = 0
    drift: int = 0


@dataclass(frozen=True)
class NodePlan:
    """Per node: the desired bundle and agent, and the digest of the facts the plan saw."""

    bundle: str
    agent_version: str
    facts_digest: str
    notes: tuple[str, ...] = ()  # oddities in the facts (see NodeFacts.problems), shown to users


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    nodes: Mapping[str, NodePlan]
    # set by `hvha plan -out`: {"file": absolute path of the cluster file, "sha256": its hash},
    # so `hvha apply plan.json` finds the configuration and refuses it if it was edited since
    source: Mapping[str, str] | None = None

    @property
    def has_changes(self) -> bool:
        return any(c.action is not Action.NOOP for c in self.changes)

    @property
    def summary(self) -> Summary:
        add = change = destroy = 0
        for c in self.changes:
            add += c.action in (Action.CREATE, Action.REPLACE)
            destroy += c.action in (Action.DELETE, Action.REPLACE)
            change += c.action is Action.UPDATE
        return Summary(add, change, destroy, sum(c.disruptive for c in self.changes),
                       sum(c.drift for c in self.changes))

    def summary_line(self) -> str:
        """Terraform's wording, so that people and log scrapers read it without learning."""
        if not self.has_changes:
            return "No changes."
        s = self.summary
        return f"Plan: {s.add} to add, {s.change} to change, {s.destroy} to destroy."

    def for_node(self, node: str) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.node == node)

    def to_dict(self) -> dict[str, Json]:
        s = self.summary
        return {
            "format_version": FORMAT_VERSION,
            "nodes": {name: {"bundle": n.bundle, "agent_version": n.agent_version,
                             "facts_digest": n.facts_digest, "notes": list(n.notes)}
                      for name, n in self.nodes.items()},
            "changes": [_change_dict(c) for c in self.changes],
            "summary": {"add": s.add, "change": s.change, "destroy": s.destroy,
                        "disruptive": s.disruptive, "drift": s.drift},
            **({"source": dict(self.source)} if self.source is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Read a saved plan; a damaged or foreign file is a :class:`PlanError`, not a crash."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PlanError(f"not a plan file (invalid JSON: {exc})") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Json) -> Plan:
        if not isinstance(doc, dict) or "format_version" not in doc:
            raise PlanError("not a plan file (no format_version)")
        version = doc["format_version"]
        if version != FORMAT_VERSION:
            raise PlanError(f"plan format {version!r} is not supported by this hvha "
                            f"(it reads format {FORMAT_VERSION}): re-run `hvha plan`")
        try:
            nodes = {str(name): NodePlan(_str(n["bundle"]), _str(n["agent_version"]),
                                         _str(n["facts_digest"]),
                                         tuple(_str(t) for t in _list(n.get("notes", []))))
                     for name, n in _obj(doc["nodes"]).items()}
            changes = tuple(_change_from(c) for c in _list(doc["changes"]))
            source = doc.get("source")
            if source is not None:
                source = {"file": _str(source["file"]), "sha256": _str(source["sha256"])}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"damaged plan file: {type(exc).__name__}: {exc}") from None
        plan = cls(changes, nodes, source)
        if "summary" in doc and doc["summary"] != plan.to_dict()["summary"]:
            raise PlanError("damaged plan file: its summary does not match its changes")
        return plan


def _sorted(value: Json) -> Json:
    """Keys sorted at every depth: the same plan always serialises to the same bytes."""
    if isinstance(value, dict):
        return {str(k): _sorted(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def _change_dict(c: Change) -> dict[str, Json]:
    return {"node": c.node, "address": c.address, "action": c.action.value,
            "symbol": c.action.symbol, "reason": c.reason, "drift": c.drift,
            "disruptive": c.disruptive, "disruption": c.disruption,
            "before": _sorted(c.before), "after": _sorted(c.after)}


def _change_from(d: Json) -> Change:
    d = _obj(d)
    return Change(address=_str(d["address"]), node=_str(d["node"]), action=Action(d["action"]),
                  before=d.get("before"), after=d.get("after"), reason=_str(d["reason"]),
                  disruptive=_bool(d.get("disruptive", False)),
                  disruption=_str(d.get("disruption", "")), drift=_bool(d.get("drift", False)))


def _obj(v: Json) -> dict[str, Json]:
    if not isinstance(v, dict):
        raise TypeError(f"expected an object, got {type(v).__name__}")
    return v


def _list(v: Json) -> list[Json]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def _str(v: Json) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _bool(v: Json) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {type(v).__name__}")
    return v
