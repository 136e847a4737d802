"""Build (once, cached) a tiny real guest for the KVM tests, and read its counter from the host.

Why: the VM modules must be tested against a real QEMU running a real kernel that writes to a
real virtio disk, not a mock, yet the lab is a container without images or network. Debian's
packages give everything: ``linux-image-*-cloud-amd64`` (virtio drivers as modules) and
``busybox-static``. Both are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
into the cache, so the host's /boot and dpkg database are never touched; only QEMU itself is
installed (``apt-get install qemu-system-x86``) when missing.

The guest's /init (busybox sh, nothing mounted from disk) loads virtio_pci, virtio_blk,
virtio_net, button and evdev (with their dependencies, read from each module's ``.modinfo``
because the kernel .deb ships no modules.dep), then loops: read the counter record in sector 0
of /dev/vda, add one, write the sector back with O_DIRECT + fsync (a virtio FLUSH the host must
honour), and only then print ``ACK <n>`` on the serial console (ttyS0). So every ACK line in the
serial log is a value that the host was told is durable. The ACPI power button (QMP
``system_powerdown``) is handled: the loop finishes its step, prints ``POWERDOWN <n>`` and powers
off, so a graceful stop really is graceful. With ``hvha.ip=ADDR/LEN`` on the kernel command line
the guest also serves its counter over HTTP (busybox httpd on port 80, ``/counter``).

Counter record, sector 0 (512 bytes): the ASCII line ``HVHACNT1 <n> <md5 of "HVHACNT1 <n>">``
then zeros; :func:`read_counter` decodes it on the host (None when absent or damaged).

Builds are cached under ``/var/cache/hvha-test-guest/<key>/`` (``HVHA_GUEST_CACHE`` overrides),
keyed by the package versions and this recipe. ``python -m tests.guest.build_guest
--print-paths`` builds if needed and prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("HVHA_GUEST_CACHE", "/var/cache/hvha-test-guest"))
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
QEMU_PACKAGE = "qemu-system-x86"
QEMU_BINARY = "qemu-system-x86_64"
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
RECIPE_VERSION = "1"
SECTOR = 512
MAGIC = b"HVHACNT1"
ACK_RE = re.compile(r"^ACK (\d+)\r?$", re.MULTILINE)

INIT = r"""#!/bin/busybox sh
# /init of the hvha test guest: counts on sector 0 of /dev/vda, one flushed write per ACK.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/hvha-modules); do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "GUEST insmod $m failed"
done
interval=0.2 ip=
for w in $(cat /proc/cmdline); do
  case "$w" in
    hvha.interval=*) interval="${w#*=}" ;;
    hvha.ip=*) ip="${w#*=}" ;;
  esac
done
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || { echo "GUEST no /dev/vda"; poweroff -f; }
for ev in /sys/class/input/event*; do
  [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
  ( head -c 1 "/dev/input/${ev##*/}" >/dev/null && : > /tmp/powerdown ) &
done
if [ -n "$ip" ]; then
  mkdir -p /tmp/www
  ip link set lo up
  ip addr add "$ip" dev eth0 && ip link set eth0 up && httpd -p 80 -h /tmp/www
fi
sum() { printf 'HVHACNT1 %s' "$1" | md5sum | cut -c1-32; }
n=0
if dd if=/dev/vda of=/tmp/blk bs=512 count=1 iflag=direct 2>/dev/null; then
  set -- $(head -c 100 /tmp/blk | tr -d '\000' | head -n 1)
  if [ "$1" = HVHACNT1 ] && [ -n "$2" ] && [ "$(sum "$2")" = "$3" ]; then n="$2"; fi
fi
echo "GUEST START $n"
while :; do
  if [ -e /tmp/powerdown ]; then
    echo "POWERDOWN $n"
    sync
    poweroff -f
  fi
  n=$((n + 1))
  { printf 'HVHACNT1 %s %s\n' "$n" "$(sum "$n")"; head -c 512 /dev/zero; } | head -c 512 > /tmp/rec
  if dd if=/tmp/rec of=/dev/vda bs=512 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null; then
    echo "ACK $n"
    [ -z "$ip" ] || echo "$n" > /tmp/www/counter
  else
    echo "GUEST write $n failed"
    n=$((n - 1))
  fi
  sleep "$interval"
done
"""


class GuestUnavailable(RuntimeError):
    """The guest cannot be built or run here; the message says why and what to install."""


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    qemu: str
    key: str
    versions: Mapping[str, str]


# ---- pure helpers ------------------------------------------------------------------------


def encode_counter(n: int) -> bytes:
    """The 512-byte sector 0 record holding counter ``n`` (what the guest writes)."""
    body = MAGIC + b" " + str(n).encode()
    line = body + b" " + hashlib.md5(body).hexdigest().encode() + b"\n"
    return line.ljust(SECTOR, b"\0")


def decode_counter(sector: bytes) -> int | None:
    """Counter from a sector 0 record, None if there is none or it is damaged."""
    fields = sector[:100].split(b"\n", 1)[0].split()
    if len(fields) != 3 or fields[0] != MAGIC or not fields[1].isdigit():
        return None
    body = MAGIC + b" " + fields[1]
    return int(fields[1]) if hashlib.md5(body).hexdigest().encode() == fields[2] else None


def parse_acks(serial_text: str) -> list[int]:
    """The acknowledged counter values printed on the serial console, in order."""
    return [int(m.group(1)) for m in ACK_RE.finditer(serial_text)]


def parse_candidate(policy_output: str) -> str | None:
    """The candidate version from ``apt-cache policy PKG`` output (None if '(none)')."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy_output, re.MULTILINE)
    return None if m is None or m.group(1) == "(none)" else m.group(1)


def parse_kernel_dep(depends_output: str) -> str | None:
    """The versioned kernel image package the metapackage depends on (apt-cache depends)."""
    m = re.search(r"Depends:\s*(linux-image-\S+)", depends_output)
    return m.group(1) if m else None


def modinfo_depends(ko: bytes) -> list[str]:
    """``depends=`` of a kernel module, read from the ``.modinfo`` section of its ELF64 file."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise ValueError("not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _n, stroff, _s = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if ko[stroff + name: ko.index(b"\0", stroff + name)] == b".modinfo":
            for item in ko[off: off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []


def load_order(wanted: Iterable[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Modules to insmod, dependencies first, each once."""
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise ValueError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        for dep in depends.get(name, ()):
            visit(dep, (*stack, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def cpio_newc(entries: Sequence[tuple[str, int, bytes | tuple[int, int]]]) -> bytes:
    """A cpio 'newc' archive of (path, mode, data) entries; data (major, minor) for a device
    node, the target path for a symlink (mode S_IFLNK). Deterministic (mtime 0, root-owned)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        rmajor, rminor = data if isinstance(data, tuple) else (0, 0)
        body = b"" if isinstance(data, tuple) else data
        name = path.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(body), 0, 0, rmajor, rminor, len(name), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        pad()
        out += body
        pad()
    return bytes(out)


def qemu_args(guest: Guest, disk: Path, serial_log: Path, *, accel: str = "tcg",
              cache: str | None = "none", memory_mb: int = 128, interval: float = 0.2,
              http_port: int | None = None) -> list[str]:
    """A QEMU command line booting the guest on ``disk`` (raw) with its console in a file.

    No -daemonize/-pidfile/-qmp here: those are the hvha module's job. ``http_port`` forwards
    127.0.0.1:PORT to the guest's HTTP counter over a restricted user network (loopback only).
    """
    drive = f"file={disk},format=raw,if=virtio" + (f",cache={cache}" if cache else "")
    append = f"console=ttyS0 panic=-1 quiet hvha.interval={interval:g}"
    args = [guest.qemu, "-accel", accel, "-m", str(memory_mb), "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{serial_log}",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-drive", drive]
    if http_port is not None:
        append += " hvha.ip=10.0.2.15/24"
        args += ["-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{http_port}-:80",
                 "-device", "virtio-net-pci,netdev=n0,romfile="]
    return [*args, "-append", append]


# ---- host side effects -------------------------------------------------------------------


def read_counter(image: Path | str) -> int | None:
    """The counter stored in a guest disk image on the host (None if never written)."""
    with open(image, "rb") as fh:
        return decode_counter(fh.read(SECTOR))


def create_disk(path: Path | str, size: int = 1 << 20, value: int | None = None) -> Path:
    """A raw disk image for the guest (zeros, or holding counter ``value``)."""
    path = Path(path)
    with open(path, "wb") as fh:
        fh.truncate(size)
        if value is not None:
            fh.write(encode_counter(value))
    return path


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    res = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False,
                         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if res.returncode != 0:
        raise GuestUnavailable(f"`{' '.join(argv)}` failed: {res.stderr.strip()[-400:]}")
    return res.stdout


def ensure_qemu() -> str:
    """Path of qemu-system-x86_64, installing Debian's qemu-system-x86 if missing (root)."""
    found = shutil.which(QEMU_BINARY)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise GuestUnavailable(f"{QEMU_BINARY} missing: apt-get install {QEMU_PACKAGE} (as root)")
    _run(["apt-get", "install", "-y", "--no-install-recommends", QEMU_PACKAGE])
    found = shutil.which(QEMU_BINARY)
    if not found:
        raise GuestUnavailable(f"{QEMU_PACKAGE} installed but {QEMU_BINARY} is not on PATH")
    return found


def package_versions() -> dict[str, str]:
    """{package: candidate version} for the versioned kernel image and busybox-static."""
    if shutil.which("apt-cache") is None:
        raise GuestUnavailable("apt-cache missing: the guest is built from Debian packages")
    kernel = parse_kernel_dep(_run(["apt-cache", "depends", KERNEL_META]))
    if kernel is None and os.geteuid() == 0:
        _run(["apt-get", "update"])
        kernel = parse_kernel_dep(_run(["apt-cache", "depends", KERNEL_META]))
    if kernel is None:
        raise GuestUnavailable(f"no {KERNEL_META} in the apt lists: run apt-get update")
    versions = {}
    for pkg in (kernel, BUSYBOX):
        version = parse_candidate(_run(["apt-cache", "policy", pkg]))
        if version is None:
            raise GuestUnavailable(f"no candidate version of {pkg}: run apt-get update")
        versions[pkg] = version
    return versions


def cache_key(versions: Mapping[str, str]) -> str:
    text = json.dumps({"versions": dict(versions), "recipe": RECIPE_VERSION, "init": INIT,
                       "modules": MODULES}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(versions: Mapping[str, str], dest: Path, work: Path) -> None:
    kernel_pkg = next(p for p in versions if p.startswith("linux-image-"))
    _run(["apt-get", "download", *(f"{p}={v}" for p, v in versions.items())], cwd=work)
    root = work / "root"
    for deb in sorted(work.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    busybox = root / "bin" / "busybox"
    if not vmlinuz or not busybox.exists():
        raise GuestUnavailable(f"{kernel_pkg} or {BUSYBOX} did not unpack a kernel/busybox")
    kos = {p.name[:-3].replace("-", "_"): p for p in (root / "lib" / "modules").rglob("*.ko")}
    depends = {name: [d.replace("-", "_") for d in modinfo_depends(p.read_bytes())]
               for name, p in kos.items()}
    order = load_order(MODULES, depends)
    missing = [m for m in order if m not in kos]
    if missing:
        raise GuestUnavailable(f"{kernel_pkg} has no module(s) {missing} (built in?)")
    entries: list[tuple[str, int, bytes | tuple[int, int]]] = [
        ("bin", 0o40755, b""), ("dev", 0o40755, b""), ("dev/console", 0o20600, (5, 1)),
        ("etc", 0o40755, b""), ("lib", 0o40755, b""), ("lib/modules", 0o40755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()), ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, INIT.encode()),
        ("etc/hvha-modules", 0o100644, ("\n".join(order) + "\n").encode())]
    entries += [(f"lib/modules/{m}.ko", 0o100644, kos[m].read_bytes()) for m in order]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(vmlinuz[-1], tmp / "vmlinuz")
    (tmp / "initrd.img").write_bytes(gzip.compress(cpio_newc(entries), 6, mtime=0))
    (tmp / "manifest.json").write_text(json.dumps(
        {"versions": dict(versions), "modules": order, "kernel": vmlinuz[-1].name}, indent=2))
    os.replace(tmp, dest)


def build_guest(cache_root: Path = CACHE_ROOT) -> Guest:
    """The guest's kernel and initramfs, built into ``cache_root`` unless already there.

    Raises :class:`GuestUnavailable` (with the reason) when QEMU or the packages cannot be had.
    Without apt (offline), the newest complete build already in the cache is used.
    """
    qemu = ensure_qemu()
    cache_root.mkdir(parents=True, exist_ok=True)
    try:
        versions: dict[str, str] | None = package_versions()
    except GuestUnavailable:
        versions = None
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if versions is None:
            built = sorted(cache_root.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
            if not built:
                raise GuestUnavailable("cannot query apt for the guest's packages and no "
                                       f"cached build in {cache_root}: run apt-get update")
            dest = built[-1].parent
            versions = json.loads(built[-1].read_text())["versions"]
        else:
            dest = cache_root / cache_key(versions)
            if not (dest / "manifest.json").exists():
                with tempfile.TemporaryDirectory(prefix="hvha-guest-") as work:
                    _build(versions, dest, Path(work))
    return Guest(dest / "vmlinuz", dest / "initrd.img", qemu, dest.name, versions)


def kvm_works(guest: Guest, timeout: float = 10.0) -> bool:
    """Does hardware KVM really run this guest here? (Nested KVM may hang: a boot is tried.)

    The answer is cached next to the build, per host kernel; ``HVHA_GUEST_ACCEL=tcg|kvm``
    skips the probe.
    """
    forced = os.environ.get("HVHA_GUEST_ACCEL")
    if forced in ("tcg", "kvm"):
        return forced == "kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    marker = guest.kernel.parent / f"kvm-probe-{os.uname().release}.json"
    with contextlib.suppress(OSError, ValueError):
        return bool(json.loads(marker.read_text())["works"])
    with tempfile.TemporaryDirectory(prefix="hvha-kvm-probe-") as tmp:
        disk, log = create_disk(Path(tmp) / "disk.img"), Path(tmp) / "serial.log"
        proc = subprocess.Popen(qemu_args(guest, disk, log, accel="kvm", cache=None),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        works = False
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if log.exists() and parse_acks(log.read_text(errors="replace")):
                    works = True
                    break
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
    marker.write_text(json.dumps({"works": works}))
    return works


def accel(guest: Guest) -> str:
    """``kvm`` when hardware KVM works here, else ``tcg``."""
    return "kvm" if kvm_works(guest) else "tcg"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest.build_guest",
                                     description="Build (or find in the cache) the test guest.")
    parser.add_argument("--print-paths", action="store_true",
                        help="print kernel, initrd, qemu, accel and versions as JSON")
    parser.add_argument("--cache", type=Path, default=CACHE_ROOT)
    args = parser.parse_args(argv)
    try:
        guest = build_guest(args.cache)
    except GuestUnavailable as exc:
        parser.exit(2, f"guest unavailable: {exc}\n")
    if args.print_paths:
        info = {**asdict(guest), "kernel": str(guest.kernel), "initrd": str(guest.initrd),
                "accel": accel(guest)}
        print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
