"""The replication TLS credentials apply hands to each node.

Why here: mutual TLS between the nodes' mirrors needs a per-cluster CA. Its key stays on the
controller (``$HVHA_CA_DIR`` or ``~/.config/hvha/<cluster>/ca``, created 0700/0600 on first
use, like an SSH key); each node receives only its own certificate and key (0600) and the CA
certificate, in ``<state>/tls/``. A node whose CA certificate already matches keeps its
credentials: a second apply pushes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from hvha.model.cluster import Cluster
from hvha.replication import tls


def ca_dir(cluster: Cluster) -> Path:
    base = os.environ.get("HVHA_CA_DIR")
    if base:
        return Path(base)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "hvha" / cluster.name / "ca"


def needed(cluster: Cluster) -> bool:
    return any(m.replicated for m in cluster.modules)


def ensure_ca(cluster: Cluster) -> Path:
    d = ca_dir(cluster)
    if not (d / "ca.key").exists():
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls.create_ca(d, cluster.name)
    return d


def ca_sha256(ca: Path) -> str:
    return hashlib.sha256((ca / "ca.crt").read_bytes()).hexdigest()


def node_files(ca: Path, node: str) -> dict[str, tuple[bytes, int]]:
    """A fresh certificate and key for ``node``: file name -> (content, mode)."""
    with tempfile.TemporaryDirectory(prefix="hvha-tls-") as tmp:
        creds = tls.issue_node_cert(ca, node, tmp)
        return {"ca.crt": (creds.ca_cert.read_bytes(), 0o644),
                f"{node}.crt": (creds.cert.read_bytes(), 0o644),
                f"{node}.key": (creds.key.read_bytes(), 0o600)}
