"""Where hvha's data files are: the schema and the module templates.

In a wheel they are packaged under ``hvha/_data``; in a source checkout (editable install,
tests) they are the top-level ``schema/`` and ``modules/`` folders.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


@cache
def data_dir(name: str) -> Path:
    """The ``schema`` or ``modules`` folder."""
    packaged = _PACKAGE / "_data" / name
    if packaged.is_dir():
        return packaged
    checkout = _PACKAGE.parent.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"hvha data folder {name!r} not found (broken installation)")


def schema_path() -> Path:
    return data_dir("schema") / "cluster.schema.json"


def modules_dir() -> Path:
    return data_dir("modules")
