"""The WinRM transport against RECORDED (synthesized) WS-Management exchanges - not a live host.

WinRM cannot run on Linux, so a small HTTPS endpoint on 127.0.0.1 (self-signed certificate
made here, trusted through the transport's ``ca_file``) plays the Windows side: it does the
NTLM 401 handshake with a stored CHALLENGE message and answers every SOAP request with the
stored envelopes of ``tests/data/winrm/`` (see its README). Command results come from
``exchanges.json``; ``put``/``get`` scripts are interpreted just enough to keep the written
bytes in memory, so a round trip is checked end to end. The real pywinrm, requests,
requests_ntlm and TLS code run unpatched: only the server is fake.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
import ssl
import threading
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hvha.model.cluster import Node, SecretRef
from hvha.model.cluster import Transport as TransportSpec
from hvha.transport import CommandTimeout, TransportError, connect
from hvha.transport.winrm import CHUNK, WinRMTransport, clean_clixml

DATA = Path(__file__).resolve().parent.parent / "data" / "winrm"
PASSWORD = "Winrm-Pa55-never-shown"
NS = {"s": "http://www.w3.org/2003/05/soap-envelope",
      "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
      "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
      "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"}
ACTION = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/"
STILL_RUNNING = "Start-Sleep -Seconds 3600"


@dataclass
class Windows:
    """What the fake host remembers: files written by put, shells, commands, what was sent."""

    reject: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)
    shells: int = 0
    scripts: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    commands: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    recorded: list[dict[str, object]] = field(default_factory=lambda: json.loads(
        (DATA / "exchanges.json").read_text())["commands"])

    def execute(self, script: str, stdin: bytes) -> tuple[bytes, bytes, int] | None:
        """Output of ``script``; None while it "still runs" (a Receive timeout fault)."""
        self.scripts.append(script)
        if script == STILL_RUNNING:
            return None
        for rec in self.recorded:
            if rec["script"] == script and str(rec.get("stdin", "")).encode() in (b"", stdin):
                return (str(rec["stdout"]).encode(), str(rec["stderr"]).encode(),
                        int(str(rec["exit_code"])))
        lit = r"'((?:[^']|'')*)'"
        if m := re.search(rf"FromBase64String\({lit}\).*Open\({lit}, \[IO.FileMode\]::(\w+)",
                          script, re.S):
            path = _unq(m[2])
            data = base64.b64decode(m[1])
            self.files[path] = (self.files.get(path, b"") if m[3] == "Append" else b"") + data
            return b"", b"", 0
        if m := re.search(rf"Move-Item -LiteralPath {lit} -Destination {lit} -Force", script):
            src, dst = _unq(m[1]), _unq(m[2])
            if "icacls" in script:
                self.private.add(dst)
            self.files[dst] = self.files.pop(src)
            return b"", b"", 0
        if m := re.search(rf"ReadAllBytes\({lit}\)", script):
            if _unq(m[1]) not in self.files:
                return b"", b"", 2
            return base64.b64encode(self.files[_unq(m[1])]) + b"\r\n", b"", 0
        return b"", f"unrecorded script: {script!r}".encode(), 1


def _unq(text: str) -> str:
    return text.replace("''", "'")


def _template(name: str, **values: str) -> bytes:
    text = (DATA / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text.encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: NTLM authenticates the connection
    disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stalls
    server: _Server
    authed = False

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests assert on what was exchanged instead."""

    def _reply(
        self, code: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        win = self.server.windows
        if not self.authed:
            auth = self.headers.get("Authorization", "")
            win.auth_headers.append(auth)
            scheme, _, token = auth.partition(" ")
            kind = base64.b64decode(token)[8] if token else 0
            if kind == 1:  # NEGOTIATE -> CHALLENGE
                challenge = (DATA / "ntlm_challenge.b64").read_text().strip()
                self._reply(401, headers=(("WWW-Authenticate", f"{scheme} {challenge}"),))
                return
            if kind != 3 or win.reject:
                self._reply(401, headers=(("WWW-Authenticate", "Negotiate"),
                                          ("WWW-Authenticate", "NTLM")))
                return
            self.authed = True
        self._reply(*self._soap(ET.fromstring(body), win))

    def _soap(self, req: ET.Element, win: Windows) -> tuple[int, bytes]:
        action = req.findtext("s:Header/a:Action", "", NS).rsplit("/", 1)[-1]
        win.actions.append(action)
        ids = {"message_id": str(uuid.uuid4()),
               "relates_to": req.findtext("s:Header/a:MessageID", "", NS).removeprefix("uuid:")}
        body = req.find("s:Body", NS)
        assert body is not None
        if action == "Create":
            win.shells += 1
            return 200, _template("create_response.xml", shell_id=str(uuid.uuid4()).upper(),
                                  endpoint="https://127.0.0.1/wsman", client_ip="127.0.0.1",
                                  **ids)
        if action == "Command":
            args = (body.findtext("rsp:CommandLine/rsp:Arguments", "", NS)).split()
            script = base64.b64decode(args[args.index("-EncodedCommand") + 1]).decode("utf-16-le")
            cid = str(uuid.uuid4()).upper()
            win.commands[cid] = (script.split("\n", 1)[1], b"")
            return 200, _template("command_response.xml", command_id=cid, **ids)
        if action == "Send":
            stream = body.find("rsp:Send/rsp:Stream", NS)
            assert stream is not None
            cid = stream.get("CommandId", "")
            script, sent = win.commands[cid]
            win.commands[cid] = (script, sent + base64.b64decode(stream.text or ""))
            return 200, _template("send_response.xml", **ids)
        if action == "Receive":
            desired = body.find("rsp:Receive/rsp:DesiredStream", NS)
            assert desired is not None
            cid = desired.get("CommandId", "")
            result = win.execute(*win.commands[cid])
            if result is None:
                time.sleep(0.05)
                return 500, _template("receive_timeout_fault.xml", **ids)
            streams = "\n".join(
                f'      <rsp:Stream Name="{name}" CommandId="{cid}">'
                f"{base64.b64encode(data).decode()}</rsp:Stream>"
                for name, data in (("stdout", result[0]), ("stderr", result[1])) if data)
            return 200, _template("receive_response.xml", command_id=cid, streams=streams,
                                  exit_code=str(result[2]), **ids)
        if action == "Signal":
            return 200, _template("signal_response.xml", **ids)
        if action == "Delete":
            return 200, _template("delete_response.xml", **ids)
        raise AssertionError(f"unexpected WS-Management action {action}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    windows: Windows


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "win-hvha01")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "winrm.crt", directory / "winrm.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@dataclass
class Endpoint:
    port: int
    ca_file: str
    windows: Windows


@pytest.fixture
def endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    monkeypatch.setenv("HVHA_TEST_WINRM_PW", PASSWORD)
    for var in ("HTTPS_PROXY", "https_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    cert, key = _certificate(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.windows = Windows()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Endpoint(server.server_address[1], str(cert), server.windows)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _transport(ep: Endpoint, **kw: object) -> WinRMTransport:
    args: dict[str, object] = {"user": "HVHA\\hvha-admin", "port": ep.port,
                               "password": SecretRef("env", "HVHA_TEST_WINRM_PW"),
                               "ca_file": ep.ca_file}
    args.update(kw)
    return WinRMTransport("127.0.0.1", **args)  # type: ignore[arg-type]


def test_run_ps_returns_recorded_output_and_exit_code(endpoint: Endpoint) -> None:
    with _transport(endpoint) as t:
        assert t.run("hostname").stdout == b"WIN-HVHA01\r\n"
        assert t.run_ps("(Get-VM -Name 'vm1').State").text().strip() == "Running"
        assert t.run("exit 42").returncode == 42
        res = t.run(["C:\\Program Files\\hvha\\hvha-agent.exe", "--version", "it's"])
        assert (res.returncode, res.stdout) == (0, b"hvha-agent 0.1.0\r\n")
        assert t.run("$input | Measure-Object -Line | ForEach-Object Lines",
                     input=b"a\r\nb\r\n").stdout == b"2\r\n"


def test_powershell_errors_arrive_as_plain_text(endpoint: Endpoint) -> None:
    with _transport(endpoint) as t:
        res = t.run("Get-Item -LiteralPath 'C:\\nope'")
    assert res.returncode == 1
    assert res.stderr.startswith(b"Get-Item : Cannot find path 'C:\\nope' because it does not")
    assert b"CLIXML" not in res.stderr and b"_x000D_" not in res.stderr
    assert clean_clixml(b"plain") == b"plain"


def test_one_shell_serves_every_command_and_is_deleted_on_close(endpoint: Endpoint) -> None:
    t = _transport(endpoint).open()
    for _ in range(10):
        assert t.run("hostname").ok
    t.close()
    assert (t.shells_opened, endpoint.windows.shells) == (1, 1)
    acts = endpoint.windows.actions
    assert acts[0] == "Create" and acts[-1] == "Delete" and acts.count("Command") == 10
    assert acts.count("Signal") == 10, "every command is cleaned up"


def test_put_get_round_trip_in_chunks_through_a_temp_file(endpoint: Endpoint) -> None:
    data = bytes(range(256)) * ((2 * CHUNK) // 256 + 7)  # three chunks
    path = "C:\\ProgramData\\hvha\\node's.bundle"
    with _transport(endpoint) as t:
        t.put(data, path)
        assert t.get(path) == data
        t.put(b"public", "C:\\ProgramData\\hvha\\readme.txt", mode=0o644)
        with pytest.raises(FileNotFoundError):
            t.get("C:\\nope.txt")
    win = endpoint.windows
    assert set(win.files) == {path, "C:\\ProgramData\\hvha\\readme.txt"}, "no temp left"
    assert win.private == {path}, "0600 becomes an owner-only ACL, 0644 inherits"
    writes = [s for s in win.scripts if "FromBase64String" in s]
    assert len(writes) == 4 and "::Create" in writes[0] and "::Append" in writes[2]
    assert all("node''s.bundle.hvha-tmp-" in s for s in writes[:3]), "temp next to the target"


def test_empty_file_round_trip(endpoint: Endpoint) -> None:
    with _transport(endpoint) as t:
        t.put(b"", "C:\\empty")
        assert t.get("C:\\empty") == b""


def test_receive_timeouts_are_retried_until_the_deadline(endpoint: Endpoint) -> None:
    with _transport(endpoint) as t:
        start = time.monotonic()
        with pytest.raises(CommandTimeout, match=r"did not finish within 0\.4 s"):
            t.run(STILL_RUNNING, timeout=0.4)
        assert time.monotonic() - start < 5
        assert endpoint.windows.actions.count("Receive") > 1
        assert endpoint.windows.actions[-1] == "Signal", "the command was told to stop"
        assert t.run("hostname").ok, "the shell is still usable"


def test_rejected_credentials_are_a_transport_error_without_the_password(
    endpoint: Endpoint,
) -> None:
    endpoint.windows.reject = True
    with pytest.raises(TransportError, match="rejected the credentials") as info:
        _transport(endpoint).open()
    text = "".join(traceback.format_exception(info.value))
    assert PASSWORD not in text
    assert "HVHA_TEST_WINRM_PW" in str(info.value) and "hvha-admin" in str(info.value)
    assert any(h.startswith("NTLM ") or h.startswith("Negotiate ")
               for h in endpoint.windows.auth_headers), "the NTLM handshake really ran"
    assert not any(PASSWORD in h for h in endpoint.windows.auth_headers)


def test_untrusted_certificate_is_refused(endpoint: Endpoint) -> None:
    with pytest.raises(TransportError, match=r"TLS certificate of https://127\.0\.0\.1:\d+/"):
        _transport(endpoint, ca_file=None).open()
    assert endpoint.windows.shells == 0


def test_unreachable_endpoint(endpoint: Endpoint) -> None:
    with pytest.raises(TransportError, match=r"cannot reach https://127\.0\.0\.1:1/wsman"):
        _transport(endpoint, port=1).open()


def test_missing_password_and_bad_auth_are_user_errors(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HVHA_TEST_WINRM_PW")
    with pytest.raises(TransportError, match="HVHA_TEST_WINRM_PW is not set"):
        _transport(endpoint).open()
    with pytest.raises(TransportError, match="unknown WinRM auth 'basic'"):
        _transport(endpoint, auth="basic")


def test_connect_factory_opens_a_winrm_node(endpoint: Endpoint) -> None:
    spec = TransportSpec(type="winrm", user="HVHA\\hvha-admin", port=endpoint.port,
                         password=SecretRef("env", "HVHA_TEST_WINRM_PW"),
                         known_hosts=endpoint.ca_file, auth="ntlm")
    node = Node(name="hv1", address="127.0.0.1", os="windows", transport=spec, heartbeat=())
    with connect(node) as t:
        assert t.run("hostname").stdout == b"WIN-HVHA01\r\n"
    nopw = Node(name="hv1", address="127.0.0.1", os="windows", heartbeat=(),
                transport=TransportSpec(type="winrm", user="u", port=endpoint.port))
    with pytest.raises(TransportError, match="needs a password"):
        connect(nopw)
