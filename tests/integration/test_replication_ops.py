"""Operator commands on two real MirrorReplicators (node1 on 127.0.0.1, node2 on 127.0.0.2, one
process, as in test_replicator.py): `hvha verify` finds a change made behind the replicator's
back and `hvha resync --full` repairs it; a split brain (both nodes wrote while apart) is
refused at reconnect, nothing is merged, and `hvha resolve --discard NODE` (run on the dropped
node or on the survivor) keeps the dropped copy aside and makes the trees equal; `hvha status`
shows the resync's progress while a bandwidth-capped resync runs; a copy on its own file system
is copied aside, not lost. Needs root and /dev/fuse (FUSE and bind mounts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_replicator import (
    Lab,
    _bind_mounted,
    digest,
    needs_root,
    run,
    until,
    write_file,
)

from hvha.agent.control import ControlServer
from hvha.cli.replication_cmds import replication_line
from hvha.replication import admin
from hvha.replication.admin import OperatorError
from hvha.replication.replicator import MirrorReplicator

pytestmark = needs_root
MiB = 1 << 20
HVHA = [sys.executable, "-m", "hvha.cli.main"]


class _Runtime:
    """What the control socket needs of a module runtime, around a real replicator."""

    def __init__(self, replicator: MirrorReplicator) -> None:
        self.replicator = replicator


class _Agent:
    def __init__(self, replicator: MirrorReplicator) -> None:
        self.modules = {"m": _Runtime(replicator)}


@contextlib.contextmanager
def control_socket(rep: MirrorReplicator, path: Path) -> Iterator[Path]:
    """The agent's real ControlServer for one replicator, on its own event loop thread."""
    loop = asyncio.new_event_loop()
    server = ControlServer(_Agent(rep), path)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def hvha(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HVHA, *args], capture_output=True, text=True, timeout=120,
                          check=False)


class OpsLab(Lab):
    """test_replicator's Lab, with a resync bandwidth cap per node."""

    def start(self, node: str, bandwidth: int = 0) -> MirrorReplicator:
        me, peer = ("node1", "node2") if node == "node1" else ("node2", "node1")
        addr = {"node1": "127.0.0.1", "node2": "127.0.0.2"}
        rep = MirrorReplicator("m", [self.a if node == "node1" else self.b], node=me, peer=peer,
                               my_address=addr[me], peer_address=addr[peer], port=self.port,
                               tls_dir=self.tmp / me / "tls", state_dir=self.tmp / me / "state",
                               zone_size=64 * 1024, timeout=3.0, retry=0.2, bandwidth=bandwidth)
        self.reps[node] = rep
        return rep


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[OpsLab]:
    lab = OpsLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
    assert not _bind_mounted(lab.a) and not _bind_mounted(lab.b)


def line(rep: MirrorReplicator) -> str:
    return replication_line({"module": "m", "replication": rep.status()}, "node1", "node2")


def dir0(rep: MirrorReplicator) -> dict[str, Any]:
    d: dict[str, Any] = rep.status()["dirs"][0]
    return d


def test_verify_finds_a_hidden_change_and_full_resync_repairs_it(lab: OpsLab) -> None:
    r1, r2 = lab.start("node1"), lab.start("node2")
    with pytest.raises(OperatorError, match="not primary"):
        r2.verify()
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync after the first resync")
    write_file(lab.a / "f", os.urandom(300_000))
    (lab.a / "d").mkdir()
    write_file(lab.a / "d" / "g", b"g" * 5000)
    assert r1.verify()["equal"]

    # change node2's copy behind the replicator's back: through the applier's own descriptor
    # (apps are kept out by the read-only guard), so nothing records it as dirty
    root_fd = r2._dirs[0].applier.tree.root_fd
    fd = os.open("f", os.O_WRONLY, dir_fd=root_fd)
    try:
        os.pwrite(fd, b"X" * 10, 70_000)
    finally:
        os.close(fd)
    fd = os.open("extra", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root_fd)
    os.close(fd)
    assert r1.in_sync()  # the replicator cannot know

    result = r1.verify()
    assert not result["equal"]
    found = {(x["path"], x["kind"]) for x in result["dirs"][0]["differences"]}
    assert found == {("f", "content"), ("extra", "extra")}

    # the same through the agent's control socket and the CLI, with its exit codes
    with control_socket(r1, lab.tmp / "c1.sock") as s1, \
            control_socket(r2, lab.tmp / "c2.sock") as s2:
        out = hvha("verify", "m", "--socket", str(s1))
        assert out.returncode == 2, out.stderr
        assert f"{lab.a}: 2 differences" in out.stdout and "  content  f  (" in out.stdout
        assert "  extra    extra" in out.stdout
        out = hvha("verify", "m", "--socket", str(s2))
        assert out.returncode == 1 and "run `hvha verify m` on the primary" in out.stderr
        assert "Traceback" not in out.stderr
        out = hvha("resync", "m", "--full", "--socket", str(s1))
        assert out.returncode == 0 and "full resync started" in out.stdout
        until(r1.in_sync, "node1 in sync after the full resync")
        out = hvha("verify", "m", "--json", "--socket", str(s1))
        assert out.returncode == 0 and json.loads(out.stdout)["equal"] is True

    assert "full resync started" in r1.force_full_resync()[0]
    assert not r1.in_sync()  # until node2's copy has been compared again in full
    until(r1.in_sync, "node1 in sync after the full resync")
    assert r1.verify()["equal"]
    assert digest(lab.a) == digest(lab.b) and not (lab.b / "extra").exists()
    assert r2.data_ok() and r1.generation() == r2.generation()


@pytest.mark.parametrize("run_on", ["dropped node", "survivor"])
def test_split_brain_is_refused_then_resolved_keeping_the_dropped_copy(
        lab: OpsLab, run_on: str) -> None:
    r1, r2 = lab.start("node1"), lab.start("node2")
    run(r1.become_primary())
    until(r1.in_sync, "node1 in sync")
    write_file(lab.a / "base", b"before the split")

    r2.close()  # node2 away: node1 writes alone
    mine = os.urandom(100_000)
    write_file(lab.a / "from-node1", mine)
    run(r1.become_secondary())
    r1.close()  # then node1 away: node2 primary alone, writes too
    r2 = lab.start("node2")
    run(r2.become_primary())
    write_file(lab.b / "from-node2", b"node2 wrote this")
    r1 = lab.start("node1")  # node1 back as secondary: node2's session is refused

    until(lambda: dir0(r2)["conflict"] == "split_brain", "node2 sees the split brain")
    until(lambda: dir0(r1)["conflict"] == "split_brain", "node1 sees the split brain")
    assert line(r2).startswith("SPLIT BRAIN: run `hvha resolve m --discard node1|node2`")
    assert not r2.in_sync()
    time.sleep(0.5)  # retries change nothing: no silent merge
    assert "from-node2" not in digest(lab.a) and "from-node1" not in digest(lab.b)

    with pytest.raises(OperatorError, match="is primary"):
        r2.resolve("node2")  # the application runs on node2's copy
    with pytest.raises(OperatorError, match="node of the pair"):
        r1.resolve("node3")
    if run_on == "dropped node":
        out = r1.resolve("node1")
        assert out["action"] == "local"
        aside = Path(out["aside"][0])
    else:
        out = r2.resolve("node1")
        assert out["action"] == "peer"
        until(lambda: any(lab.tmp.glob("A.hvha-discarded-*")), "node1 moved its copy aside")
        [aside] = lab.tmp.glob("A.hvha-discarded-*")
    assert aside.parent == lab.a.parent and aside.name.startswith("A.hvha-discarded-")
    until(r2.in_sync, "node2 in sync after resolving")

    assert digest(lab.a) == digest(lab.b)
    assert (lab.a / "from-node2").read_bytes() == b"node2 wrote this"
    assert not (lab.a / "from-node1").exists()
    assert (aside / "from-node1").read_bytes() == mine  # kept, not deleted
    assert (aside / "base").read_bytes() == b"before the split"
    assert not list(lab.tmp.glob("B.hvha-discarded-*"))  # the survivor's copy was left alone
    until(r1.data_ok, "node1's copy consistent again")
    assert r1.generation() == r2.generation() and line(r2) == "in sync"
    assert dir0(r1)["conflict"] == dir0(r2)["conflict"] == ""


def test_status_shows_resync_progress_of_a_capped_resync(lab: OpsLab) -> None:
    size, cap = 40 * MiB, 10 * MiB
    (lab.a / "big").write_bytes(os.urandom(size))  # before node1 starts: no guard yet
    r1, r2 = lab.start("node1", bandwidth=cap), lab.start("node2")
    t0 = time.monotonic()
    run(r1.become_primary())
    seen: list[dict[str, Any]] = []
    lines: list[str] = []
    while not r1.in_sync():
        st = dir0(r1)
        if st["mode"] == "resyncing" and st["resync"] is not None:
            seen.append(st["resync"])
            lines.append(line(r1))
        assert time.monotonic() - t0 < 30, "the resync did not finish"
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert elapsed > 0.7 * size / cap  # the cap held the resync back
    mid = [s for s in seen if 0 < s["percent"] < 100]
    assert mid, f"no progress seen mid-resync: {seen[:3]}"
    s = mid[0]
    assert 0 < s["bytes_left"] < size and s["rate"] > 0 and s["eta_s"] > 0
    assert s["rate"] < 2 * cap
    assert any(x.startswith("resync ") and "MiB left" in x and " ETA " in x for x in lines)
    assert digest(lab.a) == digest(lab.b)
    assert dir0(r1)["resync"] is None and line(r1) == "in sync"
    assert r2.data_ok() and line(r2) == "in sync"


def test_a_copy_on_its_own_file_system_is_copied_aside(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "hvha-test", str(root)],
                   check=True)
    try:
        (root / "sub").mkdir()
        (root / "sub" / "f").write_bytes(b"x" * 5000)
        os.symlink("sub/f", root / "link")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            aside = admin.move_aside(fd, root)
        finally:
            os.close(fd)
        assert aside.parent == tmp_path and os.listdir(root) == []
        assert (aside / "sub" / "f").read_bytes() == b"x" * 5000
        assert os.readlink(aside / "link") == "sub/f"
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
