"""Side effects of the lab: run `ip`, observe what exists, enter and empty namespaces.

Why separate: :mod:`hvha.lab.topology` decides, this module only executes and observes, so
every dangerous operation sits in one short file. Two safety rules live here: processes are
only ever found through ``ip netns pids`` and re-checked against the namespace's inode right
before each signal (never by name), and a "lab" namespace that turns out to be the namespace
we run in is refused outright.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hvha.lab.topology import Command, LinkState, Observed, Route, Topology

NETNS_DIR = Path("/run/netns")
_MISSING_MARKERS = ("Cannot find device", "No such file", "does not exist", "Cannot open")

# Run inside a namespace when no `ping` binary exists: one ICMP echo over a ping socket
# (the lab sets net.ipv4.ping_group_range so this works for any group), raw socket fallback.
_PING_SCRIPT = r"""
import socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    raw = False
except OSError:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw = True
ident, seq, payload = 0x4856, 1, b"hvha-lab-ping"
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    t += t >> 16
    return ~t & 0xFFFF
hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, seq) + payload, (dst, 0))
deadline = time.monotonic() + timeout
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        sys.exit(1)
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(2048)
    except (TimeoutError, socket.timeout):
        sys.exit(1)
    if raw:
        data = data[(data[0] & 0x0F) * 4:]
    if addr[0] == dst and data[:1] == b"\0" and data[6:8] == struct.pack("!H", seq):
        sys.exit(0)
"""


class LabError(Exception):
    """The lab cannot do what was asked; the message says why and what to do."""


def check_environment() -> None:
    """Raise :class:`LabError` unless we are root and iproute2's `ip` is installed."""
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces and needs root: rerun with sudo")
    if shutil.which("ip") is None:
        raise LabError("`ip` (iproute2) is not installed: install the iproute2 package")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise :class:`LabError` with its stderr if it fails and ``check``."""
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LabError("`ip` (iproute2) is not installed: install the iproute2 package") from exc
    if check and res.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = ip("-j", *args).stdout.strip()
    data = json.loads(out) if out else []
    return [d for d in data if isinstance(d, dict)]


def parse_links(entries: Iterable[Mapping[str, Any]]) -> dict[str, LinkState]:
    """Parse the JSON of ``ip -j -d addr show`` into ``{ifname: LinkState}``."""
    links: dict[str, LinkState] = {}
    for e in entries:
        info = e.get("linkinfo") or {}
        peer = e.get("link_index")
        links[str(e["ifname"])] = LinkState(
            name=str(e["ifname"]),
            index=int(e["ifindex"]),
            kind=str(info.get("info_kind", "")),
            up="UP" in e.get("flags", ()),
            master=e.get("master"),
            addresses=frozenset(
                f"{a['local']}/{a['prefixlen']}"
                for a in e.get("addr_info", ())
                if a.get("family") == "inet" and "local" in a
            ),
            peer_index=int(peer) if peer is not None else None,
            mac=str(e.get("address", "")).lower(),
        )
    return links


def parse_routes(entries: Iterable[Mapping[str, Any]]) -> tuple[Route, ...]:
    """Parse ``ip -j -4 route show table all``, keeping unicast routes only."""
    return tuple(
        Route(str(e["dst"]), e.get("dev"))
        for e in entries
        if "dst" in e and e.get("type", "unicast") == "unicast"
    )


def list_namespaces() -> set[str]:
    return {str(d["name"]) for d in _ip_json("netns", "list") if "name" in d}


def _read_sysctls(ns: str, keys: Sequence[str]) -> dict[str, str]:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-n", *keys],
        capture_output=True, text=True, check=False,
    )
    values = res.stdout.splitlines() if res.returncode == 0 else []
    return dict(zip(keys, values, strict=False))


def observe(topo: Topology) -> Observed:
    """Read what exists now: namespaces, root-namespace links and routes, lab namespace links."""
    present = list_namespaces()
    ns_links: dict[str, dict[str, LinkState]] = {}
    sysctls: dict[str, dict[str, str]] = {}
    broken: set[str] = set()
    for host in topo.hosts:
        ns = host.namespace
        if ns not in present:
            continue
        res = ip("-n", ns, "-j", "-d", "addr", "show", check=False)
        if res.returncode != 0:
            broken.add(ns)
            continue
        ns_links[ns] = parse_links(json.loads(res.stdout or "[]"))
        sysctls[ns] = _read_sysctls(ns, [k for k, _ in host.sysctls])
    return Observed(
        namespaces=frozenset(present - broken),
        root_links=parse_links(_ip_json("-d", "addr", "show")),
        root_routes=parse_routes(_ip_json("-4", "route", "show", "table", "all")),
        ns_links=ns_links,
        sysctls=sysctls,
        broken=frozenset(broken),
    )


def apply(commands: Iterable[Command]) -> None:
    """Run planned commands in order; a deletion of something already gone is not an error."""
    for cmd in commands:
        res = ip(*cmd.argv[1:], check=False)
        if res.returncode == 0:
            continue
        err = res.stderr.strip()
        if cmd.ok_if_missing and any(m in err for m in _MISSING_MARKERS):
            continue
        raise LabError(f"{cmd.reason}: `{' '.join(cmd.argv)}` failed: {err or res.returncode}")


# --- processes inside a namespace -----------------------------------------------------------


def _ns_inode(ns: str) -> int:
    """Inode of namespace ``ns``; refuses one that is our own or init's namespace."""
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError as exc:
        raise LabError(f"namespace {ns} does not exist: run `hvha lab up`") from exc
    for own in ("/proc/self/ns/net", "/proc/1/ns/net"):
        try:
            other = os.stat(own)
        except OSError:
            continue  # e.g. pid 1 not visible in a container
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            raise LabError(f"namespace {ns} is the host's own network namespace: refusing")
    return st.st_ino


def ns_pids(ns: str) -> list[int]:
    """Pids of the processes in namespace ``ns`` (``ip netns pids``); [] if it does not exist."""
    if not (NETNS_DIR / ns).exists():
        return []
    res = ip("netns", "pids", ns, check=False)
    return sorted(int(p) for p in res.stdout.split() if p.isdigit())


def _in_ns(pid: int, inode: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == inode
    except OSError:
        return False


def kill_ns(ns: str, sig: int = signal.SIGKILL, timeout: float = 5.0) -> list[int]:
    """Send ``sig`` to every process in ``ns``; wait up to ``timeout`` s for them to go.

    Each pid from ``ip netns pids`` is re-checked to still live in ``ns`` right before it is
    signalled. Returns the pids signalled. With SIGKILL, survivors after ``timeout`` raise.
    """
    if not (NETNS_DIR / ns).exists():
        return []
    inode = _ns_inode(ns)
    me = os.getpid()
    signalled: list[int] = []
    for pid in ns_pids(ns):
        if pid != me and _in_ns(pid, inode):
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(_in_ns(p, inode) for p in signalled) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = [p for p in signalled if _in_ns(p, inode)]
    if alive and sig == signal.SIGKILL:
        raise LabError(f"processes {alive} in namespace {ns} survived SIGKILL")
    return signalled


def stop_ns(ns: str, grace: float = 2.0) -> list[int]:
    """SIGTERM everything in ``ns``, then SIGKILL what is left after ``grace`` seconds."""
    pids = kill_ns(ns, signal.SIGTERM, timeout=grace)
    return sorted({*pids, *kill_ns(ns, signal.SIGKILL)})


def exec_in(ns: str, argv: Sequence[str], mntns: Path | None = None,
            **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``ns`` (``ip netns exec``), or inside ``ns`` and the mount
    namespace bound at ``mntns`` (``nsenter``, see :mod:`hvha.lab.nodefs`); either way the
    Popen's pid is the process itself."""
    _ns_inode(ns)
    if mntns is None:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
    cwd = popen_kwargs.get("cwd")
    argv = ["nsenter", f"--net={NETNS_DIR / ns}", f"--mount={mntns}",
            f"--wd={os.fspath(cwd) if cwd is not None else os.getcwd()}", "--", *argv]
    return subprocess.Popen(argv, **popen_kwargs)


def ping(ns: str, address: str, timeout: float = 1.0) -> bool:
    """One ICMP echo from inside ``ns`` to ``address``; True if answered within ``timeout``."""
    if not (NETNS_DIR / ns).exists():
        return False
    if shutil.which("ping"):
        argv = ["ping", "-n", "-q", "-c", "1", "-W", str(max(1, round(timeout))), address]
    else:
        argv = [sys.executable, "-I", "-c", _PING_SCRIPT, address, str(timeout)]
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True, check=False, timeout=timeout + 10,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0
