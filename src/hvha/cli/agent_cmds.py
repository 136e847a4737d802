"""Node-side commands: `hvha agent`, `hvha status`, `hvha state`, `hvha reload`, and the module
commands (`start`, `stop`, `restart`, `prim [--force]`, `second`, `swap`, `checker on|off`,
`failover on|off`). Replication commands (verify, resync, resolve): replication_cmds.py.

The operator commands talk to the local agent over its control socket
(``--socket``, ``$HVHA_SOCKET``, default ``/var/lib/hvha/control.sock``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hvha.cli.errors import UserError

log = logging.getLogger("hvha.agent")
DEFAULT_STATE = "/var/lib/hvha"
COLOURS = {"STOP": "red", "WAIT": "dark_orange", "ALONE": "green", "PRIM": "green",
           "SECOND": "green"}


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=os.environ.get("HVHA_SOCKET",
                                                      f"{DEFAULT_STATE}/control.sock"),
                   help="the agent's control socket (default: $HVHA_SOCKET or %(default)s)")


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run this node's modules (the node daemon)")
    p.add_argument("--bundle", required=True, help="<node>.bundle from `hvha compile`")
    p.add_argument("--state-dir", default=DEFAULT_STATE)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("status", help="modules and their state on both nodes")
    _socket_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reload", help="load the agent's bundle file again, without a restart",
                       description="Apply a new bundle (pushed to the path the agent was started "
                       "with) in place: added modules start, removed ones stop, changed ones "
                       "keep running unless their payload settings changed. Exit 0 when "
                       "applied, 2 when the change needs a service restart (heartbeat, "
                       "witness, node, peer, cluster or replication settings), 1 on error.")
    _socket_arg(p)
    p.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("repair", help="put each VIP where the module's role says (drift)")
    _socket_arg(p)
    p.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("state", help="exit with the module's state (STOP 0 ... SECOND 4)")
    _socket_arg(p)
    p.add_argument("module")
    p.set_defaults(func=cmd_state)

    for name, text in (("start", "start the module on this node"),
                       ("stop", "stop the module on this node (the peer takes over)"),
                       ("restart", "restart the payload here, without failover"),
                       ("prim", "make this node primary (its data is the good copy)"),
                       ("second", "make this node secondary"),
                       ("swap", "move the module to the other node")):
        p = sub.add_parser(name, help=text)
        _socket_arg(p)
        p.add_argument("module")
        if name == "prim":
            p.add_argument("--force", action="store_true",
                           help="promote even if this node's copy is half-synced (a resync "
                           "into it did not finish): what it misses is lost")
        p.set_defaults(func=cmd_module, command=name)

    for name, text in (("checker", "maintenance: turn the module's checkers on or off"),
                       ("failover", "maintenance: turn automatic failover on or off")):
        p = sub.add_parser(name, help=text)
        _socket_arg(p)
        p.add_argument("switch", choices=("on", "off"))
        p.add_argument("module")
        p.set_defaults(func=cmd_switch, command="checkers" if name == "checker" else name)


def _call(args: argparse.Namespace, request: dict[str, Any], *,
          check: bool = True) -> dict[str, Any]:
    from hvha.agent.control import call

    path = Path(args.socket)
    try:
        reply = call(path, request)
    except FileNotFoundError:
        raise UserError(f"no agent socket at {path}: is `hvha agent` running on this node? "
                        "(use --socket or $HVHA_SOCKET)") from None
    except (ConnectionRefusedError, OSError) as exc:
        raise UserError(f"cannot reach the agent at {path}: {exc}") from None
    except ValueError:
        raise UserError(f"the agent at {path} hung up without a reply: see its log") from None
    if check and not reply.get("ok"):
        raise UserError(str(reply.get("error", "the agent refused the request")))
    return reply


def cmd_agent(args: argparse.Namespace) -> int:
    from hvha.agent.bundle_io import BundleError, install_bundle, read_secret
    from hvha.agent.daemon import Agent
    from hvha.agent.ports import Ports, witness_for

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = Path(args.state_dir)
    try:
        root, config = install_bundle(Path(args.bundle), state)
        secret = read_secret(config["cluster"]["secret"])
    except BundleError as exc:
        raise UserError(str(exc)) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(root, config, state, secret, Ports(root, config, state),
                      witness_for(config, secret, state), source=Path(args.bundle).absolute())
        reloads: set[asyncio.Task[None]] = set()

        async def reload() -> None:  # SIGHUP: as `hvha reload`, the outcome goes to the log
            reply = await agent.reload()
            if reply.get("ok"):
                log.info("SIGHUP reload: %s", _reload_summary(reply))
            else:
                log.error("SIGHUP reload: %s", reply.get("error"))

        def on_hup() -> None:
            task = asyncio.create_task(reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await agent.run(stop)

    asyncio.run(main())
    return 0


def render_status(status: dict[str, Any], *, bars: bool = False) -> Any:
    """The status table; with bars, a progress bar under it for each running resync."""
    from rich.markup import escape
    from rich.table import Table

    from hvha.cli.replication_cmds import replication_line, resync_bars

    node, peer = status["node"], status["peer"]
    heard = "NOT HEARD" if not status["peer_alive"] else (
        "alive" if status.get("peer_hears_us", True) else "alive, but it does NOT HEAR this node")
    table = Table(title=f"cluster {status['cluster']}: {node} (this node), {peer} "
                  f"({heard}), witness "
                  f"{status['witness']['mode']}"
                  f"{'' if status['witness']['reachable'] else ' UNREACHABLE'}")
    for col in ("module", node, peer, "primary", "since", "why", "replication"):
        table.add_column(col)
    for m in status["modules"]:
        mine, theirs = m["role"], m["peer_role"] or ("?" if status["peer_alive"] else "-")
        primary = node if mine in ("PRIM", "ALONE") else (
            peer if theirs in ("PRIM", "ALONE") else "none")
        since = m["history"][-1]["at"] if m["history"] else status["started"]
        table.add_row(m["module"], f"[{COLOURS.get(mine, 'white')}]{mine}[/]",
                      f"[{COLOURS.get(theirs, 'white')}]{theirs}[/]", primary,
                      time.strftime("%H:%M:%S", time.localtime(since)), m["reason"],
                      escape(replication_line(m, node, peer)))
    running = resync_bars(status) if bars else []
    if not running:
        return table
    from rich.console import Group
    from rich.progress_bar import ProgressBar

    grid = Table.grid(padding=(0, 1))
    for name, pct, line in running:
        grid.add_row(escape(name), ProgressBar(total=100.0, completed=pct, width=40),
                     escape(line))
    return Group(table, grid)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    status = _call(args, {"cmd": "status"})["status"]
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
        return 0
    console = Console()
    if not args.watch:
        console.print(render_status(status))
        return 0
    bars = console.is_terminal  # progress bars where a person watches
    with Live(render_status(status, bars=bars), console=console, refresh_per_second=2) as live:
        while True:
            time.sleep(1)
            live.update(render_status(_call(args, {"cmd": "status"})["status"], bars=bars))


def cmd_state(args: argparse.Namespace) -> int:
    from hvha.agent.fsm import Role

    status = _call(args, {"cmd": "status"})["status"]
    for m in status["modules"]:
        if m["module"] == args.module:
            print(m["role"])
            return Role(m["role"]).exit_code
    raise UserError(f"no module '{args.module}' on this node")


def cmd_module(args: argparse.Namespace) -> int:
    request = {"cmd": args.command, "module": args.module}
    if getattr(args, "force", False):
        request["force"] = True
    reply = _call(args, request)
    for path in reply.get("forced", []):
        sys.stderr.write(f"hvha: WARNING: {path} was half-synced (a resync into it did not "
                         "finish) and is now taken as the good copy: data it missed is lost, "
                         "and the peer's copy will be overwritten from it\n")
    m = reply["module"]
    print(f"{m['module']}: {m['role']} ({m['reason']})")
    return 0


def cmd_switch(args: argparse.Namespace) -> int:
    reply = _call(args, {"cmd": args.command, "module": args.module, "on": args.switch == "on"})
    print(f"{reply['module']['module']}: {args.command} {args.switch}")
    return 0


def _reload_summary(reply: dict[str, Any]) -> str:
    if reply.get("message"):
        return f"bundle {str(reply.get('bundle'))[:12]}: {reply['message']}"
    parts = [f"{key} {', '.join(reply[key])}" for key in ("added", "removed", "changed",
                                                          "restarted") if reply.get(key)]
    what = "; ".join(parts) or "no module change"
    return f"bundle {str(reply.get('bundle'))[:12]} loaded: {what}"


def cmd_repair(args: argparse.Namespace) -> int:
    reply = _call(args, {"cmd": "repair"})
    fixed = reply.get("repaired") or []
    if args.json:
        sys.stdout.write(json.dumps(reply, sort_keys=True) + "\n")
    else:
        print("; ".join(fixed) if fixed else "every VIP is where its module's role says")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _call(args, {"cmd": "reload"}, check=False)
    if args.json:
        sys.stdout.write(json.dumps(reply, indent=2, sort_keys=True) + "\n")
    elif reply.get("ok"):
        print(_reload_summary(reply))
    if reply.get("ok"):
        return 0
    if not args.json:
        sys.stderr.write(f"hvha: error: {reply.get('error', 'the agent refused the reload')}\n")
    return 2 if reply.get("restart_required") else 1
