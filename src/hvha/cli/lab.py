"""`hvha lab`: placeholder until the network-namespace lab lands."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("lab", help="the two-node lab on this machine")
    p.set_defaults(func=lambda _a: 1)
