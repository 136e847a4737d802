"""Each lab node gets its own view of hvha's system paths, like a second server would.

Why: the lab's hosts are network namespaces on one machine, so they share one file system. Two
"servers" that share ``/opt/hvha``, ``/etc/hvha`` and ``/var/lib/hvha`` cannot be installed,
upgraded or destroyed independently by ``hvha apply``, and a replicated directory would be one
directory instead of two copies. So every node runs in a persistent mount namespace of its own
(``unshare --mount=<file>``) in which :data:`PRIVATE_PATHS` are bind mounts of directories under
``<lab root>/<node>/fs``; everything else (the venv running the tests, the lab root, /usr) is the
host's. The sshd of the node and every process started by :meth:`hvha.lab.Lab.exec` enter that
namespace together with the node's network namespace, and so does a FUSE mount made there: it is
visible to that node only, and goes away with the namespace.

The namespace also mounts a sysfs of the node's network namespace over /sys, as
``ip netns exec`` does, so ``/sys/class/net`` shows the node's interfaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hvha.lab.netns import NETNS_DIR, LabError

# What a real hvha node keeps for itself: the agent's venv, its configuration, its state, its
# runtime files, and /srv/hvha for the lab examples' replicated application data.
PRIVATE_PATHS = ("/opt/hvha", "/etc/hvha", "/var/lib/hvha", "/run/hvha", "/srv/hvha")
NS_BASE = Path("/run/hvha-lab")
NODES = ("node1", "node2")


def ns_dir(lab: str) -> Path:
    return NS_BASE / lab


def ns_file(lab: str, role: str) -> Path:
    """The bind-mounted namespace file of ``role`` (what ``nsenter --mount=`` takes)."""
    return ns_dir(lab) / f"{role}.mnt"


def backing(base: Path, path: str) -> Path:
    """Where the node's private ``path`` lives on the host: ``<base>/fs/opt/hvha``..."""
    return base / "fs" / path.lstrip("/")


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
    return False


def active(lab: str, role: str) -> bool:
    return is_mountpoint(ns_file(lab, role))


def of(lab: str, role: str) -> Path | None:
    """The mount namespace file to enter for ``role``, None if it has none (witness, client,
    or a lab built before node file systems existed)."""
    return ns_file(lab, role) if role in NODES and active(lab, role) else None


def _run(argv: Sequence[str], what: str) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LabError(f"{what}: `{' '.join(argv)}` failed: "
                       f"{res.stderr.strip() or res.returncode}")


def ensure(lab: str, role: str, netns: str, base: Path, record: Path) -> bool:
    """Create the node's mount namespace unless it exists; True if it was created.

    ``record`` (a JSON file in the lab root) lists the host mount points this created, so
    :func:`remove` deletes only directories the lab made."""
    if active(lab, role):
        return False
    d = ns_dir(lab)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_mountpoint(d):  # the namespace file must live on a private mount
        _run(["mount", "--bind", str(d), str(d)], f"prepare {d}")
        _run(["mount", "--make-private", str(d)], f"prepare {d}")
    created = _read(record)
    for path in PRIVATE_PATHS:
        backing(base, path).mkdir(mode=0o755, parents=True, exist_ok=True)
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o755)
            created.append(path)
    _write(record, sorted(set(created)))
    f = ns_file(lab, role)
    f.touch(mode=0o600)
    _run(["unshare", f"--mount={f}", "--propagation", "private", "true"],
         f"create the mount namespace of {role}")
    script = "".join(f"mount --bind {backing(base, p)} {p} && " for p in PRIVATE_PATHS)
    script += "umount -l /sys && mount -t sysfs sysfs /sys"
    _run(["nsenter", f"--net={NETNS_DIR / netns}", f"--mount={f}", "--", "sh", "-ec", script],
         f"set up the file system of {role}")
    return True


def remove(lab: str, record: Path) -> None:
    """Drop every node namespace of ``lab`` (call after its processes are gone) and the host
    mount points the lab created. Idempotent."""
    d = ns_dir(lab)
    for role in NODES:
        f = ns_file(lab, role)
        if is_mountpoint(f):
            _run(["umount", str(f)], f"release the mount namespace of {role}")
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    if is_mountpoint(d):
        _run(["umount", str(d)], f"release {d}")
    with contextlib.suppress(OSError):
        d.rmdir()
    with contextlib.suppress(OSError):
        NS_BASE.rmdir()
    for path in _read(record):
        with contextlib.suppress(OSError):  # not empty: something else put files there
            os.rmdir(path)
    record.unlink(missing_ok=True)


def _read(record: Path) -> list[str]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    return [p for p in data if isinstance(p, str) and p in PRIVATE_PATHS] if isinstance(
        data, list) else []


def _write(record: Path, paths: list[str]) -> None:
    record.write_text(json.dumps(paths) + "\n")
    os.chmod(record, 0o600)
