"""Smoke test of the end-to-end replication benchmark: `benchmarks/replication.py --quick`.

Why: the benchmark is kept out of the CI time budget, but it must keep working: it builds its
own lab, runs the primary (FUSE mirror + stream) and the secondary (applier) as processes in two
lab nodes, stops and restarts the secondary, resyncs, verifies and compares with rsync, and
must leave nothing behind. The quick mode takes about 10 s here; the test fails if it takes
more than 60 s, if a phase reports the copies differ, or if the resync sends far more than
the changed bytes.

Needs root, /dev/fuse, network namespaces and rsync (the benchmark's documented dependency).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.labkit import remains, require_netns

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "replication.py"
BUDGET = 60.0
NAME = f"hvq{os.getpid() % 100000}"


def test_quick_benchmark_runs_and_cleans_up(tmp_path: Path) -> None:
    require_netns("the replication benchmark's lab nodes")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("the replication benchmark mounts FUSE: /dev/fuse missing (modprobe fuse)")
    if shutil.which("rsync") is None:
        pytest.skip("the replication benchmark compares with rsync: apt-get install rsync")
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(BENCH), "--quick", "--name", NAME, "--dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=BUDGET + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    took = time.monotonic() - t
    assert proc.returncode == 0, out[-3000:]
    assert took < BUDGET, f"--quick took {took:.0f} s (budget {BUDGET:.0f} s)"
    assert f"lab {NAME}: node1 -> node2" in out, out
    resync = re.search(r"^resync, 1% of .*?(\d+\.\d+)x bytes", out, re.M)
    assert resync is not None, out
    assert float(resync.group(1)) <= 1.2, f"resync sent too much: {resync.group(0)}"
    for row in ("1 MiB writes + fsync", "4 KiB write + fsync", "verify identical",
                "clean restart -> in sync", "full verify", "CPU seconds:"):
        assert row in out, f"row {row!r} missing:\n{out}"
    assert remains(NAME) == [], f"lab {NAME} left behind: {remains(NAME)}"
    assert list(tmp_path.iterdir()) == [], "the benchmark's directory was not removed"
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read(), "a mount of the benchmark was left behind"
