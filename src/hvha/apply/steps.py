"""From a plan to the steps that carry it out on one node: a pure function.

The agent applies module-level changes itself when it reloads its bundle, so a node needs at
most: install or upgrade the agent package, push the bundle (and the cluster key when the node
lacks it), start, reload or restart the service, and repair drift the agent can fix in place
(a VIP missing on the primary or left on a secondary). Each step names the plan changes it
carries out, so progress and errors point back to the plan the user approved.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hvha.plan.model import Action, Change, Plan


class Kind(StrEnum):
    AGENT = "agent"  # install or upgrade the package in the node's venv
    BUNDLE = "bundle"  # push <etc>/node.bundle (+ .sha256) atomically
    START = "start"  # install and start the service (systemd unit or supervised process)
    RELOAD = "reload"  # the running agent loads the pushed bundle in place
    RESTART = "restart"  # stop (hands primaries to the peer) and start again
    REPAIR = "repair"  # the agent re-checks VIPs against its roles


@dataclass(frozen=True)
class Step:
    node: str
    kind: Kind
    addresses: tuple[str, ...]  # the plan changes this step carries out
    disruptive: bool = False
    why: str = ""


def node_steps(plan: Plan, node: str) -> list[Step]:
    """The steps for ``node``, in the order they must run (each needs the ones before)."""
    changes = plan.for_node(node)
    by_addr = {c.address: c for c in changes}
    agent = by_addr.get(f"node/{node}/agent")
    bundle = by_addr.get(f"node/{node}/bundle")
    service = by_addr.get(f"node/{node}/service")
    steps: list[Step] = []
    if agent is not None:
        steps.append(Step(node, Kind.AGENT, (agent.address,), why=agent.reason))
    if bundle is not None:
        steps.append(Step(node, Kind.BUNDLE, (bundle.address,), why=bundle.reason))
    module_changes = tuple(c.address for c in changes if not c.address.startswith("node/"))
    if service is not None:
        steps.append(_service_step(node, service, agent, module_changes))
    vip_drift = tuple(c.address for c in changes
                      if c.address.startswith("vip/") and c.drift and c.action is Action.UPDATE)
    # a started or restarted agent places its VIPs itself; a running one is asked to
    if vip_drift and (not steps or steps[-1].kind in (Kind.BUNDLE, Kind.RELOAD)):
        steps.append(Step(node, Kind.REPAIR, vip_drift, why="VIP not where the roles say"))
    return steps


def _service_step(node: str, service: Change, agent: Change | None,
                  module_changes: tuple[str, ...]) -> Step:
    addresses = (service.address, *module_changes)
    before = service.before or {}
    if service.action is Action.CREATE or before.get("state") != "running":
        return Step(node, Kind.START, addresses, why=service.reason)
    if agent is not None:
        return Step(node, Kind.RESTART, addresses, service.disruptive, service.reason)
    return Step(node, Kind.RELOAD, addresses, service.disruptive, service.reason)
