"""Fault-matrix row 16 end to end: the primary's disk fails under the real control plane.

node1's replicated directory sits on a failing disk: ext4 on a loop device whose image lives
on a small tmpfs, mounted inside node1's own mount namespace. A ledger writer on node1 appends
fsynced records until the disk refuses the writeback and its fsync fails (the kernel logs
"Buffer I/O error"). Then, with nothing else done:
- node1's agent hands the module to node2 (which was an in-sync secondary): node2 serves the
  VIP, node1 follows as secondary and `hvha status` says DISK FAILED;
- every record acknowledged on node1 is in node2's copy;
- node1 refuses node2's resync while its disk may still drop writes (a rewrite's fsync can
  return 0 there without the data landing);
- once the disk is repaired (the tmpfs enlarged) and the operator says so (`hvha resolve web
  --discard node1` on node1), node2's resync compares everything and node1's copy ends equal
  to node2's on disk, its fault cleared.
(No device-mapper on these machines, hence no dm-error target: a block device refusing
writes is the same kind of failure.)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from typing import Any

import pytest

from hvha.lab import Lab
from tests.e2e.apply_kit import client, cluster_file, hvha, lab, module, roles, wait_roles
from tests.e2e.test_replication_lab import LEDGER, _records, _until

pytestmark = pytest.mark.e2e
__all__ = ["lab"]
DATA = "/srv/hvha/data"


def _fault(status: dict[str, Any] | None) -> str:
    """The local fault a node's module status reports ("" if none)."""
    dirs = ((status or {}).get("replication") or {}).get("dirs") or [{}]
    return str(dirs[0].get("local_fault") or "")


def _node1_disk_digest(lab: Lab, path: str) -> str:
    """sha256 of a file on node1's disk (a mount inside node1's own namespace), read after
    its cached pages are dropped."""
    code = ("import hashlib, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); h = hashlib.sha256()\n"
            "while b := os.read(fd, 1 << 20): h.update(b)\nprint(h.hexdigest())")
    out = lab.exec("node1", [sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    return out.communicate(timeout=30)[0].strip()


def test_a_failing_primary_disk_hands_the_module_over(lab: Lab) -> None:
    room = lab.root / "room"
    room.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=700", "tmpfs", str(room)],
                   check=True)
    loop = ""
    try:
        with open(room / "disk.img", "wb") as f:
            f.truncate(256 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E",
                        "lazy_itable_init=1,nodiscard", str(room / "disk.img")], check=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(room / "disk.img")], check=True,
                              capture_output=True, text=True).stdout.strip()
        rc = lab.exec("node1", ["sh", "-ec", f"mkdir -p {DATA} && "
                                f"mount -o errors=continue {loop} {DATA}"]).wait(timeout=30)
        assert rc == 0, "mounting the failing disk in node1's namespace"

        sock = lab.node_path("node1", "/var/lib/hvha/control.sock")
        cluster = cluster_file(lab, replicated=DATA, name="replicated.yaml")
        out = hvha("apply", str(cluster), "--auto-approve")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_roles(lab, {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
        _until(lambda: bool((module(lab, "node1") or {}).get("in_sync")), "in sync", 60)

        writer = lab.exec("node1", [sys.executable, "-c", LEDGER, f"{DATA}/ledger"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        printed, err = writer.communicate(timeout=120)  # it dies on its failed fsync
        failed_at = time.monotonic()
        acked = {int(x) for x in printed.split()}
        assert "OSError" in err and len(acked) > 100, err[-500:]

        _until(lambda: roles(lab)["node1"] == "SECOND"
               and roles(lab)["node2"] in ("PRIM", "ALONE"), "node2 takes the module over", 30)
        handover = time.monotonic() - failed_at
        assert client(lab) == "node2"
        assert "fsync" in _fault(module(lab, "node1"))
        missing = sorted(acked - _records(lab.node_path("node2", f"{DATA}/ledger")))
        assert not missing, f"acknowledged records missing on node2: {missing[:5]}"
        # node1 refuses node2's resync until an operator says its disk is repaired
        _until(lambda: "disk failed" in (module(lab, "node2") or {}).get("replication", {})
               .get("dirs", [{}])[0].get("refused", ""), "node1 refuses the resync", 30)
        assert "DISK FAILED" in hvha("status", "--socket", str(sock)).stdout

        subprocess.run(["mount", "-o", "remount,size=512m", str(room)], check=True)
        out = hvha("resolve", "web", "--discard", "node1", "--yes", "--socket", str(sock))
        assert out.returncode == 0 and "disk fault cleared" in out.stdout, out.stdout + out.stderr
        _until(lambda: bool((module(lab, "node2") or {}).get("in_sync"))
               and not _fault(module(lab, "node1")), "node1 rewritten by a full resync", 120)
        want = hashlib.sha256(lab.node_path("node2", f"{DATA}/ledger").read_bytes()).hexdigest()
        assert _node1_disk_digest(lab, f"{DATA}/ledger") == want
        print(f"handover {handover:.1f} s after the failed fsync; {len(acked)} records acked")
    finally:
        for _ in range(4):  # the mirror, the read-only guard, the failing disk: lazily
            lab.exec("node1", ["umount", "-l", DATA], stderr=subprocess.DEVNULL).wait(timeout=30)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", "-l", str(room)], check=False)

