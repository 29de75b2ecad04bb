"""The pieces of the converter: name cleaning, the changed-block writer, the base layer's Go tar envelope, layer
blobs (gzip, zstd, plain; cut short or wrong), the ext4 engine's limits and the applier's refusals."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from overlaybd.convert import baselayer, ext2fs, ext4, tarlayer
from overlaybd.convert.applier import Applier, ApplyError, clean
from overlaybd.convert.delta import changed_runs, merged_blocks
from overlaybd.convert.ext4 import Attributes, Ext4Image
from overlaybd.errors import FormatError
from overlaybd.source.file import MemorySource


@pytest.mark.parametrize("name,want", [
    (b"a//b/./c/", (False, (b"a", b"b", b"c"))), (b"/x/../y", (True, (b"y",))), (b"../../etc", (False, (b"etc",))),
    (b"./", (False, ())), (b"/", (True, ())), (b"a/../..", (False, ())), (b"a/b/../../c", (False, (b"c",))),
])
def test_clean_names(name: bytes, want: tuple[bool, tuple[bytes, ...]]) -> None:
    assert clean(name) == want


def test_merged_blocks() -> None:
    assert merged_blocks([(5000, 10), (0, 1), (4096, 1), (9000, 8000), (100_000, 0)], 12288) == [(0, 12288)]
    assert merged_blocks([(8192, 4096), (0, 4096)], 1 << 20) == [(0, 4096), (8192, 12288)]


def test_changed_runs_are_the_blocks_that_differ() -> None:
    old = bytearray(64 * 4096)
    old[4096:8192] = b"a" * 4096
    new = bytearray(old)
    new[0:4096] = b"b" * 4096  # changed
    new[4096:8192] = bytes(4096)  # changed to zeros
    new[12288:16384] = b"d" * 4096  # changed, next to an unchanged block
    new[20 * 4096:21 * 4096] = b"c" * 4096  # changed, but outside the ranges written: not looked at
    changes = changed_runs(MemorySource(bytes(new)), MemorySource(bytes(old)), [(0, 4 * 4096), (40 * 4096, 4096)])
    assert changes.runs == [(0, 4096, False), (4096, 4096, True), (12288, 4096, False)]
    assert changes.compared == 5 * 4096
    seg = changes.segments()
    assert seg.offset.tolist() == [0, 8, 24] and seg.moffset.tolist() == [0, 8, 24]  # data read in place
    assert seg.zeroed.tolist() == [False, True, False]
    fresh = changed_runs(MemorySource(bytes(new)), None, [(0, 64 * 4096)])  # nothing below: zeros stay out
    assert [r for r in fresh.runs if r[2]] == [] and fresh.data_bytes == 3 * 4096


def test_zero_runs_are_cut_to_what_a_record_holds() -> None:
    from overlaybd.convert.delta import Changes

    seg = Changes([(0, 20 << 20, True), (20 << 20, 20 << 20, False)]).segments()
    assert seg.length.tolist() == [16383, 16383, 40960 - 2 * 16383, 40960]


def test_base_layer_envelope_is_gos(tmp_path: Path) -> None:
    src = tmp_path / "ext4_64"
    src.write_bytes(b"L" * 4_737_695)
    out = baselayer.wrap(str(src), str(tmp_path / "base.tar"))
    assert out.size == 4_739_584  # the size of the reference's uploaded base layer
    data = (tmp_path / "base.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        (member,) = tf.getmembers()
        assert (member.name, member.mode, member.size, member.mtime, member.uname) == ("overlaybd.commit", 0o444,
                                                                                        4_737_695, 0, "")
    header = data[:512]
    assert header[100:108] == b"0000444\0" and header[148:156].endswith(b"\0 ") and header[257:265] == b"ustar\x0000"
    assert data[-1024:] == bytes(1024)


TAR = io.BytesIO()
with tarfile.open(fileobj=TAR, mode="w", format=tarfile.PAX_FORMAT) as _tf:
    _ti = tarfile.TarInfo("f")
    _ti.size = 5
    _ti.pax_headers = {"SCHILY.xattr.user.b": "2", "SCHILY.xattr.user.a": "1", "mtime": "1700000000.9"}
    _tf.addfile(_ti, io.BytesIO(b"hello"))
PLAIN = TAR.getvalue()


@pytest.mark.parametrize("packed,kind", [
    (PLAIN, "tar"), (gzip.compress(PLAIN[:5000]) + gzip.compress(PLAIN[5000:]), "gzip"),
    (zstandard.ZstdCompressor().compress(PLAIN), "zstd"),
])
def test_unpack_blob(tmp_path: Path, packed: bytes, kind: str) -> None:
    (tmp_path / "blob").write_bytes(packed)
    got_kind, diff_id = tarlayer.unpack_blob(str(tmp_path / "blob"), str(tmp_path / "layer.tar"))
    assert got_kind == kind and (tmp_path / "layer.tar").read_bytes() == PLAIN
    import hashlib

    assert diff_id == "sha256:" + hashlib.sha256(PLAIN).hexdigest()
    seen = [(e.xattrs, e.mtime, list(e.pieces())) for e in tarlayer.read_entries(str(tmp_path / "layer.tar"))]
    assert seen == [([(b"user.a", b"1"), (b"user.b", b"2")], 1_700_000_000, [(0, b"hello")])]


@pytest.mark.parametrize("packed", [gzip.compress(PLAIN)[:-20], b"\x1f\x8b" + b"\x00" * 50,
                                    zstandard.ZstdCompressor().compress(PLAIN)[:-5]])
def test_bad_blobs_are_format_errors(tmp_path: Path, packed: bytes) -> None:
    (tmp_path / "blob").write_bytes(packed)
    with pytest.raises(FormatError):
        tarlayer.unpack_blob(str(tmp_path / "blob"), str(tmp_path / "layer.tar"))


def test_garbage_is_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "layer.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(FormatError):
        list(tarlayer.read_entries(str(tmp_path / "layer.tar")))


def test_superblock_template_is_make_extfs() -> None:
    sb = ext4.superblock_template(64 << 30)
    blocks, = struct.unpack_from("<I", sb, 4)
    inodes, = struct.unpack_from("<I", sb, 0)
    reserved, = struct.unpack_from("<I", sb, 8)
    assert (blocks, inodes, reserved) == (16 << 20, 4 << 20, int(0.05 * (16 << 20)))
    assert struct.unpack_from("<III", sb, 92) == (0x238, 0x2C2, 0x6B)
    with pytest.raises(Exception, match="too small"):
        ext4.superblock_template(1 << 20)


def test_times_beyond_32_bits_use_the_epoch_bits() -> None:
    inode = ext2fs.ext2_inode_large()
    ext4.set_times(inode, 4_200_000_000)
    assert (inode.i_mtime, inode.i_mtime_extra) == (4_200_000_000 - (1 << 32) + (1 << 32), 1)
    ext4.set_times(inode, -1)
    assert (inode.i_mtime, inode.i_mtime_extra) == (0xFFFFFFFF, 0)


@pytest.fixture()
def image(tmp_path: Path) -> Ext4Image:
    return Ext4Image.make(str(tmp_path / "fs.raw"), 32 << 20)


def entry(name: bytes, kind: str = "file", data: bytes = b"", link: bytes = b"") -> tarlayer.TarEntry:
    e = tarlayer.TarEntry(kind, name, link, 0o644, 0, 0, 0, len(data))
    if kind == "file":
        e._reader = lambda: io.BytesIO(data)
    return e


@pytest.mark.parametrize("entries,message", [
    ([entry(b"f", "link", link=b"missing")], "not in the image"),
    ([entry(b"d/", "dir"), entry(b"h", "link", link=b"d")], "hard link to a directory"),
    ([entry(b"x" * 256)], "256 bytes"),
    ([entry(b"f"), entry(b"f/g")], "not a directory"),
    ([entry(b"d/", "dir"), entry(b"d/a"), entry(b"d")], "holding entries of this same layer"),
    ([entry(b"l", "symlink", link=b"l"), entry(b"l/x")], "too many symlinks"),
])
def test_applier_refuses_with_the_entry_named(image: Ext4Image, entries: list[tarlayer.TarEntry],
                                              message: str) -> None:
    try:
        with pytest.raises(ApplyError, match=message):
            Applier(image).apply(entries)
    finally:
        image.abandon()


def test_engine_round_trip(image: Ext4Image) -> None:
    root = 2
    f = image.create(root, b"file", Attributes(7, 8, 1_000, 0o4750))
    image.write_data(f, [(0, b"abc"), (1 << 20, b"def")], 3 << 20)
    image.set_xattrs(f, [(b"user.k", b"v"), (b"security.capability", bytes(20))])
    d = image.mkdir(root, b"dir", 0o700)
    image.symlink(d, b"link", b"../file")
    image.hard_link(d, b"same", f)
    names = {e.name: e.file_type for e in image.entries(root)}
    assert names == {b"lost+found": 2, b"file": 1, b"dir": 2}
    assert image.readlink(image.lookup(d, b"link")) == b"../file"
    inode = image.read_inode(f)
    assert (inode.i_mode & 0o7777, inode.i_uid, inode.i_gid, inode.i_links_count, inode.i_size_high << 32 |
            inode.i_size) == (0o4750, 7, 8, 2, 3 << 20)
    assert image.read_data(f, 3)[:3] == b"abc"
    image.unlink(d, b"same", f)
    image.unlink(root, b"file", f)
    assert image.read_inode(f).i_dtime == ext4.DELETED_DTIME
    ranges = image.close()
    assert len(ranges) and (ranges[:, 1] > 0).all()
    fsck = __import__("subprocess").run(["e2fsck", "-fn", image.path], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    raw = np.fromfile(image.path, dtype=np.uint8, count=2048)
    assert struct.unpack_from("<I", raw.tobytes(), 1024 + 48) == (0,)  # no write time, as the reference


def test_a_full_filesystem_is_a_clear_error(image: Ext4Image) -> None:
    big = tarlayer.TarEntry("file", b"big", b"", 0o644, 0, 0, 0, 40 << 20)
    big._reader = lambda: io.BytesIO(bytes(40 << 20))
    try:
        with pytest.raises(Exception, match="inode") as info:
            Applier(image).apply([big])
        assert "fs.raw" in str(info.value)
    finally:
        image.abandon()
