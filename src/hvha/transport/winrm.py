"""The ``winrm`` transport (pywinrm): how `hvha apply` reaches a Windows (Hyper-V) node.

Why these choices:

* HTTPS (port 5986) by default and the server certificate is always verified: WinRM carries
  the password. The CA bundle (or the node's self-signed certificate, PEM) comes from the
  node's ``transport.known_hosts`` setting - for WinRM that file is the TLS trust anchor,
  as a known_hosts file is for SSH.
* Authentication is ``ntlm`` (default), ``kerberos`` or ``credssp``; Basic is not offered
  (it sends the password as is). The password comes from a SecretRef and never appears in a
  message; pywinrm's exceptions are translated, not chained.
* One WinRS shell is opened on first use and reused by every command, like the one SSH
  connection of :mod:`hvha.transport.ssh`.
* ``run`` of a string is a PowerShell script (``-EncodedCommand``, so no quoting issues) or,
  with ``shell="cmd"``, a cmd.exe line; a list is quoted for the chosen shell.
* ``put`` sends base64 chunks that PowerShell appends to a temp file next to the target, then
  ``Move-Item -Force`` replaces the target (atomic on NTFS within one volume, "atomic-ish"
  elsewhere). ``mode`` maps to ACLs: without group/other bits the temp file's inherited ACL
  is replaced by SYSTEM, Administrators and the connecting user before the move.
  ``get`` reads the file as base64.

WinRM cannot run on Linux, so its tests replay recorded/synthesized WS-Management exchanges
against a local HTTPS endpoint (``tests/unit/test_transport_winrm.py``); nothing here has
been run against a live Windows host by those tests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from typing import Literal

import requests
import requests.utils
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)
from winrm.protocol import Protocol

from hvha import secrets as secret_refs
from hvha.transport.base import (
    DEFAULT_TIMEOUT,
    ClosingMixin,
    CommandTimeout,
    Result,
    TransportError,
)

DEFAULT_PORT = 5986
AUTHS = ("ntlm", "kerberos", "credssp")
CHUNK = 6 * 1024
"""Raw bytes per ``put`` command: ~22 KB of encoded command line, under Windows' 32 KB."""
OPERATION_TIMEOUT = 20
EXIT_MISSING = 2
Auth = Literal["ntlm", "kerberos", "credssp"]
Shell = Literal["powershell", "cmd"]


class WinRMTransport(ClosingMixin):
    """A reusable WinRM shell on one node. Connects lazily, or now with :meth:`open`."""

    def __init__(
        self,
        host: str,
        *,
        user: str,
        password: secret_refs.SecretRefLike | None,
        port: int = DEFAULT_PORT,
        auth: str = "ntlm",
        scheme: Literal["https", "http"] = "https",
        ca_file: str | None = None,
        shell: Shell = "powershell",
        connect_timeout: float = 10.0,
        operation_timeout: int = OPERATION_TIMEOUT,
    ) -> None:
        if auth not in AUTHS:
            raise TransportError(f"unknown WinRM auth {auth!r}: use one of {', '.join(AUTHS)}")
        self.host, self.user, self.port, self.auth, self.shell = host, user, port, auth, shell
        netloc = f"[{host}]" if ":" in host else host
        self.endpoint = f"{scheme}://{netloc}:{port}/wsman"
        self.ca_file = ca_file
        self.connect_timeout, self.operation_timeout = connect_timeout, operation_timeout
        self._password_ref = password
        self._protocol: Protocol | None = None
        self._shell_id: str | None = None
        self.shells_opened = 0
        """WinRS shells created so far: stays 1 while the connection is healthy."""

    def __repr__(self) -> str:
        return f"WinRMTransport({self.user}@{self.endpoint}, auth={self.auth})"

    # --- connection ------------------------------------------------------------------------

    def open(self) -> WinRMTransport:
        """Authenticate and open the shell now (idempotent); raises TransportError."""
        self._shell()
        return self

    def _shell(self) -> tuple[Protocol, str]:
        if self._protocol is not None and self._shell_id is not None:
            return self._protocol, self._shell_id
        password: str | None = None
        if self._password_ref is not None:
            try:
                password = secret_refs.resolve(self._password_ref)
            except secret_refs.SecretError as exc:
                raise TransportError(f"{self.endpoint}: password: {exc}") from None
        with self._errors("connect"):
            proto = Protocol(
                self.endpoint,
                transport=self.auth,  # type: ignore[arg-type]  # checked against AUTHS
                username=self.user,
                password=password,
                ca_trust_path=self.ca_file or requests.utils.DEFAULT_CA_BUNDLE_PATH,
                server_cert_validation="validate",
                read_timeout_sec=self.operation_timeout + 10,
                operation_timeout_sec=self.operation_timeout,
                proxy=None,
            )
            shell_id = proto.open_shell(codepage=65001, noprofile=True)  # 65001: UTF-8 output
        self._protocol, self._shell_id = proto, shell_id
        self.shells_opened += 1
        return proto, shell_id

    def close(self) -> None:
        proto, shell_id = self._protocol, self._shell_id
        self._protocol = self._shell_id = None
        if proto is not None and shell_id is not None:
            with contextlib.suppress(TransportError), self._errors("close"):
                proto.close_shell(shell_id)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate pywinrm/requests failures into messages that say what to do."""
        try:
            yield
        except InvalidCredentialsError:
            where = "" if self._password_ref is None else (
                f" and the password in {secret_refs.describe(self._password_ref)}"
            )
            raise TransportError(
                f"{self.endpoint} rejected the credentials ({self.auth}) of {self.user!r}: "
                f"check the user{where}; the account must be allowed to use WinRM "
                "(Remote Management Users or Administrators)"
            ) from None
        except requests.exceptions.SSLError:
            raise TransportError(
                f"the TLS certificate of {self.endpoint} is not trusted: set the node's "
                "transport.known_hosts to a PEM file with its CA (or its self-signed "
                "certificate); the certificate must name the node's address"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise TransportError(
                f"cannot reach {self.endpoint} ({type(exc).__name__}): check that the node is "
                "up, has an HTTPS WinRM listener (`winrm quickconfig -transport:https`) and "
                f"that port {self.port} is open"
            ) from None
        except WSManFaultError as exc:
            raise TransportError(
                f"{self.endpoint}: WinRM fault during {what}: {exc.reason}"
            ) from None
        except WinRMTransportError as exc:
            raise TransportError(f"{self.endpoint}: HTTP {exc.code} during {what}") from None
        except WinRMError as exc:
            extra = {"kerberos": "pywinrm[kerberos]", "credssp": "pywinrm[credssp]"}.get(self.auth)
            hint = f" (install {extra} for {self.auth})" if extra else ""
            raise TransportError(f"{self.endpoint}: {exc}{hint}") from None

    # --- commands ----------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Result:
        """Run a PowerShell script (or cmd line with ``shell="cmd"``); a list is one program
        and its arguments. ``timeout`` is checked between WinRM receives, which the server
        holds up to ``operation_timeout`` seconds."""
        if self.shell == "cmd":
            line = argv if isinstance(argv, str) else subprocess.list2cmdline(list(argv))
            return self._run(line, (), False, input, timeout, clixml=False)
        script = argv if isinstance(argv, str) else (
            "& " + " ".join(ps_quote(a) for a in argv) + "\nexit $LASTEXITCODE"
        )
        return self.run_ps(script, input=input, timeout=timeout)

    def run_ps(
        self, script: str, *, input: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Result:
        """Run a PowerShell script; stderr's CLIXML error records become plain text."""
        command, args = encode_ps(script)
        return self._run(command, args, True, input, timeout, clixml=True)

    def _run(
        self,
        command: str,
        args: Sequence[str],
        skip_cmd_shell: bool,
        input: bytes | None,
        timeout: float,
        *,
        clixml: bool,
    ) -> Result:
        deadline = time.monotonic() + timeout
        proto, shell_id = self._shell()
        try:
            with self._errors("run"):
                cid = proto.run_command(shell_id, command, args, skip_cmd_shell=skip_cmd_shell)
        except TransportError:
            self._protocol = self._shell_id = None  # e.g. the shell expired: reopen next time
            raise
        try:
            if input is not None:
                with self._errors("send input"):
                    proto.send_command_input(shell_id, cid, input, end=True)
            out, err, code = self._receive(proto, shell_id, cid, deadline, timeout, command)
        finally:
            with contextlib.suppress(TransportError), self._errors("cleanup"):
                proto.cleanup_command(shell_id, cid)
        return Result(code, out, clean_clixml(err) if clixml else err)

    def _receive(
        self, proto: Protocol, shell_id: str, cid: str, deadline: float, timeout: float,
        command: str,
    ) -> tuple[bytes, bytes, int]:
        out: list[bytes] = []
        err: list[bytes] = []
        while True:
            try:
                with self._errors("receive"):
                    o, e, code, done = proto.get_command_output_raw(shell_id, cid)
            except WinRMOperationTimeoutError:  # nothing new yet: normal while it runs
                o, e, code, done = b"", b"", -1, False
            out.append(o)
            err.append(e)
            if done:
                return b"".join(out), b"".join(err), code
            if time.monotonic() >= deadline:
                shown = command if len(command) <= 60 else command[:57] + "..."
                raise CommandTimeout(
                    f"{self.endpoint}: `{shown}` did not finish within {timeout:g} s (it was "
                    "signalled to stop): raise the timeout or check why it hangs"
                )

    # --- files -------------------------------------------------------------------------------

    def put(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        tmp = f"{remote_path}.hvha-tmp-{uuid.uuid4().hex[:12]}"
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        try:
            for n, chunk in enumerate(chunks):
                self._check(self.run_ps(put_chunk_script(tmp, chunk, first=n == 0)), remote_path)
            self._check(self.run_ps(finish_put_script(tmp, remote_path, mode)), remote_path)
        except BaseException:
            with contextlib.suppress(TransportError):
                self.run_ps(f"Remove-Item -LiteralPath {ps_quote(tmp)} -Force "
                            "-ErrorAction SilentlyContinue")
            raise

    def get(self, remote_path: str) -> bytes:
        res = self.run_ps(get_script(remote_path))
        if res.returncode == EXIT_MISSING:
            raise FileNotFoundError(f"{self.endpoint}: no such file {remote_path}")
        self._check(res, remote_path)
        try:
            return base64.b64decode(b"".join(res.stdout.split()), validate=True)
        except binascii.Error:
            raise TransportError(
                f"{self.endpoint}: reading {remote_path} returned something that is not base64"
            ) from None

    def _check(self, res: Result, path: str) -> None:
        if res.returncode != 0:
            why = res.stderr.decode("utf-8", "replace").strip() or f"exit {res.returncode}"
            raise TransportError(f"{self.endpoint}: cannot write or read {path}: {why}")


# --- PowerShell building blocks (pure; the tests' fake endpoint reads what they produce) ----


def ps_quote(text: str) -> str:
    """A PowerShell single-quoted literal (only ``'`` is special inside one)."""
    return "'" + text.replace("'", "''") + "'"


def encode_ps(script: str) -> tuple[str, list[str]]:
    """The ``powershell.exe -EncodedCommand`` invocation of ``script`` (UTF-16LE base64)."""
    body = "$ProgressPreference = 'SilentlyContinue'\n" + script
    encoded = base64.b64encode(body.encode("utf-16-le")).decode("ascii")
    return "powershell.exe", ["-NoProfile", "-NonInteractive", "-EncodedCommand", encoded]


def decode_ps(args: Sequence[str]) -> str:
    """Inverse of :func:`encode_ps` (without the preamble): for tests and debugging."""
    body = base64.b64decode(args[list(args).index("-EncodedCommand") + 1]).decode("utf-16-le")
    return body.split("\n", 1)[1]


def put_chunk_script(tmp: str, chunk: bytes, *, first: bool) -> str:
    how = "Create" if first else "Append"
    return (
        "$ErrorActionPreference = 'Stop'\n"
        f"$b = [Convert]::FromBase64String('{base64.b64encode(chunk).decode('ascii')}')\n"
        f"$f = [IO.File]::Open({ps_quote(tmp)}, [IO.FileMode]::{how}, [IO.FileAccess]::Write)\n"
        "try { $f.Write($b, 0, $b.Length); $f.Flush($true) } finally { $f.Dispose() }\n"
    )


def finish_put_script(tmp: str, path: str, mode: int) -> str:
    lines = ["$ErrorActionPreference = 'Stop'"]
    if not mode & 0o077:  # private: owner (and the machine's admins) only
        lines += [
            "$me = [Security.Principal.WindowsIdentity]::GetCurrent().User.Value",
            f"icacls {ps_quote(tmp)} /inheritance:r /grant:r '*S-1-5-18:F' '*S-1-5-32-544:F' "
            '"*${me}:F" | Out-Null',
            "if ($LASTEXITCODE) { exit $LASTEXITCODE }",
        ]
    lines.append(f"Move-Item -LiteralPath {ps_quote(tmp)} -Destination {ps_quote(path)} -Force")
    return "\n".join(lines) + "\n"


def get_script(path: str) -> str:
    return (
        f"if (-not (Test-Path -LiteralPath {ps_quote(path)} -PathType Leaf)) "
        f"{{ exit {EXIT_MISSING} }}\n"
        f"[Convert]::ToBase64String([IO.File]::ReadAllBytes({ps_quote(path)}))\n"
    )


def clean_clixml(data: bytes) -> bytes:
    """PowerShell writes errors to a remote stderr as CLIXML; keep only the message text."""
    head = b"#< CLIXML"
    if not data.startswith(head):
        return data
    try:
        root = ET.fromstring(data[len(head):].lstrip(b"\r\n"))
    except ET.ParseError:
        return data
    parts = [s.text or "" for s in root.iter() if s.tag.endswith("}S") and s.get("S") == "Error"]
    text = "".join(parts).replace("_x000D__x000A_", "\n").strip()
    return text.encode("utf-8") if text else data
