"""What the control plane needs from a connection to a node, whatever carries it.

Why a Protocol and not a base class: `hvha plan/apply` only ever runs commands and moves whole
files, so the contract is four methods. Local, SSH and WinRM implement it without sharing
code, and a test can hand the planner any object with these methods (no patching).

Contract every transport keeps:

* ``run`` returns a :class:`Result` for any exit code; a non-zero exit is *not* an exception.
  Only "could not run it at all" (unreachable, authentication, host key) raises
  :class:`TransportError`, and a command that outlives ``timeout`` raises
  :class:`CommandTimeout`.
* ``put`` is atomic: the data goes to a temporary file in the destination's directory, gets
  its mode, and is renamed over the destination, so a reader sees the old or the new file,
  never half of one, and never a moment where a secret file is world-readable.
* ``get`` of a missing file raises :class:`FileNotFoundError`.
* Error messages say what to do next and never contain a secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

DEFAULT_TIMEOUT = 60.0


class TransportError(Exception):
    """The node cannot be reached or used (unreachable, authentication, host key...).

    The message names the node and says what to do; it never contains a secret."""


class HostKeyError(TransportError):
    """The node's SSH host key is unknown or, worse, different from the recorded one."""


class CommandTimeout(TransportError):
    """A command ran longer than its ``timeout``; the connection stays usable."""


@dataclass(frozen=True)
class Result:
    """Outcome of one command. ``stdout``/``stderr`` are raw bytes: decoding is the caller's."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced), for facts that parse text."""
        return self.stdout.decode("utf-8", "replace")


@runtime_checkable
class Transport(Protocol):
    """A connection to one node. Use it as a context manager so it is always closed."""

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Result:
        """Run ``argv`` (a list: quoted for the remote shell; a str: given to the shell as is)."""
        ...

    def put(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        """Write ``data`` to ``remote_path`` atomically with permission bits ``mode``."""
        ...

    def get(self, remote_path: str) -> bytes:
        """The content of ``remote_path``; FileNotFoundError if it does not exist."""
        ...

    def close(self) -> None:
        """Release the connection; safe to call twice."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ClosingMixin:
    """``with transport:`` support for the concrete transports (they define ``close``)."""

    def close(self) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
