"""The SSH transport against the real OpenSSH server of a lab node (root, iproute2, sshd).

One isolated lab per session (``hvs<pid>``, lan 198.18.<n>.0/25 in the benchmarking range,
another third octet than ``test_lab.py``'s) is built with ``up(sshd=True)``; the admin
machine is this (root) namespace, which reaches node1 over the lab's lan bridge - the same
path `hvha apply` takes. Everything is torn down in the fixture's finalizer, and the test
checks that no namespace and no sshd of the lab is left behind.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.labkit import require_netns

from hvha.lab import Lab
from hvha.lab import sshd as lab_sshd
from hvha.model.cluster import Node, SecretRef
from hvha.model.cluster import Transport as TransportSpec
from hvha.transport import CommandTimeout, HostKeyError, TransportError, connect
from hvha.transport.ssh import SSHTransport

pytestmark = pytest.mark.e2e

_N = os.getpid() % 100000
_NET = (os.getpid() + 125) % 250
SECRET = "pw-that-must-never-show-4711"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_netns("SSH transport tests", sshd=True)
    the_lab = Lab.open(f"hvs{_N}", tmp_path_factory.mktemp("sshlab") / "root",
                       lan=f"198.18.{_NET}.0/25", repl=f"198.19.{_NET}.0/25")
    try:
        the_lab.up(sshd=True)
        yield the_lab
    finally:
        pids = [p for r in lab_sshd.NODES
                if (p := lab_sshd.running_pid(lab_sshd.node_sshd(the_lab.topology, r)))]
        the_lab.down(purge=True, grace=0.5)
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{the_lab.name}-" not in ns
        assert all(not Path(f"/proc/{p}/cmdline").exists()
                   or b"sshd_config" not in Path(f"/proc/{p}/cmdline").read_bytes()
                   for p in pids), "an sshd of the lab survived down()"


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's ssh-agent must not log us in where a test expects a refusal."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def _ssh(lab: Lab, **kw: object) -> SSHTransport:
    args: dict[str, object] = {
        "user": "root",
        "key_file": str(lab_sshd.admin_key(lab.topology)),
        "known_hosts": str(lab_sshd.known_hosts(lab.topology)),
        "connect_timeout": 5.0,
    }
    args.update(kw)
    return SSHTransport(str(lab.address("node1")), **args)  # type: ignore[arg-type]


@pytest.fixture
def node1(lab: Lab) -> Iterator[SSHTransport]:
    with _ssh(lab) as t:
        yield t


def test_runs_as_root_inside_the_node_namespace(lab: Lab, node1: SSHTransport) -> None:
    assert node1.run(["id", "-u"]).stdout == b"0\n"
    addrs = json.loads(node1.run(["ip", "-j", "addr"]).stdout)
    mine = {a["local"] for i in addrs for a in i.get("addr_info", ())}
    assert str(lab.address("node1")) in mine
    assert str(lab.address("node2")) not in mine


def test_exit_code_stderr_and_input(node1: SSHTransport) -> None:
    res = node1.run("cat; echo oops >&2; exit 3", input=b"line\n")
    assert (res.returncode, res.stdout, res.stderr) == (3, b"line\n", b"oops\n")
    big = os.urandom(1 << 20)  # more than the SSH windows: input and output interleave
    assert node1.run(["cat"], input=big).stdout == big
    assert node1.run(["printf", "%s", "it's $HOME"]).stdout == b"it's $HOME"


def test_put_get_with_mode_by_atomic_rename(node1: SSHTransport, tmp_path: Path) -> None:
    target = tmp_path / "node.bundle"  # the nodes share this machine's filesystem
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    data = os.urandom(300_000)
    node1.put(data, str(target), mode=0o640)
    assert node1.run(["stat", "-c", "%a", str(target)]).stdout == b"640\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_ino != inode, "written in place instead of renamed over"
    assert node1.get(str(target)) == data
    node1.put(b"secret\n", str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.bundle"], "temp file left"
    with pytest.raises(FileNotFoundError):
        node1.get(str(tmp_path / "missing"))
    with pytest.raises(TransportError, match="cannot write"):
        node1.put(b"x", str(tmp_path / "no-such-dir" / "f"))


def test_one_connection_serves_many_commands(node1: SSHTransport, tmp_path: Path) -> None:
    """Reuse, seen from the server: every command reports the same client port."""
    seen = {node1.run("echo $SSH_CONNECTION").stdout for _ in range(10)}
    node1.put(b"x", str(tmp_path / "probe"))
    assert node1.get(str(tmp_path / "probe")) == b"x"
    seen.add(node1.run("echo $SSH_CONNECTION").stdout)
    assert len(seen) == 1 and seen.pop().strip()
    assert node1.connections == 1


def test_timeout_leaves_the_connection_usable(node1: SSHTransport) -> None:
    with pytest.raises(CommandTimeout, match=r"did not finish within 0\.3 s"):
        node1.run(["sleep", "10"], timeout=0.3)
    assert node1.run(["echo", "still"]).stdout == b"still\n"
    assert node1.connections == 1


def _other_key_line() -> str:
    pub = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return pub.decode()


def test_changed_host_key_is_refused_even_with_accept_new(lab: Lab, tmp_path: Path) -> None:
    tampered = tmp_path / "known_hosts"
    tampered.write_text(f"{lab.address('node1')} {_other_key_line()}\n")
    before = tampered.read_text()
    for accept in (False, True):
        with pytest.raises(HostKeyError, match="HOST KEY MISMATCH") as info:
            _ssh(lab, known_hosts=str(tampered), accept_new=accept).open()
        assert "ssh-keygen -R" in str(info.value)
    assert tampered.read_text() == before


def test_unknown_host_needs_accept_new(lab: Lab, tmp_path: Path) -> None:
    kh = tmp_path / "sub" / "known_hosts"
    with pytest.raises(HostKeyError, match="--accept-new-host-keys") as info:
        _ssh(lab, known_hosts=str(kh)).open()
    assert "unknown host key" in str(info.value)
    assert not kh.exists()
    spec = TransportSpec(type="ssh", user="root", port=22,
                         key_file=str(lab_sshd.admin_key(lab.topology)), known_hosts=str(kh))
    node = Node(name="node1", address=str(lab.address("node1")), os="linux", transport=spec,
                heartbeat=())
    with connect(node, accept_new_host_keys=True) as t:
        assert t.run(["true"]).ok
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    recorded = kh.read_text().split()
    official = lab_sshd.known_hosts(lab.topology).read_text().splitlines()[0].split()
    assert recorded == official, "the key accepted is the node's real host key"
    with connect(node) as t:  # now known: no flag needed
        assert t.run(["true"]).ok


def test_bad_credentials_give_clear_errors_without_secrets(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HVHA_TEST_SSH_PW", SECRET)
    password = SecretRef("env", "HVHA_TEST_SSH_PW")
    garbage = tmp_path / "garbage_key"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    stranger = tmp_path / "stranger_key"
    stranger.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    cases = [
        (str(tmp_path / "missing_key"), "does not exist"),
        (str(garbage), "cannot load SSH key file"),
        (str(stranger), "authentication to root@.* failed"),
    ]
    for key_file, message in cases:
        with pytest.raises(TransportError, match=message) as info:
            _ssh(lab, key_file=key_file, password=password).open()
        text = "".join(traceback.format_exception(info.value))
        assert SECRET not in text and "not a key" not in text
        exc = info.value  # no chained library exception (its text could carry key bytes)
        assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert "only allows publickey" in str(info.value)
    assert "HVHA_TEST_SSH_PW" in str(info.value)


def test_unreachable_port_is_a_transport_error(lab: Lab) -> None:
    with pytest.raises(TransportError, match=r"cannot reach root@.*:2222") as info:
        _ssh(lab, port=2222).open()
    assert not isinstance(info.value, HostKeyError)
