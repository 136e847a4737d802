"""Build hook: compile the native replication lane (src/hvha/replication/native/lane.c).

Why a hook and not an extension module: the lane is a plain shared library that lane.py loads
with ctypes (calls release the GIL), so no Python headers are needed, and the wheel that
`hvha apply` pushes to the nodes carries it (built on the controller: same architecture and
OpenSSL 3 as the nodes, as for every other wheel in the wheelhouse). Without a C compiler or
the OpenSSL headers the build still succeeds and says so: hvha then runs the Python applier,
which `hvha status` and the agent's log name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SRC = Path("src/hvha/replication/native")


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        out = root / SRC / "liblane.so"
        cc = shutil.which("cc") or shutil.which("gcc")
        cmd = [cc or "cc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
               "-o", str(out), str(root / SRC / "lane.c"), str(root / SRC / "express.c"),
               "-lssl", "-lcrypto"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            out.unlink(missing_ok=True)  # never a stale build of older sources instead
            detail = getattr(exc, "stderr", "") or str(exc)
            print(f"hvha: native lane not built ({detail.strip()[:500]}): the Python applier "
                  "will serve replication (install gcc and libssl-dev, then reinstall)",
                  file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["artifacts"].append(str(SRC / "liblane.so"))
