"""Synchronous replication of a module's directories to the peer (the mirror).

Layers, lowest first: ops (the mutation vocabulary), wire (framing + TLS), dirty (persistent
dirty maps and namespace journal while the peer is away), generations (what to do at
reconnect), blocks (block-hash verify and resync), mirrorfs (the FUSE file system on the
primary), applier (the secondary's side), replicator (the agent's Replicator port)."""
