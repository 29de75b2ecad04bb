"""Attachment records: a detach removes its own record only, never that of a later attach of the same device."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from overlaybd.export import loop


def test_a_detach_leaves_the_record_of_a_later_attach_of_the_same_device(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "STATE", str(tmp_path))
    ours = loop.Attachment("/dev/loop9", str(tmp_path / "fuse-ours"), 101, "vol", None, True, "ours.log")
    later = loop.Attachment("/dev/loop9", str(tmp_path / "fuse-later"), 102, "other", None, False, "later.log")
    record = tmp_path / "loop9.json"
    record.write_text(json.dumps(asdict(later)))  # the device was freed by our detach and attached again
    loop._forget("/dev/loop9", ours)
    assert loop.attachment("/dev/loop9") == later
    loop._forget("/dev/loop9", later)
    assert not record.exists()
    loop._forget("/dev/loop9", later)  # gone already: nothing to do
