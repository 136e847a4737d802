"""The facts script, run for real on this machine, and its parser fed garbage.

The script runs under the system's /bin/sh (dash here) and bash; "installed" runs use this
checkout's own venv as the node's hvha prefix, a bundle extracted by the agent's own code, and
the agent's real control-socket server (with a stand-in for the agent's status), answered by the
real ``hvha status --json`` client. No SSH: the transport is someone else's; the script is the
same bytes either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import EXAMPLES

from hvha import __version__
from hvha.compile.bundle import build_bundles, write_bundles
from hvha.config.validate import validate_file
from hvha.plan import (
    FACTS_SCRIPT,
    FactsError,
    NodeFacts,
    ServiceState,
    desired_from_bundles,
    facts_command,
    facts_script,
    parse_facts,
    plan,
)

VENV = Path(sys.executable).parent.parent
SHELLS = [s for s in ("sh", "bash") if shutil.which(s)]


def run_facts(shell: str = "sh", **settings: str) -> bytes:
    """As a transport would: the script on stdin of ``sh -s``."""
    out = subprocess.run([shell, "-s"], input=facts_script(**settings).encode(),
                         capture_output=True, timeout=60, check=True)
    assert out.stderr == b"", out.stderr
    return out.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_script_is_valid_posix_sh(shell: str) -> None:
    subprocess.run([shell, "-n", "-c", FACTS_SCRIPT], check=True)


@pytest.mark.skipif(Path("/opt/hvha/venv/bin/hvha").exists(), reason="hvha is installed here")
def test_not_installed_node_gives_valid_not_installed_facts() -> None:
    out = subprocess.run(facts_command(), shell=True, capture_output=True, timeout=60,
                         check=True).stdout
    facts = parse_facts("here", out)
    assert json.loads(out)["facts_format"] == 1
    assert (facts.installed, facts.version, facts.bundle_pushed, facts.bundle_running) == (
        False, None, None, None)
    assert (facts.config, facts.status) == (None, None)
    assert facts.service in (ServiceState.ABSENT, ServiceState.STOPPED)
    assert facts.addresses is None or any(a.startswith("127.") for _, a in facts.addresses)


@pytest.mark.parametrize("shell", SHELLS)
def test_installed_but_not_configured(shell: str, tmp_path: Path) -> None:
    out = run_facts(shell, prefix=str(VENV), state_dir=str(tmp_path / "state"),
                    etc=str(tmp_path / "etc"))
    facts = parse_facts("here", out)
    assert (facts.installed, facts.version, facts.service) == (True, __version__,
                                                               ServiceState.ABSENT)
    assert facts.problems == () or all("uid" in p for p in facts.problems)


@pytest.fixture
def node_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hvf", dir="/tmp"))  # short: unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _install(root: Path) -> tuple[dict[str, Any], Path, Path]:
    """A node as apply leaves it: bundle in etc, extracted by the agent's own code."""
    from hvha.agent.bundle_io import install_bundle

    cluster = validate_file(str(EXAMPLES / "lab.yaml")).cluster
    assert cluster is not None
    bundles = build_bundles(cluster, (EXAMPLES / "lab.yaml").read_bytes())
    out = root / "compiled"
    write_bundles(bundles, out)
    etc, state = root / "etc", root / "state"
    etc.mkdir()
    shutil.copy(out / "node1.bundle", etc / "node.bundle")
    (etc / "node.bundle.sha256").write_text(f"{bundles[0].hash}  node.bundle\n")
    install_bundle(etc / "node.bundle", state)
    return desired_from_bundles(bundles), etc, state


STATUS = {"node": "node1", "peer": "node2", "cluster": "lab", "bundle": "x", "started": 1.0,
          "peer_alive": True, "heartbeat": {}, "witness": {"mode": "arbiter", "reachable": True},
          "modules": [{"module": "web", "role": "PRIM", "reason": "peer is SECOND",
                       "peer_alive": True, "peer_role": "SECOND", "data_ok": True,
                       "in_sync": True, "history": []}]}


class _StatusOnly:
    def status(self) -> dict[str, Any]:
        return STATUS


def _serve(path: Path, ready: threading.Event, stop: threading.Event) -> None:
    from hvha.agent.control import ControlServer

    async def main() -> None:
        server = ControlServer(_StatusOnly(), path)
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await server.close()

    asyncio.run(main())


def test_a_running_node_reports_what_it_runs_and_plans_no_changes(node_dir: Path) -> None:
    desired, etc, state = _install(node_dir)
    (state / "agent.pid").write_text(f"{os.getpid()}\n")
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_serve, args=(state / "control.sock", ready, stop))
    thread.start()
    try:
        assert ready.wait(10)
        out = run_facts(prefix=str(VENV), state_dir=str(state), etc=str(etc))
    finally:
        stop.set()
        thread.join(10)
    facts = parse_facts("node1", out)
    assert facts.service is ServiceState.RUNNING and facts.version == __version__
    assert facts.bundle_pushed == facts.bundle_running == desired["node1"].bundle_hash
    assert facts.config is not None and facts.config.node == "node1"
    assert [m["name"] for m in facts.config.modules] == ["web"]
    assert facts.status is not None and facts.status.module("web") is not None
    assert facts.status.modules[0].role.value == "PRIM"
    p = plan({"node1": desired["node1"]}, {"node1": _holding_vip(facts)})
    assert p.summary_line() == "No changes.", [c.reason for c in p.changes]


def _holding_vip(facts: NodeFacts) -> NodeFacts:
    """This machine does not hold the lab's VIP; say it does, or the plan reports that drift."""
    from dataclasses import replace

    return replace(facts, addresses=(*(facts.addresses or ()), ("eth0", "10.77.0.100/24")))


def test_stale_pid_and_damaged_agent_json_still_give_a_valid_document(node_dir: Path) -> None:
    _, etc, state = _install(node_dir)
    (state / "bundle" / "agent.json").write_text('{"modules": [')
    (state / "agent.pid").write_text("999999999\n")
    facts = parse_facts("node1", run_facts(prefix=str(VENV), state_dir=str(state),
                                           etc=str(etc)))
    assert facts.config is None and facts.status is None
    assert facts.service is ServiceState.STOPPED
    assert facts.service_detail == "pid file: 999999999 not running"


@pytest.mark.parametrize("shell", SHELLS)
def test_odd_characters_in_values_are_escaped(shell: str, tmp_path: Path) -> None:
    weird = str(tmp_path / 'a"b\\c\td$e')
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "node.bundle.sha256").write_text('"\\\x01x  y\n')
    doc = json.loads(run_facts(shell, prefix=weird, etc=str(tmp_path / "etc")))
    assert doc["prefix"] == weird.replace("\t", "")
    assert doc["bundle_pushed"] == '"\\x'


def test_facts_command_quotes_its_settings() -> None:
    cmd = facts_command(prefix="/opt/it's here", unit="hvha-agent@x")
    out = subprocess.run(cmd, shell=True, capture_output=True, timeout=60, check=True).stdout
    assert json.loads(out)["prefix"] == "/opt/it's here"


# -- parsing ---------------------------------------------------------------------------------

MINIMAL = b'{"facts_format": 1}'


def test_minimal_document_means_nothing_known() -> None:
    facts = parse_facts("n1", MINIMAL)
    assert facts == NodeFacts("n1", service_detail="no systemd unit, no pid file")


def test_login_noise_before_the_document_is_skipped() -> None:
    facts = parse_facts("n1", b"Welcome to node1!\nLast login: today\n" + MINIMAL + b"\n")
    assert facts.node == "n1"


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "no facts document (no output)"),
    (b"sh: 1: syntax error\n", "no facts document (output starts 'sh: 1: syntax error')"),
    (b'{"facts_format": 1, "hvha": tr', "not valid JSON"),
    (b'{"facts_format": 2}', "facts format 2 is not 1"),
    (b'{"facts_format": "1"}', "facts format '1' is not 1"),
    (b'{"facts_format": 1, "x": ' + b"[" * 100_000, "not valid JSON"),
    (b"\xff\xfe" + b'{"facts_format"' + b"\xff", "not valid JSON"),
])
def test_garbage_is_a_facts_error_naming_the_node(raw: bytes, message: str) -> None:
    with pytest.raises(FactsError, match=r"^n1: ") as info:
        parse_facts("n1", raw)
    assert message in str(info.value)
    assert info.value.node == "n1"


def test_unexpected_pieces_become_problems_not_errors() -> None:
    doc = {"facts_format": 1, "hvha": True, "version": "Python 3.11", "bundle_running": 5,
           "status": {"modules": [{"module": "web", "role": "LEADER"}, "x"]},
           "config": {"modules": [{"kind": "app"}], "start_order": "module/web"},
           "addresses": "eth0=not-an-ip lo=127.0.0.1/8", "uid": "1000"}
    facts = parse_facts("n1", json.dumps(doc).encode())
    assert facts.installed and facts.version is None and facts.bundle_running is None
    assert facts.status is not None and facts.status.modules == ()
    assert facts.config is not None and facts.config.modules == ()
    assert facts.addresses == (("lo", "127.0.0.1/8"),)
    assert facts.service is ServiceState.RUNNING  # the agent answered
    assert len(facts.problems) == 7, facts.problems


@pytest.mark.parametrize(("systemd", "pid", "alive", "state"), [
    ("LoadState=loaded ActiveState=active SubState=running", None, False, ServiceState.RUNNING),
    ("LoadState=loaded ActiveState=inactive SubState=dead", None, False, ServiceState.STOPPED),
    ("LoadState=loaded ActiveState=failed SubState=failed", None, False, ServiceState.FAILED),
    ("LoadState=not-found ActiveState=inactive", "12", True, ServiceState.RUNNING),
    ("LoadState=not-found ActiveState=inactive", "12", False, ServiceState.STOPPED),
    (None, None, False, ServiceState.ABSENT),
])
def test_service_state(systemd: str | None, pid: str | None, alive: bool,
                       state: ServiceState) -> None:
    doc = {"facts_format": 1, "systemd": systemd, "pid": pid, "pid_alive": alive}
    assert parse_facts("n1", json.dumps(doc).encode()).service is state


def test_vip_holding_compares_addresses_not_prefixes() -> None:
    facts = parse_facts("n1", b'{"facts_format": 1, "addresses": "eth0@if7=10.0.0.5/32 "}')
    assert facts.addresses == (("eth0", "10.0.0.5/32"),)
    assert facts.holds("10.0.0.5/24") is True
    assert facts.holds("10.0.0.6/24") is False
    assert parse_facts("n1", MINIMAL).holds("10.0.0.5/24") is None


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=10), kids, max_size=5), max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(value=JSON)
def test_any_json_is_facts_or_a_facts_error(value: Any) -> None:
    for doc in (value, {"facts_format": 1, "config": value, "status": value},
                {"facts_format": 1, **value} if isinstance(value, dict) else value):
        with contextlib.suppress(FactsError):
            parse_facts("n1", json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_facts_or_a_facts_error(raw: bytes) -> None:
    for data in (raw, b'{"facts_format": 1, ' + raw):
        with contextlib.suppress(FactsError):
            parse_facts("n1", data)
