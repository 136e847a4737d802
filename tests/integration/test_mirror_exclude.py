"""`exclude` patterns on a real FUSE mirror: excluded entries never reach the peer, and moving
entries across the boundary leaves the peer's copy exactly the replicated part of the tree.

The peer is tests/replay_helper.ReplaySink (an independent applier on a second directory).
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.replay_helper import ReplaySink, serving

from hvha.replication.exclude import Excludes
from hvha.replication.mount import MirrorMount

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mirror fs tests mount FUSE file systems: need root and /dev/fuse")

PATTERNS = ["*.tmp", "cache/", "logs/*.gz", "**/scratch"]
libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
RENAME_EXCHANGE = 2


class Env:
    def __init__(self, tmp: Path) -> None:
        self.dir, self.replica = tmp / "data", tmp / "replica"
        self.dir.mkdir()
        self.replica.mkdir()
        self.sink = ReplaySink(str(self.replica))
        self.ex = Excludes(PATTERNS)
        self.mount = MirrorMount(str(self.dir), self.sink, excludes=self.ex)

    def write(self, rel: str, data: bytes) -> None:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

    def replicated_part(self) -> dict[str, tuple[object, ...]]:
        """What the peer must hold: every entry of the primary that is not excluded."""
        return _tree(self.dir, self.ex)

    def peer(self) -> dict[str, tuple[object, ...]]:
        return _tree(self.replica, None)


def _tree(root: Path, ex: Excludes | None) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            if ex is not None and ex.excluded(rel, stat.S_ISDIR(st.st_mode)):
                continue
            content: object = None
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                content = full.read_bytes()
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), content)
    return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    with serving(e.mount):
        yield e


def test_excluded_entries_never_reach_the_peer(env: Env) -> None:
    env.write("db/data.bin", b"kept" * 1000)
    env.write("db/sort.tmp", b"scratch" * 1000)
    env.write("cache/thumb/1.png", b"png")
    env.write("logs/app.log", b"log")
    env.write("logs/app.log.1.gz", b"gz")
    env.write("deep/er/scratch/x", b"x")
    os.chmod(env.dir / "cache", 0o700)
    os.truncate(env.dir / "db/sort.tmp", 10)
    (env.dir / "db/sort.tmp").unlink()
    os.mkdir(env.dir / "logs/archive.tmp")
    os.rmdir(env.dir / "logs/archive.tmp")
    assert sorted(env.peer()) == ["db", "db/data.bin", "deep", "deep/er", "logs",
                                  "logs/app.log"]
    assert env.peer() == env.replicated_part()
    sent = {getattr(op, "path", "") or "" for op in env.sink.ops}
    assert not any(p.endswith(".tmp") or p.startswith("cache") or p.endswith(".gz")
                   or "scratch" in p for p in sent), "an excluded entry was streamed"


def test_atomic_write_through_an_excluded_temp_file_reaches_the_peer(env: Env) -> None:
    """Write config.json.tmp, fsync, rename over config.json: the peer must get the content."""
    env.write("config.json", b'{"v": 1}')
    for v in range(2, 5):
        env.write("config.json.tmp", b'{"v": %d}' % v + b" " * 5000 * v)
        os.chmod(env.dir / "config.json.tmp", 0o640)
        os.rename(env.dir / "config.json.tmp", env.dir / "config.json")
    assert (env.replica / "config.json").read_bytes().startswith(b'{"v": 4}')
    assert env.peer() == env.replicated_part()


def test_moving_a_tree_into_and_out_of_an_excluded_name(env: Env) -> None:
    env.write("build.tmp/a/1.bin", os.urandom(300_000))
    env.write("build.tmp/a/skip.tmp", b"never")  # excluded under either name
    os.symlink("a/1.bin", env.dir / "build.tmp/link")
    os.rename(env.dir / "build.tmp", env.dir / "build")  # excluded -> replicated
    assert (env.replica / "build/a/1.bin").read_bytes() == (env.dir / "build/a/1.bin").read_bytes()
    assert not (env.replica / "build/a/skip.tmp").exists()
    assert env.peer() == env.replicated_part()
    os.rename(env.dir / "build", env.dir / "cache")  # replicated -> excluded (dir pattern)
    assert not (env.replica / "build").exists() and not (env.replica / "cache").exists()
    assert env.peer() == env.replicated_part()


def test_anchored_patterns_are_judged_again_after_a_directory_rename(env: Env) -> None:
    env.write("old/app.log.gz", b"was replicated")
    env.write("logs/keep.log", b"replicated")
    env.write("logs/rotated.gz", b"was excluded")
    os.rename(env.dir / "logs", env.dir / "logs-2026")  # logs/*.gz no longer applies
    os.rename(env.dir / "old", env.dir / "logs")  # now it does
    assert (env.replica / "logs-2026/rotated.gz").read_bytes() == b"was excluded"
    assert not (env.replica / "logs/app.log.gz").exists()
    assert env.peer() == env.replicated_part()


def test_exchange_and_hard_links_across_the_boundary(env: Env) -> None:
    env.write("a.tmp", b"from the excluded side")
    env.write("b", b"replicated side")
    fd = os.open(env.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert libc.renameat2(fd, b"a.tmp", fd, b"b", RENAME_EXCHANGE) == 0
    finally:
        os.close(fd)
    assert (env.replica / "b").read_bytes() == b"from the excluded side"
    os.link(env.dir / "a.tmp", env.dir / "c")  # excluded -> replicated name: a copy
    os.link(env.dir / "b", env.dir / "d.tmp")  # replicated -> excluded name: nothing
    assert (env.replica / "c").read_bytes() == b"replicated side"
    assert env.peer() == env.replicated_part()


def test_sockets_and_fifos_live_only_where_excluded(env: Env) -> None:
    import socket
    (env.dir / "cache").mkdir()  # excluded by "cache/"
    srv = socket.socket(socket.AF_UNIX)
    try:
        srv.bind(str(env.dir / "cache/app.sock"))
        srv.listen(1)
        assert stat.S_ISSOCK((env.dir / "cache/app.sock").lstat().st_mode)
    finally:
        srv.close()
    os.mkfifo(env.dir / "cache/pipe")
    (env.dir / "cache/app.sock").unlink()
    with pytest.raises(PermissionError):  # not excluded: refused, the peer could not have it
        os.mkfifo(env.dir / "pipe")
    assert env.peer() == env.replicated_part() == {}
