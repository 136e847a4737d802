"""How the control plane reaches a node: run a command, put a file, get a file.

Layer: above the model (it reads :class:`hvha.model.cluster.Node`), below apply/reconcile and
the CLI; nothing here imports upward. ``hvha plan/apply`` asks :func:`connect` for a
:class:`Transport` per node and never cares which kind it got::

    with connect(node, accept_new_host_keys=args.accept_new_host_keys) as t:
        facts = t.run(["ip", "-j", "addr"]).text()
        t.put(bundle_bytes, "/etc/hvha/node.bundle", mode=0o600)

Errors a user can fix are :class:`TransportError` (its message says what to do);
:class:`HostKeyError` is the SSH subclass for an unknown or changed host key, and
:class:`CommandTimeout` the one for a command that outlived its timeout.
"""

from __future__ import annotations

from hvha.model.cluster import Node
from hvha.secrets import Secret, SecretError, resolve
from hvha.transport.base import (
    DEFAULT_TIMEOUT,
    CommandTimeout,
    HostKeyError,
    Result,
    Transport,
    TransportError,
)
from hvha.transport.local import LocalTransport

__all__ = [
    "DEFAULT_TIMEOUT",
    "CommandTimeout",
    "HostKeyError",
    "LocalTransport",
    "Result",
    "Secret",
    "SecretError",
    "Transport",
    "TransportError",
    "connect",
    "resolve",
]

TYPES = ("ssh", "winrm", "local")


def connect(
    node: Node,
    *,
    accept_new_host_keys: bool = False,
    connect_timeout: float = 10.0,
) -> Transport:
    """An open transport to ``node``, as its ``transport:`` section says.

    SSH and WinRM connect and authenticate here, so an unreachable node or a bad credential
    is reported before any change starts. ``accept_new_host_keys`` records an unknown SSH
    host key instead of refusing it (never a *changed* one). The paramiko and pywinrm
    imports are lazy: a cluster of local or SSH nodes does not load the WinRM stack.
    """
    spec = node.transport
    if spec.type == "local":
        return LocalTransport(name=node.name)
    if spec.type == "ssh":
        from hvha.transport.ssh import DEFAULT_PORT, SSHTransport

        return SSHTransport(
            node.address,
            user=spec.user,
            port=spec.port or DEFAULT_PORT,
            key_file=spec.key_file,
            password=spec.password,
            known_hosts=spec.known_hosts,
            accept_new=accept_new_host_keys,
            connect_timeout=connect_timeout,
        ).open()
    if spec.type == "winrm":
        from hvha.transport.winrm import DEFAULT_PORT as WINRM_PORT
        from hvha.transport.winrm import WinRMTransport

        if spec.password is None and (spec.auth or "ntlm") != "kerberos":
            raise TransportError(
                f"node {node.name}: WinRM with {spec.auth or 'ntlm'} needs a password: set "
                "transport.password to {env: VAR} or {file: PATH}"
            )
        return WinRMTransport(
            node.address,
            user=spec.user,
            password=spec.password,
            port=spec.port or WINRM_PORT,
            auth=spec.auth or "ntlm",
            ca_file=spec.known_hosts,
            connect_timeout=connect_timeout,
        ).open()
    raise TransportError(
        f"node {node.name}: unknown transport type {spec.type!r}: use one of {', '.join(TYPES)}"
    )
