"""Our writers produce the reference tools' bytes wherever the reference is deterministic.

Byte-identical: commit (of a writable pair, of a sealed file, of a sparse layer), seal in place (but for the
reference's uninitialised index padding), merge, zstd ZFiles, the tar envelope, and LZ4 ZFiles with 4 KiB blocks
(plain, tar-wrapped, merged, of an odd-sized raw file) on both block paths: each calls LZ4_compress_default as
the reference does. (64 KiB files of incompressible data differ by design: the reference stores blocks over
64 KiB that its own reader rejects, ours have 32 KiB blocks.)
Each writer is exercised through the Python API and through the command line.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zstandard

import overlaybd
from overlaybd import Compression
from overlaybd.cli.main import main as cli_main
from overlaybd.formats import tarwrap
from overlaybd.formats.detect import peel
from overlaybd.formats.zfile.spec import MAX_STORED_BLOCK
from overlaybd.source.file import FileSource

from .payloads import device_sha256

UUID_A = "a0000000-0000-4000-8000-00000000000a"
UUID_SPARSE = "a0000000-0000-4000-8000-00000000005a"
LSMT_HEADER = 4096
LSMT_RECORD = 16


def _bytes(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def _same_bytes(ours: Path | str, reference: Path | str) -> None:
    """Equal files, with the first difference named when they are not (a bare ``==`` on 1 MB says nothing)."""
    a, b = _bytes(ours), _bytes(reference)
    if a == b:
        return
    first = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    pytest.fail(f"{ours} differs from {reference}: sizes {len(a)} vs {len(b)}, first difference at byte {first}: "
                f"ours {a[first:first + 16].hex()} reference {b[first:first + 16].hex()}")


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)  # the fixtures are read-only; copyfile gives the copy a fresh, writable mode
    os.chmod(dst, 0o644)
    return dst


def _sparse_copy(src: Path, dst: Path) -> Path:
    """The sparse layer's index is its data file's allocation map: unwritten ranges are holes. The fixture copy
    lost those holes (git stores no holes), so every range would read as allocated and commit would copy 4 MiB
    of zeros as data. ``cp --sparse=always`` leaves a hole wherever a whole filesystem block is zero, which
    restores them: no written payload holds a zero block (rand, text and mixed never do; the ``zero`` kind is
    not used in the sparse operations), so the holes are exactly the unwritten and the discarded (hole-punched)
    ranges, as in the reference's own data file."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    os.chmod(dst, 0o644)
    st = os.stat(dst)
    assert st.st_blocks * 512 < st.st_size // 4, "cp --sparse=always left no holes (filesystem without holes?)"
    return dst


def _cli(*argv: str) -> None:
    code = cli_main(list(argv))
    assert code == 0, f"overlaybd {' '.join(argv)} exited {code}"


def _trailer_index(path: Path) -> tuple[int, int]:
    """(index_offset, index_size) from an LSMT trailer."""
    with open(path, "rb") as f:
        f.seek(-LSMT_HEADER, os.SEEK_END)
        trailer = f.read(LSMT_HEADER)
    offset, size = struct.unpack_from("<QQ", trailer, 32)
    return offset, size


# -- commit ------------------------------------------------------------------------------------------------------
def test_commit_of_writable_pair(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "committed.lsmt"
    with overlaybd.open_layer(str(reference_dir / "a/rw.data"), str(reference_dir / "a/rw.index")) as layer:
        overlaybd.commit(layer, str(out), uuid=UUID_A)
    _same_bytes(out, reference_dir / "a/committed.lsmt")


def test_commit_of_writable_pair_cli(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "committed.lsmt"
    _cli("layer", "commit", str(reference_dir / "a/rw.data"), str(reference_dir / "a/rw.index"), str(out),
         "--uuid", UUID_A)
    _same_bytes(out, reference_dir / "a/committed.lsmt")


def test_commit_cli_entry_point(reference_dir: Path, tmp_path: Path) -> None:
    """The installed ``overlaybd`` command (a separate process), as a user runs it."""
    exe = Path(sys.executable).with_name("overlaybd")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "overlaybd.cli.main"]
    out = tmp_path / "committed.lsmt"
    done = subprocess.run([*cmd, "layer", "commit", str(reference_dir / "a/rw.data"),
                           str(reference_dir / "a/rw.index"), str(out), "--uuid", UUID_A],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    _same_bytes(out, reference_dir / "a/committed.lsmt")
    # an existing output is never replaced without -f: exit 2 (usage), file untouched
    again = subprocess.run([*cmd, "layer", "commit", str(reference_dir / "a/rw.data"),
                            str(reference_dir / "a/rw.index"), str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr
    _same_bytes(out, reference_dir / "a/committed.lsmt")


def test_commit_of_sealed_file(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "committed_from_sealed.lsmt"
    with overlaybd.open_layer(str(reference_dir / "a/sealed.lsmt")) as layer:
        overlaybd.commit(layer, str(out), uuid=UUID_A)
    _same_bytes(out, reference_dir / "a/committed_from_sealed.lsmt")
    out_cli = tmp_path / "cli.lsmt"
    _cli("layer", "commit", str(reference_dir / "a/sealed.lsmt"), str(out_cli), "--uuid", UUID_A)
    _same_bytes(out_cli, reference_dir / "a/committed_from_sealed.lsmt")


def test_commit_of_sparse_layer(reference_dir: Path, tmp_path: Path) -> None:
    data = _sparse_copy(reference_dir / "a/sparse_rw.data", tmp_path / "sparse.data")
    out = tmp_path / "sparse_committed.lsmt"
    with overlaybd.open_layer(str(data)) as layer:
        overlaybd.commit(layer, str(out), uuid=UUID_SPARSE)
    _same_bytes(out, reference_dir / "a/sparse_committed.lsmt")
    out_cli = tmp_path / "cli.lsmt"
    _cli("layer", "commit", str(data), str(out_cli), "--uuid", UUID_SPARSE)
    _same_bytes(out_cli, reference_dir / "a/sparse_committed.lsmt")


# -- seal in place -----------------------------------------------------------------------------------------------
def _assert_sealed_like_reference(ours: Path, reference: Path) -> None:
    """Identical but for the bytes between the end of the index and the trailer: the reference pads its index
    to a whole sector with an uninitialised buffer (heap garbage), ours pads with zeros."""
    a, b = _bytes(ours), _bytes(reference)
    assert len(a) == len(b)
    index_offset, index_size = _trailer_index(reference)
    assert _trailer_index(ours) == (index_offset, index_size)
    index_end = index_offset + LSMT_RECORD * index_size
    trailer_at = len(b) - LSMT_HEADER
    assert trailer_at - index_end == -(LSMT_RECORD * index_size) % 512  # padding to a whole sector, no more
    assert a[:index_end] == b[:index_end]
    assert a[trailer_at:] == b[trailer_at:]
    assert a[index_end:trailer_at] == bytes(trailer_at - index_end)


def test_seal_in_place(reference_dir: Path, tmp_path: Path, manifest: dict[str, Any]) -> None:
    data = _writable_copy(reference_dir / "a/rw.data", tmp_path / "rw.data")
    index = _writable_copy(reference_dir / "a/rw.index", tmp_path / "rw.index")
    overlaybd.seal(str(data), str(index))
    _assert_sealed_like_reference(data, reference_dir / "a/sealed.lsmt")
    with overlaybd.open_layer(str(data)) as layer:
        truth = manifest["ground_truth"]["a"]
        assert device_sha256(layer) == (truth["size"], truth["sha256"])


def test_seal_in_place_cli(reference_dir: Path, tmp_path: Path) -> None:
    data = _writable_copy(reference_dir / "a/rw.data", tmp_path / "rw.data")
    index = _writable_copy(reference_dir / "a/rw.index", tmp_path / "rw.index")
    _cli("layer", "commit", "--seal", str(data), str(index))
    _assert_sealed_like_reference(data, reference_dir / "a/sealed.lsmt")


# -- merge -------------------------------------------------------------------------------------------------------
def _b_layers(reference_dir: Path) -> list[str]:
    return [str(reference_dir / f"b/layer{k}.lsmt") for k in (1, 2, 3)]


def test_merge_plain(reference_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.lsmt"
    layers = [overlaybd.open_layer(p) for p in _b_layers(reference_dir)]
    try:
        overlaybd.merge(layers, str(out))
    finally:
        for layer in layers:
            layer.close()
    _same_bytes(out, reference_dir / "d/merged.lsmt")
    out_cli = tmp_path / "cli.lsmt"
    _cli("layer", "merge", *_b_layers(reference_dir), "-o", str(out_cli), "--no-compress")
    _same_bytes(out_cli, reference_dir / "d/merged.lsmt")


def test_merge_zfile_round_trips(reference_dir: Path, tmp_path: Path) -> None:
    """d/merged.zfile is LZ4: ours decompresses to d/merged.lsmt and is the reference's file byte for byte."""
    out = tmp_path / "merged.zfile"
    _cli("layer", "merge", *_b_layers(reference_dir), "-o", str(out), "--algorithm", "lz4", "--bs", "4")
    plain = tmp_path / "merged.lsmt"
    _cli("zfile", "decompress", str(out), str(plain))
    _same_bytes(plain, reference_dir / "d/merged.lsmt")
    assert overlaybd.verify_zfile(str(out)).nblocks == 278
    _same_bytes(out, reference_dir / "d/merged.zfile")


@pytest.mark.parametrize("name, crc", [("c/layer1.lz4.bs4k.zfile", True), ("c/layer1.lz4.bs4k.nocrc.zfile", False)])
def test_lz4_zfile_4k_is_the_reference_bytes(reference_dir: Path, tmp_path: Path, name: str, crc: bool) -> None:
    out = tmp_path / "layer1.zfile"
    overlaybd.compress(str(reference_dir / "b/layer1.lsmt"), str(out), Compression("lz4", 4096, verify=crc))
    _same_bytes(out, reference_dir / name)
    out_cli = tmp_path / "cli.zfile"
    _cli("zfile", "compress", "--algorithm", "lz4", "--bs", "4", *([] if crc else ["--no-crc"]),
         str(reference_dir / "b/layer1.lsmt"), str(out_cli))
    _same_bytes(out_cli, reference_dir / name)


def test_lz4_zfile_of_an_odd_sized_raw_file_is_the_reference_bytes(reference_dir: Path, tmp_path: Path) -> None:
    """c/raw_odd.lz4.bs4k.zfile holds a 300,001-byte file: decompress it, compress that again, same bytes."""
    raw = tmp_path / "raw_odd.bin"
    _cli("zfile", "decompress", str(reference_dir / "c/raw_odd.lz4.bs4k.zfile"), str(raw))
    assert raw.stat().st_size == 300_001
    out = tmp_path / "raw_odd.zfile"
    _cli("zfile", "compress", "--algorithm", "lz4", "--bs", "4", str(raw), str(out))
    _same_bytes(out, reference_dir / "c/raw_odd.lz4.bs4k.zfile")


# -- ZFile -------------------------------------------------------------------------------------------------------
def test_zstd_zfile_4k(reference_dir: Path, tmp_path: Path) -> None:
    reference = reference_dir / "c/layer1.zstd.bs4k.zfile"
    out = tmp_path / "layer1.zstd.bs4k.zfile"
    overlaybd.compress(str(reference_dir / "b/layer1.lsmt"), str(out), Compression("zstd", 4096))
    # zstd's output depends on the libzstd version: say which one when it differs
    assert _bytes(out) == _bytes(reference), f"zstd ZFile differs (libzstd {zstandard.ZSTD_VERSION})"
    out_cli = tmp_path / "cli.zfile"
    _cli("zfile", "compress", "--algorithm", "zstd", "--bs", "4", str(reference_dir / "b/layer1.lsmt"), str(out_cli))
    assert _bytes(out_cli) == _bytes(reference), f"zstd ZFile differs (libzstd {zstandard.ZSTD_VERSION})"


@pytest.mark.parametrize("block_kib", [4, 64])
@pytest.mark.parametrize("crc", [True, False])
def test_lz4_zfile_round_trips(reference_dir: Path, tmp_path: Path, block_kib: int, crc: bool) -> None:
    src = reference_dir / "b/layer1.lsmt"
    out = tmp_path / "layer1.zfile"
    w = overlaybd.compress(str(src), str(out), Compression("lz4", block_kib * 1024, verify=crc))
    assert w.zfile is not None
    # 64 KiB blocks of incompressible data would need stored blocks over 64 KiB, which the reference reader
    # rejects (the reference's own c/layer1.lz4.bs64k.zfile has them): ours fall back to 32 KiB blocks
    assert w.zfile.block_size in ({4096} if block_kib == 4 else {65536, 32768})
    back = tmp_path / "layer1.lsmt"
    overlaybd.decompress(str(out), str(back))
    _same_bytes(back, src)
    with FileSource(out) as f:
        z = peel(f).zfile
        assert z is not None
        assert z.verify is crc and z.info.algo_name == "lz4"
        assert max(z.stored_lengths()) <= MAX_STORED_BLOCK
        blocks = z.nblocks
    if crc:
        assert overlaybd.verify_zfile(str(out)).nblocks == blocks
        _cli("zfile", "verify", str(out))
    # and it opens as the layer it holds
    with overlaybd.open_layer(str(out)) as layer, overlaybd.open_layer(str(src)) as plain:
        assert device_sha256(layer) == device_sha256(plain)


def test_lz4_zfile_cli_round_trip(reference_dir: Path, tmp_path: Path) -> None:
    src = reference_dir / "b/layer1.lsmt"
    out = tmp_path / "layer1.lz4.zfile"
    _cli("zfile", "compress", "--algorithm", "lz4", "--bs", "4", str(src), str(out))
    back = tmp_path / "back.lsmt"
    _cli("zfile", "decompress", str(out), str(back))
    _same_bytes(back, src)
    _cli("zfile", "verify", str(out))


# -- tar envelope ------------------------------------------------------------------------------------------------
def test_tar_envelope_prefix_matches_reference(reference_dir: Path) -> None:
    reference = _bytes(reference_dir / "c/layer1.lz4.bs4k.zfile.tar")
    zfile_size = (reference_dir / "c/layer1.lz4.bs4k.zfile").stat().st_size
    assert zfile_size == 468160
    head, end_at, total = tarwrap.envelope(zfile_size, 0o100644)
    assert head == reference[: tarwrap.PAYLOAD_OFFSET]
    assert total == len(reference)
    assert reference[end_at:] == bytes(total - end_at) and total - end_at == 1024
    # the payload between is the plain ZFile the same command wrote without -t
    assert reference[tarwrap.PAYLOAD_OFFSET : tarwrap.PAYLOAD_OFFSET + zfile_size] == \
        _bytes(reference_dir / "c/layer1.lz4.bs4k.zfile")


def test_tar_wrapped_zfile_we_write(reference_dir: Path, tmp_path: Path, manifest: dict[str, Any]) -> None:
    """Our -t output: the reference envelope around our ZFile, and it reads back as b/layer1."""
    out = tmp_path / "layer1.lz4.bs4k.zfile.tar"
    _cli("zfile", "compress", "-t", "--algorithm", "lz4", "--bs", "4", str(reference_dir / "b/layer1.lsmt"),
         str(out))
    plain = tmp_path / "layer1.lz4.bs4k.zfile"
    _cli("zfile", "compress", "--algorithm", "lz4", "--bs", "4", str(reference_dir / "b/layer1.lsmt"), str(plain))
    data, payload = _bytes(out), _bytes(plain)
    head, end_at, total = tarwrap.envelope(len(payload), os.stat(out).st_mode)
    assert os.stat(out).st_mode == 0o100644
    assert len(data) == total
    assert data[: tarwrap.PAYLOAD_OFFSET] == head
    assert data[tarwrap.PAYLOAD_OFFSET : tarwrap.PAYLOAD_OFFSET + len(payload)] == payload
    assert data[tarwrap.PAYLOAD_OFFSET + len(payload) :] == bytes(total - tarwrap.PAYLOAD_OFFSET - len(payload))
    reference = _bytes(reference_dir / "c/layer1.lz4.bs4k.zfile.tar")
    assert head == tarwrap.envelope(len(payload), 0o100644)[0]
    assert reference[: tarwrap.PAYLOAD_OFFSET] == tarwrap.envelope(468160, 0o100644)[0]
    truth = manifest["ground_truth"]["b1"]
    with overlaybd.open_stack([str(out)]) as stack:
        assert device_sha256(stack) == (truth["size"], truth["sha256"])
    _same_bytes(out, reference_dir / "c/layer1.lz4.bs4k.zfile.tar")


def test_commit_compressed_and_tarred(reference_dir: Path, tmp_path: Path, manifest: dict[str, Any]) -> None:
    """``layer commit -z -t``: the reference's committed bytes, inside a ZFile (header overwritten, as
    ``overlaybd-commit -z`` writes it) inside the tar envelope."""
    out = tmp_path / "committed.tar"
    _cli("layer", "commit", str(reference_dir / "a/rw.data"), str(reference_dir / "a/rw.index"), str(out),
         "--uuid", UUID_A, "-z", "-t", "--algorithm", "zstd", "--bs", "4")
    back = tmp_path / "back.lsmt"
    _cli("zfile", "decompress", str(out), str(back))
    _same_bytes(back, reference_dir / "a/committed.lsmt")
    with FileSource(out) as f:
        peeled = peel(f)
        assert peeled.wrappers == ["tar", "zfile"]
        assert peeled.tar is not None and peeled.tar.offset == tarwrap.PAYLOAD_OFFSET
        assert peeled.zfile is not None and peeled.zfile.info.overwritten  # commit -z overwrites the header
    truth = manifest["ground_truth"]["a"]
    with overlaybd.open_layer(str(out)) as layer:
        assert device_sha256(layer) == (truth["size"], truth["sha256"])
