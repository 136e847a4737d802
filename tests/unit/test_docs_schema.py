"""docs/configuration.md stays in step with the schema, the defaults and the diagnostic codes.

The doc documents each key in a Markdown table with the columns ``key | type | default |
meaning``, the key cell being exactly ``\\`name\\```. The checks below read those rows:

* every property name of the schema (in every ``$defs`` entry and nested object) appears as
  ``\\`name\\``` in the doc and has a table row;
* every ``default`` of the schema is written, formatted as YAML (``5s``, ``4800``, ``false``,
  ``[]``, ``{}``, ``[{name: lan, replication: true}]``), in backticks in the default cell of a
  row for that key; a key with the same default in several places (``timeout: 5s`` for the
  heartbeat and for checkers) needs as many rows;
* the defaults that depend on other values (``hvha.config.defaults``) are taken from the code
  by applying it to small probe files, and must appear in the default cell the same way;
* every diagnostic code appears with its name on one line;
* every complete cluster file shown in the doc validates.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from hvha.config.defaults import apply_defaults
from hvha.config.diagnostics import CODES
from hvha.config.validate import validate_bytes

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "schema" / "cluster.schema.json"
DOC_FILE = ROOT / "docs" / "configuration.md"

HEADER = ["key", "type", "default", "meaning"]

# Defaults that copy another value of the file (a checker is named after its type, a VM's
# directory is replicated, the libvirt XML sits in the VM directory, a node's heartbeat address
# is its address): the doc describes where they come from, not a literal value.
DERIVED = {"name", "replicated", "domain_xml", "heartbeat"}


@cache
def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return data


@cache
def doc() -> str:
    return DOC_FILE.read_text(encoding="utf-8")


def _subschemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in the schema document: $defs, nested objects, allOf/if/then branches."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _subschemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _subschemas(value)


def _properties() -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, subschema) of every property declared anywhere in the schema."""
    for sub in _subschemas(schema()):
        props = sub.get("properties")
        if isinstance(props, dict):
            for name, prop in props.items():
                if isinstance(prop, dict):
                    yield name, prop


def property_names() -> set[str]:
    return {name for name, _ in _properties()}


def schema_defaults() -> Counter[tuple[str, str]]:
    """(key, default written as YAML) for every ``default`` keyword, counted per place."""
    found: Counter[tuple[str, str]] = Counter()
    for name, prop in _properties():
        if "default" in prop:
            found[(name, yaml_text(prop["default"]))] += 1
    return found


def yaml_text(value: Any) -> str:
    """A default as a user writes it in YAML flow style: true, 5s, 4800, [], {a: b}."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return str(value)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@cache
def rows() -> tuple[tuple[str, str, str, str], ...]:
    """(key, type, default, meaning) of every row of every ``key | type | default | meaning``
    table; ``key`` is the name inside the backticks of the first cell."""
    out = []
    in_table = False
    for line in doc().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells == HEADER:
            in_table = True
            continue
        if not in_table or set(line.replace("|", "").strip()) <= {"-", ":", " "}:
            continue
        assert len(cells) == 4, f"table row with {len(cells)} cells: {line}"
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        assert match, f"first cell of a key table is not a `key`: {line}"
        out.append((match.group(1), cells[1], cells[2], cells[3]))
    return tuple(out)


def _rows_for(key: str) -> list[tuple[str, str, str, str]]:
    return [r for r in rows() if r[0] == key]


def test_the_doc_has_key_tables() -> None:
    assert len(rows()) >= len(property_names())
    for key, type_, default, meaning in rows():
        assert type_ and default and meaning, f"row for `{key}` has an empty cell"


@pytest.mark.parametrize("name", sorted(property_names()))
def test_every_schema_property_is_documented(name: str) -> None:
    assert f"`{name}`" in doc(), f"`{name}` is not mentioned in {DOC_FILE.name}"
    assert _rows_for(name), f"`{name}` has no row in a `key | type | default | meaning` table"


def test_property_walk_sees_nested_definitions() -> None:
    # A guard on the walker itself: keys from $defs, nested items and if/then branches.
    names = property_names()
    assert {"cluster", "lease", "zone_size", "exclude", "count", "domain_xml", "switch",
            "unit", "on_failure", "known_hosts", "env"} <= names


@pytest.mark.parametrize(("key", "default"), sorted(schema_defaults()))
def test_schema_default_is_in_the_row_of_its_key(key: str, default: str) -> None:
    wanted = schema_defaults()[(key, default)]
    matching = [r for r in _rows_for(key) if f"`{default}`" in r[2]]
    assert len(matching) >= wanted, (
        f"schema default {key}: {default} appears {wanted} time(s) in the schema but only in "
        f"{len(matching)} row(s) whose default cell contains `{default}`; rows for `{key}`: "
        f"{[r[2] for r in _rows_for(key)]}")


def _probe_files() -> list[dict[str, Any]]:
    """Small cluster files that exercise every conditional default of hvha.config.defaults."""
    checkers = [
        {"type": "process", "process": "x"},
        {"type": "tcp", "host": "10.0.0.100", "port": 80},
        {"type": "ping", "host": "10.0.0.254"},
        {"type": "interface", "interface": "eth0"},
        {"type": "script", "command": "true"},
        {"type": "vm_state"},
    ]
    base = {
        "cluster": {"name": "probe", "secret": {"env": "K"}},
        "nodes": [
            {"name": "a", "address": "10.0.0.1"},
            {"name": "b", "address": "10.0.0.2", "transport": {"type": "winrm"}},
        ],
        "heartbeat": {"networks": [{"name": "lan"}]},
        "witness": {"arbiter": {"address": "10.0.0.3"}},
        "modules": [
            {"name": "app", "kind": "app", "payload": {"start": "x", "stop": "y"},
             "checkers": checkers},
            {"name": "kvm", "kind": "kvm", "payload": {"vm": "v", "directory": "/vms/v"}},
            {"name": "hv", "kind": "hyperv", "payload": {"vm": "w", "directory": "D:\\VMs\\w"},
             "failover": {"preferred": "b"}},
        ],
    }
    two_networks = json.loads(json.dumps(base))
    two_networks["heartbeat"]["networks"].append({"name": "sync"})
    return [base, two_networks]


def conditional_defaults() -> set[tuple[str, str]]:
    """(key, value as YAML) of every literal default the code applies to the probe files."""
    found: set[tuple[str, str]] = set()
    names = property_names()
    for probe in _probe_files():
        _, applied = apply_defaults(probe, schema())
        for path, value in applied:
            key = re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]
            if key in names and key not in DERIVED and not isinstance(value, dict | list):
                found.add((key, yaml_text(value)))
    return found


def test_probes_reach_the_conditional_defaults() -> None:
    found = conditional_defaults()
    # If defaults.py changes shape, these probes must still reach what it decides.
    assert {("os", "windows"), ("os", "linux"), ("port", "5986"), ("port", "22"),
            ("auth", "ntlm"), ("graceful_timeout", "300s"), ("graceful_timeout", "60s"),
            ("mode", "shutdown"), ("failback", "true"), ("failback", "false"),
            ("on_failure", "restart"), ("on_failure", "wait"), ("min", "1"),
            ("replication", "true"), ("replication", "false"), ("lease", "5s")} <= found


@pytest.mark.parametrize(("key", "default"), sorted(conditional_defaults()))
def test_code_default_is_in_the_row_of_its_key(key: str, default: str) -> None:
    assert any(f"`{default}`" in r[2] for r in _rows_for(key)), (
        f"hvha applies the default {key}: {default}, but no row for `{key}` has `{default}` "
        f"in its default cell: {[r[2] for r in _rows_for(key)]}")


@pytest.mark.parametrize(("code", "name"), sorted(CODES.items()))
def test_every_code_is_documented_with_its_name(code: str, name: str) -> None:
    lines = [line for line in doc().splitlines() if re.search(rf"\b{code}\b", line)]
    assert lines, f"{code} does not appear in {DOC_FILE.name}"
    assert any(name in line for line in lines), f"no line of the doc gives {code} with {name}"


def _yaml_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", doc(), flags=re.S | re.M)


def test_the_doc_starts_with_a_complete_example() -> None:
    blocks = _yaml_blocks()
    assert blocks and re.search(r"^cluster:", blocks[0], flags=re.M)
    assert doc().index("```yaml") < doc().index("## Top level")


@pytest.mark.parametrize("block", [b for b in _yaml_blocks() if re.search(r"^cluster:", b,
                                                                          flags=re.M)])
def test_complete_examples_validate(block: str) -> None:
    v = validate_bytes(block.encode(), "docs/configuration.md")
    assert v.report.ok, "\n".join(d.render() for d in v.report)
