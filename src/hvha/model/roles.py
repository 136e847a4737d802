"""A module's role on a node: SafeKit's states, shared by the agent and the planner."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"

    @property
    def primary(self) -> bool:
        return self in (Role.ALONE, Role.PRIM)

    @property
    def exit_code(self) -> int:
        """SafeKit's ``state`` exit codes, for scripts."""
        return _EXIT[self]


_EXIT = {Role.STOP: 0, Role.WAIT: 1, Role.ALONE: 2, Role.PRIM: 3, Role.SECOND: 4}
