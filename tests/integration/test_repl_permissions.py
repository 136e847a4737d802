"""Permissions through the mirror behave as on the local file system: setuid, setgid and file
capabilities dropped by writes, POSIX ACLs enforced and inherited, the creator's umask.

Each case runs the same command on a plain directory of the same ext4 and on a real mirror
mount, and the outcome (mode, ACLs, access granted or denied) must match there and on the
replica.

A write or truncation by a process without CAP_FSETID drops a file's setuid bit (and setgid
with group-execute); any write or truncation drops its file capabilities. The FUSE kernel
leaves that to the file system for direct-I/O handles (the mirror's write-only and O_DIRECT
opens) and for O_TRUNC opens (hvha.replication.killpriv). "Unprivileged" is root without
CAP_FSETID (setpriv), so the capability, not the uid, is what is tested.

ACLs and the umask: the mount asks for FUSE_CAP_POSIX_ACL (the kernel enforces ACLs) and
FUSE_CAP_DONT_MASK (the mirror applies the creator's umask, unless the parent directory has a
default ACL, which POSIX lets decide instead)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_mirrorfs import Env
from tests.replay_helper import serving

from hvha.replication.killpriv import CAPS

NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw=ep
UNPRIVILEGED = ["setpriv", "--bounding-set=-fsetid"]
DIRECT = ("import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT); "
          "os.pwrite(fd, mmap.mmap(-1, 4096), 0)")
CASES = {  # name: (argv after the prefix, with {f} for the file; without CAP_FSETID?)
    "write-only append": (["sh", "-c", 'echo more >> "$0"', "{f}"], True),
    "O_TRUNC open": (["sh", "-c", ': > "$0"', "{f}"], True),
    "truncate": (["truncate", "-s", "1", "{f}"], True),
    "read-write pwrite": (["python3", "-c", "import os, sys; os.pwrite(os.open(sys.argv[1], "
                           "os.O_RDWR), b'y', 0)", "{f}"], True),
    "O_DIRECT pwrite": (["python3", "-c", DIRECT, "{f}"], True),
    "large write-only": (["python3", "-c", "import mmap, os, sys; os.write(os.open(sys.argv[1],"
                          " os.O_WRONLY), mmap.mmap(-1, 1 << 20))", "{f}"], True),
    "write-only append with CAP_FSETID": (["sh", "-c", 'echo more >> "$0"', "{f}"], False),
}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("setpriv"),
    reason="needs root, /dev/fuse and setpriv (util-linux) to run a writer without "
           "CAP_FSETID")


@pytest.fixture
def env() -> Iterator[Env]:
    top = tempfile.mkdtemp(prefix="hvha-privs-")
    os.chmod(top, 0o755)
    os.makedirs(os.path.join(top, "bare"))
    e = Env(Path(top))
    try:
        with serving(e.mount):
            yield e
    finally:
        shutil.rmtree(top, ignore_errors=True)


def state(path: str, *xattrs: str) -> tuple[str, ...]:
    """The permission bits, then each extended attribute's value in hex ("-": none)."""
    out = [f"{os.stat(path).st_mode & 0o7777:o}"]
    for name in xattrs:
        try:
            out.append(os.getxattr(path, name).hex())
        except OSError:
            out.append("-")
    return tuple(out)


def prepare(path: str, mode: int, caps: bool) -> None:
    with open(path, "wb") as f:
        f.write(b"x" * 8192)
    os.chmod(path, mode)
    if caps:
        os.setxattr(path, CAPS, NET_RAW)
    assert state(path, CAPS) == (f"{mode:o}", NET_RAW.hex() if caps else "-"), \
        "the test could not set up the file"


def run(argv: list[str], path: str, unprivileged: bool) -> None:
    cmd = [a.replace("{f}", path) for a in argv]
    subprocess.run((UNPRIVILEGED if unprivileged else []) + cmd, check=True, timeout=30)


@pytest.mark.parametrize("mode,caps", [(0o6777, False), (0o2777, False), (0o2767, False),
                                       (0o0755, True)],
                         ids=["setuid+setgid", "setgid+g+x", "setgid-without-g+x", "file-caps"])
@pytest.mark.parametrize("case", list(CASES))
def test_privileges_drop_as_on_the_local_file_system(env: Env, case: str, mode: int,
                                                     caps: bool) -> None:
    argv, unprivileged = CASES[case]
    bare = str(Path(env.dir).parent / "bare" / "f")
    prepare(bare, mode, caps)
    run(argv, bare, unprivileged)
    expected = state(bare, CAPS)
    prepare(env.p("f"), mode, caps)
    run(argv, env.p("f"), unprivileged)
    assert state(env.p("f"), CAPS) == expected, f"{case}: the mirror differs from ext4"
    assert state(os.path.join(env.replica, "f"), CAPS) == expected, f"{case}: the replica differs"


def test_a_file_given_setuid_while_open_drops_it_at_the_next_write(env: Env) -> None:
    """A writer holds a write-only handle (not privileged when opened); root then makes the
    file setuid; the writer's next write drops the bit, on both copies, as on ext4."""
    script = ("import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); print(1, flush=True); "
              "sys.stdin.readline(); os.write(fd, b'y')")
    results = []
    for path in (str(Path(env.dir).parent / "bare" / "g"), env.p("g")):
        prepare(path, 0o777, False)
        with subprocess.Popen([*UNPRIVILEGED, "python3", "-c", script, path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "1"
            os.chmod(path, 0o4777)
            proc.stdin.write("\n")
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        results.append(state(path, CAPS))
    assert results[0] == ("777", "-")
    assert results[1] == results[0]
    assert state(os.path.join(env.replica, "g"), CAPS) == results[0]



# -- POSIX ACLs and the umask
ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER, ANY = 0x01, 0x02, 0x04, 0x10, 0x20, 0xFFFFFFFF
NOBODY = 65534


def acl(*entries: tuple[int, int, int]) -> bytes:
    """The xattr form of an ACL (version 2, then tag, permissions, id per entry)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acls(path: str) -> tuple[str, ...]:
    return state(path, ACCESS, DEFAULT)


def as_nobody(script: str, *args: str) -> str:
    out = subprocess.run(["python3", "-c", script, *args], user=NOBODY, group=NOBODY,
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


TRY_WRITE = ("import sys\ntry:\n    open(sys.argv[1], 'a').write('more')\n    print('wrote')\n"
             "except PermissionError:\n    print('denied')")


@pytest.mark.parametrize("grant", [6, 0], ids=["acl-grants", "acl-mask-denies"])
def test_acls_decide_access_as_on_the_local_file_system(env: Env, grant: int) -> None:
    """A file whose mode alone denies nobody (0600 root) but whose ACL names nobody with rw,
    and a mask of rw (granted) or --- (denied)."""
    entries = ((USER_OBJ, 6, ANY), (USER, 6, NOBODY), (GROUP_OBJ, 0, ANY), (MASK, grant, ANY),
               (OTHER, 0, ANY))
    outcome = []
    for d in (str(Path(env.dir).parent / "bare"), env.dir):
        os.chmod(d, 0o755)
        f = os.path.join(d, "shared")
        with open(f, "w") as fh:
            fh.write("x")
        os.chmod(f, 0o600)
        os.setxattr(f, ACCESS, acl(*entries))
        outcome.append((as_nobody(TRY_WRITE, f), acls(f)))
    assert outcome[0][0] == ("wrote" if grant else "denied")
    assert outcome[1] == outcome[0]
    assert acls(os.path.join(env.replica, "shared")) == outcome[0][1]


CREATE = ("import os, sys; os.umask(int(sys.argv[2], 8)); "
          "os.close(os.open(sys.argv[1] + '/f', os.O_CREAT | os.O_WRONLY, 0o666)); "
          "os.close(os.open(sys.argv[1] + '/g', os.O_CREAT | os.O_WRONLY, 0o640)); "
          "os.mkdir(sys.argv[1] + '/d', 0o777)")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027, 0o000], ids=lambda u: f"umask-{u:03o}")
@pytest.mark.parametrize("default_acl", [False, True], ids=["no-default-acl", "default-acl"])
def test_new_entries_get_the_umask_or_the_default_acl(env: Env, umask: int,
                                                      default_acl: bool) -> None:
    """Files and a directory created under a given umask, in a directory with or without a
    default ACL: the same modes and ACLs as on ext4, on the mount and on the replica."""
    got = []
    for d in (str(Path(env.dir).parent / "bare" / "new"), env.p("new")):
        os.mkdir(d)
        os.chmod(d, 0o777)
        if default_acl:
            os.setxattr(d, DEFAULT, acl((USER_OBJ, 7, ANY), (USER, 7, NOBODY),
                                        (GROUP_OBJ, 5, ANY), (MASK, 7, ANY), (OTHER, 5, ANY)))
        out = subprocess.run(["python3", "-c", CREATE, d, f"{umask:o}"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        got.append({n: acls(os.path.join(d, n)) for n in ("f", "g", "d")})
    assert got[1] == got[0], f"umask {umask:o}: the mirror differs from ext4"
    replica = {n: acls(os.path.join(env.replica, "new", n)) for n in ("f", "g", "d")}
    assert replica == got[0], "the replica differs"
