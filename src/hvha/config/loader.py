"""Read a cluster file into plain data, keeping the source position of every key and value.

Why not ``yaml.safe_load``: it forgets positions, silently keeps the last of two duplicate keys,
turns ``no`` into ``False`` and ``1:30`` into ``90`` (YAML 1.1), and expands alias bombs until
memory runs out. Here the document is *composed* by libyaml (linear in the file size, aliases
shared, not expanded) and then converted by our own walker, which enforces a budget on the
number of values produced and the depth, rejects duplicate keys and YAML 1.1 surprises with
file:line:col, and records positions for diagnostics. Every problem is collected, not raised.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from hvha.config.diagnostics import Path, Position, Report

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_VALUES = 1_000_000
MAX_DEPTH = 64

_T = "tag:yaml.org,2002:"
_COLLECTIONS = (_T + "map", _T + "seq", _T + "omap")
_SCALARS = ("str", "int", "float", "bool", "null", "timestamp", "value", "merge")
_YAML11_BOOL = re.compile(r"^(y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$")
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")

try:  # libyaml is much faster; the pure-Python loader gives the same nodes.
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader


class _Budget(Exception):
    """Raised inside the walker when the value budget or depth limit is exhausted."""


@dataclass
class Document:
    """A loaded cluster file: plain data plus positions, and what went wrong reading it."""

    file: str
    data: Any
    report: Report
    positions: dict[Path, Position] = field(default_factory=dict)
    key_positions: dict[Path, Position] = field(default_factory=dict)
    reported: set[Path] = field(default_factory=set)

    def position(self, path: Path) -> Position | None:
        """Position of the value at ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while True:
            if p in self.positions:
                return self.positions[p]
            if not p:
                return None
            p = p[:-1]

    def key_position(self, path: Path) -> Position | None:
        """Position of the key that introduces ``path`` (falls back to the value position)."""
        return self.key_positions.get(tuple(path)) or self.position(path)


def _pos(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def load_file(filename: str) -> Document:
    """Load ``filename``; never raises for bad input, problems land in ``Document.report``."""
    report = Report(filename)
    try:
        size = os.stat(filename).st_size
        if size > MAX_FILE_BYTES:
            report.add(
                "HV101",
                f"file is {size} bytes, more than the {MAX_FILE_BYTES} bytes accepted",
                "split the cluster into several files, or check that this is the right file",
                Position(1, 1),
            )
            return Document(filename, None, report)
        with open(filename, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        report.add("HV100", f"cannot read the file: {exc.strerror or exc}",
                   "check the path and its permissions", None)
        return Document(filename, None, report)
    return load_bytes(raw, filename, report)


def load_bytes(raw: bytes, filename: str = "<input>", report: Report | None = None) -> Document:
    report = report or Report(filename)
    if len(raw) > MAX_FILE_BYTES:
        report.add("HV101", f"input is more than {MAX_FILE_BYTES} bytes",
                   "split the cluster into several files", Position(1, 1))
        return Document(filename, None, report)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        report.add("HV102", f"byte 0x{raw[exc.start]:02x} is not valid UTF-8",
                   "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)", Position(line, col))
        return Document(filename, None, report)
    return load_text(text, filename, report)


def load_text(text: str, filename: str = "<input>", report: Report | None = None) -> Document:
    report = report or Report(filename)
    doc = Document(filename, None, report)
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        if _tab_at(text, exc.problem_mark) or "tab" in str(exc.problem):
            _check_tabs(text, report)  # tabs explain the failure; a tab in content is fine
            tab = exc.problem_mark
            if report.ok and tab is not None:  # a tab that is not indentation
                report.add("HV104", "a tab where YAML expects spaces",
                           "replace the tab with spaces", Position(tab.line + 1, tab.column + 1))
            return doc
        # A scanner error ("while scanning a quoted scalar") is best shown where the token
        # started; a parser error where the unexpected token is.
        scanning = str(exc.context or "").startswith("while scanning")
        mark = (exc.context_mark if scanning else None) or exc.problem_mark or exc.context_mark
        pos = Position(mark.line + 1, mark.column + 1) if mark else None
        what = " ".join(x for x in (exc.context, exc.problem) if x) or "invalid YAML"
        if "exceeded maximum" in what:
            report.add("HV111", "the document nests too deeply",
                       "flatten the structure; a cluster file is a few levels deep", pos)
        else:
            report.add("HV103", f"YAML syntax: {what}",
                       "fix the indentation or quoting near this point", pos)
        return doc
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        report.add("HV103", f"YAML syntax: {exc}", "check the file is YAML", None)
        return doc
    nodes = [n for n in nodes if n is not None and not _is_null(n)]
    if not nodes:
        report.add("HV113", "the file is empty",
                   "start from examples/lab.yaml or see docs/configuration.md", Position(1, 1))
        return doc
    if len(nodes) > 1:
        report.add("HV112", f"the file holds {len(nodes)} YAML documents; one is expected",
                   "remove the extra `---` separators", _pos(nodes[1]))
    walker = _Walker(doc)
    try:
        _expanded_size(nodes[0])
        doc.data = walker.value(nodes[0], (), 0)
    except _Budget as exc:
        doc.data = None
        report.add(*exc.args)
    return doc


def _tab_at(text: str, mark: Any) -> bool:
    if mark is None:
        return False
    lines = text.splitlines()
    if mark.line >= len(lines):
        return False
    line = lines[mark.line]
    return bool(mark.column < len(line) and line[mark.column] == "\t")


def _is_null(node: yaml.Node) -> bool:
    """An empty document (``---`` alone, or only comments)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == _T + "null" and node.value == ""


def _check_tabs(text: str, report: Report) -> bool:
    found = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip(" \t")
        indent = line[: len(line) - len(stripped)]
        if "\t" in indent and stripped and not stripped.startswith("#"):
            report.add("HV104", "a tab is used for indentation; YAML allows only spaces",
                       "replace the tabs with spaces (e.g. `expand -t 2`)",
                       Position(lineno, indent.index("\t") + 1))
            found += 1
            if found >= 20:
                break
    return found > 0


def _expanded_size(root: yaml.Node) -> int:
    """Count the values ``root`` expands to, sharing work across aliased nodes.

    Linear in the number of *distinct* nodes, so an alias bomb is measured, and refused,
    before anything is expanded. Recursive aliases and excessive depth are refused too.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:
            raise _Budget("HV111", f"the document nests deeper than {MAX_DEPTH} levels",
                          "flatten the structure; a cluster file is a few levels deep",
                          _pos(node), ())
        if key in active:
            raise _Budget("HV106", "an alias refers to the node that contains it",
                          "remove the recursive alias", _pos(node), ())
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v, depth + 1) for v in node.value)
        active.discard(key)
        if total > MAX_VALUES:
            raise _Budget("HV106", f"the document expands to more than {MAX_VALUES} values "
                          "(anchors and aliases nested inside each other)",
                          "remove the nested anchors/aliases; write the values out",
                          _pos(node), ())
        sizes[key] = total
        return total

    return size(root, 0)


class _Walker:
    """Converts a composed node graph to plain data under a budget, recording positions."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.count = 0

    def value(self, node: yaml.Node, path: Path, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise _Budget("HV106", f"the document expands to more than {MAX_VALUES} values "
                          "(aliases referring to aliases)",
                          "remove the nested anchors/aliases; write the values out",
                          _pos(node), path)
        if depth > MAX_DEPTH:
            raise _Budget("HV111", f"the document nests deeper than {MAX_DEPTH} levels",
                          "flatten the structure; a cluster file is a few levels deep",
                          _pos(node), path)
        self.doc.positions[path] = _pos(node)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _COLLECTIONS:
            self.doc.report.add("HV114", f"YAML tag '{node.tag}' is not supported",
                                "remove the tag; write plain values", _pos(node), path)
            self.doc.reported.add(path)
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, Position] = {}
        merged: list[yaml.MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == _T + "merge":
                merged.extend(self._merge_sources(value_node, key_node, path))
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in seen:
                first = seen[key]
                self.doc.report.add(
                    "HV105",
                    f"key '{key}' appears twice (first at line {first.line}:{first.col}); "
                    "YAML loaders would silently keep only the last one",
                    "remove or rename one of the two", _pos(key_node), (*path, key))
                continue
            seen[key] = _pos(key_node)
            self.doc.key_positions[(*path, key)] = _pos(key_node)
            out[key] = self.value(value_node, (*path, key), depth + 1)
        for source in merged:  # explicit keys win over merged ones, earlier merges over later
            for key_node, value_node in source.value:
                key = self._key(key_node, path)
                if key is not None and key not in out:
                    self.doc.key_positions[(*path, key)] = _pos(key_node)
                    out[key] = self.value(value_node, (*path, key), depth + 1)
        return out

    def _merge_sources(self, node: yaml.Node, key: yaml.Node,
                       path: Path) -> list[yaml.MappingNode]:
        if isinstance(node, yaml.MappingNode):
            return [node]
        if isinstance(node, yaml.SequenceNode) and all(
            isinstance(n, yaml.MappingNode) for n in node.value
        ):
            return list(node.value)
        self.doc.report.add("HV103", "`<<` (merge) must refer to a mapping or a list of mappings",
                            "point `<<:` at an anchored mapping, e.g. `<<: *defaults`",
                            _pos(key), path)
        return []

    def _key(self, node: yaml.Node, path: Path) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag in (_T + "str", _T + "timestamp"):
            return str(node.value)
        if isinstance(node, yaml.ScalarNode):
            value = self.scalar(node, path)
            if isinstance(value, str):
                return value
        self.doc.report.add("HV110", "a key must be a plain word or text",
                            "quote the key or rename it", _pos(node), path)
        return None

    def scalar(self, node: yaml.Node, path: Path) -> Any:
        tag, text = node.tag, node.value
        report = self.doc.report
        if not tag.startswith(_T) or tag[len(_T):] not in _SCALARS:
            report.add("HV114", f"YAML tag '{tag}' is not supported",
                       "remove the tag; write plain values", _pos(node), path)
            self.doc.reported.add(path)
            return text
        kind = tag[len(_T):]
        if kind in ("str", "timestamp", "value", "merge"):
            return text  # quoted scalars always resolve to str; dates stay text
        if kind == "null":
            return None
        if kind == "bool":
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            if _YAML11_BOOL.match(text):
                report.add("HV107",
                           f"`{text}` is read as a boolean by YAML 1.1 tools and as text by others",
                           f'write true/false for a switch, or quote it ("{text}") for text',
                           _pos(node), path)
                self.doc.reported.add(path)
                return text
            return text
        if kind == "int":
            if ":" in text:
                return self._surprise("HV108", text, node, path,
                                      f"`{text}` is read as a base-60 number by YAML 1.1 tools")
            if _OCTAL.match(text):
                return self._surprise("HV109", text, node, path,
                                      f"`{text}` is read as an octal number by YAML 1.1 tools")
            try:
                return int(text.replace("_", ""), 0)
            except ValueError:
                return text
        if kind == "float":
            if ":" in text:
                return self._surprise("HV108", text, node, path,
                                      f"`{text}` is read as a base-60 number by YAML 1.1 tools")
            low = text.lower().replace("_", "")
            if low in (".inf", "+.inf", "-.inf", ".nan"):
                return text  # not useful in a cluster file: let the schema say what is expected
            try:
                return float(low)
            except ValueError:
                return text
        return text

    def _surprise(self, code: str, text: str, node: yaml.Node, path: Path, message: str) -> str:
        self.doc.report.add(code, message,
                            f'quote it ("{text}") if you mean the text, or write the number '
                            "you mean in plain decimal", _pos(node), path)
        self.doc.reported.add(path)
        return text
