"""`hvha validate` from the command line: exit codes, file:line:col output, JSON, no tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hvha.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
HVHA = Path(sys.executable).parent / "hvha"

GOOD = """\
cluster:
  name: lab
  secret: {file: /etc/hvha/cluster.key}
nodes:
  - {name: node1, address: 10.77.0.11}
  - {name: node2, address: 10.77.0.12}
heartbeat:
  networks: [{name: lan, subnet: 10.77.0.0/24}]
witness: {arbiter: {address: 10.77.0.3}}
modules:
  - name: web
    kind: app
    payload: {start: /opt/web/start, stop: /opt/web/stop}
    vip: {address: 10.77.0.100/24}
"""

# name -> (file content, [(code, marker)]): the marker's line and column are expected.
BAD: dict[str, tuple[bytes, list[tuple[str, str]]]] = {
    "unknown-key": (GOOD.replace("  networks:", "  timout: 5s\n  networks:").encode(),
                    [("HV201", "timout")]),
    "syntax-error": (GOOD.replace("address: 10.77.0.3}}", "address: 10.77.0.3}").encode(),
                     [("HV103", "modules:")]),
    "tab-indent": (GOOD.replace("    kind: app", "\tkind: app").encode(), [("HV104", "\tkind")]),
    "latin1": (GOOD.replace("name: lab", "name: lab  # équipe").encode("latin-1"),
               [("HV102", "é")]),
    "several-problems": (
        GOOD.replace("node2, address", "node1, address")
            .replace("10.77.0.100/24", "10.77.0.100")
            .replace("    kind: app", "    kind: ap").encode(),
        [("HV302", "node1, address: 10.77.0.12"), ("HV206", "10.77.0.100}"), ("HV204", "ap\n")]),
}


def position(text: str, marker: str) -> tuple[int, int]:
    assert text.count(marker) == 1, marker
    index = text.index(marker)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["validate", *argv])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_exit_1_with_positions(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, expected = BAD[name]
    path = write(tmp_path, name, content)
    code, out, err = run_main(capsys, str(path))
    assert code == 1
    assert out == ""
    assert "Traceback" not in err and "internal error" not in err
    assert re.search(rf"^{re.escape(str(path))}:\d+:\d+: error\[HV\d{{3}} [a-z0-9-]+\]", err,
                     re.M), err
    text = content.decode("latin-1")  # one character per byte: columns as the loader counts
    for hv, marker in expected:
        line, col = position(text, marker)
        assert f"{path}:{line}:{col}: error[{hv} " in err, err
    n = len(re.findall(r"^\S+:\d+:\d+: error\[", err, re.M))
    assert err.rstrip().endswith(f"{n} error{'s' * (n != 1)}; nothing was changed"), err


def test_several_problems_all_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "multi", BAD["several-problems"][0])
    _, _, err = run_main(capsys, str(path))
    for hv in ("HV302", "HV206", "HV204"):
        assert f"error[{hv} " in err
    assert "3 errors; nothing was changed" in err


def test_real_process_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, "cluster", BAD["unknown-key"][0])
    proc = subprocess.run([str(HVHA), "validate", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    line, col = position(BAD["unknown-key"][0].decode(), "timout")
    assert f"{path}:{line}:{col}: error[HV201 unknown-key] at heartbeat.timout" in proc.stderr
    assert "hint: did you mean 'timeout'?" in proc.stderr


def test_real_process_relative_path_is_echoed_as_given(tmp_path: Path) -> None:
    write(tmp_path, "cluster", b"cluster:\n  name: lab\n\tnodes: []\n")
    proc = subprocess.run([str(HVHA), "validate", "cluster.yaml"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("cluster.yaml:3:1: error[HV104 tab-indent]"), proc.stderr


def test_nonexistent_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "clsuter.yaml"
    code, out, err = run_main(capsys, str(missing))
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    assert f"{missing}: error[HV100 file-unreadable]" in err
    assert "No such file or directory" in err


def test_directory_instead_of_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, str(tmp_path))
    assert code == 1
    assert "Traceback" not in err
    assert f"{tmp_path}: error[HV100 file-unreadable]" in err
    assert "Is a directory" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can read a mode-000 file")
def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "secret", GOOD.encode())
    path.chmod(0)
    code, _, err = run_main(capsys, str(path))
    assert code == 1
    assert "error[HV100 file-unreadable]" in err and "Permission denied" in err


def test_missing_argument_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys)
    assert code == 1
    assert "usage: hvha validate" in err
    assert "Traceback" not in err


def test_json_lists_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = BAD["several-problems"]
    path = write(tmp_path, "multi", content)
    code, out, err = run_main(capsys, "--json", str(path))
    assert code == 1
    assert err == ""
    doc = json.loads(out)
    assert doc["ok"] is False and doc["summary"] is None
    got = {(d["code"], d["line"], d["col"]) for d in doc["diagnostics"]}
    for hv, marker in expected:
        assert (hv, *position(content.decode(), marker)) in got
    for d in doc["diagnostics"]:
        assert set(d) == {"code", "name", "severity", "file", "line", "col", "path", "message",
                          "hint"}
        assert d["file"] == str(path)
        assert d["severity"] in ("error", "warning")


def test_json_for_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--json", str(tmp_path / "nope.yaml"))
    assert code == 1
    doc = json.loads(out)
    assert [(d["code"], d["line"], d["col"]) for d in doc["diagnostics"]] == [
        ("HV100", None, None)]


def test_json_for_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "good", GOOD.encode())
    code, out, _ = run_main(capsys, "--json", str(path))
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["diagnostics"] == []
    assert doc["summary"].startswith("cluster 'lab': nodes node1 and node2")


def test_real_process_json(tmp_path: Path) -> None:
    path = write(tmp_path, "multi", BAD["several-problems"][0])
    proc = subprocess.run([str(HVHA), "validate", "--json", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    codes = sorted(d["code"] for d in json.loads(proc.stdout)["diagnostics"])
    assert codes == ["HV204", "HV206", "HV302"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_ok(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, str(example))
    assert code == 0, err
    assert out.startswith("ok: cluster '"), out
    assert err == ""


def test_real_process_example_ok() -> None:
    proc = subprocess.run([str(HVHA), "validate", "examples/lab.yaml"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: cluster 'lab': nodes node1 and node2")


def test_warning_only_still_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace("witness: {arbiter: {address: 10.77.0.3}}\n", "")
    path = write(tmp_path, "nowitness", text.encode())
    code, out, err = run_main(capsys, str(path))
    assert code == 0
    assert out.startswith("ok: cluster 'lab'") and "no witness" in out
    assert f"{path}:1:1: warning[HV322 no-witness]" in err
    assert "nothing was changed" not in err


def test_huge_and_hostile_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = "a0: &a0 [" + ", ".join(["lol"] * 10) + "]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10))
    cases = {
        "bomb": (bomb.encode(), "HV106"),
        "deep": (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", None),
        "huge": (b"#" * (9 * 1024 * 1024), "HV101"),
        "binary": (bytes(range(256)) * 4, None),
    }
    for name, (content, hv) in cases.items():
        path = write(tmp_path, name, content)
        code, _, err = run_main(capsys, str(path))
        assert code == 1, name
        assert "Traceback" not in err and "internal error" not in err, err
        assert re.search(r"error\[HV\d{3} ", err), err
        if hv:
            assert f"error[{hv} " in err, err
