"""The two ends of the failover benchmark's client traffic: a prober and a node-name server.

Why a script of its own: both ends must run *inside* lab namespaces (``ip netns exec``), as
separate processes that die with the namespace they live in, so they cannot be threads of the
benchmark. Why these two in one file: they speak one tiny protocol (connect, read one line that
names the node, close), and the benchmark may only add these files.

    probe.py probe --target 10.77.0.100 [--port 8080] [--interval 0.02] [--timeout 1.0]
                   [--out FILE] [--duration S]
    probe.py serve --name node1 [--port 8080] [--bind 0.0.0.0]

``probe`` starts one connection attempt every ``interval`` seconds *without waiting for the
previous one*: while the VIP points at a dead node a SYN hangs until its timeout, and a serial
prober would then see the new primary up to a whole timeout late. Each attempt ends in one JSON
line, written when it ends::

    {"t0": 1234.500, "t": 1234.501, "node": "node2"}     # answered by node2
    {"t0": 1234.520, "t": 1235.520, "error": "timeout"}  # or refused, EHOSTUNREACH, ...

``t0``/``t`` are ``time.monotonic()`` at the start and end of the attempt. CLOCK_MONOTONIC is
not namespaced by ``ip netns``, so these values compare directly with the benchmark's own
``time.monotonic()`` taken in the root namespace. ``serve`` answers every connection with its
node name and a newline, then closes; bound to 0.0.0.0 it also answers on the VIP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from typing import IO, Any

DEFAULT_PORT = 8080
MAX_LINE = 256


def _error_name(exc: BaseException) -> str:
    """A short, stable label for a failed attempt (what the benchmark tallies)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    return type(exc).__name__


async def attempt(host: str, port: int, timeout: float) -> dict[str, Any]:
    """One connection: the node that answered, or why none did, with start and end times."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return {"t0": t0, "t": time.monotonic(), "error": _error_name(exc)}
    t = time.monotonic()
    name = line[:MAX_LINE].decode("utf-8", "replace").strip()
    if not name:
        return {"t0": t0, "t": t, "error": "empty"}
    return {"t0": t0, "t": t, "node": name}


async def probe(host: str, port: int, interval: float, timeout: float, out: IO[str],
                duration: float | None) -> int:
    """Start an attempt every ``interval`` s on a fixed grid until SIGTERM/SIGINT/``duration``.

    The grid (start + k*interval) keeps the sampling rate steady whatever each attempt costs;
    at most ``2*timeout/interval`` attempts are in flight, beyond that a tick is skipped (and
    reported as such) so a black-holed VIP cannot exhaust file descriptors.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    max_inflight = max(4, int(2 * timeout / interval))
    inflight: set[asyncio.Task[None]] = set()

    broken = False

    def emit(record: dict[str, Any]) -> None:
        nonlocal broken
        if broken:
            return
        try:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            out.flush()
        except BrokenPipeError:  # the reader went away: nothing left to report to
            broken = True
            stop.set()

    async def one() -> None:
        emit(await attempt(host, port, timeout))

    start = time.monotonic()
    k = 0
    try:
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - start >= duration:
                break
            if len(inflight) < max_inflight:
                task = asyncio.create_task(one())
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            else:
                emit({"t0": now, "t": now, "error": "skipped"})
            k += 1
            next_tick = start + k * interval
            if next_tick < now:  # fell behind (CPU starved): re-anchor instead of bursting
                start, k = now, 1
                next_tick = now + interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
    finally:
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
    if broken:  # keep the interpreter's final flush of the dead pipe quiet
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


def serve(name: str, port: int, bind: str) -> int:
    """Answer each connection with ``name``; sequential accept is plenty at 50 probes/s."""
    reply = (name + "\n").encode()
    with socket.create_server((bind, port), backlog=256) as srv:  # sets SO_REUSEADDR
        while True:
            conn, _ = srv.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(reply)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="probe TARGET:PORT, one JSON line per attempt")
    p.add_argument("--target", required=True, help="address to connect to (the VIP)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between attempts")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds before an attempt fails")
    p.add_argument("--out", default="-", help="output file (default: stdout)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    s = sub.add_parser("serve", help="answer every connection with NAME")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.name, args.port, args.bind)
    if args.interval <= 0 or args.timeout <= 0:
        parser.error("--interval and --timeout must be positive")
    if args.out == "-":
        return asyncio.run(probe(args.target, args.port, args.interval, args.timeout,
                                 sys.stdout, args.duration))
    with open(args.out, "a", encoding="utf-8") as fh:
        return asyncio.run(probe(args.target, args.port, args.interval, args.timeout, fh,
                                 args.duration))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
