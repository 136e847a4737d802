"""The user-mistake exception, in its own module so that `python -m hvha.cli.main` (which loads
main.py twice, as __main__ and as hvha.cli.main) still catches the commands' errors."""


class UserError(Exception):
    """A mistake the user can fix; its message says how. Exit code 1."""
