"""Fill in defaults and record each one, so the compiled bundle shows every default that applied.

Plain defaults come from the schema's ``default`` keywords (one source of truth for docs,
schema and code); the few that depend on other values (a VM's replicated directory, the stop
timeout of a VM vs an app) are applied here by name. The walk is defensive: a value of the
wrong type is left alone (the schema check has already reported it).
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hvha.config.diagnostics import Path, format_path

Applied = list[tuple[str, Any]]

_CHECKER_ACTION = {"ping": "wait", "interface": "wait"}


def apply_defaults(data: Any, schema: dict[str, Any]) -> tuple[Any, Applied]:
    """Return (a deep copy of ``data`` with defaults filled in, the defaults applied)."""
    out = copy.deepcopy(data)
    applied: Applied = []
    if isinstance(out, dict):
        _walk(out, schema, schema, (), applied)
        _conditional(out, applied)
    return out, applied


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _walk(value: Any, node: dict[str, Any], root: dict[str, Any], path: Path,
          applied: Applied) -> None:
    node = _resolve(node, root)
    if isinstance(value, dict):
        props = dict(node.get("properties", {}))
        for branch in node.get("allOf", []):
            cond = branch.get("if", {}).get("properties", {})
            if cond and all(value.get(k) == c.get("const") for k, c in cond.items()):
                props.update(branch.get("then", {}).get("properties", {}))
        for key, sub in props.items():
            sub_r = _resolve(sub, root)
            if key not in value and "default" in sub_r:
                value[key] = copy.deepcopy(sub_r["default"])
                if "properties" not in sub_r:  # an object's leaves are recorded one by one
                    applied.append((format_path((*path, key)), copy.deepcopy(value[key])))
            if key in value:
                _walk(value[key], sub_r, root, (*path, key), applied)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            _walk(item, node["items"], root, (*path, i), applied)


def _set(obj: dict[str, Any], key: str, value: Any, path: Path, applied: Applied) -> None:
    if key not in obj:
        obj[key] = value
        applied.append((format_path((*path, key)), value))


def _conditional(data: dict[str, Any], applied: Applied) -> None:
    nets = data.get("heartbeat", {}).get("networks") if isinstance(data.get("heartbeat"),
                                                                   dict) else None
    nets = [n for n in nets if isinstance(n, dict)] if isinstance(nets, list) else []
    explicit = any("replication" in n for n in nets)
    for i, net in enumerate(data["heartbeat"]["networks"] if nets else []):
        if isinstance(net, dict):  # the first network carries replication unless one says
            first = net is nets[0]
            _set(net, "replication", first and not explicit, ("heartbeat", "networks", i), applied)
    witness = data.get("witness")
    arbiter = witness.get("arbiter") if isinstance(witness, dict) else None
    if isinstance(arbiter, dict) and isinstance(data.get("heartbeat"), dict):
        _set(arbiter, "lease", data["heartbeat"].get("timeout"), ("witness", "arbiter"), applied)
    for i, node in _dicts(data.get("nodes")):
        transport = node.get("transport")
        if isinstance(transport, dict):
            kind = transport.get("type")
            _set(node, "os", "windows" if kind == "winrm" else "linux", ("nodes", i), applied)
            if kind != "local":
                _set(transport, "port", 5986 if kind == "winrm" else 22,
                     ("nodes", i, "transport"), applied)
            if kind == "winrm":
                _set(transport, "auth", "ntlm", ("nodes", i, "transport"), applied)
        hb = node.setdefault("heartbeat", {})
        if (isinstance(hb, dict) and len(nets) == 1 and isinstance(nets[0].get("name"), str)
                and _is_ip(node.get("address"))):  # a host name is no heartbeat address
            _set(hb, nets[0]["name"], node.get("address"), ("nodes", i, "heartbeat"), applied)
    for i, mod in _dicts(data.get("modules")):
        _module(mod, ("modules", i), applied)


def _module(mod: dict[str, Any], path: Path, applied: Applied) -> None:
    kind, payload = mod.get("kind"), mod.get("payload")
    is_vm = kind in ("kvm", "hyperv")
    if is_vm and isinstance(payload, dict) and isinstance(payload.get("directory"), str):
        _set(mod, "replicated", [{"path": payload["directory"], "exclude": []}], path, applied)
        libvirt = kind == "kvm" and payload.get("hypervisor") == "libvirt"
        if libvirt and isinstance(payload.get("vm"), str):
            xml = payload["directory"].rstrip("/") + f"/{payload['vm']}.xml"
            _set(payload, "domain_xml", xml, (*path, "payload"), applied)
    else:
        _set(mod, "replicated", [], path, applied)
    stop = mod.get("stop")
    if isinstance(stop, dict):
        if is_vm:
            _set(stop, "mode", "shutdown", (*path, "stop"), applied)
        _set(stop, "graceful_timeout", "300s" if is_vm else "60s", (*path, "stop"), applied)
    failover = mod.get("failover")
    if isinstance(failover, dict):
        preferred = failover.get("preferred")
        _set(failover, "failback", preferred not in (None, "none"), (*path, "failover"), applied)
    for j, checker in _dicts(mod.get("checkers")):
        ctype = checker.get("type")
        if isinstance(ctype, str):
            _set(checker, "name", ctype, (*path, "checkers", j), applied)
            if ctype == "process":
                _set(checker, "min", 1, (*path, "checkers", j), applied)
            _set(checker, "on_failure", _CHECKER_ACTION.get(ctype, "restart"),
                 (*path, "checkers", j), applied)


def _is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _dicts(value: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, item) for the mapping items of a list; other items were reported by the schema."""
    if not isinstance(value, list):
        return []
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]
