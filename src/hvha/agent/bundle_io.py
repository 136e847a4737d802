"""Load, install and compare the compiled bundles the agent runs, and read the cluster secret.

The bundle (a tar from ``hvha compile``, or its expanded tree) is verified before anything is
written: every file must match its manifest, and ``BUNDLE_HASH`` (when present) the manifest's
digest, so a tampered or truncated bundle is refused and the running one stays. It is then
extracted to a temp dir next to ``<state-dir>/bundle`` and swapped in as a whole (one atomic
``renameat2(RENAME_EXCHANGE)`` where the kernel has it), so scripts never run from a
half-written tree. Start-up and reload share this one path (:func:`load_bundle`,
:func:`extract`, :func:`commit`).

:func:`compare` is the pure decision of a reload: which node-level sections changed (those need
a service restart) and which modules were added, removed or changed, and how.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvha.compile.bundle import CONFIG_FILE, MANIFEST_FILE, read_archive
from hvha.plan.diff import RESTARTING_FIELDS
from hvha.secrets import Ref, SecretError, cluster_key

HASH_FILE = "BUNDLE_HASH"
# agent.json keys a reload can apply (or that carry no behaviour); any other difference is a
# node-level change (heartbeat, witness, node, peer, cluster, replication, format, ...).
RELOADABLE = ("modules", "start_order", "defaults_applied", "hvha_version", "source_sha256")
IGNORED_MODULE_FIELDS = ("start_rank",)  # derived from the graph order: adding a module shifts it
# Fields whose change restarts a running payload: what it was started with, what it is, and
# where its data lives.
RESTART_FIELDS = (*RESTARTING_FIELDS, "kind", "replicated")


class BundleError(Exception):
    pass


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle in memory, not yet written anywhere."""

    source: Path
    files: dict[str, tuple[bytes, int]]
    config: dict[str, Any]
    digests: dict[str, str]  # the manifest: relative path -> sha256
    hash: str


def _files(source: Path) -> dict[str, tuple[bytes, int]]:
    try:
        if source.is_dir():
            return {str(p.relative_to(source)): (p.read_bytes(), p.stat().st_mode & 0o777)
                    for p in sorted(source.rglob("*")) if p.is_file()}
        return read_archive(source.read_bytes())
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"cannot read bundle {source}: {exc}") from None
    except Exception as exc:  # tarfile.ReadError and friends
        raise BundleError(f"{source} is not a bundle: {exc}") from None


def load_bundle(source: Path) -> LoadedBundle:
    """Read and verify ``source``; raise :class:`BundleError` saying what is wrong."""
    files = _files(source)
    if MANIFEST_FILE not in files or CONFIG_FILE not in files:
        raise BundleError(f"{source} is not an hvha bundle (no {MANIFEST_FILE}/{CONFIG_FILE}): "
                          "give the <node>.bundle written by `hvha compile`")
    raw = files[MANIFEST_FILE][0]
    try:
        digests = dict(json.loads(raw)["files"])
        config = json.loads(files[CONFIG_FILE][0])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {source}: unreadable {MANIFEST_FILE}/{CONFIG_FILE}: {exc}; "
                          "compile it again") from None
    for rel, digest in digests.items():
        if rel not in files or hashlib.sha256(files[rel][0]).hexdigest() != digest:
            raise BundleError(f"bundle {source}: {rel} does not match its manifest "
                              "(truncated or edited): compile and push it again")
    digest = hashlib.sha256(raw).hexdigest()
    stated = files.get(HASH_FILE, (b"", 0))[0].decode(errors="replace").strip()
    if stated and stated != digest:
        raise BundleError(f"bundle {source}: {HASH_FILE} says {stated[:12]} but the manifest "
                          f"hashes to {digest[:12]}: compile and push it again")
    if not isinstance(config, dict) or not isinstance(config.get("modules"), list):
        raise BundleError(f"bundle {source}: {CONFIG_FILE} has no module list: compile it again")
    return LoadedBundle(source, files, config, digests, digest)


def extract(bundle: LoadedBundle, state_dir: Path) -> Path:
    """Write the bundle's files to a new temp dir in ``state_dir`` (for :func:`commit`)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle.", dir=state_dir))
    try:
        for rel, (data, mode) in bundle.files.items():
            path = tmp / rel
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, mode)
        if HASH_FILE not in bundle.files:
            (tmp / HASH_FILE).write_text(f"{bundle.hash}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def commit(tmp: Path, state_dir: Path) -> Path:
    """Make the extracted ``tmp`` the bundle the agent runs (``state_dir/bundle``)."""
    final = state_dir / "bundle"
    old = state_dir / ".bundle.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old tree
        return final
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def install_bundle(source: Path, state_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Verify and extract ``source``; return (bundle root, agent config)."""
    bundle = load_bundle(source)
    return commit(extract(bundle, state_dir), state_dir), bundle.config


def running_hash(root: Path) -> str | None:
    """The hash of the bundle extracted at ``root`` (None if there is none)."""
    path = root / HASH_FILE
    if path.exists():
        return path.read_text().strip()
    manifest = root / MANIFEST_FILE
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None


def running_digests(root: Path) -> dict[str, str]:
    """The manifest of the bundle at ``root`` (empty if unreadable: every script counts as
    changed, which is harmless since scripts are only used the next time they run)."""
    try:
        return dict(json.loads((root / MANIFEST_FILE).read_bytes())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def read_secret(ref: dict[str, str]) -> bytes:
    """The cluster key from its reference (see :func:`hvha.secrets.cluster_key`)."""
    try:
        return cluster_key(Ref(ref["source"], ref["ref"]))
    except SecretError as exc:
        raise BundleError(str(exc)) from None


# -- what a reload changes (pure) ------------------------------------------------------------

@dataclass(frozen=True)
class ModuleChange:
    name: str
    settings: bool  # the module's agent.json entry changed: new ports and policy
    restart: bool  # a field the running payload was started with changed (RESTART_FIELDS)
    vip: bool  # the VIP moved, appeared or went away
    replication: bool = False  # the replicated directories changed: a new replicator


@dataclass(frozen=True)
class ReloadPlan:
    sections: tuple[str, ...]  # node-level sections that differ: only a restart applies them
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[ModuleChange, ...]  # includes script-only changes (settings False)


def _module_view(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in IGNORED_MODULE_FIELDS}


def _scripts(digests: Mapping[str, str], module: str) -> dict[str, str]:
    prefix = f"modules/{module}/"
    return {k: v for k, v in digests.items() if k.startswith(prefix)}


def compare(old: Mapping[str, Any], old_digests: Mapping[str, str], new: Mapping[str, Any],
            new_digests: Mapping[str, str]) -> ReloadPlan:
    """What applying ``new`` over the running ``old`` configuration means (both agent.json)."""
    sections = tuple(sorted(k for k in set(old) | set(new)
                            if k not in RELOADABLE and old.get(k) != new.get(k)))
    have = {str(m["name"]): m for m in old.get("modules", [])}
    want = {str(m["name"]): m for m in new.get("modules", [])}
    changed = []
    for name in sorted(set(have) & set(want)):
        a, b = _module_view(have[name]), _module_view(want[name])
        scripts = _scripts(old_digests, name) != _scripts(new_digests, name)
        if a == b and not scripts:
            continue
        changed.append(ModuleChange(
            name, settings=a != b, restart=any(a.get(f) != b.get(f) for f in RESTART_FIELDS),
            vip=a.get("vip") != b.get("vip"),
            replication=a.get("replicated") != b.get("replicated")))
    return ReloadPlan(sections, tuple(n for n in want if n not in have),
                      tuple(n for n in have if n not in want), tuple(changed))


def edited_files(root: Path, digests: dict[str, str]) -> list[str]:
    """Files of the extracted bundle at ``root`` that no longer match ``digests`` (edited or
    deleted on the node since extraction): drift that a reload repairs by extracting again."""
    bad = []
    for rel, digest in sorted(digests.items()):
        try:
            ok = hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest
        except OSError:
            ok = False
        if not ok:
            bad.append(rel)
    return bad
