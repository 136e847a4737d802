"""Mutual TLS for the replication link, from a per-cluster certificate authority.

Why: every byte of a replicated directory crosses the network, and whoever can speak to the
secondary's port could otherwise write its copy. So there is no plaintext mode at all: both
ends present a certificate issued by the cluster's own CA, TLS 1.3 only, and each end checks
that the other's certificate names the expected peer node (a stolen certificate of some other
cluster, or of a third host of this one, is refused).

Files: ``<ca_dir>/ca.crt`` and ``ca.key`` (0600); ``<out_dir>/<node>.crt``, ``<node>.key``
(0600) and a copy of ``ca.crt``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import os
import shutil
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=3650)
_RBUF = 256 * 1024  # bytes received (and decrypted) at most per call
_TIMEVAL = struct.Struct("@ll")  # struct timeval (Linux: time_t and suseconds_t are longs)


class PeerRejected(ssl.SSLError):
    """The peer's certificate is valid but does not name the expected node."""


@dataclass(frozen=True)
class NodeCreds:
    """Where one node's TLS material lives."""

    ca_cert: Path
    cert: Path
    key: Path
    node: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(ca_dir: Path | str, cluster: str = "hvha") -> Path:
    """Create the cluster's CA (ca.crt, ca.key) in ca_dir; return the certificate's path.
    Refuses to overwrite an existing CA (delete it yourself to start over)."""
    d = Path(ca_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (d / "ca.key").exists():
        raise FileExistsError(f"{d / 'ca.key'} exists: remove it to create a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hvha CA {cluster}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(d / "ca.key", _key_pem(key))
    (d / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "ca.crt"


def issue_node_cert(ca_dir: Path | str, node_name: str, out_dir: Path | str,
                    addresses: tuple[str, ...] = ()) -> NodeCreds:
    """Issue a certificate naming `node_name` (CN and DNS SAN; plus IP SANs for `addresses`),
    usable as TLS server and client, signed by the CA in ca_dir."""
    ca = Path(ca_dir)
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca / 'ca.key'} is not an EC key made by create_ca")
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(node_name)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(out / f"{node_name}.key", _key_pem(key))
    (out / f"{node_name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if (out / "ca.crt").resolve() != (ca / "ca.crt").resolve():
        shutil.copyfile(ca / "ca.crt", out / "ca.crt")
    return NodeCreds(out / "ca.crt", out / f"{node_name}.crt", out / f"{node_name}.key",
                     node_name)


class NodeContext(ssl.SSLContext):
    """An SSLContext that remembers the node's credentials (the native lane loads the same
    files into its own OpenSSL context: lane.py)."""

    creds: NodeCreds | None = None


def _base(creds: NodeCreds, protocol: int) -> NodeContext:
    ctx = NodeContext(protocol)
    ctx.creds = creds
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(creds.ca_cert))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return ctx


def server_context(creds: NodeCreds) -> NodeContext:
    """A server context that requires a client certificate from the cluster CA. The peer's
    node name is checked after the handshake with `check_peer` (the ssl module cannot)."""
    ctx = _base(creds, ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # no session resumption: nothing is sent after the handshake
    return ctx


def client_context(creds: NodeCreds) -> NodeContext:
    """A client context: the server's certificate must come from the cluster CA and name the
    node passed as server_hostname (see `connect`)."""
    ctx = _base(creds, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    return ctx


def peer_names(sock: Any) -> set[str]:
    cert = sock.getpeercert()
    names: set[str] = set()
    if not cert:
        return names
    for san in cert.get("subjectAltName", ()):
        if san[0] == "DNS":
            names.add(str(san[1]))
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                names.add(str(attr[1]))
    return names


def check_peer(sock: Any, expected: str) -> None:
    """Raise PeerRejected unless the peer's certificate names `expected`."""
    names = peer_names(sock)
    if expected not in names:
        raise PeerRejected(f"peer certificate names {sorted(names)}, expected node {expected!r}"
                           ": check the node names and certificates of this cluster")


class Channel:
    """A TLS connection over a memory BIO, safe for one reading and one writing thread at
    once (an ssl.SSLSocket is not: OpenSSL forbids concurrent use of one SSL object, so every
    call on it here holds one short lock, and the socket I/O happens outside that lock).
    Reads wait at most `timeout` seconds (then TimeoutError; nothing is lost), writes block.
    `timeout` may be changed at any time; it applies from the next read on.

    Cost per round trip matters (the replication stream makes two per synchronous write), so
    a read is one blocking recv() on the socket, with no select() before it: the socket stays
    in blocking mode and the read timeout is the kernel's SO_RCVTIMEO (recv then fails with
    EAGAIN, raised here as TimeoutError), set again only when `timeout` changed. SO_RCVTIMEO
    rather than socket.settimeout() because the latter would make sendall() in the writing
    thread time out too, and would poll() before every recv(). `shutdown` still wakes a
    blocked reader: recv() returns 0, seen as the end of the stream. The SSL object is asked
    to decrypt only when it has input (so the common empty case raises no SSLWantReadError),
    and the bytes received and the decryption share one hold of the lock."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, timeout: float = 10.0) -> None:
        self.raw = raw
        self.timeout: float | None = timeout
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                server_hostname=server_hostname)
        # one receive buffer per connection: a fresh 256 KiB bytes per recv is an mmap+munmap
        self._rbuf = bytearray(_RBUF)
        self._rview = memoryview(self._rbuf)
        self._lock = threading.Lock()  # the SSL object
        self._wlock = threading.Lock()  # order of records on the socket
        self._eof = False  # the stream ended (close_notify, or EOF of the socket)
        raw.settimeout(None)
        self._rcvtimeo: float | None = None  # SO_RCVTIMEO as last set (None: wait forever)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._lock:
                    self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_out()
                got = self._recv(max(deadline - time.monotonic(), 0.001))  # outside the lock
                with self._lock:
                    self._in_add(got)
        self._flush_out()

    def _flush_out(self) -> None:
        with self._wlock:
            with self._lock:
                data = self._out.read()
            if data:
                self.raw.sendall(data)

    def _recv(self, timeout: float | None) -> int:
        """One recv() into the receive buffer, waiting at most `timeout` seconds."""
        if timeout != self._rcvtimeo:
            if timeout is None or not math.isfinite(timeout):
                tv = (0, 0)  # zero: no timeout
            else:  # at least 1 us, as zero would mean forever
                usec = max(int(timeout * 1_000_000), 1)
                tv = divmod(usec, 1_000_000)
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(*tv))
            self._rcvtimeo = timeout
        try:
            return self.raw.recv_into(self._rbuf)
        except BlockingIOError:  # EAGAIN: SO_RCVTIMEO expired
            raise TimeoutError(f"no data from the peer for {timeout} s") from None

    def _in_add(self, got: int) -> None:
        """Hand `got` received bytes (0: end of stream) to the SSL object; hold self._lock."""
        if got:
            self._in.write(self._rview[:got])
        else:
            self._in.write_eof()

    def sendall(self, data: bytes | memoryview) -> None:
        with self._wlock:
            with self._lock:
                self.obj.write(data)
                out = self._out.read()
            self.raw.sendall(out)

    def recv_into(self, buf: memoryview | bytearray) -> int:
        """Read at most len(buf) bytes into buf (0 at end of stream)."""
        view = memoryview(buf)[:_RBUF]
        n = len(view)
        got = -1  # bytes just received, to add to the input BIO (-1: none)
        while True:
            with self._lock:
                if got >= 0:
                    self._in_add(got)
                if self._eof:
                    return 0
                if self._in.pending or self._in.eof or self.obj.pending():
                    try:
                        return int(self.obj.read(n, view))
                    except ssl.SSLWantReadError:
                        pass
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        self._eof = True
                        return 0
                pending_out = self._out.pending
            if pending_out:
                self._flush_out()
            got = self._recv(self.timeout)

    def recv(self, n: int) -> bytes:
        buf = bytearray(min(n, _RBUF))
        got = self.recv_into(buf)
        return bytes(buf[:got])

    def pending(self) -> int:
        with self._lock:
            return int(self.obj.pending()) + self._in.pending

    def getpeercert(self) -> Any:
        return self.obj.getpeercert()

    def shutdown(self) -> None:
        """Wake up threads blocked on this connection (they then see an error or EOF)."""
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def accept(raw: socket.socket, ctx: ssl.SSLContext, peer: str, timeout: float) -> Channel:
    """Server side: complete the handshake of an accepted connection with the expected peer."""
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        chan = Channel(raw, ctx, server_side=True, timeout=timeout)
        check_peer(chan, peer)
    except BaseException:
        raw.close()
        raise
    return chan


def connect(address: tuple[str, int], ctx: ssl.SSLContext, peer: str,
            timeout: float) -> Channel:
    """Open a TCP connection and complete the TLS handshake with the expected peer node."""
    raw = socket.create_connection(address, timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        chan = Channel(raw, ctx, server_side=False, server_hostname=peer, timeout=timeout)
        check_peer(chan, peer)
    except BaseException:
        raw.close()
        raise
    return chan
