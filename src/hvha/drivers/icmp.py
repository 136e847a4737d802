"""ICMP echo without the `ping` binary, shared by the ping checker and the ping witness.

A datagram ICMP socket is used when ``net.ipv4.ping_group_range`` allows it; otherwise a raw
socket (root). Raw IPv4 sockets return the IP header, and datagram sockets rewrite the echo
identifier: :func:`is_echo_reply` handles both.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct

# family -> (echo request type, echo reply type, protocol)
_ECHO = {
    socket.AF_INET: (8, 0, socket.IPPROTO_ICMP),
    socket.AF_INET6: (128, 129, socket.IPPROTO_ICMPV6),
}


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(family: socket.AddressFamily, ident: int, seq: int, token: bytes) -> bytes:
    kind = _ECHO[family][0]
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    check = checksum(header + token) if family == socket.AF_INET else 0  # the kernel does v6
    return struct.pack("!BBHHH", kind, 0, check, ident, seq) + token


def is_echo_reply(family: socket.AddressFamily, data: bytes, token: bytes, ident: int | None,
                  raw: bool) -> bool:
    """Whether ``data`` (as read from an ICMP socket) answers our echo carrying ``token``."""
    if raw and family == socket.AF_INET:
        if not data or data[0] >> 4 != 4:
            return False
        data = data[(data[0] & 0x0F) * 4:]
    if len(data) < 8:
        return False
    kind, _code, _sum, got_ident, _seq = struct.unpack_from("!BBHHH", data)
    return (kind == _ECHO[family][1] and data[8:] == token
            and (ident is None or got_ident == ident))


def open_socket(family: socket.AddressFamily) -> tuple[socket.socket, bool]:
    """A non-blocking ICMP socket and whether it is raw; OSError says how to allow one."""
    proto = _ECHO[family][2]
    errors = []
    for kind, raw in ((socket.SOCK_DGRAM, False), (socket.SOCK_RAW, True)):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            errors.append(str(exc))
            continue
        sock.setblocking(False)
        return sock, raw
    raise OSError(f"no ICMP socket ({'; '.join(errors)}): allow this group in "
                  "net.ipv4.ping_group_range, or run as root")


async def ping(host: str, timeout: float) -> float:
    """Round-trip time in seconds of one echo to ``host``.

    Raises TimeoutError without an answer within ``timeout`` s, OSError if it cannot be sent."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    addr = str(infos[0][4][0])
    family = family_of(addr)
    token, ident = b"hvha" + os.urandom(12), int.from_bytes(os.urandom(2), "big")
    sock, raw = open_socket(family)
    with sock:
        sent = loop.time()
        await loop.sock_sendto(sock, echo_request(family, ident, 1, token), (addr, 0))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data, src = await loop.sock_recvfrom(sock, 4096)
                    if src[0] == addr and is_echo_reply(family, data, token,
                                                        ident if raw else None, raw):
                        return loop.time() - sent
        except TimeoutError:
            raise TimeoutError(f"no echo reply from {addr} within {timeout:g}s") from None
