"""The position-keeping YAML loader: positions, merge keys, YAML 1.1 surprises, hostile input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from hvha.config import loader
from hvha.config.diagnostics import Position
from hvha.config.loader import MAX_DEPTH, load_bytes, load_file, load_text
from hvha.config.validate import validate_bytes

TEXT = """\
cluster:
  name: lab
modules:
  - name: web
    kind: app
    checkers:
      - name: http
        type: tcp
        port: 8080
    vip: {address: 10.77.0.100/24, interface: eth0}
"""


def at(text: str, marker: str) -> Position:
    """Position of ``marker`` (at its ``^`` if any) in ``text``; the marker must be unique."""
    needle = marker.replace("^", "")
    assert text.count(needle) == 1, needle
    index = text.index(needle) + (marker.index("^") if "^" in marker else 0)
    line = text.count("\n", 0, index) + 1
    return Position(line, index - (text.rfind("\n", 0, index) + 1) + 1)


def codes(doc: loader.Document) -> list[tuple[str, int | None, int | None]]:
    return [(d.code, d.position.line if d.position else None,
             d.position.col if d.position else None) for d in doc.report]


# ------------------------------------------------------------------------------- positions


def test_positions_of_nested_keys_and_values() -> None:
    doc = load_text(TEXT, "c.yaml")
    assert codes(doc) == []
    port = ("modules", 0, "checkers", 0, "port")
    assert doc.key_positions[port] == at(TEXT, "^port: 8080")
    assert doc.positions[port] == at(TEXT, "port: ^8080")
    assert doc.position(("modules", 0, "checkers", 0)) == at(TEXT, "- ^name: http")
    assert doc.position(("modules", 0)) == at(TEXT, "- ^name: web")
    assert doc.key_position(("modules",)) == Position(3, 1)
    assert doc.position(()) == Position(1, 1)


def test_positions_inside_flow_mapping() -> None:
    doc = load_text(TEXT, "c.yaml")
    path = ("modules", 0, "vip", "interface")
    assert doc.key_positions[path] == at(TEXT, "^interface: eth0")
    assert doc.positions[path] == at(TEXT, "interface: ^eth0")
    assert doc.positions[("modules", 0, "vip")] == at(TEXT, "vip: ^{")


def test_position_of_missing_path_falls_back_to_nearest_ancestor() -> None:
    doc = load_text(TEXT, "c.yaml")
    missing = ("modules", 0, "checkers", 0, "timeout")
    assert doc.position(missing) == at(TEXT, "- ^name: http")
    assert doc.key_position(missing) == at(TEXT, "- ^name: http")
    assert doc.position(("witness", "arbiter")) == Position(1, 1)


@pytest.mark.parametrize("variant", ["crlf", "bom", "leading-document-marker"])
def test_positions_survive_crlf_bom_and_document_marker(variant: str) -> None:
    raw = {
        "crlf": TEXT.replace("\n", "\r\n").encode(),
        "bom": b"\xef\xbb\xbf" + TEXT.encode(),
        "leading-document-marker": b"---\n" + TEXT.encode() + b"...\n",
    }[variant]
    shift = 1 if variant == "leading-document-marker" else 0
    doc = load_bytes(raw, "c.yaml")
    assert codes(doc) == []
    expected = at(TEXT, "port: ^8080")
    assert doc.positions[("modules", 0, "checkers", 0, "port")] == Position(
        expected.line + shift, expected.col)


def test_positions_are_unicode_characters_not_bytes() -> None:
    text = "cluster:\n  name: lab  # l'équipe réseau\n  secret: {file: /tmp/k}\n"
    doc = load_text(text, "c.yaml")
    assert doc.positions[("cluster", "secret", "file")] == at(text, "file: ^/tmp/k")


# ------------------------------------------------------------------------------ merge keys

MERGE = """\
nodes:
  - name: node1
    transport: &ssh
      type: ssh
      user: root
      key_file: /root/.ssh/id_ed25519
  - name: node2
    transport:
      <<: *ssh
      user: admin
"""


def test_merge_key_copies_the_anchored_mapping() -> None:
    doc = load_text(MERGE, "c.yaml")
    assert codes(doc) == []
    assert doc.data["nodes"][1]["transport"] == {
        "type": "ssh", "user": "admin", "key_file": "/root/.ssh/id_ed25519"}
    assert doc.data["nodes"][0]["transport"]["user"] == "root"  # the anchor is not changed
    # the explicit key is where the user wrote it; merged keys point at their source
    assert doc.key_positions[("nodes", 1, "transport", "user")] == at(MERGE, "^user: admin")
    assert doc.key_positions[("nodes", 1, "transport", "type")] == at(MERGE, "^type: ssh")


def test_merge_of_a_list_earlier_source_wins() -> None:
    text = "a: &a {x: 1, y: 1}\nb: &b {y: 2, z: 2}\nc:\n  <<: [*a, *b]\n  z: 3\n"
    doc = load_text(text, "c.yaml")
    assert codes(doc) == []
    assert doc.data["c"] == {"x": 1, "y": 1, "z": 3}


def test_merge_keys_in_a_full_cluster_file_validate() -> None:
    text = """\
cluster: {name: lab, secret: {file: /etc/hvha/cluster.key}}
nodes:
  - name: node1
    address: 10.77.0.11
    transport: &ssh {type: ssh, user: root, key_file: /root/.ssh/id_ed25519}
  - name: node2
    address: 10.77.0.12
    transport:
      <<: *ssh
      user: admin
witness: {arbiter: {address: 10.77.0.3}}
modules:
  - name: web
    kind: app
    payload: &cmds {start: /opt/web/start, stop: /opt/web/stop}
    vip: {address: 10.77.0.100/24}
  - name: api
    kind: app
    payload:
      <<: *cmds
      start: /opt/api/start
    vip: {address: 10.77.0.101/24}
"""
    v = validate_bytes(text.encode(), "c.yaml")
    assert [d.render() for d in v.report] == []
    assert v.cluster is not None
    api = v.cluster.modules[1]
    payload = dict(api.payload)
    assert (payload["start"], payload["stop"]) == ("/opt/api/start", "/opt/web/stop")
    assert v.cluster.nodes[1].transport.user == "admin"
    assert v.cluster.nodes[1].transport.key_file == "/root/.ssh/id_ed25519"


def test_merge_of_a_scalar_is_reported() -> None:
    text = "base: &b just-text\nnode:\n  <<: *b\n  name: x\n"
    doc = load_text(text, "c.yaml")
    assert [d.code for d in doc.report] == ["HV103"]
    assert doc.data["node"] == {"name": "x"}


def test_merge_of_a_scalar_is_reported_at_the_merge_key() -> None:
    text = "base: &b just-text\nnode:\n  <<: *b\n  name: x\n"
    doc = load_text(text, "c.yaml")
    pos = at(text, "^<<: *b")
    assert codes(doc) == [("HV103", pos.line, pos.col)]


def test_shared_anchors_are_fine() -> None:
    text = 'a:\n  exclude: &ex ["*.tmp", "cache/"]\nb:\n  exclude: *ex\n'
    doc = load_text(text, "c.yaml")
    assert codes(doc) == []
    assert doc.data["b"]["exclude"] == ["*.tmp", "cache/"]


# ----------------------------------------------------------------- YAML 1.1 and plain values


@pytest.mark.parametrize("text, value", [
    ('vm: "no"', "no"),
    ("vm: 'no'", "no"),
    ('interface: "off"', "off"),
    ('automatic: "yes"', "yes"),
    ("window: '1:30'", "1:30"),
    ('umask: "0755"', "0755"),
    ("automatic: true", True),
    ("automatic: false", False),
    ("automatic: True", True),
    ("automatic: FALSE", False),
    ("vm: y", "y"),
    ("port: 8080", 8080),
    ("port: 0", 0),
    ("streams: 1_000", 1000),
    ("date: 2024-01-01", "2024-01-01"),
    ("path: D:\\VMs\\db01", "D:\\VMs\\db01"),
    ("value: ~", None),
])
def test_plain_values_without_diagnostics(text: str, value: object) -> None:
    doc = load_text(text + "\n", "c.yaml")
    assert codes(doc) == []
    assert list(doc.data.values()) == [value]


@pytest.mark.parametrize("text, code", [
    ("automatic: yes", "HV107"),
    ("automatic: No", "HV107"),
    ("automatic: on", "HV107"),
    ("interface: OFF", "HV107"),
    ("window: 1:30", "HV108"),
    ("window: 1:30:00", "HV108"),
    ("ratio: 1:30.5", "HV108"),
    ("umask: 0755", "HV109"),
    ("umask: 022", "HV109"),
])
def test_yaml11_surprises_are_reported_and_keep_the_text(text: str, code: str) -> None:
    doc = load_text(f"first: 1\n{text}\n", "c.yaml")
    key, raw = text.split(": ")
    assert codes(doc) == [(code, 2, len(key) + 3)]
    assert doc.data[key] == raw  # the text as written, not a bool or a number
    assert (key,) in doc.reported  # the schema will not report the same value again


@pytest.mark.parametrize("text, col", [
    ("1: x", 1), ("true: x", 1), ("~: x", 1), ("[a, b]: x", 1), ("{a: b}: x", 1),
    ("? [a, b]\n: x", 3),
])
def test_non_string_keys(text: str, col: int) -> None:
    doc = load_text(f"ok: 1\n{text}\n", "c.yaml")
    assert codes(doc) == [("HV110", 2, col)]
    assert doc.data == {"ok": 1}


def test_duplicate_key_names_the_first_occurrence() -> None:
    text = "a: 1\nb:\n  c: 1\n  d: 2\n  'c': 3\n"
    doc = load_text(text, "c.yaml")
    assert codes(doc) == [("HV105", 5, 3)]
    assert "first at line 3:3" in next(iter(doc.report)).message
    assert doc.data["b"]["c"] == 1  # the first one is kept, not silently the last


def test_duplicate_key_in_flow_mapping() -> None:
    doc = load_text("vip: {address: 10.0.0.1/24, address: 10.0.0.2/24}\n", "c.yaml")
    assert codes(doc) == [("HV105", 1, 29)]


def test_every_tab_indented_line_is_reported() -> None:
    text = "a:\n\tb: 1\n\tc: 2\n  # \tcomment is fine\nd: 'x\ty'\n"
    doc = load_text(text, "c.yaml")
    assert codes(doc) == [("HV104", 2, 1), ("HV104", 3, 1)]


def test_tab_inside_block_scalar_is_content() -> None:
    text = "start: |\n  if true; then\n  \techo hi\n  fi\n"
    doc = load_text(text, "c.yaml")
    assert codes(doc) == []
    assert doc.data["start"] == "if true; then\n\techo hi\nfi\n"


# ------------------------------------------------------------------------- hostile input


def billion_laughs(per_level: int = 10, levels: int = 9) -> str:
    out = "a0: &a0 [" + ", ".join(['"lol"'] * per_level) + "]\n"
    for i in range(1, levels + 1):
        out += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * per_level) + "]\n"
    return out


def test_alias_bomb_is_refused_quickly() -> None:
    text = billion_laughs()
    start = time.perf_counter()
    doc = load_text(text, "bomb.yaml")
    elapsed = time.perf_counter() - start
    assert [d.code for d in doc.report] == ["HV106"]
    assert doc.data is None
    assert elapsed < 0.5, f"{elapsed:.2f}s"


def test_alias_bomb_with_mappings_is_refused_quickly() -> None:
    out = "m0: &m0 {a: x, b: x, c: x, d: x, e: x, f: x, g: x, h: x}\n"
    for i in range(1, 10):
        keys = ", ".join(f"{k}: *m{i - 1}" for k in "abcdefgh")
        out += f"m{i}: &m{i} {{{keys}}}\n"
    start = time.perf_counter()
    doc = load_text(out, "bomb.yaml")
    assert time.perf_counter() - start < 0.5
    assert [d.code for d in doc.report] == ["HV106"]


def test_many_small_aliases_under_budget_are_fine() -> None:
    doc = load_text(billion_laughs(per_level=10, levels=3), "ok.yaml")
    assert codes(doc) == []
    assert len(doc.data["a3"]) == 10


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a\n  b:\n    c: *a\n"])
def test_recursive_alias_is_refused(text: str) -> None:
    doc = load_text(text, "rec.yaml")
    assert [d.code for d in doc.report] == ["HV106"]
    assert doc.data is None


def test_nesting_over_the_limit_is_too_deep() -> None:
    depth = MAX_DEPTH + 5
    text = "a: " + "[" * depth + "x" + "]" * depth + "\n"
    doc = load_text(text, "deep.yaml")
    assert [(d.code, d.position.line if d.position else None) for d in doc.report] == [
        ("HV111", 1)]
    assert doc.data is None


def test_nesting_at_a_sane_depth_is_fine() -> None:
    text = "a: " + "[" * 20 + "x" + "]" * 20 + "\n"
    assert codes(load_text(text, "ok.yaml")) == []


@pytest.mark.parametrize("shape", ["flow-lists", "flow-maps", "block-lists"])
def test_100k_deep_nesting_is_refused_without_recursion_error(shape: str) -> None:
    n = 100_000
    text = {
        "flow-lists": "a: " + "[" * n + "]" * n + "\n",
        "flow-maps": "a: " + "{a: " * n + "x" + "}" * n + "\n",
        "block-lists": "a:\n" + "".join(" " * i + "-\n" for i in range(1, 2000)),
    }[shape]
    start = time.perf_counter()
    doc = load_text(text, "deep.yaml")  # must not raise RecursionError
    assert time.perf_counter() - start < 2.0
    assert not doc.report.ok
    assert doc.data is None
    assert all(d.position is not None for d in doc.report)


def test_100k_deep_nesting_with_pure_python_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_Loader", yaml.SafeLoader)
    n = 100_000
    doc = load_text("a: " + "[" * n + "]" * n + "\n", "deep.yaml")  # must not raise
    assert not doc.report.ok
    assert doc.data is None


def test_100k_deep_nesting_is_reported_as_too_deep() -> None:
    n = 100_000
    doc = load_text("a: " + "[" * n + "]" * n + "\n", "deep.yaml")
    assert [d.code for d in doc.report] == ["HV111"]


# ------------------------------------------------------------------------ documents, files


def test_two_documents() -> None:
    doc = load_text("a: 1\n---\nb: 2\n---\nc: 3\n", "c.yaml")
    assert codes(doc) == [("HV112", 3, 1)]
    assert doc.data == {"a": 1}
    assert "3 YAML documents" in next(iter(doc.report)).message


@pytest.mark.parametrize("text", ["", "\n\n", "   \n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    doc = load_text(text, "c.yaml")
    assert codes(doc) == [("HV113", 1, 1)]


@pytest.mark.parametrize("raw", [b"---\n", b"# cluster.yaml\n---\n# to do\n"])
def test_document_marker_only_is_empty(raw: bytes) -> None:
    v = validate_bytes(raw, "c.yaml")
    assert [(d.code, d.position) for d in v.report] == [("HV113", Position(1, 1))]


def test_invalid_utf8_position() -> None:
    raw = "cluster:\n  name: lab\n  # équipe\n".encode("latin-1")
    doc = load_bytes(raw, "c.yaml")
    assert codes(doc) == [("HV102", 3, 5)]
    assert "0xe9" in next(iter(doc.report)).message


def test_load_file_missing_and_directory(tmp_path: Path) -> None:
    missing = load_file(str(tmp_path / "nope.yaml"))
    assert codes(missing) == [("HV100", None, None)]
    assert "No such file" in next(iter(missing.report)).message
    directory = load_file(str(tmp_path))
    assert codes(directory) == [("HV100", None, None)]


def test_load_file_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(TEXT, encoding="utf-8")
    doc = load_file(str(path))
    assert codes(doc) == []
    assert doc.file == str(path)
    assert doc.data["modules"][0]["checkers"][0]["port"] == 8080
