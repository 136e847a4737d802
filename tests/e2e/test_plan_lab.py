"""`hvha plan` over real SSH against the lab's sshd in each node namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvha.lab import Lab
from tests.e2e.cluster_lab import HVHA
from tests.labkit import require_netns

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_netns("plan-over-SSH tests", sshd=True)
    n, net = os.getpid() % 100000, 1 + (os.getpid() + 7) % 250
    the_lab = Lab.open(f"hvp{n}", tmp_path_factory.mktemp("plab") / "root",
                       lan=f"198.18.{net}.128/25", repl=f"198.19.{net}.128/25")
    try:
        the_lab.up(sshd=True)
        yield the_lab
    finally:
        the_lab.down(purge=True, grace=0.5)


def _cluster(lab: Lab, tmp: Path) -> Path:
    root = lab.root
    key = tmp / "cluster.key"
    key.write_text(os.urandom(16).hex())
    key.chmod(0o600)
    nodes = "".join(
        f"  - name: {n}\n    address: {lab.address(n, 'lan')}\n"
        f"    transport: {{type: ssh, user: root, key_file: {root}/id_ed25519, "
        f"known_hosts: {tmp}/known_hosts}}\n" for n in ("node1", "node2"))
    path = tmp / "cluster.yaml"
    path.write_text(
        f"cluster: {{name: plan, secret: {{file: {key}}}}}\nnodes:\n{nodes}"
        f"witness: {{arbiter: {{address: {lab.address('witness', 'lan')}}}}}\n"
        "modules:\n  - name: web\n    kind: app\n"
        "    payload: {start: /bin/true, stop: /bin/true}\n")
    shutil.copy(root / "known_hosts", tmp / "known_hosts")
    return path


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HVHA, "plan", *args], capture_output=True, text=True, timeout=60)


def test_plan_against_fresh_nodes(lab: Lab, tmp_path: Path) -> None:
    cluster = _cluster(lab, tmp_path)
    out = _plan(str(cluster), "--detailed-exitcode", "-out", str(tmp_path / "plan.json"))
    assert out.returncode == 2, out.stderr
    assert "+ node/node1/agent" in out.stdout and "+ node/node2/bundle" in out.stdout
    assert "to add, 0 to change, 0 to destroy." in out.stdout
    saved = tmp_path / "plan.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    doc = json.loads(saved.read_text())
    assert doc["format_version"] == 1 and set(doc["nodes"]) == {"node1", "node2"}
    as_json = json.loads(_plan(str(cluster), "--json").stdout)
    assert as_json["summary"] == doc["summary"]


def test_unreachable_node_is_an_error_naming_it(lab: Lab, tmp_path: Path) -> None:
    cluster = _cluster(lab, tmp_path)
    lab.set_link("node2", "lan", False)
    try:
        out = _plan(str(cluster))
    finally:
        lab.set_link("node2", "lan", True)
    assert out.returncode == 1
    assert "node node2" in out.stderr and "Traceback" not in out.stderr


def test_changed_host_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    cluster = _cluster(lab, tmp_path)
    hosts = tmp_path / "known_hosts"
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(tmp_path / "fake")], capture_output=True)
    assert other.returncode == 0
    fake = (tmp_path / "fake.pub").read_text().split()[:2]
    lines = [f"{line.split()[0]} {' '.join(fake)}" for line in hosts.read_text().splitlines()
             if line.strip()]
    hosts.write_text("\n".join(lines) + "\n")
    out = _plan(str(cluster))
    assert out.returncode == 1
    assert "host key" in out.stderr.lower() and "Traceback" not in out.stderr
