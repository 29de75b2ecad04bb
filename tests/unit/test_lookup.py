"""The merged index's one-record read in C (formats/lsmt/_lookup.c) gives numpy's answers, and MergedIndex.rows
gives the same rows with and without it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from overlaybd.formats.lsmt import mapping
from overlaybd.formats.lsmt.index import Segments
from overlaybd.formats.lsmt.mapping import MergedIndex

from ..native import require_extension


def _lookup() -> Any:
    require_extension(mapping._lookup, "overlaybd.formats.lsmt._lookup")
    return mapping._lookup


def random_segments(rng: np.random.Generator, n: int, span: int, clustered: bool) -> Segments:
    """``n`` non-overlapping records over ``span`` sectors; clustered ones bunch up (a poor case for guessing)."""
    if clustered:
        starts = np.concatenate([rng.integers(0, span // 1000, n // 2),
                                 rng.integers(span - span // 1000, span, n - n // 2)])
    else:
        starts = rng.integers(0, span, n)
    starts = np.unique(starts * 16)
    lengths = rng.integers(1, 16, starts.size)
    zeroed = rng.random(starts.size) < 0.1
    moffset = rng.integers(0, 1 << 40, starts.size)
    tags = rng.integers(0, 256, starts.size)
    return Segments(starts.astype(np.int64), lengths.astype(np.int64), np.where(zeroed, 0, moffset), zeroed,
                    tags.astype(np.int32))


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 33, 1000, 65000])
def test_upper_bound_is_numpys(n: int, clustered: bool) -> None:
    lookup = _lookup()
    rng = np.random.default_rng(n + clustered)
    seg = random_segments(rng, n, 1 << 26, clustered)
    mi = MergedIndex(seg)
    ends = mi.ends
    keys = np.concatenate([rng.integers(-5, (1 << 30) + 5, 3000), ends, ends - 1, ends + 1, [-1, 0, 1 << 62]])
    for key in keys.tolist():
        assert lookup.upper_bound(mi._native, key) == int(ends.searchsorted(key, side="right")), key


@pytest.mark.parametrize("clustered", [False, True])
def test_rows_are_the_same_with_and_without_c(clustered: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _lookup()
    rng = np.random.default_rng(7 + clustered)
    mi = MergedIndex(random_segments(rng, 20000, 1 << 24, clustered))
    queries = [(int(s), int(s) + int(n)) for s, n in zip(rng.integers(0, 1 << 28, 5000), rng.integers(1, 64, 5000),
                                                          strict=True)]
    queries += [(int(e) - 1, int(e)) for e in mi.ends[:2000]] + [(int(e), int(e) + 8) for e in mi.ends[:2000]]
    queries += [(int(a) - 1, int(b)) for a, b in zip(mi.ends[:1000], mi.ends[3:1003], strict=True)]  # several
    with_c = [mi.rows(a, b) for a, b in queries]
    monkeypatch.setattr(mi, "_native", None)
    without = [mi.rows(a, b) for a, b in queries]
    assert with_c == without
    assert any(len(r) == 1 for r in with_c) and any(not r for r in with_c) and any(len(r) > 1 for r in with_c)


def test_the_index_handle_checks_its_arrays() -> None:
    lookup = _lookup()
    ok = [np.zeros(3, np.int64), np.zeros(3, np.uint64)]
    lookup.index(*ok)
    with pytest.raises(ValueError, match="int64 and uint64"):
        lookup.index(ok[0], np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="one length"):
        lookup.index(ok[0], np.zeros(4, np.uint64))


def test_a_record_beyond_the_packed_limits_is_refused() -> None:
    from overlaybd.errors import LimitError

    far = Segments(np.array([0], np.int64), np.array([8], np.int64), np.array([1 << 40], np.int64),
                   np.array([False]), np.array([0], np.int32))
    with pytest.raises(LimitError, match="points"):
        MergedIndex(far)
    zeroed_far = Segments(far.offset, far.length, far.moffset, np.array([True]), far.tag)
    assert MergedIndex(zeroed_far).rows(0, 8) == [(0, 8, -1, True, 0)]  # a zeroed record's moffset is not used


def test_packing_keeps_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    seg = random_segments(rng, 5000, 1 << 24, False)
    back = MergedIndex(seg).segments()
    assert np.array_equal(back.offset, seg.offset) and np.array_equal(back.length, seg.length)
    assert np.array_equal(back.zeroed, seg.zeroed) and np.array_equal(back.tag, seg.tag)
    assert np.array_equal(back.moffset[~back.zeroed], seg.moffset[~seg.zeroed])
