"""Carry out one node's steps over its transport.

Each method is one step of :mod:`hvha.apply.steps` and does its writes atomically (the
transport's ``put`` writes a temp file and renames it). Commands are POSIX sh; what they print
is parsed only where the answer matters (the agent's reload and status replies). Secrets travel
only as file contents through SFTP, never on a command line and never in output.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvha.apply.package import Wheelhouse
from hvha.transport import Transport

SUPERVISED_LOG = "agent.log"


class StepError(Exception):
    """A step failed on a node; the message says what ran and what the node answered."""


@dataclass(frozen=True)
class NodePaths:
    """Where hvha lives on a node: the packaged systemd unit's layout."""

    prefix: str = "/opt/hvha/venv"
    wheels: str = "/opt/hvha/wheels"
    etc: str = "/etc/hvha"
    state: str = "/var/lib/hvha"
    unit: str = "hvha-agent"

    @property
    def hvha(self) -> str:
        return f"{self.prefix}/bin/hvha"

    @property
    def bundle(self) -> str:
        return f"{self.etc}/node.bundle"

    @property
    def socket(self) -> str:
        return f"{self.state}/control.sock"

    @property
    def pid_file(self) -> str:
        return f"{self.state}/agent.pid"

    def agent_argv(self) -> list[str]:
        return [self.hvha, "agent", "--bundle", self.bundle, "--state-dir", self.state]

    def supervise_argv(self) -> list[str]:
        """The agent kept running by `hvha supervise` (nodes without systemd)."""
        return [self.hvha, "supervise", "--pid-file", self.pid_file, "--log",
                f"{self.state}/{SUPERVISED_LOG}", "--", *self.agent_argv()]


def unit_text(paths: NodePaths) -> str:
    """The systemd unit (as packaging/hvha-agent.service, with this node's paths)."""
    return "\n".join([
        "# written by `hvha apply`",
        "[Unit]",
        "Description=hvha node agent (mirror modules: heartbeats, failover, VIP)",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + shlex.join(paths.agent_argv()),
        f"ExecReload={shlex.join([paths.hvha, 'reload', '--socket', paths.socket])}",
        "TimeoutStopSec=15min",
        "KillMode=mixed",
        "Restart=always",
        "RestartSec=2",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


class NodeRunner:
    def __init__(self, node: str, transport: Transport, paths: NodePaths) -> None:
        self.node = node
        self.t = transport
        self.paths = paths

    def sh(self, script: str, what: str, timeout: float = 300.0) -> str:
        res = self.t.run(["sh", "-c", script], timeout=timeout)
        if not res.ok:
            detail = (res.stderr or res.stdout).decode("utf-8", "replace").strip()
            tail = "\n    ".join(detail.splitlines()[-6:]) or f"exit status {res.returncode}"
            raise StepError(f"{self.node}: {what} failed:\n    {tail}")
        return res.text()

    # -- steps ---------------------------------------------------------------------------
    def install_agent(self, wheelhouse: Wheelhouse, version: str) -> str:
        p = self.paths
        present = set(self.sh(f"mkdir -p {shlex.quote(p.wheels)} && ls {shlex.quote(p.wheels)}",
                              "listing the wheels on the node").split())
        sent = 0
        for name in wheelhouse.wheels:
            if name in present and not name.startswith("hvha-"):
                continue  # dependencies: the file name carries name, version and build tags
            # (hvha's own wheel keeps its name across builds of one version: always sent)
            self.t.put((wheelhouse.directory / name).read_bytes(), f"{p.wheels}/{name}", 0o644)
            sent += 1
        pin = version.split()[-1]
        q = shlex.quote
        own = next(w for w in wheelhouse.wheels if w.startswith("hvha-"))
        pip = (f"{q(p.prefix)}/bin/pip install --quiet --disable-pip-version-check --no-index "
               f"--find-links {q(p.wheels)}")
        # the same version may be another build of it: hvha's own wheel is always reinstalled
        self.sh(f"set -e; [ -x {q(p.prefix)}/bin/python ] || python3 -m venv {q(p.prefix)}\n"
                f"{pip} --no-deps --force-reinstall {q(p.wheels)}/{q(own)}\n"
                f"{pip} hvha=={q(pin)}\n"  # now with this build's dependencies
                f"printf '%s\\n' {q(wheelhouse.key)} > {q(p.prefix)}/hvha-build",
                f"installing hvha {pin} into {p.prefix}", timeout=600)
        return f"hvha {pin} in {p.prefix} ({sent} of {len(wheelhouse.wheels)} wheels sent)"

    def push_bundle(self, data: bytes, digest: str, secret: tuple[str, bytes] | None) -> str:
        p = self.paths
        self.sh(f"mkdir -p {shlex.quote(p.etc)} && chmod 700 {shlex.quote(p.etc)}",
                f"creating {p.etc}")
        note = ""
        if secret is not None:
            path, key = secret
            if self.t.run(["test", "-e", path]).returncode != 0:
                self.sh(f"mkdir -p {shlex.quote(str(Path(path).parent))}", "creating key dir")
                self.t.put(key, path, 0o600)
                note = f"; cluster key installed at {path} (0600)"
        self.t.put(data, p.bundle, 0o600)  # the bundle first: the .sha256 marks it complete
        self.t.put(f"{digest}  node.bundle\n".encode(), f"{p.bundle}.sha256", 0o600)
        return f"{p.bundle} {digest[:12]}{note}"

    def push_tls(self, ca: Path, ca_sha: str) -> str:
        """This node's replication credentials in <state>/tls/, unless it has them already."""
        from hvha.apply import tls_material

        d, node, q = f"{self.paths.state}/tls", self.node, shlex.quote
        have = self.sh(f"sha256sum {q(d)}/ca.crt 2>/dev/null | cut -c1-64; "
                       f"[ -s {q(d)}/{q(node)}.key ] && echo key || true", "checking TLS files")
        if have.split() == [ca_sha, "key"]:
            return ""
        self.sh(f"mkdir -p {q(d)} && chmod 700 {q(self.paths.state)} {q(d)}", f"creating {d}")
        for name, (data, mode) in tls_material.node_files(ca, node).items():
            self.t.put(data, f"{d}/{name}", mode)
        return f"; replication TLS credentials installed in {d}"

    def start(self) -> str:
        p, q = self.paths, shlex.quote
        self.t.put(unit_text(p).encode(), f"{p.etc}/{p.unit}.service", 0o644)
        supervise = shlex.join(p.supervise_argv())
        out = self.sh(
            f"set -e; mkdir -p {q(p.state)} && chmod 700 {q(p.state)}\n"
            "if [ -d /run/systemd/system ]; then\n"
            f"  cp {q(p.etc)}/{q(p.unit)}.service /etc/systemd/system/{q(p.unit)}.service\n"
            f"  systemctl daemon-reload && systemctl enable --quiet {q(p.unit)}\n"
            f"  systemctl restart {q(p.unit)} && echo systemd\n"
            "else\n"
            f"  pid=$(cat {q(p.pid_file)} 2>/dev/null || true)\n"
            '  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo running; exit 0; fi\n'
            f"  cd / && setsid -f {supervise} </dev/null >/dev/null 2>&1\n"
            "  echo supervised\n"
            "fi", "starting the agent service")
        how = out.strip().splitlines()[-1] if out.strip() else "?"
        self.wait_socket()
        return {"systemd": f"systemd unit {p.unit} enabled and started",
                "running": "already running",
                "supervised": f"supervised process (pid file {p.pid_file})"}.get(how, how)

    def wait_socket(self, timeout: float = 60.0) -> None:
        """Until the agent answers on its control socket."""
        deadline = time.monotonic() + timeout
        while True:
            if self.status() is not None:
                return
            if time.monotonic() > deadline:
                raise StepError(f"{self.node}: the agent did not answer on {self.paths.socket} "
                                f"within {timeout:.0f}s: see {self.paths.state}/{SUPERVISED_LOG}"
                                f" or `journalctl -u {self.paths.unit}` on the node")
            time.sleep(0.2)

    def stop(self, timeout: float = 900.0) -> str:
        """Stop the service: the agent hands its primaries to the peer first."""
        p, q = self.paths, shlex.quote
        return self.sh(
            "if [ -d /run/systemd/system ]; then\n"
            f"  systemctl stop {q(p.unit)} 2>/dev/null; echo systemd; exit 0\nfi\n"
            f"pid=$(cat {q(p.pid_file)} 2>/dev/null || true)\n"
            '[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { echo "not running"; exit 0; }\n'
            'kill -TERM "$pid"\n'
            f"i=0; while kill -0 \"$pid\" 2>/dev/null && [ $i -lt {int(timeout * 10)} ]; do "
            "sleep 0.1; i=$((i+1)); done\n"
            'kill -0 "$pid" 2>/dev/null && { echo "still running" >&2; exit 1; }\n'
            "echo stopped", "stopping the agent", timeout=timeout + 30).strip()

    def restart(self) -> str:
        self.stop()
        return self.start()

    def reload(self) -> tuple[bool, str]:
        """(done, what): done False means the agent asks for a restart."""
        res = self.t.run([self.paths.hvha, "reload", "--json", "--socket", self.paths.socket],
                         timeout=900)
        reply = _json(res.stdout)
        if reply is None:
            text = (res.stderr or res.stdout).decode("utf-8", "replace").strip()
            if "restart" in text:
                return False, text
            raise StepError(f"{self.node}: the agent could not reload: {text}")
        if reply.get("restart_required"):
            return False, str(reply.get("error") or reply.get("message") or "restart required")
        if reply.get("message", "").startswith("restored"):
            return True, str(reply["message"])
        if not reply.get("ok", True):
            raise StepError(f"{self.node}: the agent refused to reload: {reply.get('error')}")
        parts = [f"{k} {', '.join(reply[k])}" for k in ("added", "removed", "changed",
                                                         "restarted") if reply.get(k)]
        return True, "; ".join(parts) or "no module changed"

    def repair(self) -> str:
        res = self.t.run([self.paths.hvha, "repair", "--json", "--socket", self.paths.socket])
        if not res.ok:
            raise StepError(f"{self.node}: VIP repair failed: "
                            f"{res.stderr.decode('utf-8', 'replace').strip()}")
        reply = _json(res.stdout) or {}
        fixed = reply.get("repaired") or []
        return "; ".join(str(f) for f in fixed) if fixed else "VIPs already in place"

    def status(self) -> dict[str, Any] | None:
        res = self.t.run([self.paths.hvha, "status", "--json", "--socket", self.paths.socket],
                         timeout=30)
        return _json(res.stdout) if res.ok else None

    def remove(self, purge_paths: list[str]) -> str:
        p, q = self.paths, shlex.quote
        doomed = [p.prefix, p.wheels, p.etc, p.state, *purge_paths]
        self.sh("if [ -d /run/systemd/system ]; then\n"
                f"  systemctl disable --quiet {q(p.unit)} 2>/dev/null || true\n"
                f"  rm -f /etc/systemd/system/{q(p.unit)}.service; systemctl daemon-reload\n"
                "fi\n" + "".join(  # contents first: the directory may be a mount point
                    f"[ ! -e {q(d)} ] || {{ find {q(d)} -mindepth 1 -delete && "
                    f"{{ rmdir {q(d)} 2>/dev/null || true; }}; }}\n" for d in doomed)
                + f"rmdir {q(str(Path(p.prefix).parent))} 2>/dev/null || true",
                "removing hvha from the node")
        return "removed " + ", ".join(doomed)


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
