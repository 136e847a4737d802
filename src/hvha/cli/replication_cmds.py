"""Replication operator commands: `hvha verify`, `hvha resync --full`, `hvha resolve`, and the
replication column of `hvha status` (pure renderers, used by agent_cmds).

Why a module of its own: agent_cmds.py holds the module state commands; these act on the
replicated data (compare both copies, copy everything again, settle a split brain) and answer
with more than a role, so their output and exit codes live here. All of them talk to the local
agent's control socket; verify and resync run on the primary, resolve on either node (see
hvha.replication.admin.resolve_action).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hvha.cli.errors import UserError

SPLIT = ("split_brain", "unrelated")
NEWER = ("full_resync_to_peer", "resync_to_peer")


# ------------------------------------------------------------------ pure renderers
def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (binary units, 3 significant digits at most)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_eta(seconds: float) -> str:
    """15 -> "0:15", 3725 -> "1:02:05"; negative (unknown) -> "?"."""
    if seconds < 0:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def resync_totals(dirs: list[dict[str, Any]]) -> dict[str, float] | None:
    """The resync of a module's directories as one: lowest percent, summed bytes left and
    rates, longest ETA; None when no directory is resyncing with progress to show."""
    running = [d["resync"] for d in dirs if d.get("mode") == "resyncing" and d.get("resync")]
    if not running:
        return None
    etas = [float(r["eta_s"]) for r in running]
    return {"percent": min(float(r["percent"]) for r in running),
            "bytes_left": sum(float(r["bytes_left"]) for r in running),
            "rate": sum(float(r["rate"]) for r in running),
            "eta_s": -1.0 if min(etas) < 0 else max(etas)}


def replication_line(module: dict[str, Any], node: str, peer: str) -> str:
    """The replication column of `hvha status` for one module (see the tests for examples)."""
    rep = module.get("replication")
    name = module["module"]
    if rep is None:
        return "-"
    if "error" in rep:
        return f"status error: {rep['error']}"
    dirs: list[dict[str, Any]] = rep.get("dirs", [])
    conflicts = {d.get("conflict") or "" for d in dirs}
    primary = any(d.get("role") == "primary" for d in dirs)
    fault = next((d["local_fault"] for d in dirs if d.get("local_fault")), "")
    if fault:  # this node's disk failed (hvha.replication.localfault)
        then = (f"fsync fails here; {peer} takes over once in sync" if primary
                else f"repair the disk, then `hvha resolve {name} --discard {node}` here")
        return f"DISK FAILED: {fault[:90]}; {then}"
    if conflicts & set(SPLIT):
        what = "SPLIT BRAIN" if "split_brain" in conflicts else "UNRELATED COPIES"
        return f"{what}: run `hvha resolve {name} --discard {node}|{peer}` (the copy to drop)"
    if conflicts & set(NEWER):
        newer = peer if primary else node
        return (f"REFUSED: {newer} has newer data: make {newer} primary, or `hvha resolve "
                f"{name} --discard {newer}`")
    if any(d.get("discard_requested") for d in dirs):
        return f"discard of {peer}'s copy asked: waiting for {peer} to connect"
    refused = next((d["refused"] for d in dirs if d.get("refused")), "")
    if refused:
        return f"REFUSED: {refused[:100]}"
    if any(d.get("mode") == "alone" for d in dirs):
        dirty = sum(int(d.get("dirty_bytes") or 0) for d in dirs)
        full = " (full resync asked)" if any(d.get("full_requested") for d in dirs) else ""
        return f"ALONE: {human_bytes(dirty)} dirty{full}"
    totals = resync_totals(dirs)
    if totals is not None:
        return (f"resync {totals['percent']:.0f}% {human_bytes(totals['bytes_left'])} left "
                f"{human_bytes(totals['rate'])}/s ETA {human_eta(totals['eta_s'])}")
    if any(d.get("mode") == "resyncing" for d in dirs):
        return "resync starting"
    if all(d.get("in_sync") for d in dirs):
        return "in sync"
    if not primary:
        if any(d.get("generations", {}).get("inconsistent") for d in dirs):
            return f"INCONSISTENT: resync from {peer} unfinished (never promoted unless forced)"
        return f"waiting for the primary ({peer})"
    return "not in sync"


def resync_bars(status: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(module, percent, line) of each module with a resync running, for progress bars."""
    out = []
    for m in status["modules"]:
        rep = m.get("replication") or {}
        totals = resync_totals(rep.get("dirs", [])) if "dirs" in rep else None
        if totals is not None:
            out.append((m["module"], totals["percent"],
                        replication_line(m, status["node"], status["peer"])))
    return out


def render_verify(reply: dict[str, Any]) -> list[str]:
    lines = []
    for d in reply["dirs"]:
        diffs = d["differences"]
        note = " (a resync is running: differences are expected)" if d.get("resyncing") else ""
        lines.append(f"{d['path']}: {'equal' if not diffs else f'{len(diffs)} differences'}"
                     f"{note}")
        lines += [f"  {x['kind']:<8} {x['path'] or '.'}" + (f"  ({x['detail']})"
                                                            if x.get("detail") else "")
                  for x in diffs]
    return lines


# ------------------------------------------------------------------ commands
def register(sub: Any) -> None:
    from hvha.cli.agent_cmds import _socket_arg

    p = sub.add_parser("verify", help="compare both copies of a module's data (on the primary)",
                       description="Compare this node's copy of each replicated directory with "
                       "the peer's, by metadata and block hashes; nothing is changed. Run it on "
                       "the primary. Exit 0: equal, 2: differences (listed), 1: error.")
    _socket_arg(p)
    p.add_argument("module")
    p.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("resync", help="copy a module's data to the secondary again (--full)",
                       description="On the primary: compare every file with the secondary's "
                       "copy by block hashes and send what differs, now, while the application "
                       "runs. The secondary is not in sync (and cannot be promoted) until it "
                       "ends; progress in `hvha status`.")
    _socket_arg(p)
    p.add_argument("module")
    p.add_argument("--full", action="store_true", required=True,
                   help="a full resync (the only kind that can be asked for)")
    p.set_defaults(func=cmd_resync)

    p = sub.add_parser("resolve", help="settle a split brain: name the node whose data to drop",
                       description="When both copies changed while apart (split brain), "
                       "name the node whose changes are dropped. On that node each replicated "
                       "directory's content is moved into <dir>.hvha-discarded-<time> next to "
                       "it (kept, not deleted), then it receives the other node's data by a "
                       "full resync. Run it on the node to discard (not primary), or on the "
                       "primary naming the peer. After a disk failure (`hvha status`: DISK "
                       "FAILED), run it on the failed node naming itself once the disk is "
                       "repaired: its copy stays, and the other node rewrites what differs by "
                       "a full compare.")
    _socket_arg(p)
    p.add_argument("module")
    p.add_argument("--discard", required=True, metavar="NODE",
                   help="the node whose copy is dropped (moved aside)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    p.set_defaults(func=cmd_resolve)


def _call(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    from hvha.cli.agent_cmds import _call as call

    return call(args, request)


def cmd_verify(args: argparse.Namespace) -> int:
    reply = _call(args, {"cmd": "verify", "module": args.module})
    if args.json:
        sys.stdout.write(json.dumps(reply, indent=2, sort_keys=True) + "\n")
    else:
        print("\n".join(render_verify(reply)))
    return 0 if reply["equal"] else 2


def cmd_resync(args: argparse.Namespace) -> int:
    reply = _call(args, {"cmd": "resync", "module": args.module, "full": True})
    print("\n".join(reply["messages"]))
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("resolve drops one node's changes: confirm with --yes")
        answer = input(f"Drop the changes of {args.discard} to {args.module} (its copy is moved "
                       "aside, then replaced by the other node's)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UserError("nothing done")
    reply = _call(args, {"cmd": "resolve", "module": args.module, "discard": args.discard})
    if args.json:
        sys.stdout.write(json.dumps(reply, indent=2, sort_keys=True) + "\n")
    else:
        print("\n".join(reply["messages"]))
    return 0
