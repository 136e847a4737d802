"""Regression: run as `python -m hvha.cli.main`, user mistakes are still exit 1 with a message.

main.py is then loaded twice (as __main__ and as hvha.cli.main); an exception class defined in
it was two different classes and user errors came out as "internal error" (exit 3).
"""

from __future__ import annotations

import subprocess
import sys


def test_user_error_under_python_dash_m(tmp_path: object) -> None:
    out = subprocess.run([sys.executable, "-m", "hvha.cli.main", "status", "--socket",
                          "/nonexistent/control.sock"], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "no agent socket" in out.stderr and "internal error" not in out.stderr
