"""A small QMP client (QEMU Machine Protocol over a unix socket), sync and async, with a CLI.

Why our own: the plain-QEMU path of ``kind: kvm`` needs exactly three things from QEMU - is the
guest running (``query-status``), press the ACPI power button (``system_powerdown``) and stop
QEMU (``quit``) - from the module scripts (a CLI, so ``status.sh`` can be the vm_state checker)
and from Python code; a dependency for three commands is not worth it.

The protocol (QEMU docs, interop/qmp-spec): on connect the server sends a greeting
``{"QMP": {...}}``; the client must send ``qmp_capabilities`` before anything else; each command
``{"execute": NAME, "arguments": {...}, "id": ID}`` gets one ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` carrying the same id; asynchronous
``{"event": ...}`` messages may arrive at any time and are skipped here. The pure part
(:func:`encode_command`, :func:`decode_message`, :func:`reply_to`) is shared by both clients.

QEMU serves one QMP client per socket at a time, so every use here is short: connect, a command
or two, close.

CLI (exit 0 = yes/done, 1 = not running, 3 = cannot reach QEMU, 4 = QEMU refused the command)::

    python3 -m hvha.drivers.qmp SOCKET running [--wait SECONDS]   # status.sh: 0 iff "running"
    python3 -m hvha.drivers.qmp SOCKET status                     # prints e.g. "running"
    python3 -m hvha.drivers.qmp SOCKET powerdown                  # ACPI power button
    python3 -m hvha.drivers.qmp SOCKET quit                       # QEMU exits at once
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20
DEFAULT_TIMEOUT = 5.0


class QmpError(Exception):
    """Talking to QEMU failed: no socket, no answer in time, or not QMP."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error (its class and description)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {error_class}: {desc}")
        self.command, self.error_class, self.desc = command, error_class, desc


@dataclass(frozen=True)
class VmStatus:
    """``query-status``: ``status`` is QEMU's RunState ("running", "paused", "shutdown",
    "io-error", "inmigrate", ...); only "running" means the guest executes."""

    status: str
    running: bool

    @classmethod
    def from_return(cls, value: Any) -> VmStatus:
        if not isinstance(value, dict) or not isinstance(value.get("status"), str):
            raise QmpError(f"query-status returned {value!r}, not a status object")
        return cls(value["status"], bool(value.get("running", False)))


# ---- protocol (pure) ---------------------------------------------------------------------


def encode_command(command: str, arguments: dict[str, Any] | None = None,
                   ident: int | None = None) -> bytes:
    """One command as a JSON line."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    if ident is not None:
        msg["id"] = ident
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode_message(line: bytes) -> dict[str, Any]:
    """One server message; raises :class:`QmpError` on EOF or anything not a JSON object."""
    if not line:
        raise QmpError("QEMU closed the QMP connection")
    if not line.endswith(b"\n") and len(line) >= MAX_LINE:
        raise QmpError(f"QMP message longer than {MAX_LINE} bytes")
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise QmpError(f"not QMP (invalid JSON): {line[:80]!r}") from exc
    if not isinstance(msg, dict):
        raise QmpError(f"not QMP (not a JSON object): {line[:80]!r}")
    return msg


def check_greeting(msg: dict[str, Any]) -> None:
    if "QMP" not in msg:
        raise QmpError(f"no QMP greeting (got {sorted(msg)}): is this a QMP socket "
                       "(-qmp unix:PATH,server=on,wait=off)?")


def reply_to(msg: dict[str, Any], command: str, ident: int | None) -> tuple[bool, Any]:
    """(True, value) if ``msg`` answers this command, (False, None) if it is an event or
    another command's reply to skip; raises :class:`QmpCommandError` for an error reply."""
    if "event" in msg or "QMP" in msg:
        return False, None
    if ident is not None and msg.get("id", ident) != ident:
        return False, None
    if "return" in msg:
        return True, msg["return"]
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise QmpCommandError(command, str(err.get("class", "GenericError")),
                              str(err.get("desc", msg["error"])))
    raise QmpError(f"unexpected QMP message {msg!r}")


# ---- sync client -------------------------------------------------------------------------


class QmpClient:
    """Synchronous client: ``with QmpClient(path) as q: q.query_status()``."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path, self.timeout = path, timeout
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._ident = 0

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise QmpError(f"cannot connect to QMP socket {self.path}: {exc.strerror or exc} "
                           "(is QEMU running with -qmp on this path?)") from exc
        self._sock, self._file = sock, sock.makefile("rb")
        try:
            check_greeting(self._read())
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_LINE)
        except (TimeoutError, OSError) as exc:
            raise QmpError(f"no answer on {self.path} within {self.timeout:g}s") from exc
        return decode_message(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._sock is None:
            raise QmpError("not connected: call connect() first")
        self._ident += 1
        try:
            self._sock.sendall(encode_command(command, arguments, self._ident))
        except OSError as exc:
            raise QmpError(f"cannot send {command} to {self.path}: {exc}") from exc
        while True:
            done, value = reply_to(self._read(), command, self._ident)
            if done:
                return value

    def query_status(self) -> VmStatus:
        return VmStatus.from_return(self.execute("query-status"))

    def system_powerdown(self) -> None:
        self.execute("system_powerdown")

    def quit(self) -> None:
        """Ask QEMU to exit; QEMU closing the socket before its reply counts as done."""
        try:
            self.execute("quit")
        except QmpCommandError:
            raise
        except QmpError:
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- async client ------------------------------------------------------------------------


class AsyncQmpClient:
    """asyncio client: ``async with AsyncQmpClient(path) as q: await q.query_status()``."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path, self.timeout = path, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ident = 0

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.path, limit=MAX_LINE)
        except (OSError, TimeoutError) as exc:
            raise QmpError(f"cannot connect to QMP socket {self.path}: {exc} "
                           "(is QEMU running with -qmp on this path?)") from exc
        try:
            check_greeting(await self._read())
            await self.execute("qmp_capabilities")
        except BaseException:
            await self.close()
            raise

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            async with asyncio.timeout(self.timeout):
                line = await self._reader.readline()
        except TimeoutError as exc:
            raise QmpError(f"no answer on {self.path} within {self.timeout:g}s") from exc
        except (OSError, ValueError) as exc:
            raise QmpError(f"reading {self.path}: {exc}") from exc
        return decode_message(line)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._writer is None:
            raise QmpError("not connected: call connect() first")
        self._ident += 1
        try:
            self._writer.write(encode_command(command, arguments, self._ident))
            await self._writer.drain()
        except OSError as exc:
            raise QmpError(f"cannot send {command} to {self.path}: {exc}") from exc
        while True:
            done, value = reply_to(await self._read(), command, self._ident)
            if done:
                return value

    async def query_status(self) -> VmStatus:
        return VmStatus.from_return(await self.execute("query-status"))

    async def system_powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        try:
            await self.execute("quit")
        except QmpCommandError:
            raise
        except QmpError:
            pass

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def __aenter__(self) -> AsyncQmpClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---- CLI for the module scripts ----------------------------------------------------------

EXIT_NOT_RUNNING, EXIT_UNREACHABLE, EXIT_REFUSED = 1, 3, 4


def _once(path: str, action: str, timeout: float) -> str:
    with QmpClient(path, timeout) as q:
        if action in ("running", "status"):
            return q.query_status().status
        if action == "powerdown":
            q.system_powerdown()
        else:
            q.quit()
        return "ok"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hvha.drivers.qmp",
                                     description="Ask a QEMU process over its QMP socket.")
    parser.add_argument("socket", help="QMP unix socket (-qmp unix:PATH,server=on,wait=off)")
    parser.add_argument("action", choices=("running", "status", "powerdown", "quit"))
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for each answer (default %(default)s)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="running: keep asking up to SECONDS until the guest runs")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            result = _once(args.socket, args.action, args.timeout)
            code = 0 if args.action != "running" or result == "running" else EXIT_NOT_RUNNING
            message = f"{args.socket}: {result}"
        except QmpCommandError as exc:
            code, message = EXIT_REFUSED, str(exc)
        except QmpError as exc:
            code, message = EXIT_UNREACHABLE, str(exc)
        if code in (0, EXIT_REFUSED) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if args.action == "status" and code == 0:
        print(result)
    elif code != 0:
        print(f"hvha qmp: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
