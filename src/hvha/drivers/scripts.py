"""Run a module script with a deadline, bounded output, and no stray processes afterwards.

Why not ``asyncio.create_subprocess_exec``: on Python 3.11 its ``wait()`` returns only once
every pipe is closed, and a start script that launches the payload in the background (``app &``)
hands our pipes to the payload, so ``start_prim.sh`` would never "finish". Here the child's exit
is watched on its own (a pidfd, else polling) and the pipes are read only until then.

Each script runs in a new session, i.e. its own process group, so a timeout can kill *the
script and everything it spawned* by pgid (SIGTERM, SIGKILL :data:`KILL_GRACE` s later) —
never by name. A script that exits normally keeps its background children (that is how a
start script leaves the payload running) unless ``kill_leftovers`` asks to clean them up, which
checkers and status scripts do. Output is kept as the last :data:`TAIL_BYTES` bytes of each
stream. Payloads should redirect their own output (``>>log 2>&1``): once the script has exited
its pipes are closed, and a background child writing to them gets EPIPE.

POSIX only (process groups, pidfds); a Windows agent would use a job object the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 8192
KILL_GRACE = 2.0
_POLL = 0.02
_DRAIN = 0.05  # after the script exits, output already written is still read for this long


@dataclass(frozen=True)
class ScriptResult:
    returncode: int  # negative: killed by that signal (as in subprocess)
    stdout_tail: str
    stderr_tail: str
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for logs and error messages: how it ended plus the last stderr line."""
        if self.timed_out:
            how = f"timed out after {self.duration:.1f}s"
        elif self.returncode < 0:
            how = f"killed by signal {-self.returncode}"
        else:
            how = f"exit {self.returncode}"
        last = (self.stderr_tail.strip() or self.stdout_tail.strip()).splitlines()
        return f"{how}: {last[-1]}" if last else how


class _Tail:
    """The last ``limit`` bytes read from a non-blocking fd."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.limit = fd, limit
        self.data = bytearray()
        self.eof = False

    def pump(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                return
            self.data += chunk
            if len(self.data) > self.limit:
                del self.data[: len(self.data) - self.limit]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``, read from /proc/*/stat."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 3 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def interpreter_for(path: Path | str) -> list[str]:
    """argv prefix that runs a module script: ``/bin/sh`` for .sh, PowerShell for .ps1.

    Rendered scripts are run through their interpreter rather than exec'd, so a bundle whose
    mode bits were lost in transit (or a noexec mount) still works.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".sh":
        return ["/bin/sh"]
    if suffix == ".ps1":
        return ["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy",
                "Bypass", "-File"]
    return []


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait_exit(proc: subprocess.Popen[bytes], deadline: float | None) -> bool:
    """Wait until ``proc`` exits (reaped) or ``deadline`` (monotonic) passes; True if exited."""
    loop = asyncio.get_running_loop()
    pidfd = -1
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(proc.pid)
    try:
        while proc.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if pidfd < 0:
                await asyncio.sleep(_POLL if left is None else min(_POLL, left))
                continue
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, _resolve, ready)
            try:
                async with asyncio.timeout(left):
                    await ready
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


async def _kill_group(proc: subprocess.Popen[bytes], pgid: int, grace: float) -> None:
    """SIGTERM the group, SIGKILL it after ``grace`` s if anything is left, reap ``proc``."""
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(pgid):
            return
        await asyncio.sleep(_POLL)
    _killpg(pgid, signal.SIGKILL)
    await _wait_exit(proc, time.monotonic() + 5.0)
    deadline = time.monotonic() + 5.0
    while group_members(pgid) and time.monotonic() < deadline:  # SIGKILL takes a moment
        await asyncio.sleep(_POLL)


def _kill_group_now(proc: subprocess.Popen[bytes], pgid: int) -> None:
    """Synchronous last resort (cancellation): SIGKILL the group and reap the script."""
    _killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2.0)


async def run_script(
    path: Path | str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    *,
    cwd: Path | str | None = None,
    interpreter: Sequence[str] | None = None,
    kill_leftovers: bool = False,
    kill_grace: float = KILL_GRACE,
) -> ScriptResult:
    """Run ``path args...`` in its own process group and wait at most ``timeout`` s.

    ``env`` is added to the agent's environment. ``interpreter`` is an argv prefix (default:
    :func:`interpreter_for`, i.e. ``/bin/sh`` for ``.sh`` files, nothing for other paths, which
    are looked up on PATH). On timeout the whole group is terminated (SIGTERM, then SIGKILL
    after ``kill_grace`` s) and ``timed_out`` is set; ``kill_leftovers`` also kills processes
    the script left in its group after a normal exit. Cancelling the call SIGKILLs the group.
    Raises OSError if the program cannot be started (missing, not executable).
    """
    prefix = list(interpreter_for(path) if interpreter is None else interpreter)
    argv = [*prefix, str(path), *args]
    full_env = {**os.environ, **(env or {})}
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                env=full_env, cwd=cwd, start_new_session=True)
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    os.close(out_w)
    os.close(err_w)
    pgid = proc.pid  # start_new_session: the script leads its own session and group
    loop = asyncio.get_running_loop()
    tails = [_Tail(out_r, TAIL_BYTES), _Tail(err_r, TAIL_BYTES)]
    for tail in tails:
        loop.add_reader(tail.fd, tail.pump)
    timed_out = False
    try:
        exited = await _wait_exit(proc, started + timeout)
        if not exited:
            timed_out = True
            await _kill_group(proc, pgid, kill_grace)
        elif kill_leftovers and group_members(pgid):
            await _kill_group(proc, pgid, kill_grace)
        drain_until = time.monotonic() + _DRAIN
        while not all(t.eof for t in tails) and time.monotonic() < drain_until:
            await asyncio.sleep(0.005)
    except BaseException:
        _kill_group_now(proc, pgid)
        raise
    finally:
        for tail in tails:
            loop.remove_reader(tail.fd)
            tail.pump()
            os.close(tail.fd)
    rc = proc.poll()
    return ScriptResult(
        returncode=-signal.SIGKILL if rc is None else rc,
        stdout_tail=tails[0].text(),
        stderr_tail=tails[1].text(),
        timed_out=timed_out,
        duration=time.monotonic() - started,
    )
