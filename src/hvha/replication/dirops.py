"""Operator commands on a replicated module: verify, forced full resync, split-brain
resolution, forced promotion (`hvha verify|resync|resolve|prim --force`).

Why a module of its own: replicator.py runs the engine for each directory; these are what an
operator asks of it, kept apart so the engine stays readable. `DirOps` is a mixin of the
replicator's per-directory class (the attributes it uses are declared below); the functions at
the end run a command over every directory of a module and shape the agent's reply. The rules
(who may discard what, what a discarded copy's generations are) are in admin.py.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hvha.replication import admin, blocks, localfault
from hvha.replication.admin import OperatorError
from hvha.replication.dirgens import DirGenerations
from hvha.replication.dirparts import DirApplier, Settings
from hvha.replication.exclude import Excludes
from hvha.replication.generations import Generations
from hvha.replication.stream import Mode, Stream, StreamDown

log = logging.getLogger("hvha.replication")


class DirOps(DirGenerations):
    """Operator commands of one replicated directory (base of replicator._Dir)."""

    s: Settings
    path: Path
    ident: str
    state: Path
    gens: Generations
    primary: bool
    peer_synced: bool
    refused: str
    conflict: str
    full_requested: bool
    discard_peer: bool
    fault: str  # this copy's disk failed, as primary or secondary (localfault); "" if not
    _fault_file: Path
    unclean: bool  # the next resync compares everything
    _busy: str  # why sessions are refused right now ("": they are not)
    _lock: threading.RLock
    _wake: threading.Event
    applier: DirApplier
    stream: Stream | None
    backing_fd: int
    excludes: Excludes

    def _discard(self) -> Path:
        """Move this secondary's copy aside; it takes the peer's data at the next session."""
        with self._lock:
            if self.primary:
                raise OperatorError(f"{self.s.node} is primary for {self.s.module}: make it "
                                    "secondary first")
            if self._busy.startswith(stopping := f"{self.s.node} is stopping"):
                raise OperatorError(f"{stopping} the replication of {self.s.module}: retry "
                                    "once its agent runs")
            busy = self._busy = f"{self.s.node} is moving its copy of {self.s.module} aside"
        try:
            with self.applier.paused() as tree:
                aside = admin.move_aside(tree.root_fd, self.path)
            with self._lock:
                self.gens = admin.discarded()
                self._save()
                self.conflict = self.refused = ""
                self.peer_synced = False
            for name in ("dirty.log", "dirty.taken.log", "dirty.taken.tmp", "resync.checkpoint"):
                (self.state / name).unlink(missing_ok=True)  # changes to the discarded data
        except TimeoutError:
            raise OperatorError(f"{self.s.peer} is replicating into {self.path} right now: "
                                "there is no conflict to resolve (`hvha status`)") from None
        finally:
            with self._lock:
                if self._busy == busy:
                    self._busy = ""
        log.warning("replication %s: this copy was DISCARDED by the operator (kept in %s); "
                    "it takes %s's data by a full resync", self.ident, aside, self.s.peer)
        return aside

    # -- operator commands (blocking)
    def _primary_stream(self, what: str) -> Stream:
        st = self.stream
        if not self.primary or st is None:
            raise OperatorError(f"{self.s.node} is not primary for {self.s.module}: run "
                                f"`hvha {what} {self.s.module}` on the primary")
        return st

    def verify(self) -> list[blocks.Difference]:
        st = self._primary_stream("verify")
        if st.mode is Mode.ALONE:
            raise OperatorError(f"{self.path}: {self.s.peer} is not connected ({st.last_error})"
                                ": nothing to compare with; see `hvha status`")
        try:
            return blocks.verify(st, self.backing_fd, streams=self.s.streams,
                                 excludes=self.excludes)
        except (StreamDown, OSError, TimeoutError) as exc:
            raise OperatorError(f"{self.path}: verify interrupted ({type(exc).__name__}: {exc})"
                                "; run it again once `hvha status` shows the peer") from None

    def force_full(self) -> str:
        st = self._primary_stream("resync --full")
        self.full_requested = True
        if st.mode is Mode.ALONE:
            self._wake.set()
            return f"{self.path}: full resync when {self.s.peer} connects ({st.last_error})"
        st.detach("full resync asked by the operator")  # reconnects, then resyncs in full
        return f"{self.path}: full resync started (progress in `hvha status`)"

    def _forget_fault(self) -> str:
        """Drop the recorded disk fault (memory, marker, the applier's latch); the old text.
        Call holding _lock."""
        fault, self.fault = self.fault, ""
        self._fault_file.unlink(missing_ok=True)
        self.applier.faults.reset()
        return fault

    def clear_fault(self) -> str:
        """`hvha resolve M --discard ME` on a node whose disk failed (localfault): the operator
        repaired it. The copy stays; it is unclean, so the peer's next session compares
        everything and rewrites what differs."""
        with self._lock:
            fault = self._forget_fault()
            self.conflict, self.refused, self.unclean = "", "", True
        if not self.primary:  # the compare must read what the disk holds, not the cache
            localfault.drop_cached(self.path)
        log.warning("replication %s: the operator cleared the disk fault (%s): %s's next "
                    "session rewrites this copy by a full compare", self.ident, fault,
                    self.s.peer)
        return (f"{self.path}: disk fault cleared; {self.s.peer} rewrites what differs by a "
                "full compare at its next connection")

    def ask_peer_discard(self) -> str:
        self._primary_stream("resolve")
        if not self.conflict:
            raise OperatorError(f"{self.path}: no conflict with {self.s.peer} seen (yet); "
                                "see `hvha status`")
        self.discard_peer = True
        self._wake.set()
        return f"{self.path}: {self.s.peer} discards its copy at the next connection"

    def force_good(self) -> bool:
        """`hvha prim --force`: declare this copy good. True if it was half-synced or on a
        disk that failed (localfault)."""
        with self._lock:
            fault, half = self._forget_fault(), self.gens.inconsistent
            if half:
                self.gens = admin.forced(self.gens)
                self._save()
        if fault:
            log.warning("replication %s: FORCED: this copy is taken as good although its disk "
                        "failed (%s)", self.ident, fault)
        if half:
            log.warning("replication %s: FORCED: this copy is half-synced (a resync from %s did "
                        "not finish) and is now taken as good data", self.ident, self.s.peer)
        return bool(fault) or half


# ------------------------------------------------------------------ a module's directories
def verify(module: str, dirs: list[DirOps]) -> dict[str, Any]:
    """Compare each directory with the peer's copy; {"equal": bool, "dirs": [{"path",
    "resyncing", "differences": [{"path", "kind", "detail"}]}]}."""
    out = []
    for d in dirs:
        st = d._primary_stream("verify")
        resyncing = st.mode is Mode.RESYNCING
        diffs = d.verify()
        out.append({"path": str(d.path), "resyncing": resyncing,
                    "differences": [asdict(x) for x in diffs]})
    return {"module": module, "equal": not any(x["differences"] for x in out), "dirs": out}


def resolve(module: str, dirs: list[DirOps], discard: str) -> dict[str, Any]:
    """`hvha resolve MODULE --discard NODE`: see admin.resolve_action."""
    s = dirs[0].s
    primary = any(d.primary for d in dirs)
    action = admin.resolve_action(discard=discard, me=s.node, peer=s.peer, primary=primary,
                                  module=module)
    if action == "peer":
        return {"module": module, "action": action, "discarded": discard,
                "messages": [d.ask_peer_discard() for d in dirs]}
    if action == "local" and any(d.fault for d in dirs):  # this node's disk failed
        return {"module": module, "action": "disk-repaired", "discarded": discard,
                "messages": [d.clear_fault() for d in dirs if d.fault]}
    if not any(d.conflict for d in dirs):
        raise OperatorError(f"no conflict over {module} seen on {s.node}: nothing to resolve "
                            "(`hvha status`); if this agent just started, wait until the "
                            f"primary has tried to connect and run it again")
    aside = [str(d._discard()) for d in dirs]
    return {"module": module, "action": action, "discarded": discard, "aside": aside,
            "messages": [f"{d.path}: this copy was moved to {a}; {s.peer}'s data comes by a "
                         "full resync" for d, a in zip(dirs, aside, strict=True)]}
