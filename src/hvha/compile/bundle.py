"""Per-node bundles: the agent's configuration plus rendered module scripts, content-hashed.

A bundle is plain data (:class:`Bundle`: relative path -> bytes and mode) computed by a pure
function, then written by :func:`write_bundles`. Deterministic: sorted keys, no timestamps, no
absolute paths of the machine that compiled it, so the same input gives the same bytes and the
same hash, which ``hvha plan`` compares with what a node runs. Secrets appear only as references.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvha import __version__
from hvha.compile.graph import build_graph, module_order, start_order
from hvha.compile.render import kind_spec, render_module, runtime_paths
from hvha.model.cluster import Cluster, Module, Node

BUNDLE_FORMAT = 1
CONFIG_FILE = "agent.json"
MANIFEST_FILE = "MANIFEST.json"


@dataclass(frozen=True)
class Bundle:
    node: str
    files: dict[str, tuple[bytes, int]]
    hash: str


def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _node_dict(node: Node) -> dict[str, Any]:
    d = asdict(node)
    d["heartbeat"] = dict(node.heartbeat)
    return d


def _module_dict(cluster: Cluster, m: Module, node: Node, rank: int) -> dict[str, Any]:
    spec = kind_spec(m.kind.value)
    return {
        "name": m.name,
        "kind": m.kind.value,
        "start_rank": rank,
        "payload": {k: list(v) if isinstance(v, tuple) else v for k, v in m.payload},
        "replicated": [{"path": r.path, "exclude": list(r.exclude)} for r in m.replicated],
        "vip": None if m.vip is None else {
            "address": m.vip.address,
            "interface": dict(m.vip.interfaces).get(node.name),
        },
        "checkers": [{**asdict(c), "params": dict(c.params)} for c in m.checkers],
        "failover": asdict(m.failover),
        "stop": asdict(m.stop),
        "replication_port": m.replication_port,
        "variables": dict(m.variables),
        "depends_on": list(m.depends_on),
        "scripts": {s.name: f"modules/{m.name}/{s.file}" for s in spec.scripts},
        "runtime": runtime_paths(cluster, m),
    }


def agent_config(cluster: Cluster, node: Node, source_sha256: str) -> dict[str, Any]:
    graph = build_graph(cluster)
    ranks = {name: i for i, name in enumerate(module_order(graph))}
    by_name = {m.name: m for m in cluster.modules}
    return {
        "format": BUNDLE_FORMAT,
        "hvha_version": __version__,
        "source_sha256": source_sha256,
        "cluster": {"name": cluster.name, "secret": asdict(cluster.secret)},
        "node": _node_dict(node),
        "peer": _node_dict(cluster.peer_of(node.name)),
        "heartbeat": {**asdict(cluster.heartbeat)},
        "witness": asdict(cluster.witness),
        "replication": asdict(cluster.replication),
        "modules": [_module_dict(cluster, by_name[name], node, ranks[name])
                    for name in ranks],
        "start_order": start_order(graph),
        "defaults_applied": [{"path": p, "value": v} for p, v in cluster.defaults_applied],
    }


def build_bundle(cluster: Cluster, node: Node, source_sha256: str) -> Bundle:
    files: dict[str, tuple[bytes, int]] = {
        CONFIG_FILE: (_canonical(agent_config(cluster, node, source_sha256)), 0o600)}
    for m in cluster.modules:
        for name, (text, mode) in render_module(cluster, m, node).items():
            files[f"modules/{m.name}/{name}"] = (text.encode(), mode)
    manifest = {path: hashlib.sha256(data).hexdigest() for path, (data, _) in sorted(files.items())}
    manifest_bytes = _canonical({"format": BUNDLE_FORMAT, "node": node.name, "files": manifest})
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    files[MANIFEST_FILE] = (manifest_bytes, 0o600)
    files["BUNDLE_HASH"] = (f"{digest}\n".encode(), 0o600)
    return Bundle(node.name, files, digest)


def build_bundles(cluster: Cluster, source: bytes) -> list[Bundle]:
    sha = hashlib.sha256(source).hexdigest()
    return [build_bundle(cluster, node, sha) for node in cluster.nodes]


def write_bundles(bundles: list[Bundle], out_dir: Path) -> list[Path]:
    """Write each bundle to ``out_dir/<node>`` atomically: a reader sees the old or the new one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for bundle in bundles:
        final = out_dir / bundle.node
        tmp = Path(tempfile.mkdtemp(prefix=f".{bundle.node}.", dir=out_dir))
        try:
            os.chmod(tmp, 0o700)
            for rel, (data, mode) in sorted(bundle.files.items()):
                path = tmp / rel
                for parent in reversed(path.relative_to(tmp).parents[:-1]):
                    (tmp / parent).mkdir(mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            old = None
            if final.exists():
                old = out_dir / f".{bundle.node}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written.append(final)
    return written
