"""`hvha` entry point: parse arguments, dispatch to one command module, map errors to exit codes.

Each command lives in its own module under :mod:`hvha.cli` exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed namespace and returning
the exit code. A user mistake is exit 1 with a message, never a traceback; an internal error is
exit 3 with a one-line summary (the traceback only with ``HVHA_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from hvha import __version__
from hvha.cli.errors import UserError

__all__ = ["UserError", "main"]

COMMAND_MODULES = ("config_cmds", "plan_cmds", "apply_cmds", "lab", "agent_cmds",
                   "replication_cmds", "witness")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"hvha: error: {message}\n")
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hvha", description="High availability for VMs and apps on two servers.")
    parser.add_argument("--version", action="version", version=f"hvha {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"hvha.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 1
    try:
        return int(func(args))
    except UserError as exc:
        sys.stderr.write(f"hvha: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("hvha: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if os.environ.get("HVHA_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(
            f"hvha: internal error: {type(exc).__name__}: {exc}\n"
            "  this is a bug in hvha; rerun with HVHA_DEBUG=1 for details and report it\n"
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
