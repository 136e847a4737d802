"""Gratuitous ARP: tell the LAN that the virtual IP now lives behind this node's MAC.

Why: when the VIP moves, clients and routers still map it to the old primary's MAC until their
ARP entry expires (minutes). Announcing it right after adding it switches them within a
packet. Both forms are sent, because receivers differ in which one they honour: an ARP request
with sender = target = VIP (RFC 5227 announcement) and an unsolicited ARP reply.

Frames are built by hand (struct) and sent on an AF_PACKET raw socket bound to the interface,
so no ``arping`` binary is needed; this needs CAP_NET_RAW (the agent runs as root). Everything
happens in the network namespace of the calling process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
from ipaddress import IPv4Address
from pathlib import Path

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
SIOCGIFHWADDR = 0x8927
_MIN_FRAME = 60  # Ethernet minimum without FCS; some NICs do not pad short frames


class GarpError(OSError):
    """The announcement could not be sent (no such interface, no CAP_NET_RAW, ...)."""


def parse_mac(text: str) -> bytes:
    parts = text.strip().split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def arp_frame(mac: bytes, ip: IPv4Address | str, op: int) -> bytes:
    """An Ethernet broadcast frame carrying a gratuitous ARP ``op`` (request or reply) for
    ``ip`` from ``mac``: sender and target protocol address are both ``ip``; the target
    hardware address is zero in a request and ``mac`` in a reply."""
    addr = IPv4Address(ip).packed
    target_mac = b"\x00" * 6 if op == ARP_REQUEST else mac
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac, addr, target_mac, addr)
    return (eth + arp).ljust(_MIN_FRAME, b"\x00")


def interface_mac(ifname: str, sock: socket.socket | None = None) -> bytes:
    """The hardware address of ``ifname``.

    Asked from the kernel (SIOCGIFHWADDR) when a socket is at hand, because that is always
    answered in the caller's network namespace; ``/sys/class/net/IF/address`` is only right
    when sysfs was mounted for this namespace (``ip netns exec`` does that, a bare setns()
    does not). The sysfs file is the fallback.
    """
    if sock is not None:
        with contextlib.suppress(OSError):
            req = struct.pack("256s", ifname.encode()[:15])
            res = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, req)
            return res[18:24]
    try:
        return parse_mac(Path(f"/sys/class/net/{ifname}/address").read_text())
    except (OSError, ValueError) as exc:
        raise GarpError(f"cannot read the MAC address of {ifname}: {exc}") from exc


def _open(ifname: str) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    except OSError as exc:
        raise GarpError(f"cannot open a raw socket for gratuitous ARP: {exc}") from exc
    try:
        sock.bind((ifname, 0))
    except OSError as exc:
        sock.close()
        raise GarpError(f"cannot bind the ARP socket to {ifname}: {exc}") from exc
    return sock


async def announce(ifname: str, ip: IPv4Address | str, *, count: int = 3,
                   interval: float = 0.2) -> str:
    """Send ``count`` rounds (request + reply), ``interval`` s apart, on ``ifname``.

    Returns the MAC that was announced. Raises :class:`GarpError`.
    """
    sock = _open(ifname)
    try:
        mac = interface_mac(ifname, sock)
        frames = [arp_frame(mac, ip, ARP_REQUEST), arp_frame(mac, ip, ARP_REPLY)]
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            for frame in frames:
                try:
                    sock.send(frame)
                except OSError as exc:
                    raise GarpError(f"sending gratuitous ARP on {ifname}: {exc}") from exc
        return format_mac(mac)
    finally:
        sock.close()
