"""Render a module's scripts from ``modules/<kind>/`` jinja2 templates.

Templates get the model objects plus two quoting filters: ``sh`` (POSIX shell) and ``ps``
(PowerShell single quotes). Every value from the cluster file passes through one of them, so a
VM named ``a'; rm -rf /`` stays a name. Undefined variables are errors, not empty strings.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from hvha.config.resources import modules_dir
from hvha.model.cluster import Cluster, Module, Node


def ps_quote(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sh_quote(value: object) -> str:
    return shlex.quote(str(value))


@dataclass(frozen=True)
class ScriptSpec:
    name: str
    template: str
    file: str


@dataclass(frozen=True)
class KindSpec:
    kind: str
    platform: str
    scripts: tuple[ScriptSpec, ...]


@cache
def kind_spec(kind: str) -> KindSpec:
    path = modules_dir() / kind / "module.yaml"
    with open(path, encoding="utf-8") as fh:
        raw: dict[str, Any] = yaml.safe_load(fh)
    scripts = tuple(ScriptSpec(s["name"], s["template"], s["file"]) for s in raw["scripts"])
    return KindSpec(raw["kind"], raw["platform"], scripts)


@cache
def _environment(root: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sh"] = sh_quote
    env.filters["ps"] = ps_quote
    return env


class _Payload(dict[str, Any]):
    """Payload mapping whose missing keys read as None in templates (they are optional)."""

    def __getattr__(self, key: str) -> Any:
        return self.get(key)


def runtime_paths(cluster: Cluster, module: Module) -> dict[str, str]:
    """Per-module runtime files on a node (QMP socket, pid file) at stable places."""
    base = f"/run/hvha/{cluster.name}/{module.name}"
    return {"qmp_socket": f"{base}/qmp.sock", "pid_file": f"{base}/payload.pid"}


def render_module(cluster: Cluster, module: Module, node: Node) -> dict[str, tuple[str, int]]:
    """{file name: (text, mode)} of a module's scripts for ``node``."""
    spec = kind_spec(module.kind.value)
    env = _environment(modules_dir() / module.kind.value)
    payload = _Payload({k: list(v) if isinstance(v, tuple) else v for k, v in module.payload})
    context = {"cluster": cluster, "module": module, "node": node,
               "peer": cluster.peer_of(node.name), "payload": payload,
               **runtime_paths(cluster, module)}
    out = {}
    for script in spec.scripts:
        text = env.get_template(script.template).render(context)
        mode = 0o600 if script.name == "env" else 0o700
        out[script.file] = (text, mode)
    return out
