"""A new agent detaches what a killed one left over a replicated directory, and nothing else.

Real mounts: the user's own volume at the directory (a tmpfs here, a disk or LV in real life:
a dedicated volume per VM is common), a previous agent's read-only guard stacked on it twice,
and a dead mirror (the FUSE file system of a process killed with SIGKILL) on top. stale.clear
must remove the dead mirror and the guards and keep the volume with its data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hvha.replication import stale
from hvha.replication.applier import read_only_guard

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mounts tmpfs, bind and FUSE file systems: needs root and /dev/fuse")

MOUNT_AND_DIE = (
    "import sys,time,threading\n"
    "from hvha.replication.mount import MirrorMount\n"
    "class S:\n lock=threading.Lock()\n def ordered(self): return self.lock\n"
    " def enqueue(self, op): return 1\n def wait(self, seq): pass\n"
    "MirrorMount(sys.argv[1], S()).start(); print('up', flush=True); time.sleep(60)\n")


def _stack(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [e.fstype for e in stale.parse(f.read()) if e.mount_point == str(path)]


def test_parse_and_judge_a_stack() -> None:
    text = (
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "90 22 0:50 / /vm1 rw,relatime - xfs /dev/sdb1 rw\n"  # the user's volume
        "91 90 0:50 / /vm1 ro,relatime - xfs /dev/sdb1 rw\n"  # a guard on it
        "92 91 0:60 / /vm1 rw,nosuid,nodev - fuse.hvha hvha:/vm1 rw,user_id=0\n"
        "93 22 254:0 /srv/data /vm\\0402 ro,relatime - ext4 /dev/vda rw\n")  # guard on '/vm 2'
    entries = stale.parse(text)
    assert [e.mount_point for e in entries] == ["/", "/vm1", "/vm1", "/vm1", "/vm 2"]
    assert stale.leftovers(entries, "/vm1") == 2  # mirror and guard, not the xfs volume
    assert stale.leftovers(entries, "/vm 2") == 1
    assert stale.leftovers(entries[:2], "/vm1") == 0  # a user's volume alone stays
    ro_volume = "94 22 0:70 / /ro rw - iso9660 /dev/sr0 ro\n95 22 0:71 / /ro ro - nfs h:/x ro\n"
    assert stale.leftovers(stale.parse(ro_volume), "/ro") == 0  # read-only, but not a bind


def test_clear_keeps_the_users_volume_under_a_dead_agents_mounts(tmp_path: Path) -> None:
    vm = tmp_path / "vm1"
    vm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(vm)], check=True)
    proc = None
    try:
        (vm / "disk.img").write_bytes(b"the VM's data")
        read_only_guard(vm)  # left by a killed agent (never released)
        read_only_guard(vm)  # ...twice: it was killed twice
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        proc = subprocess.Popen([sys.executable, "-c", MOUNT_AND_DIE, str(vm)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _stack(vm) == ["tmpfs", "tmpfs", "tmpfs", "fuse.hvha"]

        assert stale.clear(str(vm)) == 3
        assert _stack(vm) == ["tmpfs"]
        assert (vm / "disk.img").read_bytes() == b"the VM's data"
        (vm / "new").write_bytes(b"writable again")
        assert stale.clear(str(vm)) == 0 and _stack(vm) == ["tmpfs"]
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for _ in range(5):
            if not _stack(vm):
                break
            subprocess.run(["umount", "-l", str(vm)], check=False)
