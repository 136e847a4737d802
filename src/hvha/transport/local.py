"""The ``local`` transport: the node is the machine hvha runs on.

Why it exists: a node declared ``transport: {type: local}`` (and every unit test of the
planner) must behave exactly like a remote one, so this mirrors the SSH transport's
semantics with plain subprocesses and files: a list is run without a shell, a string through
``/bin/sh -c``, and ``put`` writes a temp file in the target directory, fsyncs, sets the mode
and renames it over the target.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hvha.transport.base import DEFAULT_TIMEOUT, ClosingMixin, CommandTimeout, Result

TMP_MARK = ".hvha-tmp-"


def temp_name(remote_path: str) -> str:
    """A unique sibling of ``remote_path`` (same directory, so the rename stays atomic)."""
    head, _, tail = remote_path.rpartition("/")
    name = f".{tail}{TMP_MARK}{os.urandom(6).hex()}"
    return f"{head}/{name}" if head or remote_path.startswith("/") else name


class LocalTransport(ClosingMixin):
    """Runs commands and writes files on this machine, as the user hvha runs as."""

    def __init__(self, *, name: str = "localhost") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"LocalTransport(name={self.name!r})"

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Result:
        args: list[str] = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        try:
            proc = subprocess.run(
                args,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CommandTimeout(
                f"{self.name}: `{_show(argv)}` did not finish within {timeout:g} s "
                "(it was killed): raise the timeout or check why it hangs"
            ) from None
        except FileNotFoundError:  # what a shell would answer, so callers see one behaviour
            return Result(127, b"", f"{args[0]}: command not found\n".encode())
        except PermissionError:
            return Result(126, b"", f"{args[0]}: permission denied\n".encode())
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def put(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        target = Path(remote_path)
        tmp = Path(temp_name(remote_path))
        # created with the final mode (0600 first if the umask would widen it): a secret is
        # never readable by others, not even between create and chmod
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o700)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                os.fchmod(fh.fileno(), mode)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def get(self, remote_path: str) -> bytes:
        return Path(remote_path).read_bytes()

    def close(self) -> None:
        """Nothing to release."""


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (a crash right after ``put`` keeps the new file)."""
    fd = os.open(directory if str(directory) else ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _show(argv: Sequence[str] | str) -> str:
    text = argv if isinstance(argv, str) else " ".join(argv)
    return text if len(text) <= 80 else text[:77] + "..."
