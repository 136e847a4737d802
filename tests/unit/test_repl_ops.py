"""Replication operator commands without a cluster: the status line a person reads for each
state, the verify listing, the split-brain rules (who may discard what, how a discarded or
forced copy meets its peer), moving a copy aside, and the control socket's answers (refused
`prim` on half-synced data unless forced, replication commands on a module without it)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from hvha.agent.control import ControlServer
from hvha.agent.fsm import Ev
from hvha.agent.runtime import NoReplication
from hvha.cli.replication_cmds import (
    human_bytes,
    human_eta,
    render_verify,
    replication_line,
    resync_bars,
)
from hvha.replication import admin
from hvha.replication.admin import OperatorError, meet
from hvha.replication.generations import Decision, Generations, start_alone

GiB, MiB = 1 << 30, 1 << 20


def module(*dirs: dict[str, Any], name: str = "web") -> dict[str, Any]:
    return {"module": name, "replication": {"dirs": list(dirs)}}


def primary(**kw: Any) -> dict[str, Any]:
    return {"role": "primary", "mode": "connected", "in_sync": True, "refused": "",
            "conflict": "", "resync": None, "dirty_bytes": 0, **kw}


def secondary(**kw: Any) -> dict[str, Any]:
    return {"role": "secondary", "mode": "secondary", "in_sync": True, "refused": "",
            "conflict": "", "generations": {"inconsistent": False}, **kw}


def test_units() -> None:
    assert human_bytes(0) == "0 B" and human_bytes(1536) == "1.5 KiB"
    assert human_bytes(1.2 * GiB) == "1.2 GiB" and human_bytes(12 * MiB) == "12.0 MiB"
    assert human_bytes(850 * MiB) == "850 MiB"
    assert human_eta(15) == "0:15" and human_eta(75.4) == "1:15" and human_eta(3725) == "1:02:05"
    assert human_eta(-1) == "?"


@pytest.mark.parametrize(("mod", "line"), [
    ({"module": "web", "replication": None}, "-"),
    (module(primary()), "in sync"),
    (module(secondary()), "in sync"),
    (module(primary(mode="resyncing", in_sync=False, resync={
        "percent": 42.0, "bytes_left": 1.2 * GiB, "rate": 85 * MiB, "eta_s": 15.0})),
     "resync 42% 1.2 GiB left 85.0 MiB/s ETA 0:15"),
    (module(primary(mode="resyncing", in_sync=False)), "resync starting"),
    (module(primary(mode="alone", in_sync=False, dirty_bytes=12 * MiB)), "ALONE: 12.0 MiB dirty"),
    (module(primary(mode="alone", in_sync=False, dirty_bytes=0, full_requested=True)),
     "ALONE: 0 B dirty (full resync asked)"),
    (module(primary(mode="alone", in_sync=False, conflict="split_brain",
                    refused="peer refused the session: split_brain: ...")),
     "SPLIT BRAIN: run `hvha resolve web --discard node1|node2` (the copy to drop)"),
    (module(secondary(in_sync=False, conflict="split_brain")),
     "SPLIT BRAIN: run `hvha resolve web --discard node1|node2` (the copy to drop)"),
    (module(secondary(in_sync=False, conflict="unrelated")),
     "UNRELATED COPIES: run `hvha resolve web --discard node1|node2` (the copy to drop)"),
    (module(secondary(in_sync=False, conflict="full_resync_to_peer")),
     "REFUSED: node1 has newer data: make node1 primary, or `hvha resolve web --discard node1`"),
    (module(primary(mode="alone", in_sync=False, conflict="resync_to_peer")),
     "REFUSED: node2 has newer data: make node2 primary, or `hvha resolve web --discard node2`"),
    (module(primary(mode="alone", in_sync=False, discard_requested=True, conflict="")),
     "discard of node2's copy asked: waiting for node2 to connect"),
    (module(secondary(in_sync=False, generations={"inconsistent": True})),
     "INCONSISTENT: resync from node2 unfinished (never promoted unless forced)"),
    (module(secondary(in_sync=False)), "waiting for the primary (node2)"),
    ({"module": "web", "replication": {"error": "boom"}}, "status error: boom"),
    (module(primary(local_fault="local fsync of /disk.img failed: EIO (Input/output error)")),
     "DISK FAILED: local fsync of /disk.img failed: EIO (Input/output error); fsync fails here;"
     " node2 takes over once in sync"),
    (module(secondary(in_sync=False, local_fault="local fsync of /a failed: EIO (I/O error)")),
     "DISK FAILED: local fsync of /a failed: EIO (I/O error); repair the disk, then `hvha "
     "resolve web --discard node1` here"),
])
def test_replication_line(mod: dict[str, Any], line: str) -> None:
    assert replication_line(mod, "node1", "node2") == line


def test_two_directories_show_the_worse_and_the_slower() -> None:
    a = primary(mode="resyncing", in_sync=False, resync={"percent": 80.0, "bytes_left": 1 * MiB,
                                                          "rate": 10 * MiB, "eta_s": 0.1})
    b = primary(mode="resyncing", in_sync=False, resync={"percent": 20.0, "bytes_left": 9 * MiB,
                                                          "rate": 5 * MiB, "eta_s": 75.0})
    assert replication_line(module(a, b), "n1", "n2") == \
        "resync 20% 10.0 MiB left 15.0 MiB/s ETA 1:15"
    alone = primary(mode="alone", in_sync=False, dirty_bytes=MiB)
    assert replication_line(module(a, alone), "n1", "n2").startswith("ALONE")
    status = {"node": "n1", "peer": "n2",
              "modules": [module(a, b), module(primary(), name="db")]}
    assert [(m, p) for m, p, _ in resync_bars(status)] == [("web", 20.0)]


def test_render_verify() -> None:
    reply = {"equal": False, "dirs": [
        {"path": "/srv/a", "resyncing": False, "differences": [
            {"path": "f", "kind": "content", "detail": "1 blocks of 65536 from 0"},
            {"path": "extra", "kind": "extra", "detail": ""}]},
        {"path": "/srv/b", "resyncing": True, "differences": []}]}
    assert render_verify(reply) == [
        "/srv/a: 2 differences", "  content  f  (1 blocks of 65536 from 0)", "  extra    extra",
        "/srv/b: equal (a resync is running: differences are expected)"]


# ------------------------------------------------------------------ rules
def test_a_discarded_copy_takes_the_peers_data_and_a_split_brain_is_refused() -> None:
    base = Generations(5)
    a, b = start_alone(base), start_alone(base)
    assert meet(a, b, initial=1) is Decision.SPLIT_BRAIN  # both changed: refused
    gone = admin.discarded()
    assert gone.inconsistent and not gone.history
    assert meet(a, gone, initial=1) is Decision.FULL_RESYNC_TO_PEER
    assert meet(gone, a, initial=1) is Decision.FULL_RESYNC_FROM_PEER
    assert meet(gone, admin.discarded(), initial=1) is Decision.UNRELATED  # both dropped: no
    # the usual rules are unchanged
    assert meet(a, base, initial=1) is Decision.RESYNC_TO_PEER
    assert meet(base, a, initial=1) is Decision.RESYNC_FROM_PEER
    half = Generations(5, inconsistent=True)
    assert admin.forced(half) == Generations(5)


def test_resolve_action() -> None:
    kw = {"me": "n1", "peer": "n2", "module": "web"}
    assert admin.resolve_action(discard="n1", primary=False, **kw) == "local"
    assert admin.resolve_action(discard="n2", primary=True, **kw) == "peer"
    with pytest.raises(OperatorError, match="`hvha second web`"):
        admin.resolve_action(discard="n1", primary=True, **kw)
    with pytest.raises(OperatorError, match="on n2"):
        admin.resolve_action(discard="n2", primary=False, **kw)
    with pytest.raises(OperatorError, match="n1 or n2"):
        admin.resolve_action(discard="n3", primary=False, **kw)


def test_conflict_of_a_refusal() -> None:
    assert admin.conflict_of("peer refused the session: split_brain: both changed") == \
        "split_brain"
    assert admin.conflict_of("refused: full_resync_to_peer: n2 holds newer data") == \
        "full_resync_to_peer"
    assert admin.conflict_of("refused: two primaries") == ""


def test_move_aside_keeps_everything_next_to_the_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "f").write_bytes(b"f")
    (data / ".hidden").write_bytes(b"h")
    os.chmod(data, 0o750)
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = admin.move_aside(fd, data, now=0)
        (data / "again").write_bytes(b"2")
        second = admin.move_aside(fd, data, now=0)  # same second: a distinct directory
    finally:
        os.close(fd)
    assert data.is_dir() and os.listdir(data) == []
    assert first.parent == tmp_path and first.name.startswith("data.hvha-discarded-")
    assert sorted(os.listdir(first)) == [".hidden", "sub"] and os.listdir(second) == ["again"]
    assert first != second and (os.stat(first).st_mode & 0o777) == 0o750


# ------------------------------------------------------------------ control socket
class FakeRepl(NoReplication):
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.forced = 0

    def data_ok(self) -> bool:
        return self.ok

    def force_promote(self) -> list[str]:
        self.forced += 1
        self.ok = True
        return ["/srv/a"]


class FakeRuntime:
    def __init__(self, replicator: Any) -> None:
        self.replicator = replicator
        self.posted: list[Ev] = []
        self.checkers = None

    def post(self, kind: Ev) -> None:
        self.posted.append(kind)

    async def settle(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"module": "web", "role": "WAIT", "reason": ""}


class FakeAgent:
    def __init__(self, runtime: FakeRuntime, tmp: Path) -> None:
        self.modules = {"web": runtime}
        self.tmp = tmp

    def stopped_marker(self, module: str) -> Path:
        return self.tmp / module / "stopped"


def ask(agent: FakeAgent, request: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(ControlServer(agent, agent.tmp / "sock").handle(request))


def test_prim_on_half_synced_data_needs_force(tmp_path: Path) -> None:
    rt = FakeRuntime(FakeRepl(ok=False))
    agent = FakeAgent(rt, tmp_path)
    reply = ask(agent, {"cmd": "prim", "module": "web"})
    assert not reply["ok"] and "`hvha prim web --force`" in reply["error"]
    assert rt.posted == [] and rt.replicator.forced == 0
    reply = ask(agent, {"cmd": "prim", "module": "web", "force": True})
    assert reply["ok"] and reply["forced"] == ["/srv/a"] and rt.posted == [Ev.CMD_PRIM]
    reply = ask(agent, {"cmd": "prim", "module": "web"})  # good data: no force needed
    assert reply["ok"] and "forced" not in reply


def test_replication_commands_on_a_module_without_replication(tmp_path: Path) -> None:
    agent = FakeAgent(FakeRuntime(NoReplication()), tmp_path)
    for cmd in ({"cmd": "verify"}, {"cmd": "resync", "full": True},
                {"cmd": "resolve", "discard": "n1"}):
        reply = ask(agent, {**cmd, "module": "web"})
        assert not reply["ok"] and "replicates no directory" in reply["error"]
    assert not ask(agent, {"cmd": "verify", "module": "nope"})["ok"]
