"""An OpenSSH server in each lab node, so the control plane is tested over real SSH.

Why: `hvha apply` reaches Linux nodes through :mod:`hvha.transport.ssh`; in the lab each node
namespace runs its own ``sshd`` on its lan address, port 22, exactly as a real node would, and
the admin machine (the root namespace, 10.77.0.1 on the lan bridge) connects to it. Nothing
here touches the machine's own ``/etc/ssh``: every file lives under the lab root::

    <root>/id_ed25519, id_ed25519.pub      admin key pair (0600), accepted by both nodes
    <root>/known_hosts                      both nodes' host keys, for host key checking
    <root>/<node>/etc/ssh/sshd_config       ListenAddress <lan addr>:22, keys only, no PAM
    <root>/<node>/etc/ssh/ssh_host_ed25519_key[.pub], authorized_keys
    <root>/<node>/run/sshd.pid              how ``down`` finds the daemon (never by name)
    <root>/<node>/log/sshd.log

Keys are made with ``cryptography`` (already needed by paramiko), not ``ssh-keygen``. An sshd
is "healthy" when the pid in its pid file is our sshd (its command line names our config)
and lives in the node's *current* namespace; a healthy one is left alone, any other is
stopped and started again (e.g. after ``kill_all`` or a recreated namespace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hvha.lab import netns, nodefs
from hvha.lab.netns import LabError
from hvha.lab.topology import LAN, Command, Topology

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
NODES = ("node1", "node2")
PORT = 22
INSTALL_HINT = ("install it with `apt-get install openssh-server`, or build the lab without "
                "SSH: `hvha lab up --no-sshd`")
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class NodeSshd:
    """Where one node's sshd keeps its files, and where it listens."""

    role: str
    namespace: str
    address: str
    config: Path
    host_key: Path
    authorized_keys: Path
    pid_file: Path
    log_file: Path
    lab: str = ""


def admin_key(topo: Topology) -> Path:
    """The private key that logs in as root on both nodes (``<root>/id_ed25519``)."""
    return topo.root / "id_ed25519"


def known_hosts(topo: Topology) -> Path:
    """``<root>/known_hosts``: what the control plane checks the nodes' host keys against."""
    return topo.root / "known_hosts"


def node_sshd(topo: Topology, role: str) -> NodeSshd:
    dirs = topo.dirs(role)
    etc = dirs["etc"] / "ssh"
    return NodeSshd(
        role=role,
        namespace=topo.ns_name(role),
        address=str(topo.address(role, LAN)),
        config=etc / "sshd_config",
        host_key=etc / "ssh_host_ed25519_key",
        authorized_keys=etc / "authorized_keys",
        pid_file=dirs["run"] / "sshd.pid",
        log_file=dirs["log"] / "sshd.log",
        lab=topo.name,
    )


def check_installed(binary: Path = SSHD) -> None:
    """Raise a LabError that says how to install OpenSSH's server if ``binary`` is missing."""
    if not os.access(binary, os.X_OK):
        raise LabError(f"the lab's nodes run sshd, but {binary} is not installed: {INSTALL_HINT}")


def render_config(n: NodeSshd) -> str:
    """The node's sshd_config: key-only root login on the lan address, files under the lab.

    StrictModes is off because a lab root may sit under /tmp (mode 1777), which sshd's
    path check rejects; the lab root itself is 0700 and every file here is 0600."""
    return "\n".join([
        f"# written by `hvha lab up` for {n.namespace}; regenerated on every up",
        f"ListenAddress {n.address}:{PORT}",
        f'HostKey "{n.host_key}"',
        f'AuthorizedKeysFile "{n.authorized_keys}"',
        f'PidFile "{n.pid_file}"',
        "PermitRootLogin prohibit-password",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "LogLevel INFO",
        "Subsystem sftp internal-sftp",
        "",
    ])


def ensure(topo: Topology, binary: Path = SSHD) -> list[Command]:
    """Make sure both nodes run a healthy sshd; return what was started (empty if nothing).

    The namespaces must exist (call after the network is up). Idempotent."""
    check_installed(binary)
    public, _ = _ensure_key(admin_key(topo))
    started: list[Command] = []
    lines = []
    for role in NODES:
        n = node_sshd(topo, role)
        host_public, changed = _ensure_key(n.host_key)
        lines.append(f"{n.address} {host_public}\n")
        _write_if_changed(n.authorized_keys, f"{public}\n")  # read at each login
        changed |= _write_if_changed(n.config, render_config(n))
        pid = running_pid(n)
        if pid is not None and _in_namespace(pid, n.namespace) and not changed:
            continue
        stop(n)
        started.append(_start(n, binary))
    _write_if_changed(known_hosts(topo), "".join(lines))
    return started


def running_pid(n: NodeSshd) -> int | None:
    """The pid in ``n``'s pid file if that process is our sshd (cmdline names our config)."""
    try:
        pid = int(n.pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(n.config).encode() in cmdline else None


def is_up(topo: Topology, role: str) -> bool | None:
    """True if ``role`` runs its healthy sshd, False if not, None for hosts without one."""
    if role not in NODES:
        return None
    n = node_sshd(topo, role)
    pid = running_pid(n)
    return pid is not None and _in_namespace(pid, n.namespace)


def stop(n: NodeSshd, grace: float = 2.0) -> int | None:
    """Stop ``n``'s sshd by its pid file (SIGTERM, SIGKILL after ``grace`` s); its pid or None.

    Works also when its namespace was deleted under it, which namespace-wide killing cannot
    reach. Sessions it forked live in the namespace and go with ``Lab.down``."""
    pid = running_pid(n)
    if pid is not None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(pid, n, wait):
                break
    n.pid_file.unlink(missing_ok=True)
    return pid


def stop_all(topo: Topology, grace: float = 2.0) -> list[int]:
    """Stop both nodes' sshd (see :func:`stop`); the pids stopped."""
    pids = []
    for role in NODES:
        pid = stop(node_sshd(topo, role), grace)
        if pid is not None:
            pids.append(pid)
    return pids


def remove_files(topo: Topology) -> None:
    """Delete the files kept at the lab root (node files go with the node trees)."""
    for path in (admin_key(topo), _pub(admin_key(topo)), known_hosts(topo)):
        path.unlink(missing_ok=True)


# --- internals ----------------------------------------------------------------------------


def _start(n: NodeSshd, binary: Path) -> Command:
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation chroot
    argv = (str(binary), "-f", str(n.config), "-E", str(n.log_file))
    test = subprocess.run([str(binary), "-t", "-f", str(n.config)], capture_output=True,
                          text=True, check=False)
    if test.returncode != 0:
        raise LabError(f"sshd rejects {n.config}: {test.stderr.strip() or test.returncode}")
    # without -D sshd forks into the background once it is set up; the parent's exit status
    # tells whether that worked, the pid file appears once it listens
    with netns.exec_in(n.namespace, argv, nodefs.of(n.lab, n.role), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.returncode == 0 and time.monotonic() < deadline:
        pid = running_pid(n)
        if pid is not None and _in_namespace(pid, n.namespace):
            return Command(argv, f"start sshd in {n.namespace} on {n.address}:{PORT} (pid {pid})")
        time.sleep(0.02)
    raise LabError(
        f"sshd did not start in {n.namespace}: {err.strip() or _tail(n.log_file) or 'no output'}"
        f" (see {n.log_file})"
    )


def _in_namespace(pid: int, ns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns.NETNS_DIR / ns).st_ino
    except OSError:
        return False


def _wait_gone(pid: int, n: NodeSshd, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(n) != pid:
            return True
        time.sleep(0.02)
    return running_pid(n) != pid


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def _ensure_key(path: Path) -> tuple[str, bool]:
    """An ed25519 key pair at ``path`` (private 0600, ``.pub`` beside it): its public line
    (type and base64) and whether it was just created."""
    created = not path.exists()
    if created:
        key = Ed25519PrivateKey.generate()
        _write(path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), 0o600)
    else:
        loaded = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise LabError(f"{path} is not an ed25519 key: delete it and run `hvha lab up`")
        key = loaded
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    _write_if_changed(_pub(path), f"{public} hvha-lab\n", 0o644)
    return public, created


def _write_if_changed(path: Path, text: str, mode: int = 0o600) -> bool:
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    _write(path, text.encode(), mode)
    return True


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic write (temp file + rename) with ``mode`` from the start."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
