"""Facts: what one node has installed and running, gathered in one round trip and parsed purely.

:data:`FACTS_SCRIPT` is a constant POSIX sh snippet: a transport runs it once per node
(``sh -c``, see :func:`facts_command`, or on stdin of ``sh -s``) and it prints one JSON document,
valid even when hvha is absent. :func:`parse_facts` turns that output into frozen data, never
trusting it: missing pieces become ``None`` plus a note in ``problems``; output that is not a
facts document at all is a :class:`FactsError` with a message a user can act on.

Why a script and not several commands: one SSH/WinRM round trip per node keeps ``plan`` fast on
slow links, and the facts are a single consistent snapshot. Why ``json.tool`` of the node's own
venv: the installed ``agent.json`` and the agent's status are re-encoded (and so validated)
before they are embedded, so a damaged file cannot break the document around it.

Document (``facts_format`` 1), all values null when unknown::

    {"facts_format": 1, "host": "uname -n", "uid": "0", "prefix": "/opt/hvha/venv",
     "state_dir": "/var/lib/hvha", "hvha": true,
     "bundle_pushed": "<first word of /etc/hvha/node.bundle.sha256>",
     "bundle_running": "<state_dir/bundle/BUNDLE_HASH>",
     "systemd": "LoadState=loaded ActiveState=active SubState=running UnitFileState=enabled ",
     "pid": "1234", "pid_alive": true, "addresses": "lo=127.0.0.1/8 eth0=10.77.0.11/24 ",
     "build": "<source key apply installed>",
     "py": {"version": "hvha 0.1.0", "config": {agent.json of the running bundle},
            "status": {the agent's status}, "bundle_check": {"pushed", "running_intact"}}}

(Older documents carry version/config/status/bundle_check at the top level: still read.)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hvha.model.roles import Role

FACTS_FORMAT = 1
DEFAULT_PREFIX = "/opt/hvha/venv"
DEFAULT_STATE_DIR = "/var/lib/hvha"
DEFAULT_ETC = "/etc/hvha"
DEFAULT_UNIT = "hvha-agent"

# Shell variables (settable by a prefix, see facts_command): P venv prefix, S agent state dir,
# E where apply puts node.bundle(.sha256), U systemd unit, F pid file of a supervised agent.
FACTS_SCRIPT = r"""P=${HVHA_PREFIX:-/opt/hvha/venv}
S=${HVHA_STATE_DIR:-/var/lib/hvha}
E=${HVHA_ETC:-/etc/hvha}
U=${HVHA_UNIT:-hvha-agent}
F=${HVHA_PIDFILE:-$S/agent.pid}
j() { if [ -z "$1" ]; then printf null; else
  printf '"%s"' "$(printf '%s' "$1" | tr -d '\000-\037' | sed 's/[\\"]/\\&/g')"; fi; }
w() { [ -r "$1" ] && awk 'NR==1{print $1; exit}' "$1" 2>/dev/null; }
x=false; [ -x "$P/bin/hvha" ] && x=true
bd=$(w "$P/hvha-build")
sd=; command -v systemctl >/dev/null 2>&1 && sd=$(systemctl show -p LoadState \
  -p ActiveState -p SubState -p UnitFileState "$U" 2>/dev/null | tr '\n' ' ')
pid=$(w "$F"); a=false
case $pid in ''|*[!0-9]*) pid= ;;
  *) { kill -0 "$pid" 2>/dev/null || [ -d "/proc/$pid" ]; } &&
     { [ ! -r "/proc/$pid/cmdline" ] || grep -q hvha "/proc/$pid/cmdline"; } && a=true ;; esac
ad=; command -v ip >/dev/null 2>&1 &&
  ad=$(ip -o addr show 2>/dev/null | awk '{printf "%s=%s ", $2, $4}')
T=; command -v timeout >/dev/null 2>&1 && T="timeout 10"
y="$P/bin/python"; py=
[ -x "$y" ] && py=$($T "$y" -I -c "$BC" "$E" "$S" 2>/dev/null)
printf '{"facts_format":1,"host":%s,"uid":%s,"prefix":%s,"state_dir":%s,"hvha":%s,' \
  "$(j "$(uname -n 2>/dev/null)")" "$(j "$(id -u 2>/dev/null)")" "$(j "$P")" "$(j "$S")" "$x"
printf '"bundle_pushed":%s,"bundle_running":%s,"systemd":%s,"pid":%s,' \
  "$(j "$(w "$E/node.bundle.sha256")")" "$(j "$(w "$S/bundle/BUNDLE_HASH")")" \
  "$(j "$sd")" "$(j "$pid")"
printf '"pid_alive":%s,"addresses":%s,"build":%s,"py":%s}\n' \
  "$a" "$(j "$ad")" "$(j "$bd")" "${py:-null}"
"""

# Run once by the node's venv python (one interpreter start for every fact that needs Python):
# hvha's version, the running agent.json, the agent's status over its socket, the hash of the
# pushed bundle computed from its content (an edited node.bundle shows even when its .sha256 was
# left alone), and whether every file of the extracted bundle the agent runs still matches its
# manifest (an edited script shows as drift). Printed as the document's "py" member.
BUNDLE_CHECK = r"""import hashlib, json, os, sys, tarfile
etc, state = sys.argv[1:3]
out = {"version": None, "config": None, "status": None,
       "bundle_check": {"pushed": None, "running_intact": None}}
try:
    import hvha
    out["version"] = "hvha " + hvha.__version__
except Exception:
    pass
try:
    with open(os.path.join(state, "bundle", "agent.json")) as f:
        out["config"] = json.load(f)
except Exception:
    pass
sock = os.path.join(state, "control.sock")
if out["version"] and os.path.exists(sock):
    try:
        from pathlib import Path
        from hvha.agent.control import call
        out["status"] = call(Path(sock), {"cmd": "status"}, timeout=10).get("status")
    except Exception:
        pass
check = out["bundle_check"]
try:
    with tarfile.open(os.path.join(etc, "node.bundle")) as t:
        f = t.extractfile("MANIFEST.json")
        check["pushed"] = hashlib.sha256(f.read()).hexdigest() if f else None
except Exception:
    pass
try:
    root = os.path.join(state, "bundle")
    with open(os.path.join(root, "MANIFEST.json"), "rb") as f:
        m = f.read()
    ok = all(hashlib.sha256(open(os.path.join(root, r), "rb").read()).hexdigest() == d
             for r, d in json.loads(m)["files"].items())
    with open(os.path.join(root, "BUNDLE_HASH")) as f:
        check["running_intact"] = ok and f.read().strip() == hashlib.sha256(m).hexdigest()
except FileNotFoundError:
    pass
except Exception:
    check["running_intact"] = False
print(json.dumps(out, separators=(",", ":")))
"""


def facts_script(prefix: str | None = None, state_dir: str | None = None,
                 etc: str | None = None, unit: str | None = None,
                 pidfile: str | None = None) -> str:
    """:data:`FACTS_SCRIPT` with settings in front, for ``run(["sh", "-c", script])`` or
    ``run(["sh", "-s"], input=script.encode())``. ``None`` keeps the script's default (the
    packaged systemd unit's paths; the pid file defaults to ``<state_dir>/agent.pid``)."""
    settings = {"HVHA_PREFIX": prefix, "HVHA_STATE_DIR": state_dir, "HVHA_ETC": etc,
                "HVHA_UNIT": unit, "HVHA_PIDFILE": pidfile}
    head = "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items() if v is not None)
    return head + f"BC={shlex.quote(BUNDLE_CHECK)}\n" + FACTS_SCRIPT


def facts_command(prefix: str | None = None, state_dir: str | None = None,
                  etc: str | None = None, unit: str | None = None,
                  pidfile: str | None = None) -> str:
    """The same as one command line, ``sh -c '<script>'``: ``sh`` so the script runs under a
    POSIX shell whatever the login shell is (fish, csh)."""
    return "sh -c " + shlex.quote(facts_script(prefix, state_dir, etc, unit, pidfile))


class FactsError(Exception):
    """A node's facts output is not a facts document: nothing can be planned for that node."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


class ServiceState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    ABSENT = "absent"  # no unit and no pid file: the agent was never set up to run here


@dataclass(frozen=True)
class ModuleStatus:
    name: str
    role: Role
    peer_role: Role | None
    peer_alive: bool | None
    in_sync: bool | None
    data_ok: bool | None
    reason: str


@dataclass(frozen=True)
class AgentStatus:
    """The part of ``hvha status --json`` a plan depends on (not timers, counters, history)."""

    peer: str | None
    peer_alive: bool | None
    modules: tuple[ModuleStatus, ...]

    def module(self, name: str) -> ModuleStatus | None:
        return next((m for m in self.modules if m.name == name), None)


@dataclass(frozen=True)
class InstalledConfig:
    """The ``agent.json`` of the bundle the agent last extracted (what it runs, or will run)."""

    node: str | None
    hvha_version: str | None
    modules: tuple[Mapping[str, Any], ...]
    start_order: tuple[str, ...]
    sections: Mapping[str, Any]  # the other top-level keys: heartbeat, witness, node, peer...


@dataclass(frozen=True)
class NodeFacts:
    node: str
    host: str | None = None
    installed: bool = False  # <prefix>/bin/hvha exists
    version: str | None = None  # what it says with --version; None if absent or broken
    build: str | None = None  # the source-tree key apply installed (<prefix>/hvha-build)
    bundle_pushed: str | None = None  # the last bundle apply put in /etc/hvha
    bundle_running: str | None = None  # the bundle the agent extracted when it last started
    # node.bundle's content does not match its .sha256 record: edited on the node
    bundle_tampered: bool = False
    running_intact: bool | None = None  # the extracted bundle's files match its manifest
    service: ServiceState = ServiceState.ABSENT
    service_detail: str = ""
    addresses: tuple[tuple[str, str], ...] | None = None  # (interface, "ip/len"); None: unknown
    config: InstalledConfig | None = None
    status: AgentStatus | None = None
    problems: tuple[str, ...] = ()

    def holds(self, address: str) -> bool | None:
        """Whether the node has ``address`` (e.g. a VIP ``10.77.0.100/24``); None: unknown."""
        if self.addresses is None:
            return None
        want = _ip(address)
        return want is not None and any(_ip(a) == want for _, a in self.addresses)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        return None


_MARK = '{"facts_format"'
_VERSION = re.compile(r"^hvha (\S+)$")


def parse_facts(node: str, stdout: bytes) -> NodeFacts:
    """Facts of ``node`` from the script's output. Any garbage is a :class:`FactsError`."""
    text = stdout.decode("utf-8", errors="replace")
    start = text.rfind(_MARK)  # a login banner or shell noise may come first
    if start < 0:
        shown = text.strip()[:80]
        raise FactsError(node, "the facts script printed no facts document"
                         + (f" (output starts {shown!r})" if shown else " (no output)")
                         + "; check that /bin/sh runs for this user")
    try:
        doc, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError) as exc:
        raise FactsError(node, f"the facts document is not valid JSON ({exc}); "
                         "was the output cut short?") from None
    if not isinstance(doc, dict):
        raise FactsError(node, "the facts document is not a JSON object")
    py = doc.get("py")
    if isinstance(py, dict):  # what the node's venv python reported (one process for all)
        for key in ("version", "config", "status", "bundle_check"):
            if doc.get(key) is None:
                doc[key] = py.get(key)
    if doc.get("facts_format") != FACTS_FORMAT:
        raise FactsError(node, f"facts format {doc.get('facts_format')!r} is not "
                         f"{FACTS_FORMAT}: gather facts with this hvha's script")
    return _Reader(node, doc).facts()


class _Reader:
    """Reads a facts document field by field, noting (not raising on) anything unexpected."""

    def __init__(self, node: str, doc: dict[str, Any]) -> None:
        self.node, self.doc = node, doc
        self.problems: list[str] = []

    def get(self, key: str, kind: type | tuple[type, ...], src: Any = None) -> Any:
        value = (self.doc if src is None else src).get(key)
        if value is None or isinstance(value, kind):
            return value
        self.problems.append(f"{key}: unexpected {type(value).__name__}, ignored")
        return None

    def facts(self) -> NodeFacts:
        installed = self.get("hvha", bool) is True
        raw_version = self.get("version", str)
        version = None
        if raw_version is not None:
            m = _VERSION.match(raw_version.strip())
            version = m.group(1) if m else None
            if version is None:
                self.problems.append(f"unexpected `hvha --version` output {raw_version[:40]!r}")
        elif installed:
            self.problems.append("`hvha --version` failed: the installation looks broken")
        status = self.status()
        service, detail = self.service(status is not None)
        uid = self.get("uid", str)
        if uid not in (None, "0"):
            self.problems.append(f"facts gathered as uid {uid}: the agent's files may be "
                                 "unreadable (state looks absent)")
        check = self.get("bundle_check", dict) or {}
        recorded = self.get("bundle_pushed", str)
        computed = check.get("pushed") if isinstance(check.get("pushed"), str) else None
        intact = check.get("running_intact")
        return NodeFacts(
            node=self.node, host=self.get("host", str), installed=installed, version=version,
            build=self.get("build", str),
            bundle_pushed=computed or recorded,
            bundle_tampered=recorded is not None and computed is not None and computed != recorded,
            running_intact=intact if isinstance(intact, bool) else None,
            bundle_running=self.get("bundle_running", str), service=service,
            service_detail=detail, addresses=self.addresses(), config=self.config(),
            status=status, problems=tuple(self.problems))

    def service(self, answering: bool) -> tuple[ServiceState, str]:
        systemd = self.get("systemd", str) or ""
        props = dict(p.split("=", 1) for p in systemd.split() if "=" in p)
        pid, alive = self.get("pid", str), self.get("pid_alive", bool) is True
        if answering:
            return ServiceState.RUNNING, "the agent answers on its control socket"
        if props.get("LoadState") == "loaded":
            active, sub = props.get("ActiveState", "unknown"), props.get("SubState", "")
            detail = f"systemd: {active}" + (f" ({sub})" if sub and sub != active else "")
            if active in ("active", "activating", "reloading"):
                return ServiceState.RUNNING, detail
            return (ServiceState.FAILED if active == "failed" else ServiceState.STOPPED), detail
        if pid is not None:
            state = ServiceState.RUNNING if alive else ServiceState.STOPPED
            return state, f"pid file: {pid} {'running' if alive else 'not running'}"
        return ServiceState.ABSENT, "no systemd unit, no pid file"

    def addresses(self) -> tuple[tuple[str, str], ...] | None:
        raw = self.get("addresses", str)
        if raw is None:
            return None
        pairs = (word.split("=", 1) for word in raw.split() if "=" in word)
        return tuple(sorted({(i.split("@", 1)[0], a) for i, a in pairs if _ip(a) is not None}))

    def config(self) -> InstalledConfig | None:
        cfg = self.get("config", dict)
        if cfg is None:
            return None
        modules = []
        for m in self.get("modules", list, cfg) or []:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                modules.append(m)
            else:
                self.problems.append("config: a module entry without a name, ignored")
        order = self.get("start_order", list, cfg) or []
        node = self.get("node", dict, cfg) or {}
        return InstalledConfig(
            node=node.get("name") if isinstance(node.get("name"), str) else None,
            hvha_version=self.get("hvha_version", str, cfg), modules=tuple(modules),
            start_order=tuple(o for o in order if isinstance(o, str)),
            sections={k: v for k, v in cfg.items() if k not in ("modules", "start_order")})

    def status(self) -> AgentStatus | None:
        st = self.get("status", dict)
        if st is None:
            return None
        modules = []
        for m in self.get("modules", list, st) or []:
            role = _role(m.get("role")) if isinstance(m, dict) else None
            if role is None or not isinstance(m.get("module"), str):
                self.problems.append(f"status: unreadable module entry {str(m)[:60]}, ignored")
                continue
            modules.append(ModuleStatus(
                name=m["module"], role=role, peer_role=_role(m.get("peer_role")),
                peer_alive=_bool(m.get("peer_alive")), in_sync=_bool(m.get("in_sync")),
                data_ok=_bool(m.get("data_ok")), reason=str(m.get("reason") or "")))
        peer = st.get("peer")
        return AgentStatus(peer=peer if isinstance(peer, str) else None,
                           peer_alive=_bool(st.get("peer_alive")), modules=tuple(modules))


def _role(value: Any) -> Role | None:
    try:
        return Role(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def facts_digest(facts: NodeFacts) -> str:
    """A fingerprint of everything a plan depends on, so ``apply`` can refuse a stale saved plan.

    Leaves out what changes on its own without changing the plan (timers, counters, history,
    problems): only installation, hashes, service state, roles, addresses and installed modules.
    """
    status = None if facts.status is None else {
        "peer_alive": facts.status.peer_alive,
        "modules": sorted((m.name, m.role.value, m.peer_role.value if m.peer_role else "")
                          for m in facts.status.modules)}
    config = None if facts.config is None else {
        "node": facts.config.node, "modules": list(facts.config.modules),
        "sections": dict(facts.config.sections)}
    doc = {"node": facts.node, "installed": facts.installed, "version": facts.version,
           "build": facts.build,
           "pushed": facts.bundle_pushed, "running": facts.bundle_running,
           "tampered": facts.bundle_tampered, "intact": facts.running_intact,
           "service": facts.service.value, "addresses": facts.addresses, "status": status,
           "config": config}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
