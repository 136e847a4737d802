"""The ``ssh`` transport (paramiko): how `hvha apply` reaches a Linux node.

Why it is built on ``paramiko.Transport`` and not ``SSHClient``: the host key check is the
security of the whole control plane, so it is done here, explicitly, with OpenSSH's rules:

* the node's key is looked up in one ``known_hosts`` file (the node's ``known_hosts`` setting,
  else ``~/.ssh/known_hosts``); a host written ``[addr]:port`` when the port is not 22;
* an unknown host is refused with :class:`HostKeyError` unless the transport was made with
  ``accept_new=True`` (the CLI's ``--accept-new-host-keys``), which appends the key to that file
  (created 0600) - OpenSSH's ``StrictHostKeyChecking=accept-new``;
* a host whose recorded key differs is always refused, ``accept_new`` or not.

Authentication: the ``key_file`` (ed25519, rsa or ecdsa, unencrypted), else the keys of a
running ssh-agent, then the password from a :class:`~hvha.model.cluster.SecretRef`. No
message here contains the password or key material, and paramiko's own exceptions are not
chained to ours (their text may carry key bytes).

One TCP connection is opened on first use and reused by every ``run``/``put``/``get`` (one
SSH channel per command, one SFTP session for files), with keepalives so an idle connection
survives NAT and notices a dead node.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paramiko

from hvha import secrets as secret_refs
from hvha.transport.base import (
    DEFAULT_TIMEOUT,
    ClosingMixin,
    CommandTimeout,
    HostKeyError,
    Result,
    TransportError,
)
from hvha.transport.local import temp_name

DEFAULT_PORT = 22
CONNECT_TIMEOUT = 10.0
KEEPALIVE = 15  # seconds between keepalive packets on an idle connection
_BUF = 65536
_RSA_SIGS = ("rsa-sha2-512", "rsa-sha2-256")


class SSHTransport(ClosingMixin):
    """A reusable SSH connection to one node. Connects lazily, or now with :meth:`open`."""

    def __init__(
        self,
        host: str,
        *,
        user: str,
        port: int = DEFAULT_PORT,
        key_file: str | None = None,
        password: secret_refs.SecretRefLike | None = None,
        known_hosts: str | None = None,
        accept_new: bool = False,
        connect_timeout: float = CONNECT_TIMEOUT,
        keepalive: int = KEEPALIVE,
        use_agent: bool = True,
    ) -> None:
        self.host, self.user, self.port = host, user, port
        self.key_file = os.path.expanduser(key_file) if key_file else None
        self.known_hosts = Path(os.path.expanduser(known_hosts or "~/.ssh/known_hosts"))
        self.accept_new = accept_new
        self.connect_timeout, self.keepalive, self.use_agent = connect_timeout, keepalive, use_agent
        self._password_ref = password
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()
        self.connections = 0
        """TCP connections opened so far: stays 1 while the connection is healthy."""

    def __repr__(self) -> str:
        return f"SSHTransport({self.user}@{self.host}:{self.port})"

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def host_key_name(self) -> str:
        """How this node is written in known_hosts."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    # --- connection ------------------------------------------------------------------------

    def open(self) -> SSHTransport:
        """Connect and authenticate now (idempotent); raises TransportError/HostKeyError."""
        self._conn()
        return self

    def _conn(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            self._drop()
            self._transport = self._connect()
            return self._transport

    def _connect(self) -> paramiko.Transport:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise TransportError(
                f"cannot reach {self.where}: {exc.strerror or exc}; check that the node is up, "
                "its address and port are right and sshd runs there"
            ) from None
        self.connections += 1
        t = paramiko.Transport(sock)
        try:
            known = self._known_keys()
            if known:
                self._prefer_key_types(t, known)
            try:
                t.start_client(timeout=self.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise TransportError(
                    f"SSH handshake with {self.where} failed ({type(exc).__name__}: {exc}); "
                    "is an SSH server listening on that port?"
                ) from None
            self._check_host_key(t.get_remote_server_key(), known)
            self._authenticate(t)
            t.set_keepalive(self.keepalive)
        except BaseException:
            t.close()
            raise
        return t

    def _known_keys(self) -> list[paramiko.PKey]:
        if not self.known_hosts.exists():
            return []
        hk = paramiko.HostKeys()
        try:
            hk.load(str(self.known_hosts))
        except (OSError, UnicodeDecodeError) as exc:
            raise TransportError(
                f"cannot read known_hosts file {self.known_hosts}: {exc}"
            ) from None
        entry = hk.lookup(self.host_key_name)
        return [] if entry is None else [entry[k] for k in entry]

    @staticmethod
    def _prefer_key_types(t: paramiko.Transport, known: list[paramiko.PKey]) -> None:
        """Ask for the key type we recorded first, so the server shows the key we can check."""
        opts = t.get_security_options()
        want: list[str] = []
        for key in known:
            name = key.get_name()
            want.extend(_RSA_SIGS if name == "ssh-rsa" else (name,))
        offered = list(opts.key_types)
        first = [k for k in want if k in offered]
        opts.key_types = [*first, *(k for k in offered if k not in first)]

    def _check_host_key(self, key: paramiko.PKey, known: list[paramiko.PKey]) -> None:
        fingerprint = key.fingerprint  # "SHA256:..." like ssh-keygen -l
        if known:
            if any(k.get_name() == key.get_name() and k == key for k in known):
                return
            raise HostKeyError(
                f"HOST KEY MISMATCH for {self.host_key_name}: the node showed {key.get_name()} "
                f"{fingerprint}, which is not the key recorded in {self.known_hosts}. Someone "
                "may be intercepting the connection, or the node was reinstalled. Refused. If "
                "the change is expected, verify the new fingerprint on the node's console "
                f"(ssh-keygen -lf /etc/ssh/ssh_host_{_short_type(key)}_key.pub), "
                f"then remove the old entry: ssh-keygen -R {shlex.quote(self.host_key_name)} "
                f"-f {self.known_hosts}"
            )
        if not self.accept_new:
            raise HostKeyError(
                f"unknown host key for {self.host_key_name} ({key.get_name()} {fingerprint}); "
                f"it is not in {self.known_hosts}. Check the fingerprint on the node, then rerun "
                "with --accept-new-host-keys to record it (or add it to that file yourself)"
            )
        self._record_host_key(key)

    def _record_host_key(self, key: paramiko.PKey) -> None:
        """Append the key to known_hosts, creating the file (and its directory) private."""
        path = self.known_hosts
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = f"{self.host_key_name} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size:
                with open(path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        line = "\n" + line
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _authenticate(self, t: paramiko.Transport) -> None:
        tried: list[str] = []
        if self.key_file:
            key = self._load_key(self.key_file)
            if self._try_key(t, key):
                return
            tried.append(f"key {self.key_file}")
        if self.use_agent:
            for key in _agent_keys():
                if self._try_key(t, key):
                    return
            tried.append("ssh-agent keys" if os.environ.get("SSH_AUTH_SOCK") else "no ssh-agent")
        if self._password_ref is not None:
            try:
                password = secret_refs.resolve(self._password_ref)
            except secret_refs.SecretError as exc:
                raise TransportError(f"{self.where}: password: {exc}") from None
            try:
                t.auth_password(self.user, password)
                return
            except paramiko.BadAuthenticationType as exc:
                tried.append(f"password from {secret_refs.describe(self._password_ref)}, but "
                             f"the server only allows {', '.join(exc.allowed_types)}")
            except (paramiko.SSHException, EOFError):
                tried.append(f"password from {secret_refs.describe(self._password_ref)}")
        raise TransportError(
            f"authentication to {self.where} failed (tried: {', '.join(tried) or 'nothing'}): "
            f"set the node's transport key_file to a key whose public half is in "
            f"~{self.user}/.ssh/authorized_keys on the node, load it into ssh-agent, or give "
            "a password reference"
        )

    def _load_key(self, path: str) -> paramiko.PKey:
        if not os.path.isfile(path):
            raise TransportError(f"SSH key file {path} does not exist: fix the node's key_file")
        try:
            return paramiko.PKey.from_path(path)
        except Exception:  # the library's message may quote the file's bytes: never show it
            raise TransportError(
                f"cannot load SSH key file {path}: it is not an unencrypted ed25519, rsa or "
                "ecdsa private key (OpenSSH or PEM format). An encrypted key must be loaded "
                "into ssh-agent and key_file left unset"
            ) from None

    def _try_key(self, t: paramiko.Transport, key: paramiko.PKey) -> bool:
        try:
            rest = t.auth_publickey(self.user, key)
        except (paramiko.SSHException, EOFError):
            return False
        if rest:  # the server wants a second factor: we cannot answer prompts
            raise TransportError(
                f"{self.where} requires more than a key ({', '.join(rest)}): hvha needs key-only "
                "login; relax AuthenticationMethods for this user"
            )
        return True

    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            t = self._conn()
            if self._sftp is None or self._sftp.sock.closed:
                client = paramiko.SFTPClient.from_transport(t)
                if client is None:
                    raise TransportError(f"{self.where} refused an SFTP session")
                self._sftp = client
            return self._sftp

    def _drop(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --- commands and files ----------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Result:
        """Run on the node (a list is quoted with :func:`shlex.join`). A process killed by a
        signal has returncode -1 (SSH reports the signal, not a status)."""
        command = argv if isinstance(argv, str) else shlex.join(argv)
        deadline = time.monotonic() + timeout
        try:
            chan = self._conn().open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise TransportError(
                f"{self.where}: cannot open a session ({exc}); the connection was lost, retry"
            ) from None
        with chan:
            try:
                chan.exec_command(command)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise TransportError(f"{self.where}: cannot start a command ({exc})") from None
            out, err = _pump(chan, input, deadline)
            if out is None or err is None or not chan.status_event.wait(_left(deadline)):
                raise CommandTimeout(
                    f"{self.where}: `{_short(command)}` did not finish within {timeout:g} s "
                    "(its channel was closed): raise the timeout or check why it hangs"
                )
            return Result(chan.recv_exit_status(), out, err)

    def put(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        """Write through SFTP to a temp name in the same directory, chmod before any data is
        written, then ``posix-rename`` over the target (atomic on the node)."""
        tmp = temp_name(remote_path)
        with self._lock:
            sftp = self._sftp_client()
            try:
                with sftp.open(tmp, "wbx") as fh:
                    sftp.chmod(tmp, mode)
                    fh.set_pipelined(True)
                    fh.write(data)
                sftp.posix_rename(tmp, remote_path)
            except BaseException as exc:
                with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                    sftp.remove(tmp)
                if isinstance(exc, (OSError, paramiko.SSHException, EOFError)):
                    why = getattr(exc, "strerror", None) or exc
                    raise TransportError(
                        f"{self.where}: cannot write {remote_path}: {why}"
                    ) from None
                raise

    def get(self, remote_path: str) -> bytes:
        with self._lock:
            sftp = self._sftp_client()
            try:
                with sftp.open(remote_path, "rb") as fh:
                    fh.prefetch()
                    return fh.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.where}: no such file {remote_path}") from None
            except OSError as exc:
                raise TransportError(
                    f"{self.where}: cannot read {remote_path}: {exc.strerror or exc}"
                ) from None


def _agent_keys() -> list[paramiko.PKey]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        return list(paramiko.Agent().get_keys())
    except paramiko.SSHException:
        return []


def _pump(
    chan: paramiko.Channel, data: bytes | None, deadline: float
) -> tuple[bytes | None, bytes | None]:
    """Feed stdin and collect stdout/stderr until EOF; (None, None) at the deadline.

    Reading and writing are interleaved so a command that writes a lot while we still send
    its input cannot deadlock on full windows."""
    out: list[bytes] = []
    err: list[bytes] = []
    pending = memoryview(data) if data else None
    if pending is None:
        chan.shutdown_write()
    while True:
        while chan.recv_ready():
            out.append(chan.recv(_BUF))
        while chan.recv_stderr_ready():
            err.append(chan.recv_stderr(_BUF))
        if pending is not None and chan.send_ready():
            pending = pending[chan.send(bytes(pending[:_BUF])):]
            if not pending:
                chan.shutdown_write()
                pending = None
            continue
        if (chan.eof_received or chan.closed) and not (
            chan.recv_ready() or chan.recv_stderr_ready()
        ):
            return b"".join(out), b"".join(err)
        left = _left(deadline)
        if left <= 0:
            return None, None
        select.select([chan], [], [], min(left, 0.05) if pending is not None else left)


def _short_type(key: paramiko.PKey) -> str:
    """``ed25519``, ``rsa`` or ``ecdsa``: how OpenSSH names the host key files."""
    name = key.get_name()
    return "ecdsa" if name.startswith("ecdsa") else name.removeprefix("ssh-")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
