"""``plan(desired, facts) -> Plan``: the pure comparison of compiled bundles with what nodes run.

No I/O and no clock, so every case is a data test (facts in, plan out) and a saved plan can be
recomputed and compared. Per node it looks at three node resources and, per module, the
resources of the graph (``module/web``, ``driver/web``, ``vip/web``, ``rfs/web/0``,
``checker/web/http``), each compared as the part of the module dict it owns in ``agent.json``.

Disruption is judged from the agent's status on that node: a change is disruptive only if it
touches a module that is primary (PRIM or ALONE) there; when the status cannot be read from a
running agent, it is *assumed* disruptive ("possibly ..."): a plan may over-warn, never under-warn.

A running agent reloads a new bundle in place (``hvha reload``): modules that did not change are
not touched, and the per-module changes say what the new configuration does to each payload.
Only a change of the node-level sections (:data:`RESTART_SECTIONS`: heartbeat, witness, node
identity, replication) or of the agent's version needs a ``node/<n>/service`` restart, and
stopping the agent hands every module it runs to the peer: that is disruptive where modules are
primary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hvha.compile.bundle import CONFIG_FILE, Bundle
from hvha.plan.facts import NodeFacts, ServiceState, facts_digest
from hvha.plan.model import Action, Change, DesiredNode, NodePlan, Plan, PlanError

DRIVER_FIELDS = ("kind", "payload", "stop", "variables", "scripts")
OWN_RESOURCES = ("replicated", "vip", "checkers")
IGNORED = ("start_rank",)  # derived from the graph order; a new module would shift every rank
RESTARTING_FIELDS = ("payload", "variables")  # what the running payload was started with
UNEXPLAINED = ("source_sha256", "defaults_applied", "hvha_version", "format")
# agent.json sections a running agent cannot take in place (see hvha.agent reload)
RESTART_SECTIONS = ("cluster", "heartbeat", "witness", "node", "peer", "replication")


def desired_from_bundles(bundles: Sequence[Bundle],
                         build: str | None = None) -> dict[str, DesiredNode]:
    """Desired state per node, read back from the compiled bundles' ``agent.json``; ``build``
    is the source key of the package apply would install (None: compare versions only)."""
    out = {}
    for b in bundles:
        cfg = json.loads(b.files[CONFIG_FILE][0])
        out[b.node] = DesiredNode(
            node=b.node, bundle_hash=b.hash, agent_version=cfg["hvha_version"],
            modules=tuple(cfg["modules"]), start_order=tuple(cfg["start_order"]),
            config={k: v for k, v in cfg.items() if k not in ("modules", "start_order")},
            agent_build=build)
    return out


def plan(desired: Mapping[str, DesiredNode], facts: Mapping[str, NodeFacts]) -> Plan:
    """Every change per node, nodes in the order given, resources in graph order."""
    missing = [n for n in desired if n not in facts]
    if missing:
        raise PlanError(f"no facts for {', '.join(missing)}: cannot plan without knowing "
                        "what the node runs")
    changes: list[Change] = []
    nodes = {}
    for name, want in desired.items():
        changes.extend(_node(_Ctx(want, facts[name])))
        nodes[name] = NodePlan(want.bundle_hash, want.agent_version, facts_digest(facts[name]),
                               facts[name].problems)
    return Plan(tuple(changes), nodes)


@dataclass(frozen=True)
class _Ctx:
    want: DesiredNode
    facts: NodeFacts

    @property
    def node(self) -> str:
        return self.want.node

    def running(self, module: str) -> bool | None:
        """Is ``module`` primary here? None when a running agent did not tell us."""
        status = self.facts.status
        if status is not None:
            m = status.module(module)
            return m is not None and m.role.primary
        return None if self.facts.service is ServiceState.RUNNING else False

    def disturbs(self, module: str, what: str) -> tuple[bool, str]:
        running = self.running(module)
        if running is False:
            return False, ""
        if running is None:
            return True, f"possibly {what} (the agent's status is unavailable)"
        return True, what


def _node(ctx: _Ctx) -> list[Change]:
    node_level = [c for c in (_agent(ctx), _bundle(ctx), _service(ctx)) if c is not None]
    order = list(ctx.want.start_order)
    if ctx.facts.config is not None:
        seen = set(order)
        order += [a for a in ctx.facts.config.start_order if a not in seen]
    rank = {a: i for i, a in enumerate(order)}
    modules = sorted(_modules(ctx), key=lambda c: (rank.get(c.address, len(rank)), c.address))
    return node_level + modules


def _short(h: str | None) -> str:
    return "none" if h is None else h[:12]


# -- node resources ------------------------------------------------------------------------

def _agent(ctx: _Ctx) -> Change | None:
    f, want, addr = ctx.facts, ctx.want.agent_version, f"node/{ctx.node}/agent"
    if not f.installed:
        return Change(addr, ctx.node, Action.CREATE, None, {"version": want}, "not installed")
    if f.version is None:
        return Change(addr, ctx.node, Action.UPDATE, {"version": None}, {"version": want},
                      "drift: `hvha --version` fails (broken installation)", drift=True)
    if f.version != want:
        return Change(addr, ctx.node, Action.UPDATE, {"version": f.version}, {"version": want},
                      f"agent {f.version} -> {want}")
    build = ctx.want.agent_build
    # "given": installed from a wheelhouse the user built (--wheelhouse): versions decide
    if build is not None and f.build != build and f.build != "given":
        return Change(addr, ctx.node, Action.UPDATE, {"version": want, "build": f.build},
                      {"version": want, "build": build},
                      f"agent {want} rebuilt from other source ({f.build or 'unknown'} -> {build})")
    return None


def _bundle(ctx: _Ctx) -> Change | None:
    f, want, addr = ctx.facts, ctx.want.bundle_hash, f"node/{ctx.node}/bundle"
    if f.bundle_tampered:
        return Change(addr, ctx.node, Action.UPDATE, {"hash": f.bundle_pushed}, {"hash": want},
                      "drift: node.bundle was edited on the node (its content no longer "
                      "matches its .sha256)", drift=True)
    if f.bundle_pushed == want:
        return None
    if f.bundle_pushed is None:
        if f.bundle_running is None:
            return Change(addr, ctx.node, Action.CREATE, None, {"hash": want}, "not installed")
        return Change(addr, ctx.node, Action.CREATE, None, {"hash": want},
                      f"drift: no pushed bundle on the node (the agent runs "
                      f"{_short(f.bundle_running)})", drift=True)
    before: dict[str, Any] = {"hash": f.bundle_pushed}
    after: dict[str, Any] = {"hash": want}
    if f.config is None:
        what = "installed configuration unknown"
    else:
        old, new = f.config.sections, ctx.want.config
        keys = sorted(k for k in set(old) | set(new)
                      if k not in UNEXPLAINED and old.get(k) != new.get(k))
        before.update((k, old.get(k)) for k in keys)
        after.update((k, new.get(k)) for k in keys)
        if _by_name(f.config.modules) != _by_name(ctx.want.modules):
            keys.append("modules")
        what = ", ".join(keys) + " changed" if keys else (
            "module scripts changed" if old.get("source_sha256") == new.get("source_sha256")
            else "cluster file edited, no effective change")
    return Change(addr, ctx.node, Action.UPDATE, before, after,
                  f"bundle {_short(f.bundle_pushed)} -> {_short(want)}: {what}")


def _service(ctx: _Ctx) -> Change | None:
    f, n, addr = ctx.facts, ctx.node, f"node/{ctx.node}/service"
    after = {"state": "running", "bundle": ctx.want.bundle_hash,
             "version": ctx.want.agent_version}
    if f.service is ServiceState.ABSENT:
        if f.bundle_pushed is None:
            return Change(addr, n, Action.CREATE, None, after, "not installed")
        return Change(addr, n, Action.CREATE, None, after,
                      "drift: the agent is not set up to run (no systemd unit, no pid file)",
                      drift=True)
    before = {"state": f.service.value, "bundle": f.bundle_running, "version": f.version}
    if f.service is not ServiceState.RUNNING:
        return Change(addr, n, Action.UPDATE, before, after,
                      f"drift: agent {f.service.value} ({f.service_detail})", drift=True)
    reasons, drift, restart = [], False, False
    if f.bundle_running != ctx.want.bundle_hash:
        sections = _restart_sections(ctx)
        verb = ("restart to load" if sections else "reload") + (
            f" bundle {_short(ctx.want.bundle_hash)}")
        restart = bool(sections)
        if sections:
            verb += f" ({', '.join(sections)} changed: the agent cannot take that in place)"
        if f.bundle_pushed == ctx.want.bundle_hash:
            drift = True
            reasons.append(f"drift: the agent runs bundle {_short(f.bundle_running)}, "
                           f"not the pushed {_short(f.bundle_pushed)}: {verb}")
        else:
            reasons.append(verb)
    elif f.running_intact is False:
        drift = True
        reasons.append("drift: files of the running bundle were edited on the node: reload it")
    if f.version is not None and f.version != ctx.want.agent_version:
        restart = True
        reasons.append(f"restart to run agent {ctx.want.agent_version}")
    elif (ctx.want.agent_build is not None and f.installed and f.build != "given"
          and f.build != ctx.want.agent_build):
        restart = True
        reasons.append(f"restart to run agent build {ctx.want.agent_build}")
    if not reasons:
        return None
    if not restart:
        return Change(addr, n, Action.UPDATE, before, after, "; ".join(reasons), drift=drift)
    disruptive, disruption = _restart_disruption(ctx)
    return Change(addr, n, Action.UPDATE, before, after, "; ".join(reasons), disruptive,
                  disruption, drift)


def _restart_sections(ctx: _Ctx) -> list[str]:
    """Node-level sections that differ between what the agent runs and the desired bundle
    (all of them when the installed configuration is unknown)."""
    if ctx.facts.config is None:
        return ["configuration unknown"]
    old, new = ctx.facts.config.sections, ctx.want.config
    return [k for k in RESTART_SECTIONS if old.get(k) != new.get(k)]


def _restart_disruption(ctx: _Ctx) -> tuple[bool, str]:
    """Stopping the agent hands its primaries to the peer, or stops them if the peer cannot."""
    status, n = ctx.facts.status, ctx.node
    if status is None:
        return True, (f"possibly moves or stops modules running on {n} while the agent restarts "
                      "(the agent's status is unavailable)")
    peer = status.peer or "the peer"
    moved = [m.name for m in status.modules if m.role.primary
             and m.peer_role is not None and m.peer_role.value == "SECOND"
             and status.peer_alive is not False]
    stopped = [m.name for m in status.modules if m.role.primary and m.name not in moved]
    parts = []
    if moved:
        parts.append(f"moves {', '.join(moved)} to {peer}")
    if stopped:
        parts.append(f"stops {', '.join(stopped)} on {n} ({peer} cannot take over)")
    if not parts:
        return False, ""
    return True, " and ".join(parts) + " while the agent restarts"


# -- module resources ----------------------------------------------------------------------

def _items(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _by_name(modules: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(m["name"]): m for m in modules}


def split_module(m: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A module dict cut into its graph resources: address -> the fields that resource owns."""
    if m is None:
        return {}
    name = m["name"]
    out = {f"module/{name}": {k: v for k, v in m.items()
                              if k not in DRIVER_FIELDS + OWN_RESOURCES + IGNORED},
           f"driver/{name}": {k: m[k] for k in DRIVER_FIELDS if k in m}}
    for i, rep in enumerate(_items(m.get("replicated"))):
        out[f"rfs/{name}/{i}"] = rep
    if isinstance(m.get("vip"), dict):
        out[f"vip/{name}"] = m["vip"]
    for checker in _items(m.get("checkers")):
        out[f"checker/{name}/{checker.get('name')}"] = checker
    return out


def _modules(ctx: _Ctx) -> Iterator[Change]:
    f = ctx.facts
    want = _by_name(ctx.want.modules)
    fresh = "new module"
    if f.config is not None:
        have = _by_name(f.config.modules)
    elif f.bundle_running == ctx.want.bundle_hash:
        have = want  # same bundle hash, same agent.json: nothing to compare
    elif f.bundle_running is None and f.bundle_pushed is None and (
            f.service is not ServiceState.RUNNING):
        have, fresh = {}, "not installed"
    else:
        yield from _unknown(ctx, want)
        return
    for name in sorted(set(have) | set(want)):
        old, new = split_module(have.get(name)), split_module(want.get(name))
        if name not in have:
            for addr, after in new.items():
                yield Change(addr, ctx.node, Action.CREATE, None, after, fresh)
            continue
        if name not in want:
            yield from _removed(ctx, name, old)
            continue
        changes = {addr: _resource(ctx, name, addr, old.get(addr), new.get(addr))
                   for addr in set(old) | set(new) if old.get(addr) != new.get(addr)}
        drift = _vip_drift(ctx, name, have[name].get("vip"))
        if drift is not None:
            same = changes.get(drift.address)
            changes[drift.address] = drift if same is None else replace(
                same, reason=f"{same.reason}; {drift.reason}")
        yield from changes.values()


def _unknown(ctx: _Ctx, want: Mapping[str, Mapping[str, Any]]) -> Iterator[Change]:
    """The node runs a bundle whose agent.json the facts could not read: every resource may
    change, and a payload may restart. Over-warn rather than pretend the modules are new."""
    reason = "installed configuration unknown (agent.json unreadable): cannot compare"
    for name, module in sorted(want.items()):
        for addr, after in split_module(module).items():
            hit, why = (ctx.disturbs(name, f"restarts {name} on {ctx.node}")
                        if addr.startswith("driver/") else (False, ""))
            yield Change(addr, ctx.node, Action.UPDATE, None, after, reason, hit, why)


def _removed(ctx: _Ctx, name: str, old: dict[str, dict[str, Any]]) -> Iterator[Change]:
    reason = "removed from the configuration"
    for addr, before in old.items():
        hit, why = (ctx.disturbs(name, f"stops {name} on {ctx.node}")
                    if addr.startswith("module/") else (False, ""))
        yield Change(addr, ctx.node, Action.DELETE, before, None, reason, hit, why)


def _resource(ctx: _Ctx, module: str, addr: str, before: dict[str, Any] | None,
              after: dict[str, Any] | None) -> Change:
    """One changed resource of a module present on both sides, with its disruption."""
    kind, n = addr.split("/", 1)[0], ctx.node
    action = Action.CREATE if before is None else Action.DELETE if after is None else (
        Action.UPDATE)
    paths = changed_paths(before or {}, after or {})
    reason = {Action.CREATE: f"added to {module}", Action.DELETE: f"removed from {module}"}.get(
        action, _list(paths) + " changed")
    hit, why = False, ""
    b, a = before or {}, after or {}
    if kind == "driver":
        if b.get("kind") != a.get("kind"):
            action, reason = Action.REPLACE, f"kind {b.get('kind')} -> {a.get('kind')}"
            hit, why = ctx.disturbs(module, f"restarts {module} on {n} as {a.get('kind')}")
        elif any(p.split(".", 1)[0].split("[", 1)[0] in RESTARTING_FIELDS for p in paths):
            hit, why = ctx.disturbs(module, f"restarts {module} on {n}")
    elif kind == "vip":
        if action is Action.DELETE:
            hit, why = ctx.disturbs(module, f"removes VIP {b.get('address')} from {n}")
        elif b.get("address") != a.get("address") and action is Action.UPDATE:
            hit, why = ctx.disturbs(module, f"moves VIP {b.get('address')} -> {a.get('address')}"
                                    f" on {n}")
        elif action is Action.UPDATE:
            hit, why = ctx.disturbs(module, f"moves VIP {a.get('address')} from interface "
                                    f"{b.get('interface')} to {a.get('interface')} on {n}")
    elif kind == "rfs":
        if action is Action.UPDATE and b.get("path") != a.get("path"):
            action = Action.REPLACE
        if action is not Action.UPDATE:
            path = a.get("path") if after is not None else b.get("path")
            hit, why = ctx.disturbs(module, f"restarts {module} on {n} to "
                                    f"{'un' if after is None else ''}mount {path}")
    return Change(addr, n, action, before, after, reason, hit, why)


def _vip_drift(ctx: _Ctx, module: str, vip: Any) -> Change | None:
    """The VIP where the agent's role says it should be: on the primary, and only there."""
    status = ctx.facts.status
    if status is None or not isinstance(vip, dict) or not isinstance(vip.get("address"), str):
        return None
    m = status.module(module)
    held = ctx.facts.holds(vip["address"])
    if m is None or held is None or held == m.role.primary:
        return None
    where = f"{ctx.node} where {module} is {m.role.value}"
    reason = (f"drift: VIP {vip['address']} missing on {where}" if m.role.primary
              else f"drift: VIP {vip['address']} held by {where}")
    return Change(f"vip/{module}", ctx.node, Action.UPDATE, {**vip, "held": held},
                  {**vip, "held": m.role.primary}, reason, drift=True)


# -- field paths ---------------------------------------------------------------------------

def flatten(value: Any) -> dict[str, Any]:
    """Leaves of a JSON object by path (``payload.start``, ``exclude[0]``), for field-level
    diffs. Nested empty containers are leaves, so ``variables: {} -> {A: 1}`` reads as one
    change; a missing or empty top level has no fields at all."""
    out: dict[str, Any] = {}

    def walk(v: Any, path: str) -> None:
        if isinstance(v, dict) and v:
            for k in sorted(v, key=str):  # as in the JSON: a loaded plan renders the same
                walk(v[k], f"{path}.{k}" if path else str(k))
        elif isinstance(v, list) and v:
            for i, item in enumerate(v):
                walk(item, f"{path}[{i}]")
        elif path:
            out[path] = v

    walk(value, "")
    return out


def changed_paths(before: Any, after: Any) -> list[str]:
    old, new = flatten(before), flatten(after)
    return sorted(p for p in set(old) | set(new)
                  if p not in old or p not in new or old[p] != new[p])


def _list(paths: list[str]) -> str:
    if len(paths) <= 3:
        return ", ".join(paths) or "nothing"
    return f"{', '.join(paths[:3])} and {len(paths) - 3} more"
