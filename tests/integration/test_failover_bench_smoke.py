"""Smoke test of the failover benchmark: `benchmarks/failover.py --quick --only keepalived`.

Why: the benchmark is not part of the CI time budget, but it must keep working (it builds its
own lab, drives keepalived, parses the prober's output and tears everything down). Two trials
take about 20 s. The benchmark runs as a subprocess exactly as a user would run it, with a lab
name of our choosing so that this test can check that nothing of it is left behind.

Needs root (network namespaces) and keepalived; keepalived is installed with apt-get when
missing (the benchmark's documented dependency), and the test is skipped when that fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.labkit import remains, require_netns

from hvha.lab import Lab, LabError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "failover.py"
BUDGET = 60.0  # s: the quick mode must stay a smoke test
NAME = f"hvs{os.getpid() % 100000}"


def _ensure_keepalived() -> None:
    if shutil.which("keepalived"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("keepalived is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "keepalived"]
    try:
        res = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
        if res.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env,
                           timeout=300, check=False)
            res = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("keepalived could not be installed: apt-get timed out")
    if shutil.which("keepalived") is None:
        pytest.skip(f"keepalived could not be installed: {res.stderr.strip()[-300:]}")


@pytest.fixture
def lab_name(tmp_path: Path) -> Iterator[str]:
    """The benchmark's lab name; whatever the benchmark leaves is removed, by exact name."""
    require_netns("the failover benchmark's tests")
    _ensure_keepalived()
    yield NAME
    leftover = remains(NAME)
    if leftover:  # clean up for the next run, but still fail the test below
        with contextlib.suppress(LabError):
            Lab.open(NAME, tmp_path / "cleanup").down(grace=0.5)


def test_quick_keepalived_run_prints_a_median_and_cleans_up(lab_name: str) -> None:
    argv = [sys.executable, str(BENCH), "--quick", "--only", "keepalived", "--name", lab_name]
    start = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT) as proc:
        try:
            out, err = proc.communicate(timeout=BUDGET)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the benchmark tears its lab down on SIGTERM
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"failover.py --quick took more than {BUDGET:.0f} s\n{out}\n{err}")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    assert elapsed < BUDGET
    assert "median" in out
    row = re.search(r"^keepalived\s+2/2\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s", out, re.M)
    assert row, out
    median, low, high = (float(x) for x in row.groups())
    assert 0.1 < low <= median <= high < 30, out
    assert remains(lab_name) == [], "the benchmark left lab objects behind"
