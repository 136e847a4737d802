"""`exclude` pattern rules (docs/configuration.md): names at any depth, directories only with a
trailing slash, anchored patterns with a slash inside, everything below an excluded directory."""

from __future__ import annotations

import pytest

from hvha.replication.exclude import Excludes

EX = Excludes(["*.tmp", "cache/", "logs/*.gz", "**/scratch", "run/[!a]*.sock", "?.bak"])


@pytest.mark.parametrize(("path", "is_dir", "excluded"), [
    ("a.tmp", False, True),
    ("deep/in/a.tmp", False, True),
    ("a.tmp.keep", False, False),
    ("work.tmp", True, True),                # a name pattern matches directories too
    ("work.tmp/inside", False, True),        # ... and everything below them
    ("cache", True, True),
    ("x/cache", True, True),
    ("cache", False, False),                 # a trailing slash: directories only
    ("cache/thumbs/1.png", False, True),
    ("logs/a.gz", False, True),
    ("logs/sub/a.gz", False, False),         # "*" never crosses a slash
    ("other/logs/a.gz", False, False),       # anchored at the replicated directory
    ("a/b/c/scratch", False, True),
    ("scratch", False, True),
    ("run/x.sock", False, True),
    ("run/a.sock", False, False),
    ("z.bak", False, True),
    ("zz.bak", False, False),
    ("", True, False),                       # the root itself is always replicated
    ("a/b/scratch/x", False, True),

])
def test_pattern_rules(path: str, is_dir: bool, excluded: bool) -> None:
    assert EX.excluded(path, is_dir) is excluded


def test_a_leading_slash_anchors_a_plain_name() -> None:
    ex = Excludes(["/build"])
    assert ex.excluded("build", True) and not ex.excluded("src/build", True)


def test_no_patterns_exclude_nothing() -> None:
    ex = Excludes([])
    assert not ex and not ex.excluded("a.tmp") and not ex.anchored
    assert EX and EX.anchored
