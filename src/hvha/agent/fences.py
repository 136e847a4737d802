"""Data fences at the witness: a node that wrote without its peer outdates the peer's copy.

Why: two nodes cut apart cannot tell whether the other still writes. If node1 goes on alone
(its mirror ALONE, a new data generation) while node2 waits, and node1 dies later, node2 would
be granted the lease and start the module on a copy that lacks node1's acknowledged writes:
lost data. DRBD prevents this with "outdate-peer" fencing; here the witness, which already
decides who may be primary, keeps the record. Before a primary acknowledges its first write
alone it registers its new generation (``outdate``, only accepted from the lease holder); from
then on the witness grants the module only to a node that presents that generation, i.e. the
writer itself or a peer that has resynced from it. An operator can still force a stale node
(`hvha prim --force`), knowingly.

Pure data and rules; persistence is a JSON file the witness writes atomically when it has a
state directory (without one, a restarted witness forgets fences: documented as weaker).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

GEN_RE = re.compile(r"[0-9a-f]{1,16}(,[0-9a-f]{1,16}){0,31}")


def valid_gen(gen: object) -> bool:
    return isinstance(gen, str) and GEN_RE.fullmatch(gen) is not None


@dataclass(frozen=True)
class Fence:
    node: str  # who wrote alone
    gen: str  # the generation a node must present to be granted the module


class FenceTable:
    def __init__(self, fences: dict[str, Fence] | None = None) -> None:
        self.fences: dict[str, Fence] = dict(fences or {})

    def record(self, module: str, node: str, gen: str) -> bool:
        """Record (True if it changed anything)."""
        new = Fence(node, gen)
        if self.fences.get(module) == new:
            return False
        self.fences[module] = new
        return True

    def blocks(self, module: str, node: str, gen: str | None) -> Fence | None:
        """The fence that keeps ``node`` (presenting ``gen``) from the module, if any."""
        fence = self.fences.get(module)
        if fence is None or fence.node == node or (gen is not None and gen == fence.gen):
            return None
        return fence

    def to_json(self) -> str:
        return json.dumps({m: {"node": f.node, "gen": f.gen}
                           for m, f in sorted(self.fences.items())}, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path) -> FenceTable:
        """The table saved at ``path``; missing file: empty. A damaged file raises ValueError
        (refusing to start beats forgetting that a copy is outdated)."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the witness's data fences {path}: {exc}; fix or "
                             "remove it (removing forgets which copies are outdated)") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path} is not a fence table")
        fences = {}
        for module, f in doc.items():
            if not (isinstance(f, dict) and isinstance(f.get("node"), str)
                    and valid_gen(f.get("gen"))):
                raise ValueError(f"{path}: bad fence for {module!r}")
            fences[str(module)] = Fence(f["node"], f["gen"])
        return cls(fences)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
