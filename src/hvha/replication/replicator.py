"""The agent's Replicator for a module with replicated directories: engine + FUSE mirror glued.

Why it exists: the node runtime (agent/runtime.py) sees replication only through the small
`Replicator` protocol; the engine pieces (Stream, Applier, DirtyStore, generations, resync) and
the mirror mount are tested separately. This module owns their lifecycle for ONE module:

- always (from construction): an Applier per directory listens on my replication address, so
  whichever node is primary can connect; while not primary the directory is bind-mounted
  read-only over itself (`read_only_guard`), so apps cannot write the secondary's copy;
- become_primary(): release the guard, mount the mirror over each directory with a Stream to
  the peer, try to connect once; unreachable -> ALONE (`start_alone`, dirty tracking); a worker
  thread keeps (re)connecting, decides with the data generations and resyncs in the background
  while the app runs, then the pair is in sync;
- become_secondary()/stop(): unmount, close the stream, re-protect the directory.

Directory i of a module uses port + i (see build.py for a module's port). Generations, dirty
maps and resync checkpoints live in <state>/replication/<module>/<dir key>/.
The secondary learns that a resync into it finished from an "hvha-synced" query sent in order
after the resync (answered by `dirparts.SyncedTree`), and only then takes the source's
generation. Rules: plan.py and admin.py (admin.meet); meeting the peer, going alone and
fencing: dirgens.py; operator commands: dirops.py."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hvha.replication import admin, blocks, dirops, generations, localfault, tls, wire
from hvha.replication.admin import OperatorError, meet
from hvha.replication.applier import ReadOnlyGuard, read_only_guard
from hvha.replication.dirops import DirOps
from hvha.replication.dirparts import SYNCED_QUERY, DirApplier, Settings, creds_for
from hvha.replication.dirty import DirtyStore
from hvha.replication.exclude import Excludes
from hvha.replication.generations import Decision, Generations
from hvha.replication.localfault import FaultLatch
from hvha.replication.mount import MirrorMount
from hvha.replication.plan import TO_PEER, begin_primary, dir_key, initial_id
from hvha.replication.stream import Mode, PeerRefused, Stream

__all__ = ["MirrorReplicator", "OperatorError", "creds_for"]
log = logging.getLogger("hvha.replication")


# ------------------------------------------------------------------ one directory
class _Dir(DirOps):
    """One replicated directory: applier + guard always, mount + stream + worker when primary."""

    def __init__(self, s: Settings, path: Path, index: int, port: int,
                 excludes: Excludes) -> None:
        self.s, self.path, self.port, self.excludes = s, path, port, excludes
        self.ident = f"{s.module}[{index}]"
        self.state = s.state_dir / "replication" / s.module / dir_key(str(path))
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.initial = initial_id(s.module, index)
        self._lock = threading.RLock()
        self.gens = generations.load(self.state / "generations.json") or Generations(self.initial)
        self._save()
        # "primary.active" exists while this node is primary. Found at start, the last primary
        # period ended in a crash: this copy may hold local writes that never reached the peer
        # (applied here, not yet sent or acknowledged), which no dirty map names; the next
        # resync, in either direction, compares everything (unclean, told in the hello)
        self._active = self.state / "primary.active"
        self._fault_file = self.state / "local.fault"  # this disk failed while primary
        self.fault = localfault.load(self._fault_file)
        self.unclean = self._active.exists() or bool(self.fault)
        self.primary = False
        self.peer_synced = False  # secondary: the live session started in sync or caught up
        self._need_fence = False  # primary alone: the witness must hear it before any ack
        self._fence_warned = False
        self.refused = ""
        self.conflict = self.last_error = ""  # conflict: what an operator must settle
        self.full_requested = self.discard_peer = False  # see dirops
        self._busy = ""  # why hellos are refused now: closing, or moving the copy aside
        self.mount: MirrorMount | None = None
        self.stream: Stream | None = None
        self.dirty: DirtyStore | None = None
        self.backing_fd = -1
        self._closing = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self.applier = DirApplier(path, self._on_synced, node=s.node, peer=s.peer,
                                module=self.ident, ctx=tls.server_context(s.creds),
                                host=s.my_address, port=port,
                                generations=self._gens_dict, on_hello=self._on_hello,
                                faults=FaultLatch(self._on_fault))
        self.applier.start()
        self.guard: ReadOnlyGuard | None = read_only_guard(path)

    # -- role changes (blocking: called through asyncio.to_thread)
    def _on_fault(self, text: str) -> None:
        """This copy's disk failed (a FUSE thread when primary, the applier's when secondary).
        data_ok() turns False: a primary hands the module to an in-sync peer (agent/fsm.py), a
        secondary is never promoted. The copy refuses resyncs until an operator says the disk
        is repaired (dirops.clear_fault); then one that compares everything rewrites it."""
        with self._lock:
            self.fault, self.unclean, self.last_error = text, True, text
        localfault.persist(self._fault_file, text)

    def become_primary(self) -> None:
        if self.primary:
            return
        with self._lock:
            self.primary = True
            self.gens = begin_primary(self.gens, self.initial)
            self._save()
            fd = os.open(self._active, os.O_WRONLY | os.O_CREAT, 0o600)
            os.fsync(fd)
            os.close(fd)
            dfd = os.open(self.state, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
        self._closing = False
        self._stop.clear()
        # a former primary may still hold its session (paused, not dead: fault-matrix row 6);
        # its ops must not reach the directory this node now serves (hellos are refused now)
        try:
            self.applier.drop_session()
        except TimeoutError:
            self.leave_primary()
            raise
        if self.guard is not None:
            self.guard.release()
            self.guard = None
        self.backing_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirty = DirtyStore(self.state, self.s.zone_size)
        self.stream = Stream(node=self.s.node, peer=self.s.peer, module=self.ident,
                             address=(self.s.peer_address, self.port),
                             ctx=tls.client_context(self.s.creds), dirty=self.dirty,
                             generations=self._gens_dict, timeout=self.s.timeout,
                             on_mode=self._on_mode, fence_alone=self.s.fence is not None,
                             peer_alive=self.s.peer_alive)
        self.mount = MirrorMount(str(self.path), self.stream, excludes=self.excludes,
                                 faults=FaultLatch(self._on_fault))
        try:
            self.mount.start()
        except BaseException:
            self.leave_primary()
            raise
        alive = self.s.peer_alive
        hello = None
        if alive is None or alive():  # a peer the heartbeats declared dead: alone at once
            hello = self._connect(self.s.connect_timeout)
        else:
            self.last_error = f"peer {self.s.peer} is dead or does not hear this node (heartbeats)"
        if hello is None:
            self._go_alone(self.last_error)
        self._worker = threading.Thread(target=self._work, args=(hello,), daemon=True,
                                        name=f"hvha-repl-{self.ident}")
        self._worker.start()

    def leave_primary(self) -> None:
        self._closing = True
        self._stop.set()
        self._wake.set()
        if self.mount is not None:
            self.mount.stop()
            self.mount = None
        if self.stream is not None:
            self.stream.close()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        self.stream = None
        if self.dirty is not None:
            self.dirty.close()
            self.dirty = None
        if self.backing_fd >= 0:
            os.close(self.backing_fd)
            self.backing_fd = -1
        with self._lock:
            self.primary = False
            if not self.unclean:  # a clean stop: what was not acknowledged is in the dirty map
                self._active.unlink(missing_ok=True)
        if self.fault:  # the next resync must compare what the disk holds, not the cache
            n = localfault.drop_cached(self.path)
            log.warning("replication %s: the disk failed while primary: dropped the cache of %d "
                        "files; the next resync compares everything", self.ident, n)
        if self.guard is None:
            self.guard = read_only_guard(self.path)

    def close(self) -> None:
        with self._lock:  # a hello accepted now would mark this copy inconsistent for nothing
            self._busy = f"{self.s.node} is stopping the replication of {self.s.module}"
        self.leave_primary()
        if self.guard is not None:
            self.guard.release()
            self.guard = None
        self.applier.close()

    # -- the primary's worker thread
    def _connect(self, timeout: float) -> dict[str, Any] | None:
        stream = self.stream
        if stream is None:
            return None
        try:
            return stream.connect(timeout).generations
        except PeerRefused as exc:
            if str(exc) != self.refused:
                log.error("replication %s: %s; not replicating until that is resolved",
                          self.ident, exc)
            self.refused = self.last_error = str(exc)
            self.conflict = admin.conflict_of(self.refused)
        except (OSError, ssl.SSLError, ConnectionError, wire.WireError) as exc:
            self.last_error = f"peer {self.s.peer} unreachable: {exc}"
            log.debug("replication %s: %s", self.ident, self.last_error)
        return None

    def _work(self, hello: dict[str, Any] | None) -> None:
        while not self._stop.is_set():
            stream = self.stream
            if stream is None:
                return
            if self._need_fence:
                self._fence_once()
            if hello is None and stream.mode is Mode.ALONE:
                alive = self.s.peer_alive
                if alive is None or alive():
                    hello = self._connect(self.s.connect_timeout)
                if hello is None:  # an operator command sets _wake to retry at once
                    self._wake.wait(self.s.retry * (10 if self.refused else 1))
                    self._wake.clear()
                    continue
            if hello is not None:
                self.refused = self.conflict = ""
                self.discard_peer = False
                self._acknowledging()  # the peer is back: writes made alone get acknowledged
                try:
                    self._sync(stream, Generations.from_dict(hello), bool(hello.get("unclean")))
                except Exception as exc:  # the peer went away mid-resync: retry
                    self.last_error = f"resync: {type(exc).__name__}: {exc}"
                    if not self._stop.is_set():
                        log.warning("replication %s: %s", self.ident, self.last_error)
                    if stream.mode is not Mode.ALONE:
                        stream.detach(self.last_error)
                hello = None
                continue
            self._wake.wait(1.0)
            self._wake.clear()

    def _sync(self, stream: Stream, peer: Generations, peer_unclean: bool = False) -> None:
        with self._lock:
            local = self.gens
        d = meet(local, peer, self.initial)
        if d not in (Decision.IN_SYNC, *TO_PEER):
            self.conflict = d.value
            self.refused = (f"{d.value}: {self.s.peer}'s copy of {self.s.module} is newer or "
                            "diverged; refusing to replicate over it; an operator must pick "
                            f"the copy to discard: `hvha resolve {self.s.module} --discard NODE`")
            log.error("replication %s: %s", self.ident, self.refused)
            stream.detach(self.refused)
            return
        assert self.dirty is not None
        unclean = self.unclean or peer_unclean  # a primary crashed: see __init__
        full = d is Decision.FULL_RESYNC_TO_PEER or self.full_requested or unclean
        why = (" (full, asked by the operator)" if self.full_requested else
               " (full: a primary crashed, its copy may hold writes never sent)" if unclean
               else "")
        log.info("replication %s: connected to %s: %s%s", self.ident, self.s.peer, d.value, why)
        blocks.resync(stream, self.backing_fd, self.dirty, full=full, state_dir=self.state,
                      checkpoint_key=f"{local.current:x}-{peer.current:x}",
                      streams=self.s.streams, bandwidth=self.s.bandwidth,
                      excludes=self.excludes)
        if full:
            self.full_requested = False
        if d is not Decision.IN_SYNC or local.bitmap or unclean:
            done = generations.synced(local)
            stream.query({"q": SYNCED_QUERY, "generations": done.as_dict()})
            with self._lock:
                self.gens = done if self.gens == local else generations.synced(self.gens)
                self._save()
                self._set_clean()
        self.last_error = ""
        log.info("replication %s: in sync with %s", self.ident, self.s.peer)

    # -- views
    def in_sync(self) -> bool:
        st = self.stream
        if st is None:  # secondary: the primary's session is live and this copy caught up
            return (self.applier.connected and self.peer_synced
                    and not self.gens.inconsistent)
        return bool(st.in_sync and self.dirty is not None and self.dirty.is_clean())

    def status(self) -> dict[str, Any]:
        st = self.stream
        out: dict[str, Any] = {"path": str(self.path), "port": self.port,
                               "role": "primary" if self.primary else "secondary",
                               "generations": self._gens_dict(), "last_error": self.last_error,
                               "refused": self.refused, "conflict": self.conflict,
                               "full_requested": self.full_requested, "local_fault": self.fault,
                               "discard_requested": self.discard_peer}
        if st is not None:
            out.update(st.status().as_dict())
            if self.dirty is not None:
                out["dirty_bytes"] = self.dirty.snapshot().dirty_bytes()
        else:
            out.update(mode="secondary", in_sync=None, applier_sessions=self.applier.sessions,
                       applier_error=self.applier.last_error)
        out["in_sync"] = self.in_sync()
        return out


# ------------------------------------------------------------------ the Replicator
class MirrorReplicator:
    """`hvha.agent.runtime.Replicator` for one module with one or more replicated directories.

    Constructing it starts the appliers and protects the directories (root, /dev/fuse, fuse3).
    Call `close()` when the agent drops the module (the runtime's `stop()` keeps the appliers,
    so the peer can still replicate into this node)."""

    def __init__(self, module: str, dirs: list[str | Path], *, node: str, peer: str,
                 my_address: str, peer_address: str, port: int, tls_dir: str | Path,
                 state_dir: str | Path, zone_size: int = 1 << 20, streams: int = 2,
                 timeout: float = 10.0, connect_timeout: float = 2.0,
                 retry: float = 1.0, bandwidth: int = 0,
                 fence: Callable[[str], bool] | None = None,
                 peer_alive: Callable[[], bool] | None = None,
                 excludes: Sequence[Sequence[str]] = ()) -> None:
        creds = creds_for(Path(tls_dir), node)
        if creds is None:
            raise FileNotFoundError(f"TLS files for {node} missing in {tls_dir}: run "
                                    "`hvha tls init` (see replicator.init_tls)")
        s = Settings(module, node, peer, my_address, peer_address, creds, Path(state_dir),
                     zone_size, streams, timeout, connect_timeout, retry, bandwidth,
                     None if fence is None else (lambda: fence(self.generation())),
                     peer_alive)
        self.module = module
        self._dirs: list[_Dir] = []
        try:
            for i, d in enumerate(dirs):
                patterns = excludes[i] if i < len(excludes) else ()
                self._dirs.append(_Dir(s, Path(d), i, port + i, Excludes(patterns)))
        except BaseException:
            for x in self._dirs:
                x.close()
            raise

    def data_ok(self) -> bool:
        """Every copy may serve: none half-synced, none on a disk that failed (localfault)."""
        return all(generations.may_promote(d.gens) and not d.fault for d in self._dirs)

    def in_sync(self) -> bool:
        return all(d.in_sync() for d in self._dirs)

    def generation(self) -> str:
        return ",".join(f"{d.gens.current:016x}" for d in self._dirs)

    async def become_primary(self) -> None:
        for d in self._dirs:
            await asyncio.to_thread(d.become_primary)

    async def become_secondary(self) -> None:
        for d in self._dirs:
            await asyncio.to_thread(d.leave_primary)

    async def stop(self) -> None:
        await self.become_secondary()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        for d in self._dirs:
            try:
                d.close()
            except Exception:  # close the other directories all the same
                log.exception("replication %s: closing %s failed; check `mount | grep %s`",
                              d.ident, d.path, d.path)

    def status(self) -> dict[str, Any]:
        """For `hvha status --json`: per directory mode, in_sync, resync progress, errors."""
        return {"module": self.module, "in_sync": self.in_sync(), "data_ok": self.data_ok(),
                "generation": self.generation(), "dirs": [d.status() for d in self._dirs]}

    # -- operator commands (blocking: the agent runs them in a thread)
    def verify(self) -> dict[str, Any]:
        """`hvha verify`: compare both copies by block hashes (primary only)."""
        return dirops.verify(self.module, list(self._dirs))

    def force_full_resync(self) -> list[str]:
        """`hvha resync --full`: resync every directory in full now (primary only)."""
        return [d.force_full() for d in self._dirs]

    def resolve(self, discard: str) -> dict[str, Any]:
        """`hvha resolve --discard NODE`: settle a split brain (see dirops.resolve)."""
        return dirops.resolve(self.module, list(self._dirs), discard)

    def force_promote(self) -> list[str]:
        """`hvha prim --force`: take half-synced copies as good; the paths that were."""
        return [str(d.path) for d in self._dirs if d.force_good()]
