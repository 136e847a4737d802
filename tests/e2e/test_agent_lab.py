"""End-to-end: two real agents and a real witness in the network-namespace lab.

Each test builds a fresh cluster (agents, witness, app) on one shared lab and tears it down,
even on failure. Timings: heartbeat 300 ms / 1.5 s timeout, lease 1.5 s, so each fault
resolves in a few seconds. The role sampler reads the VIP from the kernel of each node every
100 ms, independently of what the agents say.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvha.agent.frames import HEARTBEAT_KEY_PURPOSE, cluster_id, derive_key, encode
from hvha.lab import Lab
from tests.e2e.cluster_lab import HVHA, ClusterLab
from tests.labkit import require_netns

pytestmark = pytest.mark.e2e
T = 1.5  # heartbeat timeout
DEADLINE = T + 6  # detection + lease + app start, with room for a loaded 2-core machine


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_netns("agent end-to-end tests")
    n, net = os.getpid() % 100000, 1 + os.getpid() % 250
    the_lab = Lab.open(f"hve{n}", tmp_path_factory.mktemp("elab") / "root",
                       lan=f"198.18.{net}.0/25", repl=f"198.19.{net}.0/25")
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down(purge=True, grace=0.5)


@contextlib.contextmanager
def running_cluster(lab: Lab, tmp_path: Path, **kw: object) -> Iterator[ClusterLab]:
    for node in ("node1", "node2"):
        for net in ("lan", "repl"):
            lab.set_link(node, net, True)
    c = ClusterLab(lab, tmp_path / "cluster", **kw)  # type: ignore[arg-type]
    try:
        c.start_witness()
        c.start_agent("node1")
        c.start_agent("node2")
        c.wait_for("node1 PRIM and node2 SECOND",
                   lambda: c.role("node1") == "PRIM" and c.role("node2") == "SECOND", 20)
        c.wait_for("the client reaching node1 through the VIP",
                   lambda: c.client_get() == "node1", 10)
        c.start_sampler()
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster(lab: Lab, tmp_path: Path) -> Iterator[ClusterLab]:
    with running_cluster(lab, tmp_path) as c:
        yield c


def test_cluster_comes_up_with_one_primary(cluster: ClusterLab) -> None:
    assert cluster.vip_holders() == {"node1"}
    for node, code in (("node1", 3), ("node2", 4)):
        out = subprocess.run([*HVHA, "state", "web", "--socket", str(cluster.socket(node))],
                             capture_output=True, text=True)
        assert out.returncode == code, out.stderr
    status = cluster.status("node1")
    assert status is not None and status["peer_alive"] and status["witness"]["reachable"]
    shown = subprocess.run([*HVHA, "status", "--socket", str(cluster.socket("node2"))],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "SECOND" in shown.stdout and "PRIM" in shown.stdout


def test_primary_power_off_fails_over_and_rejoins_as_secondary(cluster: ClusterLab) -> None:
    killed = time.monotonic()
    cluster.power_off("node1")
    took = cluster.wait_for("node2 answering through the VIP",
                            lambda: cluster.client_get() == "node2", DEADLINE)
    assert cluster.role("node2") == "ALONE"
    assert time.monotonic() - killed < DEADLINE, took
    cluster.power_on("node1")
    cluster.wait_for("node1 back as SECOND and node2 PRIM",
                     lambda: cluster.role("node1") == "SECOND" and cluster.role("node2") == "PRIM",
                     20)
    assert cluster.dual_primary_samples(cut={"node1"}) == []
    assert cluster.vip_holders() == {"node2"}


def test_kill_9_of_primary_agent_and_app(cluster: ClusterLab) -> None:
    cluster.lab.kill_all("node1", signal.SIGKILL)  # links stay up: the VIP stays in the kernel
    cluster.wait_for("node2 primary", lambda: cluster.role("node2") in ("ALONE", "PRIM"),
                     DEADLINE)
    cluster.wait_for("client on node2", lambda: cluster.client_get() == "node2", 5)
    # node1's kernel still carries the VIP (its agent is dead); restarting it must clean up.
    cluster.start_agent("node1")
    cluster.wait_for("node1 SECOND and VIP only on node2",
                     lambda: cluster.role("node1") == "SECOND"
                     and cluster.vip_holders() == {"node2"}, 20)


def test_sigstop_primary_then_sigcont_fences_itself(cluster: ClusterLab) -> None:
    pids = cluster.lab.pids("node1")

    def signal_all(sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a short-lived script ended
                os.kill(pid, sig)

    signal_all(signal.SIGSTOP)
    try:
        cluster.wait_for("node2 primary", lambda: cluster.role("node2") in ("ALONE", "PRIM"),
                         DEADLINE)
        time.sleep(max(0.0, 3 * T - DEADLINE / 2))
    finally:
        signal_all(signal.SIGCONT)
    resumed = time.monotonic()
    cluster.wait_for("node1 gives up the VIP", lambda: cluster.vip_holders() == {"node2"}, 5)
    assert time.monotonic() - resumed < 5
    cluster.wait_for("node1 SECOND", lambda: cluster.role("node1") == "SECOND", 20)
    assert cluster.client_get() == "node2"


def _cut_between_nodes(c: ClusterLab, cut: bool) -> None:
    """Nodes lose each other on both networks but both still reach the witness."""
    op = "add" if cut else "del"
    for node, other in (("node1", "node2"), ("node2", "node1")):
        c.lab.run(node, ["ip", "route", op, "blackhole", f"{c.lab.address(other, 'lan')}/32"])
    c.lab.set_link("node2", "repl", not cut)


def test_link_between_nodes_cut_exactly_one_primary(cluster: ClusterLab) -> None:
    _cut_between_nodes(cluster, True)
    try:
        cluster.wait_for("node2 WAIT (witness refuses it)",
                         lambda: cluster.role("node2") == "WAIT", 3 * T + 5)
        time.sleep(2 * T)
        assert cluster.role("node1") == "ALONE"
        assert cluster.role("node2") == "WAIT"
        assert cluster.client_get() == "node1"
    finally:
        _cut_between_nodes(cluster, False)
    cluster.wait_for("node2 SECOND again", lambda: cluster.role("node2") == "SECOND", 20)
    assert cluster.dual_primary_samples() == []


def test_witness_down_changes_nothing(cluster: ClusterLab) -> None:
    cluster.signal("witness", signal.SIGKILL)
    time.sleep(3 * T)
    assert cluster.role("node1") == "PRIM" and cluster.role("node2") == "SECOND"
    status = cluster.status("node1")
    assert status is not None and not status["witness"]["reachable"]
    assert cluster.client_get() == "node1"
    assert cluster.dual_primary_samples() == []


def test_swap_moves_the_module(cluster: ClusterLab) -> None:
    reply = cluster.command("node1", "swap")
    assert reply["ok"]
    cluster.wait_for("node2 PRIM, node1 SECOND",
                     lambda: cluster.role("node2") == "PRIM" and cluster.role("node1") == "SECOND",
                     20)
    cluster.wait_for("client on node2", lambda: cluster.client_get() == "node2", 5)
    assert cluster.dual_primary_samples() == []


def test_app_crash_restarts_locally_then_fails_over(lab: Lab, tmp_path: Path) -> None:
    with running_cluster(lab, tmp_path, restart_count=1) as c:
        pidfile = c.work / "run" / "node1.pid"
        for attempt in range(2):
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGKILL)
            if attempt == 0:
                c.wait_for("local restart on node1",
                           lambda p=pid, f=pidfile, c=c: f.exists() and int(f.read_text()) != p
                           and c.client_get() == "node1", 15)
        c.wait_for("failover to node2 after the budget",
                   lambda: c.client_get() == "node2" and c.role("node1") == "STOP", 20)
        assert c.dual_primary_samples() == []


def test_failback_to_the_preferred_node(lab: Lab, tmp_path: Path) -> None:
    with running_cluster(lab, tmp_path, failback=True) as c:
        c.power_off("node1")
        c.wait_for("node2 primary", lambda: c.client_get() == "node2", DEADLINE)
        c.power_on("node1")
        c.wait_for("failback: node1 PRIM again after the stability window",
                   lambda: c.role("node1") == "PRIM" and c.role("node2") == "SECOND", 30)
        c.wait_for("client on node1", lambda: c.client_get() == "node1", 5)
        assert c.dual_primary_samples(cut={"node1"}) == []


def test_forged_and_replayed_heartbeats_are_dropped(cluster: ClusterLab) -> None:
    before = cluster.status("node1")
    assert before is not None
    target = (str(cluster.lab.address("node1", "lan")), 4800)
    good_key = derive_key(cluster.secret.read_bytes().strip(), HEARTBEAT_KEY_PURPOSE)
    forged = encode(derive_key(b"not the cluster key!", HEARTBEAT_KEY_PURPOSE),
                    cluster_id=cluster_id("e2e"), sender="node2", incarnation=1 << 40, seq=1,
                    sent_ms=0, payload=b'{"h":0,"m":{"web":{"r":"PRIM"}}}')
    replayed = encode(good_key, cluster_id=cluster_id("e2e"), sender="node2", incarnation=1,
                      seq=1, sent_ms=0, payload=b'{"h":0,"m":{"web":{"r":"PRIM"}}}')
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "for _ in range(5):\n for f in (bytes.fromhex(sys.argv[1]),bytes.fromhex(sys.argv[2])):"
            "\n  s.sendto(f,(sys.argv[3],int(sys.argv[4])))\n")
    cluster.lab.run("client", [sys.executable, "-c", code, forged.hex(), replayed.hex(),
                               target[0], str(target[1])])
    time.sleep(1)
    after = cluster.status("node1")
    assert after is not None
    c0, c1 = before["heartbeat"]["counters"], after["heartbeat"]["counters"]
    assert c1["dropped_bad_mac"] >= c0["dropped_bad_mac"] + 5
    replays = lambda c: c["dropped_replay"] + c["dropped_duplicate"]  # noqa: E731
    assert replays(c1) >= replays(c0) + 5
    assert cluster.role("node1") == "PRIM" and cluster.role("node2") == "SECOND"


def test_agent_sigterm_hands_the_module_over(cluster: ClusterLab) -> None:
    """An agent that is told to stop never leaves a payload or VIP nothing would fence."""
    cluster.signal("node1", signal.SIGTERM)
    cluster.wait_for("node2 serving", lambda: cluster.client_get() == "node2", DEADLINE)
    assert cluster.procs["node1"].wait(timeout=15) == 0
    assert cluster.vip_holders() == {"node2"}
    assert not (cluster.work / "run" / "node1.pid").exists(), "node1's app still runs"
    assert cluster.dual_primary_samples() == []


def test_isolated_primary_fences_itself_while_the_peer_takes_over(cluster: ClusterLab) -> None:
    """Fault 8: the primary loses peer and witness (its links are down) but keeps running."""
    for net in ("lan", "repl"):
        cluster.lab.set_link("node1", net, False)
    try:
        cluster.wait_for("node1 drops the VIP (self-fencing)",
                         lambda: "node1" not in cluster.vip_holders(), T + 3)
        cluster.wait_for("node2 serving", lambda: cluster.client_get() == "node2", DEADLINE)
        assert cluster.role("node1") == "WAIT"
        assert not (cluster.work / "run" / "node1.pid").exists(), "node1's app still runs"
    finally:
        for net in ("lan", "repl"):
            cluster.lab.set_link("node1", net, True)
    cluster.wait_for("node1 back as SECOND", lambda: cluster.role("node1") == "SECOND", 20)
    assert cluster.dual_primary_samples() == []


def test_kill_9_of_the_agent_alone_fences_its_app(cluster: ClusterLab) -> None:
    """The app survives its agent's death only for milliseconds: the guard fences it, so the
    peer's takeover never overlaps it (two apps would otherwise run)."""
    killed = time.monotonic()
    cluster.procs["node1"].kill()
    cluster.wait_for("node1's app stopped and VIP gone",
                     lambda: not (cluster.work / "run" / "node1.pid").exists()
                     and "node1" not in cluster.vip_holders(), 3)
    assert time.monotonic() - killed < T, "fenced before the peer could take over"
    cluster.wait_for("node2 serving", lambda: cluster.client_get() == "node2", DEADLINE)
    assert cluster.dual_primary_samples() == []
