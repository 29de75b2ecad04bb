"""Wrong magics, and the tar envelope's records: a typed error naming the file, never a crash."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import overlaybd
from overlaybd.errors import (
    BadMagicError,
    FormatError,
    LimitError,
    OverlaybdError,
    TruncatedError,
)
from overlaybd.formats.detect import peel
from overlaybd.source.file import FileSource

from ...oracle import (
    LSMT_HEADER,
    ZREC,
    Reads,
    pax_record_span,
)
from ..mutations import check_error, judge, observe_device
from .common import (
    TAR,
    Baseline,
    seeded_rng,
)

pytestmark = pytest.mark.fixtures


# -- 4. wrong magics -------------------------------------------------------------------------------------------------


def _gnu_tar(member: Path, out: Path, fmt: int) -> None:
    with tarfile.open(out, "w", format=fmt) as tf:
        tf.add(member, arcname="overlaybd.commit")


@pytest.mark.parametrize("kind", ["empty", "one-byte", "23-bytes", "zeros", "random", "png", "gnu-tar",
                                  "zfile-magic-only", "lsmt-magic-only", "zfile-header-zeros"])
def test_wrong_magic(kind: str, reference_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.bin"
    rng = seeded_rng(kind)
    lsmt_magic = (reference_dir / "a/committed.lsmt").read_bytes()[:24]
    zmagic = (reference_dir / "c/layer1.lz4.bs4k.zfile").read_bytes()[:24]
    content = {
        "empty": b"",
        "one-byte": b"L",
        "23-bytes": lsmt_magic[:23],
        "zeros": bytes(3 * LSMT_HEADER),
        "random": rng.randbytes(65536),
        "png": bytes.fromhex("89504E470D0A1A0A0000000D49484452") + rng.randbytes(8192),
        "zfile-magic-only": zmagic,
        "lsmt-magic-only": lsmt_magic,
        "zfile-header-zeros": zmagic + bytes(ZREC - 24 + 4096),
    }
    expected: dict[str, type[OverlaybdError]] = {"lsmt-magic-only": TruncatedError, "zfile-magic-only":
                                                 TruncatedError, "zfile-header-zeros": FormatError}
    if kind == "gnu-tar":
        _gnu_tar(reference_dir / "a/committed.lsmt", path, tarfile.GNU_FORMAT)
        assert path.read_bytes()[257:265] == b"ustar  \x00"
    else:
        path.write_bytes(content[kind])
    with pytest.raises(OverlaybdError) as info:
        overlaybd.open_layer(str(path))
    exc = info.value
    assert isinstance(exc, expected.get(kind, BadMagicError)), repr(exc)
    assert check_error(exc, "", (str(path),)) is None, exc
    if kind == "gnu-tar":
        # the reference does not recognise GNU tar: the blob is raw, and raw it is no LSMT layer
        assert "raw" in str(exc), exc
        with FileSource(str(path)) as f:
            assert peel(f).wrappers == []


def test_posix_ustar_without_pax_is_read(reference_dir: Path, baselines: dict[str, Baseline],
                                         tmp_path: Path) -> None:
    """Control for the GNU case: a plain POSIX ustar envelope (Go archive/tar style, payload at 512) is read."""
    path = tmp_path / "ustar.tar"
    _gnu_tar(reference_dir / "a/committed.lsmt", path, tarfile.USTAR_FORMAT)
    b = baselines["a/committed.lsmt"]
    assert b.device is not None
    assert judge(Reads(b.device, "ustar envelope"), observe_device(path), (str(path),)) is None


@pytest.mark.parametrize("record, expected", [
    (b"15 size=999999\n", TruncatedError),  # bigger than the file
    (b"23 size=99999999999999\n", TruncatedError),
    (b"15 size=46816x\n", FormatError),
    (b"15 size=000000\n", BadMagicError),  # 0: the ustar size (0) holds, an empty payload is no layer
    (b"0 size=468160\n", FormatError),
    (b"x5 size=468160\n", FormatError),
    (b"15size=468160\n\n", FormatError),
])
def test_bad_pax_record(record: bytes, expected: type[OverlaybdError], baselines: dict[str, Baseline],
                        tmp_path: Path) -> None:
    b = baselines[TAR]
    start, end = pax_record_span(b.data)
    data = bytearray(b.data)
    data[start:end] = bytes(end - start)
    data[start : start + len(record)] = record
    # keep the PAX header's size field in step with the record, as a writer would (its checksum too)
    hdr = bytearray(data[:512])
    hdr[124:136] = b"%11o " % len(record)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%6o \x00" % sum(hdr)
    data[:512] = hdr
    path = tmp_path / "pax.tar"
    path.write_bytes(bytes(data))
    obs = observe_device(path)
    assert obs.exc is not None, f"read {obs.size} bytes"
    assert check_error(obs.exc, obs.tb, (str(path),)) is None, obs.tb
    assert isinstance(obs.exc, expected), repr(obs.exc)


def test_tar_header_size_beyond_file(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """A PAX extended header whose own size field is huge (octal and GNU base-256): refused for its size (over the
    1 MiB limit), before anything is read."""
    b = baselines[TAR]
    for field in (b"%11o " % (1 << 32), b"\x80" + (1 << 60).to_bytes(11, "big")):
        hdr = bytearray(b.data[:512])
        hdr[124:136] = field
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%6o \x00" % sum(hdr)
        path = tmp_path / "big.tar"
        path.write_bytes(bytes(hdr) + b.data[512:])
        obs = observe_device(path)
        assert isinstance(obs.exc, LimitError), obs.tb or obs.size
        assert check_error(obs.exc, obs.tb, (str(path),)) is None and obs.exc.offset == 124, obs.exc
