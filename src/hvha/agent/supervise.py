"""`hvha supervise`: keep the agent running where there is no systemd (the lab, containers).

What systemd's ``Restart=always`` does for the packaged unit, in a few lines: start the agent,
restart it with backoff when it dies, forward SIGHUP (reload) and SIGTERM (hand modules over,
then stop) to it, and keep a pid file that ``hvha plan`` reads as the service state. The pid
file holds the supervisor's pid; it is removed on a clean stop, so a stale one reads "stopped".
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger("hvha.supervise")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # an agent up this long resets the backoff


def next_backoff(current: float, uptime: float) -> float:
    """Delay before the next restart: doubles while the agent keeps dying young."""
    if uptime >= STABLE_AFTER:
        return BACKOFF_FIRST
    return min(BACKOFF_MAX, max(BACKOFF_FIRST, current * 2))


class Supervisor:
    def __init__(self, argv: Sequence[str], pid_file: Path, log_file: Path) -> None:
        self.argv = list(argv)
        self.pid_file = pid_file
        self.log_file = log_file
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def _write_pid(self) -> None:
        self.pid_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.pid_file)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        self._write_pid()
        backoff = 0.0
        try:
            while not self.stopping:
                fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                started = time.monotonic()
                try:
                    self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                                  stdout=fd, stderr=fd)
                finally:
                    os.close(fd)
                code = self.child.wait()
                if self.stopping:
                    return 0
                backoff = next_backoff(backoff, time.monotonic() - started)
                log.warning("agent exited with %s; restarting in %.0fs", code, backoff)
                deadline = time.monotonic() + backoff
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
            return 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                if self.pid_file.read_text().strip() == str(os.getpid()):
                    self.pid_file.unlink()
