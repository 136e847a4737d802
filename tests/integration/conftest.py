"""Fixtures shared by the replication integration tests."""

from __future__ import annotations

import pytest

from hvha.replication import tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.NodeCreds]:
    """A cluster CA with node1..node3, and a "node1" from another CA (rogue)."""
    base = tmp_path_factory.mktemp("pki")
    tls.create_ca(base / "ca")
    tls.create_ca(base / "other-ca")
    return {"node1": tls.issue_node_cert(base / "ca", "node1", base / "n1"),
            "node2": tls.issue_node_cert(base / "ca", "node2", base / "n2"),
            "node3": tls.issue_node_cert(base / "ca", "node3", base / "n3"),
            "rogue": tls.issue_node_cert(base / "other-ca", "node1", base / "rogue")}
