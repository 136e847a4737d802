"""The data generations of one replicated directory: meeting the peer, going alone, fencing.

Why a module of its own: these methods decide whose data wins when the two nodes meet, when
this node's writes alone start to count, and what a secondary accepts; replicator.py runs the
engine (mount, stream, worker) around them. `DirGenerations` is the base of the replicator's
per-directory class (through dirops.DirOps); the attributes it uses are declared below and set
by replicator._Dir. The pure rules are in generations.py, plan.py and admin.py.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from hvha.replication import generations, wire
from hvha.replication.admin import REFUSALS, OperatorError, meet
from hvha.replication.dirparts import Settings
from hvha.replication.generations import Decision, Generations
from hvha.replication.plan import FROM_PEER, TO_PEER
from hvha.replication.stream import Mode, Stream

log = logging.getLogger("hvha.replication")


class DirGenerations:
    """Generations of one replicated directory (base of dirops.DirOps and replicator._Dir)."""

    s: Settings
    ident: str
    state: Path
    initial: int
    gens: Generations
    primary: bool
    peer_synced: bool
    conflict: str
    discard_peer: bool
    fault: str
    unclean: bool
    _busy: str
    _lock: threading.RLock
    _wake: threading.Event
    _active: Path
    _need_fence: bool
    _closing: bool
    _fence_warned: bool
    stream: Stream | None

    def _discard(self) -> Path:
        raise NotImplementedError  # dirops.DirOps

    # -- generations (any thread)
    def _save(self) -> None:
        generations.save(self.state / "generations.json", self.gens)

    def _gens_dict(self) -> dict[str, Any]:
        with self._lock:
            out = self.gens.as_dict()
            if self.unclean:
                out["unclean"] = True
            if self.discard_peer and self.primary:
                out["discard"] = self.s.peer  # the operator's word; see _on_hello
            return out

    def _on_hello(self, hello: wire.Hello) -> str | None:
        """Secondary side: accept the primary's session, or say why not."""
        with self._lock:
            if self.primary:
                return (f"{self.s.node} is primary for {self.s.module} itself: two primaries; "
                        "stop the module on one node")
            if self._busy:
                return self._busy
            if self.fault:  # a resync now could "succeed" on a disk that still drops writes
                self.conflict = "disk_failed"
                return (f"{self.s.node}'s disk failed under {self.s.module} ({self.fault}): "
                        f"repair or replace it, then run `hvha resolve {self.s.module} "
                        f"--discard {self.s.node}` on {self.s.node}")
            try:
                peer = Generations.from_dict(hello.generations)
            except (KeyError, ValueError) as exc:
                return f"bad generations in hello: {exc}"
            d = meet(self.gens, peer, self.initial)
            if d in REFUSALS and hello.generations.get("discard") == self.s.node:
                try:  # `hvha resolve --discard <this node>` run on the primary
                    self._discard()
                except OperatorError as exc:
                    return str(exc)
                d = meet(self.gens, peer, self.initial)
            self.conflict = d.value if d in REFUSALS else ""
            self.peer_synced = d is Decision.IN_SYNC
            if d in FROM_PEER:
                if self.gens.unfenced:
                    log.warning("replication %s: the writes this node made alone were never "
                                "acknowledged (the witness did not fence %s's copy): they are "
                                "overwritten by %s's data", self.ident, self.s.peer, self.s.peer)
                if not self.gens.inconsistent:
                    self.gens = generations.resync_started(self.gens)
                    self._save()
                log.info("replication %s: resync from %s starts (%s): this copy is "
                         "inconsistent until it ends", self.ident, self.s.peer, d.value)
                return None
            if d is Decision.IN_SYNC:
                return None
            if d in TO_PEER:
                return (f"{d.value}: {self.s.node} holds newer data of {self.s.module} than "
                        f"{self.s.peer}: make {self.s.node} primary, or discard its changes "
                        f"with `hvha resolve {self.s.module} --discard {self.s.node}`")
            return (f"{d.value}: the copies of {self.s.module} on {self.s.node} and "
                    f"{self.s.peer} both changed; an operator must pick the copy to discard: "
                    f"`hvha resolve {self.s.module} --discard NODE`")

    def _on_synced(self, source: dict[str, Any]) -> None:
        with self._lock:
            self.gens = generations.resync_finished(self.gens, Generations.from_dict(source))
            self._save()
            self.peer_synced = True
            self._set_clean()
        log.info("replication %s: resync from %s finished, copy consistent", self.ident,
                 self.s.peer)

    def _on_mode(self, mode: Mode, why: str) -> None:
        if mode is Mode.ALONE and not self._closing:
            self._go_alone(why)
        self._wake.set()

    def _go_alone(self, why: str) -> None:
        with self._lock:
            if not self.primary:
                return
            if self.gens.bitmap == 0:
                self.gens = generations.start_alone(self.gens,
                                                    unfenced=self.s.fence is not None)
                self._save()
                log.warning("replication %s: writing without %s (%s): new generation, "
                            "tracking dirty zones", self.ident, self.s.peer, why)
            self._need_fence = True
        self._wake.set()  # the worker fences (never this thread: it may be the stream's)

    def _acknowledging(self) -> None:
        """Writes made alone are about to be acknowledged (the witness fenced the peer's copy,
        or the peer is back and gets them by resync): from now on this period's changes count,
        and a split brain against them is an operator's call (generations.unfenced)."""
        with self._lock:
            if self.gens.unfenced:
                self.gens = generations.fenced(self.gens)
                self._save()

    def _fence_once(self) -> None:
        """Writes made alone wait until the witness records that the peer's copy is outdated
        (hvha.agent.fences): then the peer cannot be promoted on stale data. One attempt; the
        worker retries while the peer stays away."""
        stream, fence = self.stream, self.s.fence
        if stream is None or stream.mode is not Mode.ALONE:
            self._need_fence = False
            return
        if fence is None or fence():
            self._need_fence = False
            self._acknowledging()
            stream.allow_alone()
            return
        if not self._fence_warned:
            log.warning("replication %s: writes wait until the witness records that %s's copy "
                        "is outdated", self.ident, self.s.peer)
            self._fence_warned = True

    def _set_clean(self) -> None:
        """A resync made both copies equal (call holding _lock)."""
        self.unclean = False
        if not self.primary:
            self._active.unlink(missing_ok=True)
