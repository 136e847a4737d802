"""Fault-matrix row 16: the primary's own disk fails (real block I/O errors).

The failing disk: an ext4 file system (no journal) on a loop device whose image lives on a
small tmpfs. Once the tmpfs is full, the loop device fails the writes ext4 sends it, the kernel
logs "Buffer I/O error", and fsync fails. Its data pages are then marked clean, so a second
fsync of the same file returns 0 (PostgreSQL's "fsyncgate"): the mirror must never let that 0
through. Enlarging the tmpfs repairs the disk. (No device-mapper on these machines, so no
dm-error target: this is the same kind of failure, a block device refusing writes.)

Checked with two MirrorReplicators (node1 on the failing disk, primary; node2 secondary):
- every acknowledged record of a ledger writer is on the secondary;
- after the failed fsync, every later fsync on the mirror fails too;
- node1 reports the fault (data_ok False, status, a marker that survives a restart);
- handed over, node1 drops its page cache (which still holds the lost writes, marked clean)
  and refuses node2's resync until an operator says the disk is repaired (`hvha resolve MODULE
  --discard node1`); then node2's resync compares everything: the blocks node1 lost are
  rewritten, the copies end byte-equal on disk and node1's fault is cleared.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_replicator import Lab, digest, needs_root, run, until

RECORD = struct.Struct(">QI")
PAYLOAD = 64 * 1024


@contextlib.contextmanager
def failing_disk(where: Path, mountpoint: Path, room_mib: int) -> Iterator[Path]:
    """ext4 on a loop device whose 256 MiB sparse image sits on a `room_mib` tmpfs (mounted
    at `where`); yields the tmpfs path (remount it larger to repair the disk)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room_mib}m,mode=700", "tmpfs",
                    str(where)], check=True)
    loop = ""
    try:
        img = where / "disk.img"
        with open(img, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E",
                        "lazy_itable_init=1,nodiscard", str(img)], check=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-o", "errors=continue", loop, str(mountpoint)], check=True)
        try:
            yield where
        finally:
            if subprocess.run(["umount", str(mountpoint)], check=False).returncode:
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", "-l", str(where)], check=False)


def _records(data: bytes) -> set[int]:
    size, got = RECORD.size + PAYLOAD, set()
    for off in range(0, len(data) - size + 1, size):
        n, crc = RECORD.unpack_from(data, off)
        if zlib.crc32(data[off + RECORD.size:off + size]) == crc:
            got.add(n)
    return got


@needs_root
def test_a_failing_primary_disk_latches_hands_over_and_is_repaired(tmp_path: Path) -> None:
    lab = Lab(tmp_path)  # certificates and the two directories; nothing mounted yet
    with failing_disk(tmp_path / "room", lab.a, room_mib=8) as room:
        try:  # the replicators' mounts go before the failing disk's
            r1, r2 = lab.start("node1"), lab.start("node2")
            run(r1.become_primary())
            until(r1.in_sync, "node1 in sync")
            ledger = lab.a / "ledger"
            fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            acked: set[int] = set()
            failure: OSError | None = None
            try:
                for n in range(400):  # 25 MiB of records onto 8 MiB of real room
                    payload = os.urandom(PAYLOAD)
                    os.write(fd, RECORD.pack(n, zlib.crc32(payload)) + payload)
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        failure = exc
                        break
                    acked.add(n)
                assert failure is not None, "the disk never failed"
                # the kernel already forgot the error: without the latch this would return 0
                for _ in range(3):
                    with pytest.raises(OSError) as again:
                        os.fsync(fd)
                    assert again.value.errno == failure.errno
            finally:
                os.close(fd)
            other = os.open(lab.a / "other", os.O_WRONLY | os.O_CREAT, 0o644)
            try:  # the whole mirror is suspect, not just the one file
                os.write(other, b"x")
                with pytest.raises(OSError):
                    os.fsync(other)
            finally:
                os.close(other)
            assert len(acked) > 10
            assert not r1.data_ok() and r2.data_ok()
            fault = r1.status()["dirs"][0]["local_fault"]
            assert "fsync" in fault and "ledger" in fault
            assert list((tmp_path / "node1" / "state").rglob("local.fault"))
            # the secondary holds every acknowledged record
            missing = sorted(acked - _records((lab.b / "ledger").read_bytes()))
            assert not missing, f"acknowledged records missing on the secondary: {missing[:5]}"

            # hand over (what the agent does on data_ok False, agent/fsm.py): node1 drops its
            # cache, so its reads come from the disk, where the failed writes never landed
            run(r1.become_secondary())
            assert (lab.a / "ledger").read_bytes() != (lab.b / "ledger").read_bytes(), \
                "node1 still reads the lost writes from its page cache"
            # node2 takes over; node1 refuses its resync while the disk may still drop writes
            # (a rewrite's fsync can return 0 there without the data landing)
            run(r2.become_primary())
            until(lambda: "disk failed" in r2.status()["dirs"][0]["refused"],
                  "node1 refuses the resync")
            assert not r2.in_sync() and not r1.data_ok()
            assert r1.status()["dirs"][0]["conflict"] == "disk_failed"
            # the operator repairs the disk and says so; node2 then rewrites what differs
            subprocess.run(["mount", "-o", "remount,size=512m", str(room)], check=True)
            reply = r1.resolve("node1")
            assert reply["action"] == "disk-repaired", reply
            until(lambda: r2.in_sync() and r1.in_sync(), "node1 resynced by node2", timeout=60)
            assert digest(lab.a) == digest(lab.b)
            with open(lab.a / "ledger", "rb") as f:  # on the disk now, not only in the cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == (lab.b / "ledger").read_bytes()
            assert r1.data_ok() and r1.status()["dirs"][0]["local_fault"] == ""
            assert not list((tmp_path / "node1" / "state").rglob("local.fault"))
        finally:
            lab.close()


@needs_root
def test_a_failing_secondary_disk_is_never_reported_in_sync(tmp_path: Path) -> None:
    """The secondary's disk fails under the replication: node1 goes on alone (its app's
    fsyncs succeed: durable on node1 and in its dirty map), and node2 latches the fault. Once
    the kernel has forgotten the error, a resync into node2 would "succeed" on fsyncs that
    returned 0: node2 must refuse it, never be counted in sync nor promotable, until an
    operator says the disk is repaired; then its copy ends equal to node1's on disk."""
    lab = Lab(tmp_path)
    with failing_disk(tmp_path / "room", lab.b, room_mib=8) as room:
        try:
            r1, r2 = lab.start("node1"), lab.start("node2")
            run(r1.become_primary())
            until(r1.in_sync, "node1 in sync")
            fd = os.open(lab.a / "ledger", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                for n in range(160):  # 10 MiB onto node2's 8 MiB of room; all must succeed
                    payload = os.urandom(PAYLOAD)
                    os.write(fd, RECORD.pack(n, zlib.crc32(payload)) + payload)
                    os.fsync(fd)
            finally:
                os.close(fd)
            until(lambda: not r2.data_ok(), "node2 latches its disk fault")
            assert r2.status()["dirs"][0]["local_fault"]
            assert r1.status()["dirs"][0]["mode"] == "alone"
            time.sleep(2)  # node1 retries every 0.2 s: ten tries, each refused
            assert not r1.in_sync() and not r2.data_ok()
            assert "disk failed" in r1.status()["dirs"][0]["refused"]

            subprocess.run(["mount", "-o", "remount,size=512m", str(room)], check=True)
            assert r2.resolve("node2")["action"] == "disk-repaired"
            until(lambda: r1.in_sync() and r2.in_sync(), "node2 rewritten by node1", timeout=60)
            with open(lab.b / "ledger", "rb") as f:  # on node2's disk, not only in its cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == (lab.a / "ledger").read_bytes()
            assert r2.data_ok() and digest(lab.a) == digest(lab.b)
        finally:
            lab.close()
