"""killpriv's rules: which bits a write drops, and reading CAP_FSETID from /proc."""

from __future__ import annotations

from hvha.replication.killpriv import Privileged, carries, dropped_mode, has_fsetid


def test_rules() -> None:
    assert dropped_mode(0o104755, False) == 0o755
    assert dropped_mode(0o106755, False) == 0o755
    assert dropped_mode(0o102745, False) is None  # setgid without g+x: a locking mark, kept
    assert dropped_mode(0o104755, True) is None  # CAP_FSETID keeps them
    assert dropped_mode(0o100644, False) is None
    assert dropped_mode(0o044755, False) is None  # a directory: never
    assert carries(0o4755, False) and carries(0o2775, False) and carries(0o644, True)
    assert not carries(0o2745, False) and not carries(0o755, False)
    assert has_fsetid("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not has_fsetid("CapEff:\t000001ffffffffef\n")
    assert not has_fsetid("CapEff:\tzz\n") and not has_fsetid("")


def test_handles_are_flagged_when_their_file_gains_privileges() -> None:
    p = Privileged()
    p.opened(5, 100, False)
    p.opened(6, 100, False)
    p.opened(7, 200, True)
    assert p.flagged == {7}
    assert sorted(p.gained(100)) == [5, 6] and p.gained(100) == []
    p.cleared(5)
    p.closed(6)
    assert p.flagged == {7} and p.gained(300) == []
