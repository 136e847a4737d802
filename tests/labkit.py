"""What every test that builds a network-namespace lab needs: the same skip rules, and a
teardown that leaves nothing behind even when `down` itself fails."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from hvha.lab import Lab


def require_netns(what: str, *, sshd: bool = False) -> None:
    """Skip, saying why, unless this machine can build labs (root, iproute2, `ip netns`)."""
    if os.geteuid() != 0:
        pytest.skip(f"{what} need root (network namespaces): run as root")
    if shutil.which("ip") is None:
        pytest.skip(f"{what} need `ip` from iproute2: install iproute2")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns` does not work here: {probe.stderr.decode().strip()}")
    if sshd:
        from hvha.lab import sshd as lab_sshd

        if not os.access(lab_sshd.SSHD, os.X_OK):
            pytest.skip(f"{what} need {lab_sshd.SSHD}: {lab_sshd.INSTALL_HINT}")


def remains(name: str) -> list[str]:
    """Namespaces and root interfaces of lab ``name`` that still exist, asked straight from `ip`."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in ns.stdout.splitlines() if line.strip()}
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    ifnames = {line.split(":")[1].strip().split("@")[0] for line in links.stdout.splitlines()}
    return sorted(n for n in names | ifnames if n.startswith(f"{name}-"))


def force_down(lab: Lab) -> None:
    """`down --purge`, then remove by exact name whatever it could not; nothing may remain."""
    try:
        lab.down(purge=True, grace=0.5)
    finally:
        for name in lab.topology.root_interfaces:
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        for ns in lab.topology.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    assert remains(lab.name) == []
