"""Random mutations of the valid examples never produce a traceback or a hang.

Mutations are what a hurried edit does to a YAML file: lines deleted, duplicated or swapped,
characters replaced, indentation changed, values swapped for other YAML scalars. Every outcome
must be either a model or a report with at least one positioned error.
"""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import EXAMPLES

from hvha.compile.bundle import build_bundles
from hvha.config.validate import validate_bytes

SOURCES = [p.read_text() for p in sorted(EXAMPLES.glob("*.yaml")) if "32" not in p.name]
SCALARS = ["no", "yes", "on", "1:30", "0755", "~", "''", "[]", "{}", "-1", "1e9", "&a x", "*a",
           "!!binary aGk=", "\t", ":", "- x", "'", '"', "|", ">", "%TAG", "@", "`", "5", "5s",
           "10.0.0.300", "D:\\x", "/tmp", "node1", "none", "true", "65536", "0", "x" * 200]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    lines = draw(st.sampled_from(SOURCES)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.integers(0, 6))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3 and ":" in lines[i]:
            key, _, _ = lines[i].partition(":")
            lines[i] = f"{key}: {draw(st.sampled_from(SCALARS))}"
        elif op == 4:
            lines[i] = " " * draw(st.integers(0, 6)) + lines[i].lstrip()
        elif op == 5 and lines[i]:
            k = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + draw(st.sampled_from(["", ":", "-", " ", "\t", "#", "é"])) \
                + lines[i][k + 1:]
        elif op == 6:
            lines.insert(i, draw(st.sampled_from(SCALARS)))
    raw = "\n".join(lines).encode()
    if draw(st.booleans()) and raw:
        k = draw(st.integers(0, len(raw) - 1))
        raw = raw[:k] + bytes([draw(st.integers(0, 255))]) + raw[k + 1:]
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_never_crash_or_hang(raw: bytes) -> None:
    start = time.monotonic()
    v = validate_bytes(raw, "mutated.yaml")
    if v.cluster is not None:
        assert v.report.ok
        build_bundles(v.cluster, raw)
    else:
        errors = v.report.errors
        assert errors, "invalid but no error reported"
        for d in errors:
            assert d.code.startswith("HV") and d.message and d.render()
    assert time.monotonic() - start < 5


def test_fuzz_sources_exist() -> None:
    assert len(SOURCES) >= 4
    assert all(Path(p).exists() for p in sorted(EXAMPLES.glob("*.yaml")))
