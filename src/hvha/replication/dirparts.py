"""Small parts of a replicated directory that replicator.py wires together.

Why a module of its own: replicator.py owns the lifecycle of a directory (applier, guard, mount,
stream, worker) and had outgrown one file; these parts have no lifecycle of their own: the
settings of a module's replication, the TLS files lookup, and the secondary's applier extended
with the "hvha-synced" query and a pause for operator actions on its tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hvha.replication import tls, wire
from hvha.replication.applier import Applier
from hvha.replication.treewriter import TreeWriter

SYNCED_QUERY = "hvha-synced"


def creds_for(tls_dir: Path, node: str) -> tls.NodeCreds | None:
    """This node's TLS files (ca.crt, <node>.crt, <node>.key as written by tls.issue_node_cert),
    or None if one is missing."""
    c = tls.NodeCreds(tls_dir / "ca.crt", tls_dir / f"{node}.crt", tls_dir / f"{node}.key", node)
    return c if all(p.exists() for p in (c.ca_cert, c.cert, c.key)) else None


@dataclasses.dataclass
class Settings:
    module: str
    node: str
    peer: str
    my_address: str
    peer_address: str
    creds: tls.NodeCreds
    state_dir: Path
    zone_size: int
    streams: int
    timeout: float
    connect_timeout: float
    retry: float
    bandwidth: int = 0  # resync cap in bytes/s, 0: none
    # before acknowledging writes alone: record at the witness that the peer's copy is
    # outdated (True when recorded); None: nothing to fence with (no witness, tests)
    fence: Callable[[], bool] | None = None
    peer_alive: Callable[[], bool] | None = None  # heartbeats' verdict, to skip a doomed connect


class SyncedTree(TreeWriter):
    """The applier's tree, plus the "hvha-synced" query (the resync into this copy finished)."""

    def __init__(self, root: str | Path, on_synced: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(root)
        self.on_synced = on_synced

    def query(self, payload: bytes) -> bytes:
        if b'"q":"' + SYNCED_QUERY.encode() + b'"' in payload:
            try:
                self.on_synced(wire.decode_json(payload)["generations"])
            except (OSError, ValueError, KeyError, TypeError, wire.WireError) as exc:
                return b"\1" + f"{type(exc).__name__}: {exc}".encode()
            return b"\0true"
        return super().query(payload)


class DirApplier(Applier):
    def __init__(self, root: Path, on_synced: Callable[[dict[str, Any]], None],
                 **kw: Any) -> None:
        super().__init__(root, **kw)
        self.tree.close()
        self.tree = SyncedTree(root, on_synced)

    @contextlib.contextmanager
    def paused(self, timeout: float = 5.0) -> Iterator[TreeWriter]:
        """No primary's session applies anything while the caller works on the tree (a
        session holds the apply lock while it is served); the tree's cached descriptors are
        dropped afterwards. Raises TimeoutError if a session is being served."""
        lock = self._apply_lock  # the Applier's own: held for the whole of a served session
        if not lock.acquire(timeout=timeout):
            raise TimeoutError("a primary's session is being served")
        try:
            yield self.tree
        finally:
            self.tree.forget("")
            lock.release()
