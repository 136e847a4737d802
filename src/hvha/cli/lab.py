"""`hvha lab up|down|status`: the two-node network-namespace lab on this machine.

Kept thin on purpose: it parses options, drives :class:`hvha.lab.Lab` and renders the result.
Every :class:`hvha.lab.LabError` (not root, `ip` missing, address clash...) becomes a
:class:`hvha.cli.main.UserError`, so the user sees what to do, never a traceback.

Exit codes: 0 done / lab up; 1 user error; 2 (``status`` only) the lab is down or degraded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hvha.cli.errors import UserError
from hvha.lab import LAN, REPL, Lab, LabError
from hvha.lab import sshd as lab_sshd

EXIT_NOT_UP = 2
MAX_PROBLEMS = 6


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "lab",
        help="the two-node lab on this machine",
        description="Build, inspect or remove a two-node hvha lab made of network namespaces "
        "(node1, node2, witness, client) joined by bridges. Needs root.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name", default="lab",
        help="lab name, prefix of its namespaces and interfaces: [a-z][a-z0-9]{0,7} "
        "(default: lab)",
    )
    common.add_argument(
        "--root", type=Path, default=None, metavar="DIR",
        help="directory for lab.json and the node trees (default: /var/lib/hvha-lab/NAME)",
    )
    actions = p.add_subparsers(dest="lab_action", metavar="ACTION")

    up = actions.add_parser("up", parents=[common], help="create or repair the lab (idempotent)")
    up.add_argument("--lan-subnet", default=None, metavar="CIDR",
                    help="lan subnet (default: recorded in lab.json, else 10.77.0.0/24)")
    up.add_argument("--repl-subnet", default=None, metavar="CIDR",
                    help="repl subnet (default: recorded in lab.json, else 10.78.0.0/24)")
    up.add_argument("--no-sshd", action="store_true",
                    help="do not start an sshd in each node (default: start one, for the "
                    "SSH transport; needs openssh-server)")
    up.add_argument("-v", "--verbose", action="store_true", help="print every ip command run")
    up.set_defaults(func=_guard(_cmd_up))

    down = actions.add_parser(
        "down", parents=[common],
        help="stop the lab's processes and remove its namespaces and interfaces",
    )
    down.add_argument("--purge", action="store_true",
                      help="also delete the node directories and lab.json")
    down.add_argument("-v", "--verbose", action="store_true", help="print every ip command run")
    down.set_defaults(func=_guard(_cmd_down))

    status = actions.add_parser(
        "status", parents=[common],
        help="show hosts, addresses and links; ping each host from the client "
        "(exit 2 if not fully up)",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--no-ping", action="store_true", help="skip the pings from the client")
    status.set_defaults(func=_guard(_cmd_status))

    def _usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 1

    p.set_defaults(func=_usage)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as exc:
            raise UserError(str(exc)) from exc

    return run


def _open(args: argparse.Namespace) -> Lab:
    return Lab.open(
        args.name,
        args.root,
        lan=getattr(args, "lan_subnet", None),
        repl=getattr(args, "repl_subnet", None),
    )


def _cmd_up(args: argparse.Namespace) -> int:
    lab = _open(args)
    cmds = lab.up(sshd=not args.no_sshd)
    if args.verbose:
        for c in cmds:
            print(f"  {shlex.join(c.argv)}    # {c.reason}")
    net = [c for c in cmds if c.argv[0] == "ip"]
    what = f"built or repaired with {len(net)} changes" if net else "already complete"
    print(f"lab {lab.name!r} is up ({what}); state in {lab.state_path}")
    for c in cmds[len(net):]:
        print(f"  {c.reason}")
    print(f"  lan {lab.topology.network(LAN).subnet}: node1 {lab.address('node1')}, "
          f"node2 {lab.address('node2')}, witness {lab.address('witness')}, "
          f"client {lab.address('client')}, VIP {lab.vip.ip}")
    print(f"  repl {lab.topology.network(REPL).subnet}: node1 {lab.address('node1', REPL)}, "
          f"node2 {lab.address('node2', REPL)}")
    print(f"  run inside a host with: ip netns exec {lab.ns_name('node1')} COMMAND")
    if not args.no_sshd:
        print(f"  ssh: ssh -i {lab_sshd.admin_key(lab.topology)} -o UserKnownHostsFile="
              f"{lab_sshd.known_hosts(lab.topology)} root@{lab.address('node1')}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    lab = _open(args)
    cmds = lab.down(purge=args.purge)
    if args.verbose:
        for c in cmds:
            print(f"  {shlex.join(c.argv)}    # {c.reason}")
    what = "removed" if cmds else "was not running"
    purged = f"; deleted {lab.root}" if args.purge else ""
    print(f"lab {lab.name!r} {what}{purged}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    lab = _open(args)
    st = lab.status(ping=not args.no_ping)
    if args.json:
        json.dump(st, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _render(st)
    return 0 if st["state"] == "up" else EXIT_NOT_UP


def _mark(value: bool | None, yes: str, no: str) -> str:
    if value is None:
        return "-"
    return f"[green]{yes}[/]" if value else f"[red]{no}[/]"


def _link(i: dict[str, Any]) -> str:
    state = _mark(i["link_up"], "up", "down" if i["present"] else "missing")
    return f"{i['address'].split('/')[0]} {state}"


def _render(st: dict[str, Any]) -> None:
    console = Console()
    colour = {"up": "green", "degraded": "yellow"}.get(st["state"], "red")
    console.print(f"lab [bold]{st['name']}[/]: [{colour}]{st['state']}[/]  (root {st['root']})")
    if st["state"] == "down":
        console.print(f"  nothing exists; create it with `hvha lab up --name {st['name']}`")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("host", "namespace", "lan (eth0)", "repl (eth1)", "pids", "ping", "sshd"):
        table.add_column(col, no_wrap=True)
    for role, h in st["hosts"].items():
        ifaces = h["interfaces"]
        table.add_row(
            role,
            h["namespace"] if h["present"] else f"[red]{h['namespace']} missing[/]",
            _link(ifaces[LAN]) if LAN in ifaces else "",
            _link(ifaces[REPL]) if REPL in ifaces else "",
            str(h["pids"]),
            _mark(h["ping"], "ok", "fail"),
            _mark(h.get("sshd"), "up", "down"),
        )
    console.print(table)
    bridges = ", ".join(
        f"{b['name']} {_mark(b['up'], 'up', 'down' if b['present'] else 'missing')}"
        + (f" {b['address']}" if b["address"] else "")
        for b in st["bridges"].values()
    )
    console.print(f"bridges: {bridges}; VIP {st['vip']}")
    problems = st["problems"]
    for problem in problems[:MAX_PROBLEMS]:
        console.print(f"  [yellow]needs repair:[/] {problem}")
    if len(problems) > MAX_PROBLEMS:
        console.print(f"  ... and {len(problems) - MAX_PROBLEMS} more")
    if problems:
        console.print(f"  run `hvha lab up --name {st['name']}` to repair")
