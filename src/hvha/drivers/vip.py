"""The module's virtual IP: add it on the primary, announce it, remove it when leaving.

Why ``ip`` (iproute2) and not netlink bindings: no extra dependency, and the commands in the
log are the ones an operator would type. Every call is idempotent: ``add`` on a node that has
the address only re-announces it, ``remove`` on a node without it does nothing, so the agent can
retry or repeat after a crash without first finding out what was done.

With no interface configured, the VIP goes on the interface whose own IPv4 subnet contains it
(10.77.0.100/24 goes next to 10.77.0.11/24). Everything happens in the network namespace of the
agent process (the lab starts agents with ``ip netns exec``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from hvha.drivers import garp
from hvha.drivers.scripts import run_script

log = logging.getLogger("hvha.drivers")

IP_TIMEOUT = 5.0


class VipError(Exception):
    """The VIP could not be added, removed or placed (the message says which and why)."""


def interface_for(vip: IPv4Address, addresses: Iterable[Mapping[str, Any]]) -> str | None:
    """The interface (from ``ip -j addr show`` output) with an IPv4 subnet containing ``vip``,
    ignoring ``vip`` itself; None if none. The first match wins (``ip`` lists by ifindex)."""
    for link in addresses:
        for info in link.get("addr_info") or []:
            if info.get("family") != "inet" or info.get("local") == str(vip):
                continue
            iface = IPv4Interface(f"{info['local']}/{info['prefixlen']}")
            if vip in iface.network:
                return str(link["ifname"])
    return None


def holders(vip: IPv4Address, addresses: Iterable[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """(interface, prefix length) of every place ``vip`` is configured."""
    return [(str(link["ifname"]), int(info["prefixlen"]))
            for link in addresses for info in link.get("addr_info") or []
            if info.get("family") == "inet" and info.get("local") == str(vip)]


class Vip:
    """One virtual IP, e.g. ``Vip("10.77.0.100/24", None)`` or ``Vip("10.0.0.5/24", "eth1")``.

    ``announce`` sends the gratuitous ARP after ``add`` (``garp_count`` rounds, ``garp_interval``
    s apart). ``last_mac`` is the MAC last announced, for status and tests.
    """

    def __init__(self, address: str, interface: str | None = None, *,
                 garp_count: int = 3, garp_interval: float = 0.2) -> None:
        self.interface = IPv4Interface(address)
        self.configured_interface = interface
        self.garp_count = garp_count
        self.garp_interval = garp_interval
        self.last_mac: str | None = None

    @property
    def ip(self) -> IPv4Address:
        return self.interface.ip

    def __repr__(self) -> str:
        return f"Vip({str(self.interface)!r}, {self.configured_interface!r})"

    @classmethod
    def from_module(cls, module: Mapping[str, Any]) -> Vip | None:
        """From a module of agent.json (``vip: {address, interface}``); None without a VIP."""
        vip = module.get("vip")
        if not vip:
            return None
        return cls(str(vip["address"]), vip.get("interface"))

    async def _ip(self, *args: str) -> tuple[int, str, str]:
        try:
            res = await run_script("ip", args, None, IP_TIMEOUT, interpreter=())
        except OSError as exc:
            raise VipError(f"cannot run `ip` (install iproute2): {exc}") from exc
        if res.timed_out:
            raise VipError(f"`ip {' '.join(args)}` timed out")
        return res.returncode, res.stdout_tail, res.stderr_tail.strip()

    async def addresses(self, interface: str | None = None) -> list[dict[str, Any]]:
        """``ip -j -4 addr show [dev IF]`` parsed."""
        argv: Sequence[str] = ("-j", "-4", "addr", "show", *(("dev", interface)
                                                              if interface else ()))
        rc, out, err = await self._ip(*argv)
        if rc != 0:
            raise VipError(f"`ip {' '.join(argv)}` failed: {err}")
        try:
            data = json.loads(out or "[]")
        except ValueError as exc:
            raise VipError(f"unreadable output of `ip -j addr show`: {exc}") from exc
        return [d for d in data if isinstance(d, dict)]

    async def resolve_interface(self) -> str:
        """The configured interface, else the one whose IPv4 subnet holds the VIP."""
        if self.configured_interface:
            return self.configured_interface
        found = interface_for(self.ip, await self.addresses())
        if found is None:
            raise VipError(f"no interface has an IPv4 subnet containing {self.ip}: configure "
                           "`vip.interfaces` for this node")
        return found

    async def present(self) -> bool:
        """True if the VIP is configured on any interface of this node."""
        return bool(holders(self.ip, await self.addresses()))

    async def add(self, *, announce: bool = True) -> None:
        """Add the VIP if missing, then announce it (gratuitous ARP) unless ``announce`` is
        false. A failed announcement is logged, not raised: the VIP itself is in place."""
        ifname = await self.resolve_interface()
        if not holders(self.ip, await self.addresses(ifname)):
            rc, _, err = await self._ip("addr", "add", str(self.interface), "dev", ifname)
            if rc != 0 and "File exists" not in err:
                raise VipError(f"adding {self.interface} on {ifname} failed: {err}")
            log.info("VIP %s added on %s", self.interface, ifname)
        if announce:
            try:
                self.last_mac = await garp.announce(ifname, self.ip, count=self.garp_count,
                                                    interval=self.garp_interval)
            except garp.GarpError as exc:
                log.warning("VIP %s: gratuitous ARP on %s failed: %s", self.ip, ifname, exc)

    async def remove(self) -> None:
        """Remove the VIP from every interface that has it (none: nothing to do)."""
        for ifname, prefixlen in holders(self.ip, await self.addresses()):
            rc, _, err = await self._ip("addr", "del", f"{self.ip}/{prefixlen}", "dev", ifname)
            if rc != 0 and "Cannot assign" not in err:
                raise VipError(f"removing {self.ip} from {ifname} failed: {err}")
            log.info("VIP %s removed from %s", self.ip, ifname)
