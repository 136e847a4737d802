"""Diagnostics: every problem found in a cluster file, with where it is and how to fix it.

Validation never stops at the first problem: rules append :class:`Diagnostic` items to a
:class:`Report`, and the CLI renders all of them at once. Codes are stable (``HV101``) so that
scripts, documentation and tests can refer to them; the name after the code is for humans.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

Path = tuple[str | int, ...]


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a source file."""

    line: int
    col: int


@dataclass(frozen=True)
class Diagnostic:
    code: str
    name: str
    message: str
    hint: str
    file: str
    position: Position | None
    path: Path = ()
    severity: Severity = Severity.ERROR

    @property
    def yaml_path(self) -> str:
        return format_path(self.path)

    def render(self) -> str:
        where = self.file
        if self.position is not None:
            where += f":{self.position.line}:{self.position.col}"
        at = f" at {self.yaml_path}" if self.path else ""
        text = f"{where}: {self.severity.value}[{self.code} {self.name}]{at}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "name": self.name,
            "severity": self.severity.value,
            "file": self.file,
            "line": self.position.line if self.position else None,
            "col": self.position.col if self.position else None,
            "path": self.yaml_path,
            "message": self.message,
            "hint": self.hint,
        }


def format_path(path: Path) -> str:
    """Render a YAML path the way a user would write it: ``modules[3].vip.address``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


@dataclass
class Report:
    """An accumulating list of diagnostics for one file."""

    file: str
    items: list[Diagnostic] = field(default_factory=list)

    def add(
        self,
        code: str,
        message: str,
        hint: str,
        position: Position | None,
        path: Path = (),
        severity: Severity = Severity.ERROR,
    ) -> None:
        self.items.append(
            Diagnostic(
                code=code,
                name=CODES[code],
                message=message,
                hint=hint,
                file=self.file,
                position=position,
                path=path,
                severity=severity,
            )
        )

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity is Severity.ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def sorted(self) -> list[Diagnostic]:
        def key(d: Diagnostic) -> tuple[int, int, str]:
            pos = d.position or Position(0, 0)
            return (pos.line, pos.col, d.code)

        return sorted(self.items, key=key)

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.sorted())


# Stable codes. Never renumber; retire a code rather than reuse it.
CODES: dict[str, str] = {
    # 1xx: reading the file
    "HV100": "file-unreadable",
    "HV101": "file-too-large",
    "HV102": "not-utf8",
    "HV103": "yaml-syntax",
    "HV104": "tab-indent",
    "HV105": "duplicate-key",
    "HV106": "alias-expansion",
    "HV107": "yaml11-boolean",
    "HV108": "yaml11-sexagesimal",
    "HV109": "yaml11-octal",
    "HV110": "non-string-key",
    "HV111": "too-deep",
    "HV112": "multiple-documents",
    "HV113": "empty-file",
    "HV114": "unsupported-tag",
    # 2xx: shape (schema)
    "HV200": "schema",
    "HV201": "unknown-key",
    "HV202": "missing-key",
    "HV203": "wrong-type",
    "HV204": "bad-value",
    "HV205": "bad-duration",
    "HV206": "bad-address",
    "HV207": "inline-secret",
    "HV208": "bad-name",
    # 3xx: meaning (semantic rules)
    "HV301": "node-count",
    "HV302": "duplicate-name",
    "HV303": "vip-is-node-address",
    "HV304": "vip-outside-subnets",
    "HV305": "directory-replicated-twice",
    "HV306": "directory-nested",
    "HV307": "path-style",
    "HV308": "timeout-too-short",
    "HV309": "witness-is-node",
    "HV310": "port-collision",
    "HV311": "unknown-node",
    "HV312": "heartbeat-address-missing",
    "HV313": "unknown-network",
    "HV314": "replication-network",
    "HV315": "vip-duplicate",
    "HV316": "dependency-cycle",
    "HV317": "unknown-module",
    "HV318": "checker-kind-mismatch",
    "HV319": "duplicate-address",
    "HV320": "payload-directory-not-replicated",
    "HV321": "interval-too-short",
    "HV322": "no-witness",
    "HV323": "timeout-order",
    "HV324": "os-mismatch",
    "HV325": "option-not-for-kind",
}
