"""Turn a secret *reference* from the cluster file into the secret, and keep it out of sight.

Why here: the cluster file only says where a password is (``{env: VAR}`` or ``{file: PATH}``),
so configs can be committed. The transports are the only code that needs the value; this
module is the one place that reads it and the one place that decides what is safe:

* a file must be a regular file that neither group nor others can read or write (0600 or
  stricter), like ssh demands of private keys; otherwise we refuse and say ``chmod 600``;
* an empty secret is an error (an empty password is a configuration mistake, not a choice);
* no message, ``repr`` or ``str`` produced here ever contains the secret.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SOURCES = ("env", "file")


class SecretError(Exception):
    """A secret reference cannot be resolved; the message says how to fix it (never the value)."""


class SecretRefLike(Protocol):
    """Anything with ``source`` (``env`` or ``file``) and ``ref``: e.g. the model's SecretRef."""

    @property
    def source(self) -> str: ...

    @property
    def ref(self) -> str: ...


class Secret:
    """A resolved secret that does not show itself: ``repr``/``str`` print ``Secret(***)``.

    Transports keep this object instead of the plain string so that logging or printing a
    transport (or its ``vars()``) cannot reveal the password; :meth:`reveal` is explicit."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def describe(ref: SecretRefLike) -> str:
    """Where the secret is, for messages: ``environment variable X`` or ``file /p``."""
    return f"environment variable {ref.ref}" if ref.source == "env" else f"file {ref.ref}"


def resolve(ref: SecretRefLike) -> str:
    """The secret ``ref`` points to. Raises :class:`SecretError` (without the value) if the
    variable is unset, the file is missing, unreadable or too open, or the secret is empty."""
    if ref.source == "env":
        value = os.environ.get(ref.ref)
        if value is None:
            raise SecretError(
                f"environment variable {ref.ref} is not set: export it before running hvha"
            )
    elif ref.source == "file":
        value = _read_file(Path(os.path.expanduser(ref.ref)))
    else:
        raise SecretError(
            f"unknown secret source {ref.source!r}: use one of {', '.join(SOURCES)}"
        )
    if value == "":
        raise SecretError(f"the secret in {describe(ref)} is empty: put the password there")
    return value


def load(ref: SecretRefLike | None) -> Secret | None:
    """:func:`resolve` wrapped in a :class:`Secret` (None stays None)."""
    return None if ref is None else Secret(resolve(ref))


def _read_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretError(f"secret file {path} does not exist: create it (mode 0600)") from None
    except OSError as exc:
        raise SecretError(
            f"cannot open secret file {path} ({exc.strerror}): it must be a readable regular "
            "file, not a symlink"
        ) from None
    st = os.fstat(fd)  # the file we read, not whatever the path names later
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SecretError(f"secret file {path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_mode & 0o077:
            raise SecretError(
                f"secret file {path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`"
            )
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"secret file {path} is not UTF-8 text") from None
    # one trailing newline is what editors and `echo` add; it is not part of the password
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


MIN_CLUSTER_KEY = 16


@dataclass(frozen=True)
class Ref:
    """A secret reference given on a command line (the model's SecretRef has the same shape)."""

    source: str
    ref: str


def cluster_key(ref: SecretRefLike) -> bytes:
    """The cluster key, read the same way by every agent and the witness (so HMAC keys match)."""
    value = resolve(ref).encode()
    if len(value) < MIN_CLUSTER_KEY:
        raise SecretError(f"the cluster secret in {describe(ref)} is shorter than "
                          f"{MIN_CLUSTER_KEY} bytes: generate one, e.g. `openssl rand -hex 32`")
    return value
