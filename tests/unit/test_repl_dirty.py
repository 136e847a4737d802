"""Dirty maps and the namespace journal: recorded before a write is acknowledged while the
peer is away, cheap for repeated writes, surviving a crash, following renames."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvha.replication import ops
from hvha.replication.dirty import DirtyStore

Z = 4096


def test_zones_are_recorded_persisted_and_reloaded(tmp_path: Path) -> None:
    d = DirtyStore(tmp_path, zone_size=Z)
    d.sync(d.record(ops.Write("f", Z - 1, b"ab")))  # spans zones 0 and 1
    d.sync(d.record(ops.Truncate("g", 3 * Z + 5)))
    d.sync(d.record(ops.Mkdir("dir", 0o755)))
    d.sync(d.record(ops.Chmod("f", 0o600)))
    d.close()
    d2 = DirtyStore(tmp_path, zone_size=Z)  # after a crash
    snap = d2.snapshot()
    assert snap.zones["f"] == {0, 1} and snap.zones["g"] == {3}
    assert snap.trunc == {"g": 3 * Z + 5} and "dir" in snap.paths and "f" in snap.meta
    d2.close()


def test_rewriting_a_dirty_zone_costs_nothing(tmp_path: Path) -> None:
    d = DirtyStore(tmp_path, zone_size=Z)
    d.sync(d.record(ops.Write("f", 0, b"x")))
    size = os.path.getsize(tmp_path / "dirty.log")
    for i in range(100):
        d.sync(d.record(ops.Write("f", i, b"y")))
    assert os.path.getsize(tmp_path / "dirty.log") == size
    d.close()


def test_renames_move_zones_and_unlink_forgets_them(tmp_path: Path) -> None:
    d = DirtyStore(tmp_path, zone_size=Z)
    for op in (ops.Write("a/x", 0, b"1"), ops.Write("b", 5 * Z, b"2"), ops.Rename("a", "c"),
               ops.Rename("b", "c/x"), ops.Write("gone", 0, b"3"), ops.Unlink("gone")):
        d.record(op)
    d.flush()
    d.close()
    snap = DirtyStore(tmp_path, zone_size=Z).snapshot()
    assert snap.zones == {"c/x": frozenset({5})}
    assert {"a", "c", "b", "c/x", "gone"} <= snap.paths
    assert snap.renames == (("a", "c"), ("b", "c/x"))


def test_torn_last_record_is_ignored(tmp_path: Path) -> None:
    d = DirtyStore(tmp_path, zone_size=Z)
    d.sync(d.record(ops.Write("f", 0, b"x")))
    d.close()
    with open(tmp_path / "dirty.log", "ab") as f:
        f.write(b'["z", "f", 9')
    assert DirtyStore(tmp_path, zone_size=Z).snapshot().zones["f"] == {0}


def test_take_and_finish_and_renames_during_resync(tmp_path: Path) -> None:
    d = DirtyStore(tmp_path, zone_size=Z)
    d.record(ops.Write("old", 0, b"x"))
    taken = d.take()
    assert taken.zones == {"old": frozenset({0})} and d.resync_pending()
    d.sync(d.observe(ops.Rename("old", "new")))  # streamed while the resync runs
    d.record(ops.Write("later", 0, b"y"))  # recorded: the peer was lost again
    d.flush()
    d.close()
    d = DirtyStore(tmp_path, zone_size=Z)  # crash: both sets survive
    assert d.taken().zones == {"new": frozenset({0})}
    assert set(d.snapshot().zones) == {"new", "later"}
    again = d.take()  # an interrupted resync's set is merged, never lost
    assert set(again.zones) == {"new", "later"}
    d.finish_taken()
    assert d.is_clean() and not d.resync_pending()
    d.close()


def test_a_failed_persist_raises_and_keeps_raising(tmp_path: Path) -> None:
    d = DirtyStore(tmp_path, zone_size=Z)
    os.close(d._fd)
    d._fd = os.open(tmp_path / "dirty.log", os.O_RDONLY)  # writes now fail (EBADF)
    ticket = d.record(ops.Write("f", 0, b"x"))
    with pytest.raises(OSError):
        d.sync(ticket)
    with pytest.raises(OSError):
        d.sync(d.record(ops.Write("g", 0, b"x")))
    d.close()
