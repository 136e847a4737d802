"""The replication stream's plain types: modes, errors, status and resync progress.

Why a module of its own: the resync, the replicator, the admin commands and the status output
use these without needing the stream's machinery (threads, TLS), and stream.py stays small.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Mode(StrEnum):
    CONNECTED = "connected"
    ALONE = "alone"
    RESYNCING = "resyncing"


class StreamDown(ConnectionError):
    """The peer is not connected (or was lost while a query waited)."""


class PeerRefused(ConnectionError):
    """The peer authenticated but refused the session (its hello says why)."""


class NotPersisted(OSError):
    """An op was neither acknowledged by the peer nor durably recorded as dirty."""


@dataclass
class ResyncProgress:
    total_bytes: int = 0
    done_bytes: int = 0
    started: float = 0.0

    def snapshot(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        left = max(self.total_bytes - self.done_bytes, 0)
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return {"percent": round(pct, 1), "bytes_left": left, "rate": round(rate),
                "eta_s": round(left / rate, 1) if rate > 0 else -1.0}


@dataclass(frozen=True)
class StreamStatus:
    mode: Mode
    in_sync: bool
    bytes_sent: int
    ops_in_flight: int
    acked_seq: int
    last_error: str
    resync: dict[str, float] | None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "in_sync": self.in_sync, "bytes_sent": self.bytes_sent,
                "ops_in_flight": self.ops_in_flight, "acked_seq": self.acked_seq,
                "last_error": self.last_error, "resync": self.resync}


def unwrap(reply: bytes) -> bytes:
    """A REPLY payload -> its body, or OSError with the peer's message."""
    if reply[:1] == b"\0":
        return reply[1:]
    raise OSError(errno.EIO, f"peer could not answer: {reply[1:].decode(errors='replace')}")
