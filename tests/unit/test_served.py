"""A served volume's snapshot exports: opened at their first read, reading as the snapshot."""

from __future__ import annotations

from pathlib import Path

from overlaybd.export.served import ServedVolume, SnapshotSource
from overlaybd.volume import Volume


def test_snapshot_exports_open_their_layers_at_the_first_read(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 1 << 20)
    for i in range(3):
        with vol.open(writable=True) as dev:
            dev.pwrite(i * 4096, bytes([i + 1]) * 8192)
            dev.flush()
        vol.snapshot(f"s{i}")
    with ServedVolume(vol, readonly=True) as served:
        snaps = [e.source for e in served.exports[1:]]
        assert len(snaps) == 3 and all(isinstance(s, SnapshotSource) for s in snaps)
        assert all(s._stack is None for s in snaps if isinstance(s, SnapshotSource))  # nothing opened yet
        assert [s.size for s in snaps] == [1 << 20] * 3
        for n, src in enumerate(snaps):
            with vol.open(snapshot=n) as want:
                assert src.pread(0, 5 * 4096) == want.pread(0, 5 * 4096)
                assert list(src.extents(0, 1 << 20)) == list(want.extents(0, 1 << 20))
        assert snaps[1].pread(4096, 8192) == b"\x02" * 8192
