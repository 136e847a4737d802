"""A running hvha cluster in the network-namespace lab, for end-to-end tests and benchmarks.

Real parts only: `hvha lab` namespaces, the real `hvha witness` and `hvha agent` processes
started inside their namespaces from bundles compiled by `hvha compile`, a small TCP app that
answers its node's name, a client in its own namespace reaching it through the VIP, and a role
sampler that checks, every 100 ms and independently of the agents' own reports, which nodes
hold the VIP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvha.agent.control import call
from hvha.lab import Lab

HVHA = [sys.executable, "-m", "hvha.cli.main"]
NODES = ("node1", "node2")

SERVER = """\
import socket, sys
name = sys.argv[1].encode() + b"\\n"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.sendall(name)
    finally:
        c.close()
"""


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


class ClusterLab:
    def __init__(self, lab: Lab, work: Path, *, interval: str = "300ms", timeout: str = "1500ms",
                 witness: bool = True, preferred: str = "node1", failback: bool = False,
                 restart_count: int = 3, checker_interval: str = "500ms") -> None:
        self.lab = lab
        self.work = work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.samples: list[dict[str, Any]] = []
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        work.mkdir(parents=True, exist_ok=True)
        (work / "run").mkdir(exist_ok=True)
        self.secret = work / "cluster.key"
        self.secret.write_bytes(os.urandom(32).hex().encode())
        self.secret.chmod(0o600)
        (work / "server.py").write_text(SERVER)
        app = work / "app"
        app.mkdir(exist_ok=True)
        pid = f"{work}/run/$HVHA_NODE.pid"
        _script(app / "start", f'setsid {sys.executable} {work}/server.py "$HVHA_NODE" '
                f'>>{work}/run/$HVHA_NODE-app.log 2>&1 < /dev/null &\necho $! > {pid}\n')
        # A zombie (killed, not reaped: PID 1 here does not reap orphans) counts as stopped.
        alive = ('alive() { [ -r "/proc/$p/status" ] && '
                 '! grep -q "^State:[[:space:]]*Z" "/proc/$p/status"; }\n')
        _script(app / "stop", f'p=$(cat {pid} 2>/dev/null) || exit 0\n{alive}'
                f'if [ "$HVHA_STOP_MODE" = force ]; then kill -9 "$p"; else kill "$p"; fi\n'
                f'while alive; do sleep 0.05; done\nrm -f {pid}\n')
        _script(app / "status", f'p=$(cat {pid} 2>/dev/null) || exit 1\n{alive}alive\n')
        self.vip = str(lab.vip)
        self.vip_ip = self.vip.split("/")[0]
        lines = [
            f"cluster: {{name: e2e, secret: {{file: {self.secret}}}}}",
            "nodes:",
        ]
        for node in NODES:
            lines += [f"  - name: {node}", f"    address: {lab.address(node, 'lan')}",
                      "    transport: {type: local}",
                      f"    heartbeat: {{lan: {lab.address(node, 'lan')}, "
                      f"repl: {lab.address(node, 'repl')}}}"]
        subnets = {n.name: n.subnet for n in lab.topology.networks}
        lines += [
            f"heartbeat: {{interval: {interval}, timeout: {timeout}, networks: "
            f"[{{name: lan, subnet: '{subnets['lan']}'}}, "
            f"{{name: repl, subnet: '{subnets['repl']}', replication: true}}]}}",
        ]
        if witness:
            lines.append(f"witness: {{arbiter: {{address: {lab.address('witness', 'lan')}}}}}")
        lines += [
            "modules:",
            "  - name: web",
            "    kind: app",
            f"    payload: {{start: {app}/start, stop: {app}/stop, status: {app}/status}}",
            f"    vip: {{address: {self.vip}, interface: eth0}}",
            "    stop: {graceful_timeout: 5s, forced_timeout: 5s}",
            "    checkers:",
            f"      - {{name: app, type: tcp, host: 127.0.0.1, port: 8080, "
            f"interval: {checker_interval}, timeout: 400ms, failures: 2}}",
            f"    failover: {{preferred: {preferred}, failback: {str(failback).lower()}, "
            f"stability_window: 2s, restart_budget: {{count: {restart_count}, window: 1h}}}}",
        ]
        self.cluster_file = work / "cluster.yaml"
        self.cluster_file.write_text("\n".join(lines) + "\n")
        out = subprocess.run([*HVHA, "compile", str(self.cluster_file), "-o", str(work / "out")],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"compile failed:\n{out.stderr}")

    # -- processes -----------------------------------------------------------------------
    def state_dir(self, node: str) -> Path:
        return self.work / "state" / node

    def socket(self, node: str) -> Path:
        return self.state_dir(node) / "control.sock"

    def _spawn(self, role: str, key: str, argv: list[str]) -> None:
        old = self.procs.pop(key, None)
        if old is not None:  # reap a process a fault killed before replacing it
            try:
                old.wait(timeout=5)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
        log = open(self.work / "run" / f"{key}.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs[key] = self.lab.exec(role, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def start_witness(self) -> None:
        self._spawn("witness", "witness", [*HVHA, "witness", "--cluster", "e2e", "--secret-file",
                                           str(self.secret), "--port", "4801", "--lease",
                                           "1500ms"])

    def start_agent(self, node: str) -> None:
        self._spawn(node, node, [*HVHA, "agent", "--bundle",
                                 str(self.work / "out" / f"{node}.bundle"),
                                 "--state-dir", str(self.state_dir(node)), "--log-level", "info"])

    def signal(self, key: str, sig: int) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def power_off(self, node: str) -> None:
        """Kill every process of the node's namespace and pull its cables."""
        self.lab.kill_all(node, signal.SIGKILL)
        for net in ("lan", "repl"):
            self.lab.set_link(node, net, False)

    def power_on(self, node: str) -> None:
        for net in ("lan", "repl"):
            self.lab.set_link(node, net, True)
        self.start_agent(node)

    # -- observation ---------------------------------------------------------------------
    def status(self, node: str) -> dict[str, Any] | None:
        try:
            reply: dict[str, Any] = call(self.socket(node), {"cmd": "status"}, timeout=2)
            return reply["status"]  # type: ignore[no-any-return]
        except (OSError, ValueError, KeyError):
            return None

    def role(self, node: str, module: str = "web") -> str | None:
        status = self.status(node)
        if status is None:
            return None
        return next((m["role"] for m in status["modules"] if m["module"] == module), None)

    def command(self, node: str, cmd: str, module: str = "web") -> dict[str, Any]:
        return call(self.socket(node), {"cmd": cmd, "module": module}, timeout=60)

    def client_get(self, timeout: float = 0.5) -> str | None:
        code = ("import socket,sys\ntry:\n s=socket.create_connection((sys.argv[1],8080),"
                f"{timeout})\n print(s.recv(64).decode().strip())\nexcept OSError:\n pass\n")
        out = self.lab.run("client", [sys.executable, "-c", code, self.vip_ip], timeout=10)
        return out.stdout.strip() or None

    def vip_holders(self) -> set[str]:
        holders = set()
        for node in NODES:
            out = self.lab.run(node, ["ip", "-j", "addr", "show", "dev", "eth0"], timeout=5)
            try:
                infos = json.loads(out.stdout or "[]")
            except ValueError:
                continue
            for info in infos:
                if any(a.get("local") == self.vip_ip for a in info.get("addr_info", [])):
                    holders.add(node)
        return holders

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if pred():
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for log in sorted((self.work / "run").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-25:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- role sampler --------------------------------------------------------------------
    def start_sampler(self) -> None:
        self._sampling.set()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self._sampling.is_set():
            links_up = {n: self.lab.link_up(n, "lan") if hasattr(self.lab, "link_up") else True
                        for n in NODES}
            self.samples.append({"t": time.monotonic(), "vip": sorted(self.vip_holders()),
                                 "links": links_up})
            time.sleep(0.1)

    def stop_sampler(self) -> None:
        self._sampling.clear()
        if self._sampler is not None:
            self._sampler.join(timeout=5)

    def dual_primary_samples(self, cut: set[str] | None = None) -> list[dict[str, Any]]:
        """Samples where two reachable nodes held the VIP (a node in ``cut`` is unreachable)."""
        cut = cut or set()
        return [s for s in self.samples if len(set(s["vip"]) - cut) > 1]

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        self.stop_sampler()
        for key in list(self.procs):
            self.signal(key, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for role in ("node1", "node2", "witness", "client"):
            self.lab.kill_all(role, signal.SIGKILL)
