"""The local transport and the secret resolver: real processes and files, no root needed."""

from __future__ import annotations

import os
import stat
import threading
import traceback
from pathlib import Path

import pytest

from hvha.model.cluster import Node, SecretRef
from hvha.model.cluster import Transport as TransportSpec
from hvha.transport import (
    CommandTimeout,
    LocalTransport,
    Result,
    Secret,
    SecretError,
    Transport,
    TransportError,
    connect,
    resolve,
)
from hvha.transport.local import TMP_MARK, temp_name

SECRET = "s3cr3t-do-not-print"


def _node(kind: str) -> Node:
    spec = TransportSpec(type=kind, user="root", port=None)
    return Node(name="n1", address="127.0.0.1", os="linux", transport=spec, heartbeat=())


def test_connect_gives_a_local_transport_that_meets_the_protocol() -> None:
    with connect(_node("local")) as t:
        assert isinstance(t, LocalTransport)
        assert isinstance(t, Transport)


def test_unknown_transport_type_is_a_user_error() -> None:
    with pytest.raises(TransportError, match="unknown transport type 'telnet'"):
        connect(_node("telnet"))


def test_run_list_string_input_and_exit_code() -> None:
    t = LocalTransport()
    assert t.run(["printf", "%s|", "a b", "$HOME"]) == Result(0, b"a b|$HOME|", b"")
    res = t.run("echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr, res.ok) == (7, b"out\n", b"err\n", False)
    assert t.run(["cat"], input=b"\x00binary\xff").stdout == b"\x00binary\xff"
    assert t.run(["true"]).text() == ""


def test_missing_program_is_exit_127_like_a_shell() -> None:
    res = LocalTransport().run(["/nonexistent/prog"])
    assert res.returncode == 127 and b"not found" in res.stderr


def test_timeout_kills_the_command_and_says_so() -> None:
    with pytest.raises(CommandTimeout, match=r"did not finish within 0.2 s"):
        LocalTransport().run(["sleep", "5"], timeout=0.2)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755, 0o400])
def test_put_sets_the_mode_and_get_reads_it_back(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "f.conf"
    t = LocalTransport()
    t.put(b"data\n", str(target), mode)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert t.get(str(target)) == b"data\n"


def test_put_replaces_by_rename_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.write_bytes(b"old")
    before = target.stat().st_ino
    LocalTransport().put(b"new" * 100000, str(target))
    assert target.read_bytes() == b"new" * 100000
    assert target.stat().st_ino != before, "written in place instead of renamed over"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_put_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A reader polling the file only ever sees a whole old or a whole new version."""
    target = tmp_path / "state"
    versions = [bytes([65 + i]) * 200_000 for i in range(8)]
    target.write_bytes(versions[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    th = threading.Thread(target=reader)
    th.start()
    try:
        t = LocalTransport()
        for v in versions[1:]:
            t.put(v, str(target))
    finally:
        stop.set()
        th.join()
    assert seen <= set(versions)


def test_put_temp_file_never_has_a_wider_mode(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        LocalTransport().put(b"x", str(tmp_path / "k"), 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_failed_put_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LocalTransport().put(b"x", str(tmp_path / "missing-dir" / "f"))
    assert list(tmp_path.iterdir()) == []


def test_get_of_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LocalTransport().get(str(tmp_path / "nope"))


def test_temp_name_stays_in_the_same_directory() -> None:
    assert temp_name("/etc/hvha/node.bundle").startswith(f"/etc/hvha/.node.bundle{TMP_MARK}")
    assert temp_name("rel.txt").startswith(f".rel.txt{TMP_MARK}")
    assert temp_name("/etc/x") != temp_name("/etc/x")


# --- secrets --------------------------------------------------------------------------------


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVHA_TEST_PW", SECRET)
    assert resolve(SecretRef("env", "HVHA_TEST_PW")) == SECRET
    f = tmp_path / "pw"
    f.write_text(SECRET + "\n")
    f.chmod(0o600)
    assert resolve(SecretRef("file", str(f))) == SECRET
    f.chmod(0o400)
    assert resolve(SecretRef("file", str(f))) == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    f = tmp_path / "pw"
    f.write_text(SECRET)
    f.chmod(mode)
    with pytest.raises(SecretError, match=rf"chmod 600 {f}") as info:
        resolve(SecretRef("file", str(f)))
    assert SECRET not in str(info.value)


def test_secret_errors_name_the_reference_never_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HVHA_TEST_UNSET", raising=False)
    with pytest.raises(SecretError, match="HVHA_TEST_UNSET is not set"):
        resolve(SecretRef("env", "HVHA_TEST_UNSET"))
    monkeypatch.setenv("HVHA_TEST_EMPTY", "")
    with pytest.raises(SecretError, match="empty"):
        resolve(SecretRef("env", "HVHA_TEST_EMPTY"))
    with pytest.raises(SecretError, match="does not exist"):
        resolve(SecretRef("file", str(tmp_path / "missing")))
    with pytest.raises(SecretError, match="unknown secret source"):
        resolve(SecretRef("vault", "x"))
    link = tmp_path / "link"
    target = tmp_path / "real"
    target.write_text(SECRET)
    target.chmod(0o600)
    link.symlink_to(target)
    with pytest.raises(SecretError, match="symlink") as info:
        resolve(SecretRef("file", str(link)))
    text = "".join(traceback.format_exception(info.value))
    assert SECRET not in text


def test_secret_object_hides_its_value() -> None:
    s = Secret(SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in f"{s}"
    assert s.reveal() == SECRET and s == Secret(SECRET)
