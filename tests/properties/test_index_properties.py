"""Index logic against plain per-sector models: replay, merge/overlay, compaction,
and read resolution through levels."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaybd.formats.lsmt import index as idxmod
from overlaybd.formats.lsmt.index import (
    MutableIndex,
    Segments,
    is_sorted_disjoint,
    merge_layers,
    overlay,
    plan_compaction,
    replay,
)
from overlaybd.formats.lsmt.mapping import DATA, HOLE, ZERO, Level, MergedIndex, MutableLevel, resolve
from overlaybd.formats.lsmt.spec import COPY_STEP_SECTORS, MAX_RECORD_SECTORS
from overlaybd.testing.strategies import (
    Row,
    big_logs,
    compaction_inputs,
    disjoint_rows,
    layer_stacks,
    log_rows,
    to_segments,
    writable_logs,
)

# -- plain models -------------------------------------------------------------------------------------------


def components(sectors: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted sectors -> maximal runs ``(start, end)``."""
    out: list[tuple[int, int]] = []
    for s in sectors:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def pieces_model(layers_top_first: Sequence[Sequence[Row]]) -> tuple[dict[int, tuple[int, int, bool, int]],
                                                                      list[Row]]:
    """The merged view, sector by sector and as pieces.

    Returns ``(sector -> (winning record id, moffset at the sector, zeroed, tag), expected rows)``. A record is
    identified by its position in the flattened top-first list; each record survives as the connected components
    of its range that no record above it covers, a later fragment's moffset advanced unless zeroed.
    """
    per_sector: dict[int, tuple[int, int, bool, int]] = {}
    rows: list[Row] = []
    rid = 0
    for layer in layers_top_first:
        mine: list[tuple[int, Row]] = []
        for rec in layer:
            mine.append((rid, rec))
            rid += 1
        claimed: dict[int, tuple[int, int, bool, int]] = {}
        for r, (o, ln, m, z, t) in mine:
            free = [s for s in range(o, o + ln) if s not in per_sector]
            for s in free:
                claimed[s] = (r, m if z else m + (s - o), z, t)
            for a, b in components(free):
                rows.append((a, b - a, m if z else m + (a - o), z, t))
        per_sector.update(claimed)
    rows.sort()
    return per_sector, rows


def replay_model(log: Sequence[Row]) -> list[Row]:
    """Replay = merge where later records are higher layers (each record its own layer)."""
    return pieces_model([[rec] for rec in reversed(log)])[1]


def sector_view(rows: Sequence[Row]) -> dict[int, tuple[int, bool, int]]:
    out: dict[int, tuple[int, bool, int]] = {}
    for o, ln, m, z, t in rows:
        for s in range(o, o + ln):
            assert s not in out, f"sector {s} is covered twice in {rows}"
            out[s] = (m if z else m + (s - o), z, t)
    return out


def check_sorted_disjoint(seg: Segments, what: str) -> None:
    rows = seg.rows()
    assert is_sorted_disjoint(seg), f"{what}: records overlap or are out of order: {rows}"
    assert all(r[1] > 0 for r in rows), f"{what}: an empty record: {rows}"
    assert all(a[0] < b[0] for a, b in zip(rows, rows[1:], strict=False)), f"{what}: not sorted: {rows}"


def inserted(log: Sequence[Row]) -> list[Row]:
    idx = MutableIndex()
    for o, ln, m, z, t in log:
        idx.insert(o, ln, m, z, t)
    return idx.segments().rows()


# -- replay ---------------------------------------------------------------------------------------------------


def _check_replay(log: list[Row]) -> None:
    seg = to_segments(log)
    got = replay(seg)
    check_sorted_disjoint(got, "replay")
    want = replay_model(log)
    assert got.rows() == want, f"replay differs from the model\nlog={log}\ngot={got.rows()}\nwant={want}"
    assert inserted(log) == want, f"one-by-one MutableIndex.insert differs from the model\nlog={log}"
    # per sector: last write wins, moffset advanced from the record's start unless zeroed
    per_sector: dict[int, tuple[int, int, bool]] = {}
    for i, (o, ln, m, z, _t) in enumerate(log):
        for s in range(o, o + ln):
            per_sector[s] = (i, m if z else m + (s - o), z)
    view = sector_view(got.rows())
    assert set(view) == set(per_sector)
    for s, (i, m, z) in per_sector.items():
        assert view[s] == (m, z, log[i][4]), f"sector {s}: got {view[s]}, the last record there is #{i} {log[i]}"


@settings(max_examples=300, deadline=None)
@given(log_rows())
def test_replay_small_ranges(log: list[Row]) -> None:
    _check_replay(log)


@settings(max_examples=100, deadline=None)
@given(writable_logs(max_size=80))
def test_replay_writable_logs(log: list[Row]) -> None:
    _check_replay(log)


@settings(max_examples=100, deadline=None)
@given(log_rows(tags=False, max_size=60))
def test_replay_untagged_fragments_never_merge(log: list[Row]) -> None:
    """As a real writable layer (all tags 0): neighbouring fragments stay separate records."""
    seg = to_segments(log)
    want = replay_model([(o, ln, m, z, i) for i, (o, ln, m, z, _t) in enumerate(log)])
    want = [(o, ln, m, z, 0) for o, ln, m, z, _t in want]
    assert replay(seg).rows() == want
    assert inserted(log) == want


@settings(max_examples=40, deadline=None)
@given(big_logs())
def test_replay_big_logs_divide_and_conquer(log: list[Row]) -> None:
    assert len(log) > idxmod._REPLAY_LEAF
    _check_replay(log)


@settings(max_examples=15, deadline=None)
@given(big_logs(min_size=129, max_size=300, max_sector=200, max_length=16))
def test_replay_big_logs_dense(log: list[Row]) -> None:
    _check_replay(log)


def test_replay_splitting_examples() -> None:
    # a write over the middle of an earlier one splits it; the right fragment's moffset advances
    assert replay(to_segments([(0, 10, 100, False, 0), (3, 2, 500, False, 0)])).rows() == [
        (0, 3, 100, False, 0), (3, 2, 500, False, 0), (5, 5, 105, False, 0)]
    # ... unless it is zeroed
    assert replay(to_segments([(0, 10, 100, True, 0), (3, 2, 500, False, 0)])).rows() == [
        (0, 3, 100, True, 0), (3, 2, 500, False, 0), (5, 5, 100, True, 0)]
    # contiguous writes never merge
    assert replay(to_segments([(0, 4, 8, False, 0), (4, 4, 12, False, 0)])).rows() == [
        (0, 4, 8, False, 0), (4, 4, 12, False, 0)]


# -- merge / overlay ------------------------------------------------------------------------------------------


def _check_merge(layers: list[list[Row]], got: Segments) -> None:
    check_sorted_disjoint(got, "merge")
    per_sector, want = pieces_model(layers)
    assert got.rows() == want, f"merge differs from the model\nlayers={layers}\ngot={got.rows()}\nwant={want}"
    view = sector_view(got.rows())
    assert set(view) == set(per_sector)
    for s, (_rid, m, z, t) in per_sector.items():
        assert view[s] == (m, z, t), f"sector {s}: got {view[s]}, want {(m, z, t)}"


@settings(max_examples=300, deadline=None)
@given(layer_stacks())
def test_merge_layers_top_most_wins(layers: list[list[Row]]) -> None:
    _check_merge(layers, merge_layers([to_segments(rows) for rows in layers]))


@settings(max_examples=30, deadline=None)
@given(layer_stacks(min_layers=5, max_layers=16, max_records=40, max_gap=20, max_length=30))
def test_merge_many_layers(layers: list[list[Row]]) -> None:
    _check_merge(layers, merge_layers([to_segments(rows) for rows in layers]))


@settings(max_examples=150, deadline=None)
@given(disjoint_rows(), disjoint_rows())
def test_overlay_top_over_bottom(top: list[Row], bottom: list[Row]) -> None:
    _check_merge([top, bottom], overlay(to_segments(top), to_segments(bottom)))


@settings(max_examples=50, deadline=None)
@given(layer_stacks(max_layers=5))
def test_merge_is_a_fold_of_overlays(layers: list[list[Row]]) -> None:
    segs = [to_segments(rows) for rows in layers]
    folded = segs[-1]
    for seg in reversed(segs[:-1]):
        folded = overlay(seg, folded)
    assert merge_layers(segs).rows() == folded.rows()


def test_merge_of_nothing_is_empty() -> None:
    assert len(merge_layers([])) == 0
    assert merge_layers([Segments.empty(), Segments.empty()]).rows() == []


# -- compaction -----------------------------------------------------------------------------------------------


def _mend(row: Row) -> int:
    o, ln, m, z, _t = row
    return m if z else m + ln


def _first_piece(row_start: int, inputs: list[Row], starts: list[int]) -> int:
    """Length of the compaction piece that starts at logical sector ``row_start``."""
    k = bisect_right(starts, row_start) - 1
    o, ln, _m, z, _t = inputs[k]
    if z:
        return ln
    return min(COPY_STEP_SECTORS, o + ln - row_start)


@settings(max_examples=300, deadline=None)
@given(compaction_inputs(), st.sampled_from([8, 8, 16, 1000]))
def test_plan_compaction(inputs: list[Row], first_sector: int) -> None:
    plan = plan_compaction(to_segments(inputs), first_sector)
    out = plan.index.rows()
    # the copies are exactly the data records, in order; the data area is their sum
    data = [r for r in inputs if not r[3]]
    assert plan.copies == [(t, m, ln) for _o, ln, m, _z, t in data]
    assert plan.data_sectors == sum(r[1] for r in data)
    # where each data record lands in the output: copies are laid back to back from first_sector
    landing: dict[int, int] = {}
    cur = first_sector
    copy_starts: list[int] = []
    for k, r in enumerate(inputs):
        if not r[3]:
            landing[k] = cur
            copy_starts.append(cur)
            cur += r[1]
    # sorted, disjoint, within limits
    check_sorted_disjoint(plan.index, "compaction output")
    for r in out:
        if r[3]:
            assert r[1] <= MAX_RECORD_SECTORS
            assert r[1] < MAX_RECORD_SECTORS or any(r == (i[0], i[1], r[2], True, i[4]) for i in inputs), \
                f"a coalesced zeroed record reaches the limit: {r}"
        else:
            assert r[1] < MAX_RECORD_SECTORS, f"data record of {r[1]} sectors (limit < {MAX_RECORD_SECTORS}): {r}"
    # same logical coverage, same tag and kind, same data (through the copies) at every sector
    assert sector_set(out) == sector_set(inputs)
    starts = [r[0] for r in inputs]
    for orow in out:
        oo, ol, om, oz, ot = orow
        k = bisect_right(starts, oo) - 1
        while k < len(inputs) and inputs[k][0] < oo + ol:
            io, il, im, iz, it = inputs[k]
            a, b = max(oo, io), min(oo + ol, io + il)
            if a < b:
                assert (oz, ot) == (iz, it), f"output {orow} meets input {inputs[k]} with another kind or tag"
                if oz:
                    # a zeroed record carries the data cursor: the data of every data record before it
                    assert om == first_sector + sum(r[1] for r in inputs[:k] if not r[3]), orow
                else:
                    out_at = om + (a - oo)
                    assert out_at == landing[k] + (a - io), f"output {orow} maps sector {a} to {out_at}, the " \
                        f"copy of {inputs[k]} holds it at {landing[k] + (a - io)}"
                    # replay the copies: output sector -> (source tag, source sector)
                    c = bisect_right(copy_starts, out_at) - 1
                    ct, cm, cl = plan.copies[c]
                    assert copy_starts[c] <= out_at and out_at + (b - a) <= copy_starts[c] + cl
                    assert (ct, cm + out_at - copy_starts[c]) == (it, im + (a - io))
                    # data records start and end on 32 KiB piece boundaries of their source record
                    if a == oo:
                        assert (a - io) % COPY_STEP_SECTORS == 0, f"{orow} starts inside a piece of {inputs[k]}"
                    if b == oo + ol:
                        assert (b - io) % COPY_STEP_SECTORS == 0 or b == io + il, \
                            f"{orow} ends inside a piece of {inputs[k]}"
            k += 1
    # greedy, maximal coalescing: two neighbours that could join did not only because of the length limit
    for x, y in zip(out, out[1:], strict=False):
        joinable = (x[0] + x[1] == y[0] and _mend(x) == y[2] and x[3] == y[3] and x[4] == y[4])
        if joinable:
            assert x[1] + y[1] >= MAX_RECORD_SECTORS, f"{x} and {y} should have been coalesced"
            assert x[1] + _first_piece(y[0], inputs, starts) >= MAX_RECORD_SECTORS, \
                f"{x} stopped growing before the limit: the next piece at {y[0]} would have fitted"


def sector_set(rows: Sequence[Row]) -> list[tuple[int, int]]:
    """Coverage as maximal intervals (cheap for long records)."""
    spans = sorted((r[0], r[0] + r[1]) for r in rows)
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def test_plan_compaction_reference_lengths() -> None:
    # the reference's compaction: long contiguous runs of 64-sector pieces become records of 16320 sectors;
    # 8-sector pieces 16376
    plan = plan_compaction(to_segments([(0, 40000, 8, False, 0)]))
    assert [r[1] for r in plan.index.rows()] == [16320, 16320, 40000 - 2 * 16320]
    rows = [(8 * i, 8, 1000 + 8 * i, False, 0) for i in range(3000)]
    plan = plan_compaction(to_segments(rows))
    assert plan.index.rows()[0][1] == 16376


# -- resolve --------------------------------------------------------------------------------------------------


@st.composite
def levels_and_query(draw: st.DrawFn) -> tuple[list[list[Row]], list[bool], int, int]:
    layers = draw(layer_stacks(min_layers=0, max_layers=5))
    mutable = [draw(st.booleans()) for _ in layers]
    start = draw(st.integers(0, 260))
    end = draw(st.integers(start + 1, 300))
    return layers, mutable, start, end


@settings(max_examples=200, deadline=None)
@given(levels_and_query())
def test_resolve_matches_sector_model(case: tuple[list[list[Row]], list[bool], int, int]) -> None:
    layers, mutable, start, end = case
    levels: list[Level] = []
    for k, (rows, mut) in enumerate(zip(layers, mutable, strict=True)):
        seg = to_segments(rows).with_tag(k)
        levels.append(MutableLevel(MutableIndex.from_segments(seg), source=k) if mut else MergedIndex(seg))
    pieces = resolve(levels, start, end)
    pos = start
    got: dict[int, tuple[int, int, int]] = {}
    for p_start, n, kind, src, moff in pieces:
        assert p_start == pos and n > 0, f"pieces do not tile [{start}, {end}): {pieces}"
        for s in range(p_start, p_start + n):
            got[s] = (kind, src, moff + (s - p_start) if kind == DATA else 0)
        pos += n
    assert pos == end, f"pieces end at {pos}, not {end}: {pieces}"
    for s in range(start, end):
        want: tuple[int, int, int] = (HOLE, -1, 0)
        for k, rows in enumerate(layers):
            hit = [r for r in rows if r[0] <= s < r[0] + r[1]]
            if hit:
                o, _ln, m, z, _t = hit[0]
                want = (ZERO, k, 0) if z else (DATA, k, m + (s - o))
                break
        assert got[s] == want, f"sector {s}: resolved to {got[s]}, the model says {want}"


# -- the chunked mutable index ----------------------------------------------------------------------------------


def _check_chunks(idx: MutableIndex) -> None:
    """The chunks' own invariants: none empty, none past twice the chunk size, their last ends noted in order."""
    chunks = idx._chunks
    assert all(ch.offs for ch in chunks), "an empty chunk"
    assert all(len(ch.offs) <= 2 * idx.CHUNK for ch in chunks), "a chunk past twice the chunk size"
    assert idx._lasts == [ch.ends[-1] for ch in chunks]
    assert len(idx) == sum(len(ch.offs) for ch in chunks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "remove", "apply"]), log_rows()), min_size=1, max_size=6),
       st.integers(1, 4), st.integers(0, 300), st.integers(1, 60))
def test_chunked_index_is_the_sector_model(ops: list[tuple[str, list[Row]]], chunk: int, start: int,
                                           span: int) -> None:
    """Inserts, removes and applied logs on chunks of 1-4 records (splits, emptied chunks, ranges across chunks)
    give what one flat model gives, sector by sector; rows() and covers() answer any range as the model does."""
    idx = type("SmallChunks", (MutableIndex,), {"__slots__": (), "CHUNK": chunk})()
    model: list[Row] = []  # every record in time order; a remove is a hole punched: kept as (o, ln, -1, ...)
    for op, rows in ops:
        if op == "insert":
            for o, ln, m, z, t in rows:
                idx.insert(o, ln, m, z, t)
                model.append((o, ln, m, z, t))
        elif op == "remove":
            for o, ln, _m, _z, _t in rows:
                idx.remove(o, ln)
                model.append((o, ln, -1, False, -1))
        else:
            idx.apply(to_segments(rows))
            model.extend(rows)
        _check_chunks(idx)
    per_sector: dict[int, tuple[int, bool, int]] = {}
    for o, ln, m, z, t in model:
        for s in range(o, o + ln):
            if m < 0:
                per_sector.pop(s, None)
            else:
                per_sector[s] = (m if z else m + (s - o), z, t)
    got = idx.segments()
    check_sorted_disjoint(got, "chunked index")
    assert sector_view(got.rows()) == per_sector
    end = start + span
    want = [r for r in got.rows() if r[0] < end and r[0] + r[1] > start]
    assert idx.rows(start, end, 7) == [(o, ln, m, z, 7) for o, ln, m, z, _t in want]
    assert idx.covers(start, end) == bool(want)


@settings(max_examples=60, deadline=None)
@given(log_rows(), big_logs(), st.integers(1, 5))
def test_chunked_index_applies_big_logs(first: list[Row], log: list[Row], chunk: int) -> None:
    """A log past the size inserted one by one is replayed and overlaid, and cut in chunks again: the same as one
    insert each, on an index already in chunks."""
    small: type[MutableIndex] = type("SmallChunks", (MutableIndex,), {"__slots__": (), "CHUNK": chunk})
    idx = small.from_segments(replay(to_segments(first)))
    _check_chunks(idx)
    one_by_one = small.from_segments(idx.segments())
    idx.apply(to_segments(log))
    for o, ln, m, z, t in log:
        one_by_one.insert(o, ln, m, z, t)
    _check_chunks(idx)
    _check_chunks(one_by_one)
    assert idx.segments().rows() == one_by_one.segments().rows() == replay_model(first + log)


# -- replay sorting once (the offset order passed down) ----------------------------------------------------------


def _replay_sorting_each_level(log: Segments) -> Segments:
    """:func:`replay` as it was before it sorted once: each half of the log in time sorted again by offset."""
    if len(log) == 0:
        return log
    by_offset = log.take(np.argsort(log.offset, kind="stable"))
    if is_sorted_disjoint(by_offset):
        return by_offset
    if len(log) <= idxmod._REPLAY_LEAF:
        idx = MutableIndex()
        for o, ln, m, z, t in log.rows():
            idx.insert(o, ln, m, z, t)
        return idx.segments()
    half = len(log) // 2
    return overlay(_replay_sorting_each_level(log.take(slice(half, len(log)))),
                   _replay_sorting_each_level(log.take(slice(0, half))))


@st.composite
def crowded_logs(draw: st.DrawFn) -> list[Row]:
    """Big logs (several levels of the divide and conquer) whose records mostly start at a few offsets, all tagged
    0 as in a real writable layer: only the time order tells records at one offset apart (the moffset is the
    record's place in the log), so a later record there must win."""
    n = draw(st.integers(idxmod._REPLAY_LEAF + 1, 700))
    starts = draw(st.lists(st.integers(0, 300), min_size=1, max_size=4))
    out: list[Row] = []
    for k in range(n):
        o = draw(st.sampled_from(starts)) if draw(st.integers(0, 9)) < 8 else draw(st.integers(0, 300))
        out.append((o, draw(st.sampled_from([1, 2, 8, 40])), k * 1000, draw(st.integers(0, 9)) == 0, 0))
    return out


@settings(max_examples=60, deadline=None)
@given(crowded_logs())
def test_replay_of_crowded_logs_is_the_inserts_and_the_old_replay(log: list[Row]) -> None:
    seg = to_segments(log)
    got = replay(seg).rows()
    assert got == _replay_sorting_each_level(seg).rows()
    assert got == inserted(log)
    check_sorted_disjoint(replay(seg), "replay")


@st.composite
def mostly_disjoint_logs(draw: st.DrawFn) -> list[Row]:
    """Big logs of disjoint records in a shuffled order (so that halves of the log are sorted and disjoint once in
    offset order: the replay returns them as its offset order gives them), with a few records over them here and
    there (some at the offset of an earlier one) so that the whole is not."""
    n = draw(st.integers(idxmod._REPLAY_LEAF + 1, 500))
    slots = draw(st.permutations(range(n)))
    out: list[Row] = [(s * 10, draw(st.integers(1, 10)), k * 1000, False, 0) for k, s in enumerate(slots)]
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, n - 1))
        o = draw(st.sampled_from([out[at][0], draw(st.integers(0, n * 10))]))
        out.insert(draw(st.integers(0, n)), (o, draw(st.integers(1, 30)), 7, draw(st.booleans()), 0))
    return [(o, ln, k * 1000 + 1 if m == 7 else m, z, t) for k, (o, ln, m, z, t) in enumerate(out)]


@settings(max_examples=60, deadline=None)
@given(mostly_disjoint_logs())
def test_replay_of_logs_with_disjoint_halves_is_the_inserts(log: list[Row]) -> None:
    seg = to_segments(log)
    got = replay(seg).rows()
    assert got == inserted(log) == _replay_sorting_each_level(seg).rows()
