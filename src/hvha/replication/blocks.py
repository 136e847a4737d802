"""Block-hash verify and resync of a replicated tree: the public entry points.

Why: callers (the replicator, `hvha verify`, the applier, tests, benchmarks) import one
module; the work is split by concern into modules below 400 lines each:

- hashing: block digests (xxh3_128; holes and zero blocks hash to ZERO on both sides);
- protocol: the query kinds and their encoding (batched stats/hashes; the previous
  version's one-file kinds still answered for a rolling upgrade); Entry;
- tree: TreeReader, safe dir-fd access to a tree, answering the queries;
- peer: the peer's tree through batched, asynchronous queries;
- blockplan: pure decisions (pieces, batches, which blocks differ, runs to send);
- syncer: one run's namespace walk, metadata, ops, barrier and checkpoints;
- content: the pipelined, batched content comparison;
- resync: verify() and resync().

A scattered 4 KiB change costs 4 KiB plus a few hash bytes: blocks of COARSE bytes are
compared first, then FINE blocks inside the coarse blocks that differ.
"""

from __future__ import annotations

from hvha.replication.content import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from hvha.replication.hashing import COARSE, FINE, ZERO
from hvha.replication.protocol import Entry
from hvha.replication.resync import resync, verify
from hvha.replication.syncer import Difference, ResyncAborted, ResyncStats
from hvha.replication.tree import TreeReader

__all__ = ["COARSE", "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE", "FINE", "ZERO",
           "Difference", "Entry", "ResyncAborted", "ResyncStats", "TreeReader", "resync",
           "verify"]
