"""The cluster model. Built by :mod:`hvha.config.build` from validated, defaults-applied data.

Frozen and typed so the compiler, planner and agent never re-check what validation proved.
Durations are seconds (float); every field has its effective value (no "None means default").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    HYPERV = "hyperv"
    KVM = "kvm"
    APP = "app"

    @property
    def is_vm(self) -> bool:
        return self is not Kind.APP


@dataclass(frozen=True)
class SecretRef:
    """Where a secret is: ``file`` (a path) or ``env`` (a variable). Never the secret itself."""

    source: str
    ref: str


@dataclass(frozen=True)
class Transport:
    type: str
    user: str
    port: int | None  # none for the local transport
    key_file: str | None = None
    password: SecretRef | None = None
    known_hosts: str | None = None
    auth: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    os: str
    transport: Transport
    heartbeat: tuple[tuple[str, str], ...]

    def heartbeat_address(self, network: str) -> str:
        return dict(self.heartbeat)[network]


@dataclass(frozen=True)
class Network:
    name: str
    subnet: str | None
    replication: bool


@dataclass(frozen=True)
class Heartbeat:
    interval: float
    timeout: float
    port: int
    networks: tuple[Network, ...]

    @property
    def replication_network(self) -> str:
        return next(n.name for n in self.networks if n.replication)


@dataclass(frozen=True)
class Witness:
    """``kind`` is ``arbiter``, ``ping`` or ``none``."""

    kind: str
    address: str | None = None
    port: int | None = None
    lease: float | None = None
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Replication:
    port: int
    streams: int
    zone_size: int


@dataclass(frozen=True)
class Replicated:
    path: str
    exclude: tuple[str, ...]


@dataclass(frozen=True)
class Vip:
    address: str
    interfaces: tuple[tuple[str, str], ...]
    """(node, interface) pairs; empty means the interface whose subnet holds the VIP."""


@dataclass(frozen=True)
class Checker:
    name: str
    type: str
    interval: float
    timeout: float
    failures: int
    on_failure: str
    params: tuple[tuple[str, str | int], ...] = ()


@dataclass(frozen=True)
class Failover:
    automatic: bool
    preferred: str | None
    failback: bool
    stability_window: float
    restart_count: int
    restart_window: float


@dataclass(frozen=True)
class Stop:
    mode: str | None
    graceful_timeout: float
    forced_timeout: float


@dataclass(frozen=True)
class Module:
    name: str
    kind: Kind
    payload: tuple[tuple[str, str | tuple[str, ...]], ...]
    replicated: tuple[Replicated, ...]
    vip: Vip | None
    checkers: tuple[Checker, ...]
    failover: Failover
    stop: Stop
    replication_port: int
    variables: tuple[tuple[str, str], ...]
    depends_on: tuple[str, ...]

    def payload_value(self, key: str) -> str | tuple[str, ...] | None:
        return dict(self.payload).get(key)


@dataclass(frozen=True)
class Cluster:
    name: str
    secret: SecretRef
    nodes: tuple[Node, Node]
    heartbeat: Heartbeat
    witness: Witness
    replication: Replication
    modules: tuple[Module, ...]
    defaults_applied: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def peer_of(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name != name)
