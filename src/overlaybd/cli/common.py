"""What every command shares: sizes, JSON output, progress drawing."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..sizes import human, parse_size

if TYPE_CHECKING:
    from ..volume import Volume

__all__ = ["emit_json", "human", "open_volume", "parse_size", "progress_bar", "split_volume_ref"]


def open_volume(path: str) -> Volume:
    """A volume whose snapshots may still be in their repository (pulled lazily)."""
    from ..remote.lazy import RemoteLayers  # loaded by the commands that open volumes, not by every command
    from ..volume import Volume

    return Volume(path, opener=RemoteLayers())


def split_volume_ref(text: str) -> tuple[str, str | None]:
    """``VOL@SNAP`` -> (VOL, SNAP); a plain path -> (path, None)."""
    if "@" in text and not os.path.exists(text):
        vol, _, ref = text.rpartition("@")
        return vol, ref
    return text, None


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawn with rich on a terminal (stderr), or None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:  # an extra (pyoverlaybd[progress]), loaded when a bar is drawn; without it, no bar
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
    except ImportError:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
