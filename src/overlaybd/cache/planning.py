"""Which chunks a read needs and how to fetch them (pure; no I/O)."""

from __future__ import annotations


def chunk_span(offset: int, length: int, chunk: int) -> tuple[int, int]:
    """First and one-past-last chunk numbers covering ``[offset, offset+length)``."""
    return offset // chunk, -(-(offset + length) // chunk)


def plan_fetches(present: bytes | bytearray | memoryview, first: int, last: int, *, readahead: int,
                 nchunks: int, max_run: int) -> list[tuple[int, int]]:
    """Runs ``(start_chunk, count)`` to fetch so that chunks ``first..last-1`` are present. ``present[i]`` says
    whether chunk ``first + i`` is there (it may reach past ``last``, to cover the read-ahead window).

    Missing chunks are grouped into runs of at most ``max_run``; the last run is extended by up to ``readahead``
    chunks past ``last`` while they are missing (sequential readers then find the next chunks cached).
    """
    runs: list[tuple[int, int]] = []
    k = first
    while k < last:
        if present[k - first]:
            k += 1
            continue
        start = k
        while k < last and not present[k - first] and k - start < max_run:
            k += 1
        runs.append((start, k - start))
    if readahead and runs and runs[-1][0] + runs[-1][1] == last:
        start, count = runs[-1]
        end = last
        while end < min(nchunks, last + readahead, first + len(present)) and not present[end - first] \
                and end - start < max_run:
            end += 1
        runs[-1] = (start, end - start)
    return runs
