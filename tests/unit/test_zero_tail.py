"""A writable layer's index file that ends in all-zero records (a crash after the file grew, before their bytes
were written): the tail is torn, ignored as torn records are (and cut off when opened writable); an all-zero
record before one that is not is corruption."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from overlaybd.errors import CorruptIndexError
from overlaybd.formats.lsmt.spec import HEADER_SIZE, RECORD_SIZE
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable
from overlaybd.inspection import check_layer
from overlaybd.operations import commit

SIZE = 1 << 20


def _layer(tmp_path: Path) -> tuple[str, str]:
    """A writable layer with three records: 4 KiB of 0x01 at 0, of 0x02 at 8 KiB, zeros written at 64 KiB."""
    d, i = str(tmp_path / "u.data"), str(tmp_path / "u.index")
    create_writable(d, i, SIZE)
    layer = WritableLayer(d, i)
    try:
        layer.pwrite(0, b"\x01" * 4096)
        layer.pwrite(8192, b"\x02" * 4096)
        layer.write_zeroes(65536, 4096)
        layer.flush()
    finally:
        layer.close()
    return d, i


def _grow(index: str, records: int) -> None:
    with open(index, "r+b") as f:
        f.truncate(os.path.getsize(index) + records * RECORD_SIZE)  # the bytes read as zeros


def _reads_as_written(layer: WritableLayer) -> None:
    assert layer.records() == 3
    assert layer.pread(0, 12288) == b"\x01" * 4096 + bytes(4096) + b"\x02" * 4096


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
def test_all_zero_records_at_the_end_are_a_torn_tail(tmp_path: Path, readonly: bool) -> None:
    d, i = _layer(tmp_path)
    written = os.path.getsize(i)
    _grow(i, 5)
    layer = WritableLayer(d, i, readonly=readonly)
    try:
        _reads_as_written(layer)
        assert layer.torn_records == 5
        if not readonly:  # cut off before anything is appended, as torn records are
            assert os.path.getsize(i) == written
            layer.pwrite(4096, b"\x03" * 4096)
            layer.flush()
    finally:
        layer.close()
    assert os.path.getsize(i) == written + (RECORD_SIZE if not readonly else 5 * RECORD_SIZE)
    again = WritableLayer(d, i, readonly=True)
    try:
        middle = b"\x03" * 4096 if not readonly else bytes(4096)
        assert again.pread(0, 12288) == b"\x01" * 4096 + middle + b"\x02" * 4096
    finally:
        again.close()


def test_an_index_of_zero_records_only_is_empty(tmp_path: Path) -> None:
    d, i = str(tmp_path / "u.data"), str(tmp_path / "u.index")
    create_writable(d, i, SIZE)
    _grow(i, 3)
    layer = WritableLayer(d, i)
    try:
        assert (layer.records(), layer.torn_records, os.path.getsize(i)) == (0, 3, HEADER_SIZE)
    finally:
        layer.close()


def test_a_zero_record_before_one_that_is_not_is_corruption(tmp_path: Path) -> None:
    d, i = _layer(tmp_path)
    with open(i, "r+b") as f:
        f.seek(HEADER_SIZE + RECORD_SIZE)  # the second of three records
        f.write(bytes(RECORD_SIZE))
    _grow(i, 2)  # a zero tail after it changes nothing
    with pytest.raises(CorruptIndexError) as exc:
        WritableLayer(d, i, readonly=True)
    assert "index record 1 is all zeros, and record 2 after it is not" in str(exc.value)
    assert exc.value.offset == HEADER_SIZE + RECORD_SIZE


def test_check_reports_the_torn_tail_and_says_ok(tmp_path: Path) -> None:
    d, i = _layer(tmp_path)
    _grow(i, 2)
    report = check_layer(d, i)
    assert not report["errors"] and any("2 index record(s)" in w for w in report["warnings"]), report


def test_the_reference_commits_the_layer_once_opened_writable_cut_the_tail(tmp_path: Path) -> None:
    """After a writable open cut the zero tail off (and a write after it), the reference's overlaybd-commit reads
    the layer and commits it to the bytes ours does."""
    folder = os.environ.get("OVERLAYBD_REFERENCE_TOOLS")
    tool = Path(folder) / "overlaybd-commit" if folder else None
    if tool is None or not tool.exists():
        pytest.skip("set OVERLAYBD_REFERENCE_TOOLS to the reference tools' folder to commit with overlaybd-commit")
    d, i = _layer(tmp_path)
    _grow(i, 4)
    layer = WritableLayer(d, i)
    try:
        layer.pwrite(4096, b"\x03" * 4096)
        layer.flush()
    finally:
        layer.close()
    uuid = "11111111-2222-3333-4444-555555555555"
    subprocess.run([str(tool), d, i, str(tmp_path / "ref.commit"), "--uuid", uuid], check=True, capture_output=True)
    with WritableLayer(d, i, readonly=True) as again:
        commit(again, str(tmp_path / "our.commit"), uuid=uuid)
    assert (tmp_path / "ref.commit").read_bytes() == (tmp_path / "our.commit").read_bytes()
