"""A two-node hvha lab built from network namespaces on this one machine.

Why: it is both the default way to try hvha without two servers and the harness of every
end-to-end test. Agents run inside the node namespaces, a client namespace reaches the app
through the virtual IP, and fault tests pull "cables" (root-side veths) or "power off" a node
(kill every process of its namespace).

Layout (defaults; ``name`` prefixes every namespace and root-namespace interface)::

    <name>-node1    eth0 10.77.0.11/24 (lan)   eth1 10.78.0.11/24 (repl)
    <name>-node2    eth0 10.77.0.12/24 (lan)   eth1 10.78.0.12/24 (repl)
    <name>-witness  eth0 10.77.0.3/24  (lan)
    <name>-client   eth0 10.77.0.50/24 (lan)
    root namespace: bridge <name>-br0 10.77.0.1/24 (lan), bridge <name>-br1 (repl, no address)
    VIP 10.77.0.100/24 (added later by the agents), dirs <root>/{node1,node2,witness}/{data,...}

Python API (all of it needs root)::

    lab = Lab.open("hvt1", root=tmp_path)      # or Lab(default_topology(...))
    lab.up()                                   # idempotent; repairs a half-built lab
    lab.up(sshd=True)                          # also an sshd per node (hvha.lab.sshd)
    proc = lab.exec("node1", ["hvha", "agent"], stdout=PIPE)
    lab.ping("client", "node1")                # -> bool
    lab.set_link("node2", "repl", up=False)    # pull node2's replication cable
    lab.kill_all("node1")                      # power node1 off (SIGKILL all its pids)
    lab.status()                               # -> dict, see Lab.status
    lab.down(purge=True)                       # removes everything, also when nothing exists

Every interface gets a MAC derived from the lab name, so a host rebuilt by ``up`` comes back
with the same MAC and its neighbours' ARP caches stay valid. Moving the VIP between nodes does
change its MAC: the agent must announce it (gratuitous ARP); the client accepts those
(``arp_accept=1``) and the nodes announce their own link changes (``arp_notify=1``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from hvha.lab import netns, nodefs
from hvha.lab import sshd as lab_sshd
from hvha.lab.netns import LabError
from hvha.lab.topology import (
    DEFAULT_LAN,
    DEFAULT_NAME,
    DEFAULT_REPL,
    DEFAULT_ROOT_BASE,
    DIR_ROLES,
    LAN,
    REPL,
    ROLES,
    SUBDIRS,
    Command,
    Observed,
    Topology,
    conflicts,
    default_topology,
    leftovers,
    plan_down,
    plan_up,
    validate_name,
)

__all__ = [
    "LAN",
    "REPL",
    "ROLES",
    "Command",
    "Lab",
    "LabError",
    "Topology",
    "default_topology",
    "read_state",
    "validate_name",
]


class Lab:
    """One lab, identified by its topology (name, root dir, subnets)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    @classmethod
    def open(
        cls,
        name: str = DEFAULT_NAME,
        root: Path | str | None = None,
        *,
        lan: IPv4Network | str | None = None,
        repl: IPv4Network | str | None = None,
    ) -> Lab:
        """The lab ``name`` under ``root`` (default ``/var/lib/hvha-lab/<name>``).

        Subnets not given are taken from an existing ``<root>/lab.json``, else the defaults
        (lan 10.77.0.0/24, repl 10.78.0.0/24). Raises LabError for an invalid name or subnet.
        """
        try:
            validate_name(name)
            base = Path(root) if root is not None else DEFAULT_ROOT_BASE / name
            recorded = _read_state(base / "lab.json")
            nets = recorded.get("networks", {}) if recorded.get("name") == name else {}

            def subnet(
                given: IPv4Network | str | None, net: str, default: IPv4Network
            ) -> IPv4Network:
                if given is not None:
                    return IPv4Network(given)
                return IPv4Network(nets[net]["subnet"]) if net in nets else default

            topo = default_topology(
                name, base, lan=subnet(lan, LAN, DEFAULT_LAN), repl=subnet(repl, REPL, DEFAULT_REPL)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(str(exc.args[0]) if exc.args else repr(exc)) from exc
        return cls(topo)

    # --- names and addresses ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.topology.name

    @property
    def root(self) -> Path:
        return self.topology.root

    @property
    def state_path(self) -> Path:
        """``<root>/lab.json``: the topology as JSON (see :meth:`Topology.to_dict`)."""
        return self.topology.state_path

    @property
    def vip(self) -> IPv4Interface:
        """The virtual IP the agents will add on the nodes' lan interface (10.77.0.100/24)."""
        return self.topology.vip

    def ns_name(self, role: str) -> str:
        """Namespace of ``role`` (node1, node2, witness, client), e.g. ``lab-node1``."""
        with _lab_errors():
            return self.topology.ns_name(role)

    def address(self, role: str, network: str = LAN) -> IPv4Address:
        """Address of ``role`` on ``network`` (``"lan"`` or ``"repl"``)."""
        with _lab_errors():
            return self.topology.address(role, network)

    def ifname(self, role: str, network: str = LAN) -> str:
        """Interface name inside the namespace (``eth0`` on lan, ``eth1`` on repl)."""
        with _lab_errors():
            return self.topology.host(role).attachment(network).ifname

    def root_veth(self, role: str, network: str = LAN) -> str:
        """Root-namespace end of ``role``'s veth on ``network`` (what :meth:`set_link` flips)."""
        with _lab_errors():
            return self.topology.host(role).attachment(network).root_veth

    def dirs(self, role: str) -> dict[str, Path]:
        """``{"base", "data", "etc", "run", "log"}`` paths of node1, node2 or witness."""
        with _lab_errors():
            return self.topology.dirs(role)

    # --- lifecycle -------------------------------------------------------------------------

    def observe(self) -> Observed:
        netns.check_environment()
        return netns.observe(self.topology)

    def up(self, *, sshd: bool = False) -> list[Command]:
        """Create or repair the lab; return the commands that were needed (none if complete).

        ``sshd`` also starts an OpenSSH server in each node (see :mod:`hvha.lab.sshd`; the
        admin key is ``<root>/id_ed25519``, host keys in ``<root>/known_hosts``); a healthy
        one is left running. Off by default so a bare lab keeps only the processes a test
        starts. Refuses (LabError) if the lan subnet is already used on this machine, if
        ``root`` is a non-empty directory that is not this lab's, or if sshd is not installed.
        """
        netns.check_environment()
        if sshd:
            lab_sshd.check_installed()
        obs = netns.observe(self.topology)
        recorded = _read_state(self.state_path)
        if (recorded.get("name") == self.name and leftovers(self.topology, obs)
                and recorded.get("networks") != self.topology.to_dict()["networks"]):
            raise LabError(
                f"lab {self.name!r} is running with other subnets (see {self.state_path}): "
                f"run `hvha lab down --name {self.name}` first"
            )
        found = conflicts(self.topology, obs)
        if found:
            raise LabError(
                "the lab's addresses clash with this machine: " + "; ".join(found)
                + " (pick other subnets with --lan-subnet/--repl-subnet)"
            )
        self._prepare_dirs()
        cmds = plan_up(self.topology, obs)
        netns.apply(cmds)
        missing = plan_up(self.topology, netns.observe(self.topology))
        if missing:
            raise LabError(
                "the lab is still incomplete after `up`: " + "; ".join(c.reason for c in missing)
            )
        for role in nodefs.NODES:
            nodefs.ensure(self.name, role, self.ns_name(role), self.dirs(role)["base"],
                          self.root / "nodefs.json")
        return (cmds + lab_sshd.ensure(self.topology)) if sshd else cmds

    def down(self, *, purge: bool = False, grace: float = 2.0) -> list[Command]:
        """Stop every process in the lab namespaces (SIGTERM, SIGKILL after ``grace`` s), then
        delete the veths, bridges and namespaces. ``purge`` also deletes the directory tree and
        lab.json. Succeeds when nothing exists. Returns the commands run."""
        netns.check_environment()
        lab_sshd.stop_all(self.topology, grace)  # by pid file: also in a namespace deleted under it
        obs = netns.observe(self.topology)
        for ns in self.topology.namespaces:
            if ns in obs.namespaces:
                netns.stop_ns(ns, grace)
        nodefs.remove(self.name, self.root / "nodefs.json")
        cmds = plan_down(self.topology, obs)
        netns.apply(cmds)
        left = leftovers(self.topology, netns.observe(self.topology))
        if left:
            raise LabError(f"could not remove {', '.join(left)}: delete them by hand")
        if purge:
            self._purge_dirs()
        return cmds

    # --- operations used by tests ----------------------------------------------------------

    def exec(self, role: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace of ``role``; ``popen_kwargs`` go to Popen.

        Nodes run in their own mount namespace (:mod:`hvha.lab.nodefs`: private /opt/hvha,
        /etc/hvha, /var/lib/hvha, /run/hvha, /srv/hvha). The returned Popen's pid is the
        process itself (``ip netns exec`` or ``nsenter`` execs into it)."""
        return netns.exec_in(self.ns_name(role), argv, nodefs.of(self.name, role),
                             **popen_kwargs)

    def node_path(self, role: str, path: str) -> Path:
        """Where ``path`` (one of :data:`hvha.lab.nodefs.PRIVATE_PATHS` or below) of ``role``
        lives on this machine: ``node_path("node1", "/etc/hvha/node.bundle")``."""
        for private in nodefs.PRIVATE_PATHS:
            if path == private or path.startswith(private + "/"):
                return nodefs.backing(self.dirs(role)["base"], private) / path[len(private):
                                                                              ].lstrip("/")
        raise LabError(f"{path} is not private to a lab node (see hvha.lab.nodefs)")

    def run(
        self, role: str, argv: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``role``'s namespace, capturing text output."""
        with self.exec(role, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def ping(self, src: str, dst: str, network: str = LAN, *, timeout: float = 1.0) -> bool:
        """True if ``src`` gets an answer to one ICMP echo within ``timeout`` s.

        ``dst`` is a role (its address on ``network`` is pinged) or an IPv4 address such as
        ``str(lab.vip.ip)``."""
        if dst in ROLES:
            target = str(self.address(dst, network))
        else:
            try:
                target = str(IPv4Address(dst))
            except ValueError as exc:
                msg = f"ping target {dst!r} is neither a role nor an IPv4 address"
                raise LabError(msg) from exc
        return netns.ping(self.ns_name(src), target, timeout)

    def set_link(self, role: str, network: str, up: bool) -> None:
        """Set ``role``'s root-side veth on ``network`` down or up: a cable pull / plug."""
        veth = self.root_veth(role, network)
        netns.check_environment()
        netns.ip("link", "set", veth, "up" if up else "down")

    def pids(self, role: str) -> list[int]:
        """Pids of the processes in ``role``'s namespace."""
        return netns.ns_pids(self.ns_name(role))

    def kill_all(self, role: str, sig: int = signal.SIGKILL, *, timeout: float = 5.0) -> list[int]:
        """Send ``sig`` to every process in ``role``'s namespace (found with ``ip netns
        pids``, never by name) and wait up to ``timeout`` s for them to exit: "power off"."""
        netns.check_environment()
        return netns.kill_ns(self.ns_name(role), sig, timeout)

    def status(self, *, ping: bool = True) -> dict[str, Any]:
        """The lab as a dict::

            {"name", "root", "state": "up" | "down" | "degraded", "state_file": str | None,
             "vip", "problems": [str],
             "bridges": {net: {"name", "present", "up", "address"}},
             "hosts": {role: {"namespace", "present", "pids", "ping": bool | None,
                              "sshd": bool | None (None: witness, client),
                              "interfaces": {net: {"ifname", "address", "root_veth",
                                                   "present", "link_up"}}}}}

        ``ping`` is the client's one-packet ping of that host on lan (None when not tried).
        """
        topo = self.topology
        obs = self.observe()
        problems = [c.reason for c in plan_up(topo, obs)]
        state = "up" if not problems else ("degraded" if leftovers(topo, obs) else "down")
        if state == "down":
            problems = []
        bridges = {
            n.name: {
                "name": n.bridge,
                "present": n.bridge in obs.root_links,
                "up": n.bridge in obs.root_links and obs.root_links[n.bridge].up,
                "address": None if n.bridge_address is None else str(n.bridge_address),
            }
            for n in topo.networks
        }
        hosts: dict[str, Any] = {}
        for h in topo.hosts:
            links = obs.ns_links.get(h.namespace, {})
            ifaces = {}
            for a in h.attachments:
                outer, inner = obs.root_links.get(a.root_veth), links.get(a.ifname)
                bridge = topo.network(a.network).bridge
                ifaces[a.network] = {
                    "ifname": a.ifname,
                    "address": str(a.address),
                    "root_veth": a.root_veth,
                    "present": outer is not None and inner is not None,
                    "link_up": bool(
                        outer and inner and outer.up and inner.up and outer.master == bridge
                    ),
                }
            hosts[h.role] = {
                "namespace": h.namespace,
                "present": h.namespace in obs.namespaces,
                "pids": len(netns.ns_pids(h.namespace)) if h.namespace in obs.namespaces else 0,
                "interfaces": ifaces,
                "ping": None,
                "sshd": lab_sshd.is_up(topo, h.role),
            }
        client = topo.ns_name("client")
        if ping and client in obs.namespaces:
            targets = [r for r in ROLES if r != "client" and hosts[r]["present"]]
            with ThreadPoolExecutor(max_workers=len(targets) or 1) as pool:
                results = pool.map(
                    lambda r: netns.ping(client, str(topo.address(r, LAN)), 1.0), targets
                )
                for role, ok in zip(targets, results, strict=True):
                    hosts[role]["ping"] = ok
        return {
            "name": topo.name,
            "root": str(topo.root),
            "state": state,
            "state_file": str(topo.state_path) if topo.state_path.exists() else None,
            "vip": str(topo.vip),
            "problems": problems,
            "bridges": bridges,
            "hosts": hosts,
        }

    # --- directories and lab.json ----------------------------------------------------------

    def _prepare_dirs(self) -> None:
        root, state = self.topology.root, self.topology.state_path
        if root.exists() and not root.is_dir():
            raise LabError(f"lab root {root} exists and is not a directory: pick another --root")
        recorded = _read_state(state)
        if root.is_dir() and any(root.iterdir()) and recorded.get("name") != self.name:
            raise LabError(
                f"lab root {root} is not empty and holds no lab.json of lab {self.name!r}: "
                "pick an empty or new directory with --root"
            )
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        _write_state(state, self.topology.to_dict())  # written first: it marks the dir as ours
        for role in DIR_ROLES:
            for sub in ("base", *SUBDIRS):
                path = self.topology.dirs(role)[sub]
                path.mkdir(mode=0o700, exist_ok=True)
                os.chmod(path, 0o700)

    def _purge_dirs(self) -> None:
        root, state = self.topology.root, self.topology.state_path
        if _read_state(state).get("name") != self.name:
            return  # not provably ours: leave it alone
        lab_sshd.remove_files(self.topology)
        for role in DIR_ROLES:
            base = self.topology.dirs(role)["base"]
            if base.is_dir() and not base.is_symlink():
                shutil.rmtree(base)
        state.unlink()
        with contextlib.suppress(OSError):  # something else lives there: keep it
            root.rmdir()
            if root.parent == DEFAULT_ROOT_BASE:
                root.parent.rmdir()  # only if no other lab is left in it


@contextlib.contextmanager
def _lab_errors() -> Iterator[None]:
    """Turn a lookup of an unknown role or network into a LabError that names the valid ones."""
    try:
        yield
    except KeyError as exc:
        raise LabError(str(exc.args[0]) if exc.args else "unknown lab object") from exc


def _read_state(path: Path) -> dict[str, Any]:
    """The parsed lab.json, or {} if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temp file + rename), mode 0600."""
    fd, tmp = tempfile.mkstemp(prefix=".lab.json.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(root: Path | str) -> dict[str, Any]:
    """Public reader of ``<root>/lab.json`` for other code ({} if absent)."""
    return _read_state(Path(root) / "lab.json")
