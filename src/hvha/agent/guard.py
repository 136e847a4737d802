"""The dead-agent guard: no payload keeps running on a node whose agent died.

The agent starts one guard (`python -m hvha.agent.guard BUNDLE_ROOT`) in its own session and
keeps a pipe to its stdin. It writes ``arm MODULE`` before starting a module's payload and
``disarm MODULE`` once the payload is stopped; ``exit`` on an orderly shutdown. If the pipe
closes without ``exit`` (the agent was killed or crashed), the guard at once runs each armed
module's stop script in ``force`` mode and deletes its VIP, then exits. The peer cannot be
granted the role before the dead agent's lease expires (docs/arbitration.md), and the guard
acts within milliseconds of the death, so the payload is gone before the peer starts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def fence(root: Path, module: dict[str, Any]) -> None:
    script = root / module["scripts"]["stop_prim"]
    env = {**os.environ, "HVHA_STOP_MODE": "force", "HVHA_MODULE": module["name"]}
    timeout = float(module["stop"]["forced_timeout"])
    try:
        subprocess.run([str(script), "force"], env=env, timeout=timeout, check=False,
                       stdin=subprocess.DEVNULL, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"hvha guard: {module['name']}: forced stop failed: {exc}", file=sys.stderr)
    vip = module.get("vip")
    if vip:
        address = vip["address"].split("/")[0]
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                             check=False)
        for link in json.loads(out.stdout or "[]"):
            for addr in link.get("addr_info", []):
                if addr.get("local") == address:
                    subprocess.run(["ip", "addr", "del", f"{address}/{addr['prefixlen']}", "dev",
                                    link["ifname"]], check=False, capture_output=True)


def main(argv: list[str]) -> int:
    root = Path(argv[1])
    config = json.loads((root / "agent.json").read_text())
    modules = {m["name"]: m for m in config["modules"]}
    armed: set[str] = set()
    for line in sys.stdin:
        word, _, name = line.strip().partition(" ")
        if word == "exit":
            return 0
        if word == "arm" and name in modules:
            armed.add(name)
        elif word == "disarm":
            armed.discard(name)
    for name in sorted(armed):  # EOF without "exit": the agent is gone
        print(f"hvha guard: agent died: fencing module {name}", file=sys.stderr, flush=True)
        fence(root, modules[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
