"""The activity log (what the peer applied but may not have on disk): pure bookkeeping."""

from __future__ import annotations

from hvha.replication import ops
from hvha.replication.activity import ActivityLog

Z = 1 << 20


def test_records_cover_every_streamed_change_until_its_barrier_is_acknowledged() -> None:
    log = ActivityLog(Z, max_age=3600)
    log.note(ops.Write("img", 3 * Z + 5, b"x" * 10))        # seq 1
    log.close_epoch(2)                                       # barrier seq 2
    log.note(ops.Write("img", 7 * Z, b"y"))                  # seq 3
    log.acked(1)                                             # barrier not yet acknowledged
    recs = log.take()
    assert ["z", "img", 3] in recs and ["z", "img", 7] in recs
    assert log.take() == [], "take() starts over"


def test_an_acknowledged_barrier_forgets_its_epoch_only() -> None:
    log = ActivityLog(Z, max_age=3600)
    log.note(ops.Write("a", 0, b"x"))
    log.close_epoch(2)
    log.note(ops.Write("b", 0, b"x"))
    log.acked(2)
    assert log.take() == [["z", "b", 0]]


def test_a_rename_moves_what_older_epochs_hold() -> None:
    log = ActivityLog(Z, max_age=3600)
    log.note(ops.Write("tmp", 0, b"x"))
    log.close_epoch(2)
    log.note(ops.Rename("tmp", "final"))
    recs = log.take()
    assert ["z", "final", 0] in recs and ["z", "tmp", 0] not in recs
    assert ["p", "final"] in recs


def test_barriers_are_due_by_age_or_volume_and_never_for_nothing() -> None:
    log = ActivityLog(Z, max_age=10, max_bytes=2 * Z)
    assert not log.barrier_due() and log.seconds_to_barrier() is None
    log.note(ops.Fsync(None))
    assert not log.barrier_due(), "a barrier alone makes nothing to flush"
    log.note(ops.Write("a", 0, b"x"))
    assert not log.barrier_due() and 9 < (log.seconds_to_barrier() or 0) <= 10
    assert log.barrier_due(now=10**9)
    log.note(ops.Write("a", 0, b"x" * (2 * Z)))
    assert log.barrier_due()
