"""The hvha package as wheels, built once on the controller and pushed to every node.

Why a wheelhouse: nodes in a production network often have no route to a package registry,
and they must run exactly the code that compiled their bundle. ``pip wheel`` of the source tree
gives hvha's wheel plus every dependency's; ``pip install --no-index --find-links`` on the node
installs only from those. The wheelhouse is cached under ``$XDG_CACHE_HOME/hvha/wheelhouse/<key>``
where the key hashes the source tree, so an unchanged tree is not rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hvha

SOURCE_PARTS = ("pyproject.toml", "src", "schema", "modules")


class PackageError(Exception):
    """The wheelhouse cannot be built; the message says what to do."""


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    wheels: tuple[str, ...]  # file names
    key: str

    def size(self) -> int:
        return sum((self.directory / w).stat().st_size for w in self.wheels)


def source_root() -> Path:
    """The source tree this hvha runs from (an editable install or a checkout)."""
    root = Path(hvha.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "src" / "hvha").is_dir():
        raise PackageError(
            f"hvha runs from {Path(hvha.__file__).parent}, not from a source tree, so it cannot "
            "build the package to push: pass --wheelhouse DIR (wheels made with "
            "`pip wheel -w DIR hvha`)")
    return root


def source_key(root: Path) -> str:
    h = hashlib.sha256()
    for part in SOURCE_PARTS:
        base = root / part
        files = [base] if base.is_file() else sorted(
            p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hvha" / "wheelhouse"


def from_directory(directory: Path) -> Wheelhouse:
    wheels = tuple(sorted(p.name for p in directory.glob("*.whl")))
    if not any(w.startswith("hvha-") for w in wheels):
        raise PackageError(f"{directory} holds no hvha wheel: build one with "
                           f"`pip wheel -w {directory} <hvha source>`")
    return Wheelhouse(directory, wheels, "given")


def build(root: Path | None = None) -> Wheelhouse:
    """The cached wheelhouse of the source tree, built now if the tree changed."""
    root = root or source_root()
    key = source_key(root)
    final = cache_dir() / key
    if final.is_dir():
        return Wheelhouse(final, from_directory(final).wheels, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:  # one build at a time per cache
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # built by a concurrent hvha while we waited
            return Wheelhouse(final, from_directory(final).wheels, key)
        return _build_into(root, final, key)


def _build_into(root: Path, final: Path, key: str) -> Wheelhouse:
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
             "--wheel-dir", str(tmp), str(root)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = "\n".join(res.stderr.strip().splitlines()[-5:])
            raise PackageError(f"building the hvha wheelhouse failed (pip wheel {root}):\n"
                               f"{tail}\n  the controller needs a package index or a pip cache "
                               "for hvha's dependencies, or pass --wheelhouse DIR")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Wheelhouse(final, from_directory(final).wheels, key)


def local_build() -> str | None:
    """The key of the source tree hvha runs from, or None when it runs from an installed
    package (then plans compare versions only)."""
    try:
        return source_key(source_root())
    except PackageError:
        return None
