"""The peer's tree as the resync sees it: batched queries on the ordered stream.

Why: every question to the peer costs a round trip, so questions are asked many at a time
(stats of many paths, hashes of many files and ranges in one query) and asynchronously (the
caller hashes its own copy while the peer answers). A peer one version older does not know
the batched kinds; its "unknown query" answer switches this client to the one-file queries
(slower, still correct) for the rest of the run: a rolling upgrade may update the primary
first.
"""

from __future__ import annotations

import json
from concurrent.futures import Future

from hvha.replication import protocol
from hvha.replication.protocol import Entry, HashResult, Ranges
from hvha.replication.stream import Stream, unwrap

STATS_BATCH = 4096  # paths per stats query
LIST_LIMIT = 20000  # entries per list query


def _unknown(exc: OSError) -> bool:
    return not isinstance(exc, ConnectionError) and protocol.UNKNOWN in str(exc)


class PendingHashes:
    """The answer to a hashes question, on its way: result() waits for it."""

    def __init__(self, peer: Peer, items: list[tuple[str, Ranges]], bs: int) -> None:
        self.peer, self.items, self.bs = peer, items, bs
        self._batch: Future[bytes] | None = None
        self._single: list[Future[bytes]] = []
        if peer.legacy:
            self._single = peer.single_hashes(items, bs)
        elif items:
            self._batch = peer.ask(protocol.hashes_request(items, bs))

    def result(self) -> list[HashResult]:
        timeout = self.peer.timeout
        if self._batch is not None:
            try:
                return protocol.decode_hashes(unwrap(self._batch.result(timeout)), self.items,
                                              self.bs)
            except OSError as exc:
                if not _unknown(exc):
                    raise
                self.peer.legacy = True
                self._single = self.peer.single_hashes(self.items, self.bs)
        out: list[HashResult] = []
        for fut in self._single:
            try:
                out.append(unwrap(fut.result(timeout)))
            except ConnectionError:
                raise
            except OSError as exc:
                out.append(str(exc))
        return out


class Peer:
    """The peer's tree, through queries on the ordered stream (answers reflect every op
    enqueued before the question)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.legacy = False  # the peer only knows the one-file queries
        self.queries = 0  # questions asked (for tests and statistics)

    @property
    def timeout(self) -> float:
        return self.stream.timeout * 6

    def ask(self, request: dict[str, object]) -> Future[bytes]:
        self.queries += 1
        return self.stream.query_async(request)

    def single_hashes(self, items: list[tuple[str, Ranges]], bs: int) -> list[Future[bytes]]:
        futs = [self.ask({"q": "hash", "path": p, "ranges": [list(r) for r in rs], "bs": bs})
                for p, rs in items]
        self.stream.flush()
        return futs

    def hashes(self, items: list[tuple[str, Ranges]], bs: int) -> PendingHashes:
        """Ask for the digests of many files' ranges at once (answered in order)."""
        return PendingHashes(self, items, bs)

    def stats(self, paths: list[str]) -> list[Entry | None]:
        """The peer's entries of many paths (None: no such entry), a few queries in all."""
        if not self.legacy:
            chunks = [paths[i:i + STATS_BATCH] for i in range(0, len(paths), STATS_BATCH)]
            futs = [self.ask(protocol.stats_request(c)) for c in chunks]
            self.stream.flush()
            try:
                return [e for f in futs for e in protocol.decode_stats(unwrap(
                    f.result(self.timeout)))]
            except OSError as exc:
                if not _unknown(exc):
                    raise
                self.legacy = True
        futs = [self.ask({"q": "stat", "path": p}) for p in paths]
        self.stream.flush()
        out: list[Entry | None] = []
        for f in futs:
            v = json.loads(unwrap(f.result(self.timeout)))
            out.append(None if v is None else Entry.from_list(v))
        return out

    def stat(self, path: str) -> Entry | None:
        return self.stats([path])[0]

    def list_dir(self, path: str, first: Future[bytes] | None = None) -> list[Entry]:
        """The peer's entries of a directory, sorted by name (first: the answer to an earlier
        list_ahead(path), if any)."""
        out: list[Entry] = []
        more, start = True, 0
        while more:
            fut = first if first is not None and start == 0 else None
            if fut is None:
                fut = self.ask(protocol.list_request(path, start, LIST_LIMIT))
                self.stream.flush()
            more, entries = json.loads(unwrap(fut.result(self.timeout)))
            out += [Entry.from_list(e) for e in entries]
            start += LIST_LIMIT
        return out

    def list_ahead(self, path: str) -> Future[bytes]:
        """Ask for the first page of a directory now; pass the answer to list_dir later."""
        return self.ask(protocol.list_request(path, 0, LIST_LIMIT))
