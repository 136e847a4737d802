"""Install a compiled bundle where the agent runs it, and read the cluster secret it names.

The bundle (a tar from ``hvha compile``, or its expanded tree) is extracted to
``<state-dir>/bundle`` by a temp-dir-and-rename swap, so scripts never run from a half-written
tree. The manifest's hashes are checked: a tampered or truncated bundle is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hvha.compile.bundle import CONFIG_FILE, MANIFEST_FILE, read_archive
from hvha.secrets import Ref, SecretError, cluster_key


class BundleError(Exception):
    pass


def _files(source: Path) -> dict[str, tuple[bytes, int]]:
    if source.is_dir():
        return {str(p.relative_to(source)): (p.read_bytes(), p.stat().st_mode & 0o777)
                for p in sorted(source.rglob("*")) if p.is_file()}
    try:
        return read_archive(source.read_bytes())
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"cannot read bundle {source}: {exc}") from None
    except Exception as exc:  # tarfile.ReadError and friends
        raise BundleError(f"{source} is not a bundle: {exc}") from None


def install_bundle(source: Path, state_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Verify and extract ``source``; return (bundle root, agent config)."""
    files = _files(source)
    if MANIFEST_FILE not in files or CONFIG_FILE not in files:
        raise BundleError(f"{source} is not an hvha bundle (no {MANIFEST_FILE}/{CONFIG_FILE})")
    manifest = json.loads(files[MANIFEST_FILE][0])
    for rel, digest in manifest["files"].items():
        if rel not in files or hashlib.sha256(files[rel][0]).hexdigest() != digest:
            raise BundleError(f"bundle {source}: {rel} does not match its manifest")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle.", dir=state_dir))
    for rel, (data, mode) in files.items():
        path = tmp / rel
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
    final = state_dir / "bundle"
    old = state_dir / ".bundle.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final, json.loads(files[CONFIG_FILE][0])


def read_secret(ref: dict[str, str]) -> bytes:
    """The cluster key from its reference (see :func:`hvha.secrets.cluster_key`)."""
    try:
        return cluster_key(Ref(ref["source"], ref["ref"]))
    except SecretError as exc:
        raise BundleError(str(exc)) from None
