"""Benchmark: validate + compile with 32, 256 and 1024 modules.

Baseline measured in the same run: parsing the same file with PyYAML's libyaml loader
(``yaml.load(CSafeLoader)``), the least any YAML tool must do. Reported: medians of in-process
validate, bundle build, archive write, their total, the ratio of the total to the baseline,
the cost per module (linear growth means a flat per-module cost), and the wall time of the real
CLI (``hvha compile``, including interpreter start-up). Goal: 1024 modules under 2 s.

    .venv/bin/python benchmarks/compile.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gen import cluster_yaml  # noqa: E402
from hvha.compile.bundle import build_bundles, write_bundles  # noqa: E402
from hvha.config.validate import validate_bytes  # noqa: E402


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def measure(n: int, repeat: int, workdir: Path) -> dict[str, float]:
    raw = cluster_yaml(n).encode()
    path = workdir / f"cluster-{n}.yaml"
    path.write_bytes(raw)
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("baseline", "validate", "bundle", "write", "total", "cli")}
    for i in range(repeat):
        # Alternate baseline and subject inside each repetition (same memory state for both).
        t0 = time.perf_counter()
        yaml.load(raw, Loader=yaml.CSafeLoader)
        t1 = time.perf_counter()
        v = validate_bytes(raw, str(path))
        t2 = time.perf_counter()
        assert v.cluster is not None, [d.render() for d in v.report][:3]
        bundles = build_bundles(v.cluster, raw)
        t3 = time.perf_counter()
        write_bundles(bundles, workdir / f"out-{n}-{i}")
        t4 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "hvha.cli.main", "compile", str(path), "-o",
                              str(workdir / f"cli-{n}-{i}")], capture_output=True, text=True)
        t5 = time.perf_counter()
        assert cli.returncode == 0, cli.stderr
        for key, value in (("baseline", t1 - t0), ("validate", t2 - t1), ("bundle", t3 - t2),
                           ("write", t4 - t3), ("total", t4 - t1), ("cli", t5 - t4)):
            rows[key].append(value)
    return {k: _median(v) for k, v in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 and 256 modules, 2 repeats")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = (32, 256) if args.quick else (32, 256, 1024)
    repeat = 2 if args.quick else args.repeat
    gc.set_threshold(500_000, 50, 50)  # as the CLI does for config commands (see config_cmds)
    cpu0 = time.process_time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hvha-bench-") as tmp:
        for n in sizes:
            results[n] = measure(n, repeat, Path(tmp))
    cpu = time.process_time() - cpu0
    print(f"hvha validate+compile, medians of {repeat} runs (seconds)")
    header = (f"{'modules':>7} {'yaml-parse':>10} {'validate':>9} {'bundle':>8} {'write':>7} "
              f"{'total':>7} {'x parse':>8} {'ms/module':>9} {'CLI wall':>9}")
    print(header)
    for n, r in results.items():
        print(f"{n:>7} {r['baseline']:>10.3f} {r['validate']:>9.3f} {r['bundle']:>8.3f} "
              f"{r['write']:>7.3f} {r['total']:>7.3f} {r['total'] / r['baseline']:>8.1f} "
              f"{1000 * r['total'] / n:>9.2f} {r['cli']:>9.3f}")
    small, big = min(results), max(results)
    growth = (results[big]["total"] / big) / (results[small]["total"] / small)
    print(f"per-module cost at {big} vs {small} modules: {growth:.2f}x (1.0 = linear)")
    if 1024 in results:
        verdict = "met" if results[1024]["cli"] < 2.0 else "NOT met"
        print(f"goal (1024 modules, CLI under 2 s): {verdict}")
    print(f"CPU seconds in this process: {cpu:.1f} (the CLI runs are separate processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
