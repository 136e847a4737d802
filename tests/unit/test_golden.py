"""Golden tests: each example's graph and bundle hashes are pinned.

A change to templates, defaults or the graph shows up here as a diff to review. To accept an
intended change: ``HVHA_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py`` and commit the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.conftest import EXAMPLES, ROOT

from hvha.compile.bundle import archive, build_bundles, read_archive
from hvha.compile.graph import build_graph
from hvha.compile.graph_formats import to_text
from hvha.config.validate import validate_file

GOLDEN = ROOT / "tests" / "golden"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
UPDATE = os.environ.get("HVHA_UPDATE_GOLDEN") == "1"


def _check(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"missing golden file {path.name}: run with HVHA_UPDATE_GOLDEN=1"
    assert actual == path.read_text(), f"{path.name} differs from the golden copy"


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_graph_text_is_pinned(example: Path) -> None:
    cluster = validate_file(str(example)).cluster
    assert cluster is not None
    graph = build_graph(cluster)
    _check(GOLDEN / f"{example.stem}.start.txt", to_text(graph, "start"))
    _check(GOLDEN / f"{example.stem}.stop.txt", to_text(graph, "stop"))


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_bundle_hashes_are_pinned(example: Path) -> None:
    v = validate_file(str(example))
    assert v.cluster is not None
    bundles = build_bundles(v.cluster, example.read_bytes())
    hashes = {b.node: b.hash for b in bundles}
    _check(GOLDEN / f"{example.stem}.hashes.json", json.dumps(hashes, indent=2) + "\n")


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_compile_is_deterministic_and_archives_round_trip(example: Path) -> None:
    source = example.read_bytes()
    first = build_bundles(validate_file(str(example)).cluster, source)  # type: ignore[arg-type]
    second = build_bundles(validate_file(str(example)).cluster, source)  # type: ignore[arg-type]
    for a, b in zip(first, second, strict=True):
        assert archive(a) == archive(b)
        assert read_archive(archive(a)) == a.files


def test_bundle_shows_every_default_and_no_secret_value(tmp_path: Path) -> None:
    v = validate_file(str(EXAMPLES / "lab.yaml"))
    assert v.cluster is not None
    config = json.loads(build_bundles(v.cluster, b"x")[0].files["agent.json"][0])
    applied = {d["path"]: d["value"] for d in config["defaults_applied"]}
    assert applied["heartbeat.port"] == 4800
    assert applied["modules[0].stop.graceful_timeout"] == "60s"
    assert applied["modules[0].checkers[0].on_failure"] == "restart"
    assert config["heartbeat"]["port"] == 4800
    assert config["cluster"]["secret"] == {"source": "file",
                                           "ref": "/var/lib/hvha-lab/lab/cluster.key"}


def test_node_bundles_differ_only_where_nodes_differ() -> None:
    v = validate_file(str(EXAMPLES / "lab.yaml"))
    assert v.cluster is not None
    one, two = (json.loads(b.files["agent.json"][0]) for b in build_bundles(v.cluster, b"x"))
    assert (one["node"]["name"], one["peer"]["name"]) == ("node1", "node2")
    assert (two["node"]["name"], two["peer"]["name"]) == ("node2", "node1")
    assert one["modules"] == two["modules"]


def test_local_transport_compiles_without_a_port() -> None:
    """Regression: a `local` transport has no port, and compile crashed on it (KeyError)."""
    text = (EXAMPLES / "lab.yaml").read_text().replace(
        "      type: ssh\n      user: root\n      key_file: /var/lib/hvha-lab/lab/id_ed25519\n",
        "      type: local\n")
    assert "type: local" in text
    from hvha.config.validate import validate_bytes

    v = validate_bytes(text.encode(), "local.yaml")
    assert v.cluster is not None, [d.render() for d in v.report]
    assert v.cluster.nodes[0].transport.port is None
    config = json.loads(build_bundles(v.cluster, text.encode())[0].files["agent.json"][0])
    assert config["node"]["transport"]["type"] == "local"
