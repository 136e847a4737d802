"""From the agent's configuration (agent.json) to a module's MirrorReplicator, and TLS setup.

Why it exists: the agent's port builder (agent/ports.py) should not know replication's file
layout or ports. `build_replicator` reads the plain dicts of agent.json and returns a
Replicator, or None when this node cannot replicate yet (TLS files missing): the caller then
falls back to PendingReplication and logs why. `init_tls` is what `hvha tls init` runs.

TLS files: <state_dir>/tls/ca.crt, <node>.crt, <node>.key (0600), as written by
`tls.issue_node_cert`. Ports: directory i of a module listens on port + i, where port is the
module's `replication_port`; modules that share the cluster's port are spread by their order
among the replicated modules of agent.json (same order on both nodes), so each directory of
each module gets its own port: port + (directories of the modules before it) + i.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvha.replication import tls
from hvha.replication.replicator import MirrorReplicator, creds_for

log = logging.getLogger("hvha.replication")


def replication_network(config: dict[str, Any]) -> str:
    """The heartbeat network that carries replication (`replication: true`; else the first)."""
    nets = config["heartbeat"]["networks"]
    if not nets:
        raise ValueError("no heartbeat network: replication needs one (heartbeat.networks)")
    for net in nets:
        if net.get("replication"):
            return str(net["name"])
    return str(nets[0]["name"])


def module_port(module: dict[str, Any], config: dict[str, Any]) -> int:
    """The first port of this module's directories (pure; see the module docstring)."""
    base = int(config["replication"]["port"])
    port = int(module.get("replication_port") or base)
    if port != base:
        return port
    offset = 0
    for m in config.get("modules", []):
        if m["name"] == module["name"]:
            break
        if m.get("replicated") and int(m.get("replication_port") or base) == base:
            offset += len(m["replicated"])
    return base + offset


def build_replicator(module: dict[str, Any], config: dict[str, Any], state_dir: Path, *,
                     fence: Callable[[str], bool] | None = None,
                     peer_alive: Callable[[], bool] | None = None) -> MirrorReplicator | None:
    """The module's MirrorReplicator, or None if this node has no TLS files yet (in
    <state_dir>/tls/) or the module replicates nothing."""
    if not module.get("replicated"):
        return None
    node, peer = config["node"]["name"], config["peer"]["name"]
    tls_dir = Path(state_dir) / "tls"
    if creds_for(tls_dir, node) is None:
        log.warning("module %s: no TLS files for %s in %s: replication is off; create them "
                    "with `hvha tls init`", module["name"], node, tls_dir)
        return None
    net = replication_network(config)
    rep = config["replication"]
    return MirrorReplicator(
        module["name"], [r["path"] for r in module["replicated"]], node=node, peer=peer,
        my_address=config["node"]["heartbeat"][net], peer_address=config["peer"]["heartbeat"][net],
        port=module_port(module, config), tls_dir=tls_dir, state_dir=state_dir,
        zone_size=int(rep.get("zone_size") or 1 << 20), streams=int(rep.get("streams") or 2),
        fence=fence, peer_alive=peer_alive,
        excludes=[list(r.get("exclude") or ()) for r in module["replicated"]])


def init_tls(ca_dir: str | Path, nodes: list[str], out: str | Path,
             cluster: str = "hvha") -> dict[str, Path]:
    """Create the cluster CA in ca_dir (unless it exists) and issue one certificate per node
    into <out>/<node>/ (ca.crt, <node>.crt, <node>.key). Copy each node's directory to
    <state_dir>/tls/ on that node (e.g. /var/lib/hvha/tls/). Keep ca_dir (ca.key) off the
    nodes. Returns {node: its directory}."""
    ca = Path(ca_dir)
    if not (ca / "ca.key").exists():
        tls.create_ca(ca, cluster)
    dirs = {}
    for n in nodes:
        tls.issue_node_cert(ca, n, Path(out) / n)
        dirs[n] = Path(out) / n
    return dirs
