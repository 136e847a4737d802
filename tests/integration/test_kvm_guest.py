"""The plain-QEMU path of ``kind: kvm`` with a real guest: the compiled module scripts start,
check and stop a real QEMU (TCG unless hardware KVM works) booting the tiny guest of
:mod:`tests.guest.build_guest`, whose counter on its virtio disk is flushed before each
``ACK <n>`` on the serial console.

What a user relies on, checked here:
* start_prim.sh boots the VM (ACK lines appear), status.sh (the vm_state checker) exits 0 while
  the guest runs and 1 once it is paused or gone, a second start is a no-op;
* a graceful stop presses the ACPI power button over QMP and the guest powers off by itself
  (its /init handles the button: ``POWERDOWN <n>``), a force stop ends QEMU (QMP quit, SIGKILL);
* after any stop, or QEMU killed outright, the image holds at least the last acknowledged
  value, and the next start continues from it;
* on a FUSE file system (a tiny mfusepy passthrough, like the mirror): when it honours O_DIRECT
  the disk runs with cache=none; when it does not (a naive passthrough hands the unaligned
  buffers to an O_DIRECT fd: EINVAL) plain QEMU with cache=none fails, and the module falls
  back to cache=writeback, where the counter is still durable at each ACK.

Needs qemu-system-x86 (installed by the fixture when root) and Debian's packages; skips saying
why otherwise. FUSE cases need root and /dev/fuse. Every QEMU and FUSE daemon started here is
killed by pid, and every mount unmounted, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.guest.build_guest import (
    Guest,
    GuestUnavailable,
    accel,
    build_guest,
    create_disk,
    parse_acks,
    qemu_args,
    read_counter,
)

from hvha.drivers.qmp import AsyncQmpClient, QmpClient

pytestmark = pytest.mark.e2e  # real QEMU, root, FUSE

ROOT = Path(__file__).resolve().parents[2]

PASSTHROUGH = r"""
import os, sys
import mfusepy
src, mnt, mode = sys.argv[1:4]
KEYS = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime", "st_mtime", "st_ctime")

class Passthrough(mfusepy.Operations):
    use_ns = True
    def _p(self, path): return os.path.join(src, path.lstrip("/"))
    def _flags(self, fi):
        flags = fi.flags
        if mode == "direct" and flags & os.O_DIRECT:  # as the mirror does: kernel-side direct
            fi.direct_io = 1                           # I/O, backing file without O_DIRECT
            flags &= ~os.O_DIRECT
        return flags                                   # "naive": O_DIRECT reaches the backing fd
    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        return {k: getattr(st, k) for k in KEYS}
    def readdir(self, path, fh): return [".", "..", *os.listdir(self._p(path))]
    def open(self, path, fi):
        fi.fh = os.open(self._p(path), self._flags(fi)); return 0
    def create(self, path, perm, fi):
        fi.fh = os.open(self._p(path), self._flags(fi) | os.O_CREAT, perm); return 0
    def read(self, path, size, offset, fi): return os.pread(fi.fh, size, offset)
    def write(self, path, data, offset, fi): return os.pwrite(fi.fh, data, offset)
    def fsync(self, path, datasync, fi): os.fsync(fi.fh); return 0
    def flush(self, path, fi): return 0
    def release(self, path, fi): os.close(fi.fh); return 0
    def truncate(self, path, length, fh=None): os.truncate(self._p(path), length); return 0
    def unlink(self, path): os.unlink(self._p(path)); return 0
    def chmod(self, path, m): os.chmod(self._p(path), m); return 0
    def utimens(self, path, times=None): os.utime(self._p(path), ns=times); return 0

mfusepy.FUSE(Passthrough(), mnt, raw_fi=True, foreground=True)
"""

CLUSTER_YAML = """\
cluster:
  name: {cluster}
  secret: {{file: /nonexistent/cluster.key}}
nodes:
  - {{name: n1, address: 127.0.0.1, transport: {{type: local}}}}
  - {{name: n2, address: 127.0.0.2, transport: {{type: local}}}}
heartbeat:
  interval: 500ms
  timeout: 3s
  networks: [{{name: lan, subnet: 127.0.0.0/8}}]
witness: {{arbiter: {{address: 127.0.0.3}}}}
modules:
  - name: vm
    kind: kvm
    payload:
      vm: tiny
      directory: {directory}
      hypervisor: qemu
      command: {command}
    stop: {{mode: shutdown, graceful_timeout: 20s, forced_timeout: 10s}}
    checkers: [{{type: vm_state}}]
"""


@pytest.fixture(scope="module")
def guest() -> Guest:
    if os.geteuid() != 0:
        pytest.skip("the VM tests run QEMU and write /run/hvha: run as root")
    try:
        return build_guest()
    except GuestUnavailable as exc:
        pytest.skip(f"no test guest: {exc}")


@dataclass
class Module:
    """The compiled scripts of one qemu module, and what the test needs to watch it."""

    dir: Path
    disk: Path
    serial: Path
    run_dir: Path

    def run(self, script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HVHA_PYTHON": sys.executable}
        return subprocess.run(["/bin/sh", str(self.dir / script), *args], env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)

    @property
    def qmp(self) -> str:
        return str(self.run_dir / "qmp.sock")

    def pid(self) -> int | None:
        try:
            pid = int((self.run_dir / "payload.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if str(self.run_dir / "payload.pid").encode() in cmdline else None

    def cmdline(self) -> str:
        pid = self.pid()
        assert pid is not None, "QEMU is not running"
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    def acks(self) -> list[int]:
        return parse_acks(self.serial.read_text(errors="replace")) if self.serial.exists() else []

    def wait_acks(self, count: int, timeout: float = 30) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(self.acks()) < count:
            assert time.monotonic() < deadline, f"no {count} ACKs within {timeout}s: " \
                f"{self.serial.read_text(errors='replace')[-500:] if self.serial.exists() else ''}"
            assert self.pid() is not None, "QEMU exited while waiting for ACKs"
            time.sleep(0.1)
        return self.acks()

    def wait_text(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not (self.serial.exists() and text in self.serial.read_text(errors="replace")):
            assert time.monotonic() < deadline, f"no {text!r} on the console in {timeout}s"
            time.sleep(0.1)

    def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.fixture
def make_module(guest: Guest, tmp_path: Path) -> Iterator[Callable[..., Module]]:
    """make_module(vm_dir) -> Module: compile a qemu module whose image lives in vm_dir."""
    made: list[Module] = []
    cluster = f"kvmt{os.getpid() % 100000}"

    def make(vm_dir: Path, *, cache: str | None = None) -> Module:
        name = f"m{len(made)}"
        serial = tmp_path / f"{name}-serial.log"
        disk = create_disk(vm_dir / "disk.img")
        args = qemu_args(guest, disk, serial, accel=accel(guest), cache=cache)
        # -chardev file with append=on: a restart adds to the log instead of truncating it.
        i = args.index("-serial")
        args[i:i + 2] = ["-chardev", f"file,id=s0,path={serial},append=on", "-serial",
                         "chardev:s0"]
        text = CLUSTER_YAML.format(cluster=f"{cluster}-{name}", directory=vm_dir,
                                   command="[" + ", ".join(f"'{a}'" for a in args) + "]")
        (tmp_path / f"{name}.yaml").write_text(text)
        out = tmp_path / f"{name}-out"
        subprocess.run([sys.executable, "-m", "hvha.cli.main", "compile",
                        str(tmp_path / f"{name}.yaml"), "-o", str(out), "--expand"],
                       check=True, capture_output=True, cwd=ROOT)
        module = Module(out / "n1" / "modules" / "vm", disk, serial,
                        Path(f"/run/hvha/{cluster}-{name}/vm"))
        made.append(module)
        prep = module.run("prepare.sh")
        assert prep.returncode == 0, prep.stderr
        return module

    try:
        yield make
    finally:
        for m in made:
            m.kill()
            shutil.rmtree(m.run_dir.parent, ignore_errors=True)


@contextlib.contextmanager
def fuse_passthrough(tmp_path: Path, mode: str) -> Iterator[tuple[Path, Path]]:
    """Mount a passthrough of tmp/src-MODE on tmp/mnt-MODE; yields (backing, mount point)."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("FUSE cases need /dev/fuse and fusermount3 (apt-get install fuse3)")
    if importlib.util.find_spec("mfusepy") is None:
        pytest.skip("FUSE cases need the mfusepy package (pip install mfusepy)")
    src, mnt = tmp_path / f"src-{mode}", tmp_path / f"mnt-{mode}"
    src.mkdir()
    mnt.mkdir()
    errlog = tmp_path / f"fuse-{mode}.log"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", PASSTHROUGH, str(src), str(mnt), mode],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"FUSE passthrough did not mount: {errlog.read_text()[-500:]}")
            time.sleep(0.05)
        yield src, mnt
    finally:
        if os.path.ismount(mnt):
            res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True,
                                 check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _await_failed_write(proc: subprocess.Popen[bytes], log: Path, fuse_log: Path,
                        timeout: float = 120) -> None:
    """Wait for the guest's first failed write; each other outcome fails with its own message.

    It takes about 2 s here (TCG). The deadline is generous because a loaded CI machine once
    took more than 30 s; if it is ever reached, the console and the FUSE daemon's log are shown.
    """
    t0 = time.monotonic()
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "GUEST write 1 failed" in text:
            return
        assert not parse_acks(text), \
            f"cache=none unexpectedly works on the naive passthrough:\n{text[-1500:]}"
        waited = time.monotonic() - t0
        if proc.poll() is not None or waited > timeout:
            fuse = fuse_log.read_text(errors="replace")[-1000:] if fuse_log.exists() else ""
            state = (f"QEMU exited with {proc.returncode}" if proc.poll() is not None
                     else f"no failed write after {waited:.0f} s")
            pytest.fail(f"{state}; console:\n{text[-1500:]}\nFUSE daemon:\n{fuse}")
        time.sleep(0.1)


def _started(module: Module) -> subprocess.CompletedProcess[str]:
    res = module.run("start_prim.sh")
    assert res.returncode == 0, f"start_prim.sh failed: {res.stderr}"
    return res


def test_start_status_graceful_stop_and_restart_continue_the_counter(
        make_module: Callable[..., Module], tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    module = make_module(vm_dir)
    assert module.run("status.sh").returncode == 1, "status must fail before the VM starts"

    _started(module)
    acks = module.wait_acks(3)
    assert acks[:3] == [1, 2, 3]
    assert module.run("status.sh").returncode == 0
    pid = module.pid()
    assert module.run("start_prim.sh").returncode == 0
    assert module.pid() == pid, "a second start must keep the running VM"

    t0 = time.monotonic()
    stop = module.run("stop_prim.sh", "graceful")
    assert stop.returncode == 0, stop.stderr
    assert time.monotonic() - t0 < 10, "the guest handles the power button: no timeout"
    log = module.serial.read_text()
    down = re.findall(r"^POWERDOWN (\d+)", log, re.MULTILINE)
    assert down, f"the guest did not see the power button: {log[-300:]}"
    last = module.acks()[-1]
    assert int(down[-1]) == last
    assert read_counter(module.disk) == last
    assert module.pid() is None
    assert module.run("status.sh").returncode == 1

    _started(module)
    module.wait_text(f"GUEST START {last}")
    acks = module.wait_acks(len(module.acks()) + 2)
    assert acks[-2:] == [last + 1, last + 2] or acks[-1] > last + 2
    assert module.run("stop_prim.sh", "force").returncode == 0
    assert module.pid() is None
    assert read_counter(module.disk) in (module.acks()[-1], module.acks()[-1] + 1)


def test_status_follows_qmp_and_qemu_killed_keeps_acknowledged_value(
        make_module: Callable[..., Module], tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    module = make_module(vm_dir)
    _started(module)
    module.wait_acks(2)
    with QmpClient(module.qmp) as q:
        assert q.query_status().running
        q.execute("stop")
    assert module.run("status.sh").returncode == 1, "a paused guest is not running"

    async def resume() -> str:
        async with AsyncQmpClient(module.qmp) as aq:
            await aq.execute("cont")
            status: str = (await aq.query_status()).status
            return status

    assert asyncio.run(resume()) == "running"
    assert module.run("status.sh").returncode == 0

    module.wait_acks(len(module.acks()) + 2)
    module.kill()
    last = module.acks()[-1]
    assert read_counter(module.disk) in (last, last + 1)
    assert module.run("status.sh").returncode == 1
    assert module.run("stop_prim.sh", "graceful").returncode == 0, "nothing to stop is success"


def test_fuse_with_o_direct_runs_cache_none(make_module: Callable[..., Module],
                                            tmp_path: Path) -> None:
    with fuse_passthrough(tmp_path, "direct") as (backing, mnt):
        module = make_module(mnt)
        try:
            res = _started(module)
            assert "refuses O_DIRECT" not in res.stderr
            assert "cache=none" in module.cmdline()
            module.wait_acks(3)
            assert module.run("stop_prim.sh", "force").returncode == 0
            assert read_counter(backing / "disk.img") in (module.acks()[-1],
                                                          module.acks()[-1] + 1)
        finally:
            module.kill()


def test_fuse_without_o_direct_falls_back_to_writeback_and_keeps_acks(
        make_module: Callable[..., Module], guest: Guest, tmp_path: Path) -> None:
    with fuse_passthrough(tmp_path, "naive") as (backing, mnt):
        # Why the fallback exists: QEMU with cache=none starts on this file system, but every
        # guest write fails (EINVAL behind the FUSE daemon): the guest gets I/O errors, no ACK.
        disk, log = create_disk(mnt / "plain-disk.img"), tmp_path / "plain.log"
        plain = subprocess.Popen(qemu_args(guest, disk, log, accel=accel(guest), cache="none"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _await_failed_write(plain, log, tmp_path / "fuse-naive.log")
        finally:
            plain.kill()
            plain.wait()
        assert parse_acks(log.read_text()) == []

        module = make_module(mnt)
        try:
            res = _started(module)
            assert "refuses O_DIRECT" in res.stderr and "cache=writeback" in res.stderr
            assert "cache=writeback" in module.cmdline()
            assert module.run("status.sh").returncode == 0
            module.wait_acks(3)
            module.kill()  # QEMU dies without any stop: what was ACKed must be in the file
            last = module.acks()[-1]
            assert read_counter(backing / "disk.img") in (last, last + 1)
            _started(module)
            module.wait_text(f"GUEST START {read_counter(backing / 'disk.img')}")
            assert module.run("stop_prim.sh", "graceful").returncode == 0
            assert read_counter(backing / "disk.img") == module.acks()[-1]
        finally:
            module.kill()


def test_guest_answers_http_through_a_loopback_forward(guest: Guest, tmp_path: Path) -> None:
    """The guest's network side (for the failover benchmark): its counter over HTTP."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    disk = create_disk(tmp_path / "disk.img", value=41)
    log = tmp_path / "serial.log"
    proc = subprocess.Popen(qemu_args(guest, disk, log, accel=accel(guest), http_port=port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.monotonic() + 30, b""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/counter",
                                              timeout=2).read()
                if body.strip():
                    break
            time.sleep(0.2)
        assert body.strip() and int(body) > 41, f"no counter over HTTP: {body!r}"
        assert "GUEST START 41" in log.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_counter_record_round_trip_and_damage(tmp_path: Path) -> None:
    """The host-side reader the failover test relies on: exact value, None when damaged."""
    from tests.guest.build_guest import decode_counter, encode_counter

    disk = create_disk(tmp_path / "d.img", value=1234)
    assert read_counter(disk) == 1234
    assert read_counter(create_disk(tmp_path / "z.img")) is None
    record = bytearray(encode_counter(77))
    record[10] ^= 1  # "HVHACNT1 77" -> "HVHACNT1 67": checksum no longer matches
    assert decode_counter(bytes(record)) is None
    assert parse_acks("GUEST START 0\nACK 1\r\nnoise ACK 9\nACK 2\n") == [1, 2]
