"""`hvha witness`: run the arbiter that breaks ties between the two nodes, on a third machine.

Kept thin: it checks the options, reads the cluster secret, and runs
:class:`hvha.agent.witness.WitnessServer` until SIGTERM or SIGINT (exit 0). The secret must
not leak through the command line (it would show in ``ps``), so it comes from a file that only
its owner may read (mode 0600 or stricter: refused otherwise) or from an environment variable;
it is never printed. Leases are deliberately not persisted: after a restart the witness refuses
``acquire`` for one grace period instead (docs/arbitration.md).

Exit codes: 0 stopped by a signal; 1 user error (bad option, unreadable secret, port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

from hvha.agent.fences import FenceTable
from hvha.agent.incarnation import next_incarnation
from hvha.agent.witness import DEFAULT_PORT, MAX_LEASE, Arbiter, WitnessServer
from hvha.cli.errors import UserError
from hvha.model.units import parse_duration
from hvha.secrets import Ref, SecretError, cluster_key

log = logging.getLogger("hvha.witness")

MIN_LEASE = 0.3  # the same floor as `witness.arbiter.lease` in the cluster file
_CLUSTER_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "witness",
        help="run the witness (arbiter) of a cluster on a third machine",
        description="Grant each module's primary role to at most one node at a time "
        "(UDP, authenticated with the cluster secret). Runs until SIGTERM or SIGINT.",
    )
    p.add_argument("--cluster", required=True, metavar="NAME", help="cluster name")
    secret = p.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret-file", metavar="PATH",
                        help="file holding the cluster secret (mode 0600 or stricter)")
    secret.add_argument("--secret-env", metavar="VAR",
                        help="environment variable holding the cluster secret")
    p.add_argument("--listen", default="0.0.0.0", metavar="ADDRESS",
                   help="IP address to listen on (default: 0.0.0.0; give the nodes' address "
                   "if this machine has several, replies must come from it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"UDP port (default: "
                   f"{DEFAULT_PORT})")
    p.add_argument("--lease", default="5s", metavar="DURATION",
                   help="lease length, the cluster's witness lease (default: 5s)")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="directory for the witness's incarnation counter (optional)")
    p.set_defaults(func=cmd_witness)


def read_secret_file(path: str) -> bytes:
    """The cluster secret in ``path``, read exactly as the agents read it."""
    return _key(Ref("file", path))


def read_secret_env(name: str) -> bytes:
    return _key(Ref("env", name))


def _key(ref: Ref) -> bytes:
    try:
        return cluster_key(ref)
    except SecretError as exc:
        raise UserError(str(exc)) from None


def _options(args: argparse.Namespace) -> tuple[float, str]:
    if not _CLUSTER_NAME.fullmatch(args.cluster):
        raise UserError(f"--cluster {args.cluster!r}: use the cluster's name (1-32 lower-case "
                        "letters, digits or '-', starting with a letter)")
    try:
        lease = parse_duration(args.lease)
    except ValueError:
        raise UserError(f"--lease {args.lease!r} is not a duration such as 5s or 700ms") from None
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise UserError(f"--lease must be between {MIN_LEASE:g}s and {MAX_LEASE:g}s")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    try:
        host = str(ipaddress.ip_address(args.listen))
    except ValueError:
        raise UserError(f"--listen {args.listen!r} is not an IP address") from None
    return lease, host


def cmd_witness(args: argparse.Namespace) -> int:
    lease, host = _options(args)
    secret = read_secret_file(args.secret_file) if args.secret_file else read_secret_env(
        args.secret_env
    )
    incarnation = None  # random: nodes match replies by nonce, not by sequence
    fences, on_fence = FenceTable(), None
    if args.state_dir is not None:
        try:
            incarnation = next_incarnation(args.state_dir)
            path = Path(args.state_dir) / "fences.json"
            fences = FenceTable.load(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"--state-dir {args.state_dir}: {exc}") from None

        def on_fence(table: FenceTable) -> None:
            table.save(path)  # before the outdate is acknowledged
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = WitnessServer(Arbiter(lease, fences=fences, on_fence=on_fence),
                           cluster=args.cluster, secret=secret, host=host,
                           port=args.port, incarnation=incarnation)
    return asyncio.run(_serve(server, args.cluster))


async def _serve(server: WitnessServer, cluster: str) -> int:
    try:
        await server.start()
    except OSError as exc:
        raise UserError(f"cannot listen on {server.host} port {server.port}: "
                        f"{exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        host, port = server.address
        arbiter = server.arbiter
        log.info("witness of cluster %s listening on %s port %d: lease %gs, no acquire during "
                 "the first %gs (start-up grace), incarnation %d", cluster, host, port,
                 arbiter.lease, arbiter.grace, server.incarnation)
        await stop.wait()
        log.info("witness stopping: %s", server.counters.as_dict())
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0
