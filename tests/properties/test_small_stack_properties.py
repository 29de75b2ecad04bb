"""The numpy-free merge (``formats.lsmt.small_stack``) gives exactly the records the numpy index logic gives: the
same fragments, ``moffset`` and source for every layer stack and every writable log."""

from __future__ import annotations

from hypothesis import given, settings

from overlaybd.formats.lsmt import small_stack
from overlaybd.formats.lsmt.index import merge_layers, replay
from overlaybd.testing.strategies import (
    Row,
    big_logs,
    disjoint_rows,
    layer_stacks,
    log_rows,
    to_segments,
    writable_logs,
)


def merged_in_python(layers: list[list[Row]]) -> list[Row]:
    """Layers top-most first, each tagged with its position, merged as ``open_small`` merges them (and, the same,
    as a fold of overlays from the bottom up)."""
    tagged = [[(o, ln, m, z, k) for o, ln, m, z, _t in rows] for k, rows in enumerate(layers)]
    folded: list[Row] = []
    for rows in tagged:
        folded = small_stack.overlay(folded, rows)
    merged = small_stack.merge(tagged)
    assert merged == folded
    return merged


def merged_by_numpy(layers: list[list[Row]]) -> list[Row]:
    return merge_layers([to_segments(rows).with_tag(k) for k, rows in enumerate(layers)]).rows()


@settings(max_examples=300, deadline=None)
@given(layer_stacks())
def test_merge_gives_the_records_of_merge_layers(layers: list[list[Row]]) -> None:
    assert merged_in_python(layers) == merged_by_numpy(layers)


@settings(max_examples=40, deadline=None)
@given(layer_stacks(min_layers=5, max_layers=16, max_records=40, max_gap=20, max_length=30))
def test_merge_of_many_layers(layers: list[list[Row]]) -> None:
    assert merged_in_python(layers) == merged_by_numpy(layers)


@settings(max_examples=150, deadline=None)
@given(disjoint_rows(), disjoint_rows())
def test_overlay_gives_the_records_of_index_overlay(top: list[Row], bottom: list[Row]) -> None:
    assert merged_in_python([top, bottom]) == merged_by_numpy([top, bottom])


@settings(max_examples=300, deadline=None)
@given(log_rows())
def test_replay_gives_the_records_of_index_replay(log: list[Row]) -> None:
    assert small_stack.replay(log) == replay(to_segments(log)).rows()


@settings(max_examples=150, deadline=None)
@given(writable_logs(max_size=80))
def test_replay_of_writable_logs(log: list[Row]) -> None:
    assert small_stack.replay(log) == replay(to_segments(log)).rows()


@settings(max_examples=30, deadline=None)
@given(big_logs())
def test_replay_of_long_logs(log: list[Row]) -> None:
    assert small_stack.replay(log) == replay(to_segments(log)).rows()


def test_nothing_merges_to_nothing() -> None:
    assert small_stack.overlay([], []) == [] and small_stack.replay([]) == [] and small_stack.merge([]) == []
