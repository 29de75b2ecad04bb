"""A layer's tar stream: unpacked from its blob (gzip, zstd or plain, told by magic) into a plain tar whose sha256 is
the layer's diff ID, then read as entries.

Entries are read with Python's ``tarfile``: ustar, GNU (long names and links, old and PAX sparse files) and PAX
(``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``, ``SCHILY.xattr.*``). Names and link targets are
kept as bytes, whatever their encoding. The reference's reader ignores PAX ``uid``/``gid``/``mtime`` and GNU
sparse maps; here they are honoured (a file the tar stores sparse keeps its holes).
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

import zstandard

from ..errors import FormatError, UnsupportedError

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XATTR_PREFIX = "SCHILY.xattr."
Progress = Callable[[int, int], None]

REGULAR, DIRECTORY, SYMLINK, HARDLINK, CHARDEV, BLOCKDEV, FIFO = "file", "dir", "symlink", "link", "chr", "blk", \
    "fifo"
_KINDS = {tarfile.REGTYPE: REGULAR, tarfile.AREGTYPE: REGULAR, tarfile.CONTTYPE: REGULAR,
          tarfile.GNUTYPE_SPARSE: REGULAR, tarfile.DIRTYPE: DIRECTORY, tarfile.SYMTYPE: SYMLINK,
          tarfile.LNKTYPE: HARDLINK, tarfile.CHRTYPE: CHARDEV, tarfile.BLKTYPE: BLOCKDEV, tarfile.FIFOTYPE: FIFO}
KIND_MODES = {REGULAR: stat.S_IFREG, DIRECTORY: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHARDEV: stat.S_IFCHR,
              BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO, HARDLINK: stat.S_IFREG}


def compression_of(head: bytes) -> str:
    """"gzip", "zstd" or "tar" from a blob's first bytes (pure)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


def _gzip_chunks(src: BinaryIO, name: str) -> Iterator[bytes]:
    """Decompressed chunks (each at most ``CHUNK``) of a gzip stream of one or more members."""
    dec = zlib.decompressobj(31)
    data = b""
    while True:
        if not data:
            data = src.read(CHUNK)
            if not data:
                break
        try:
            out = dec.decompress(data, CHUNK)
        except zlib.error as exc:
            raise FormatError(f"bad gzip data: {exc}", path=name) from None
        data = dec.unconsumed_tail
        if out:
            yield out
        if dec.eof:
            data = dec.unused_data or src.read(CHUNK)
            if not data:
                return
            if not data.startswith(GZIP_MAGIC):
                if data.strip(b"\0") or src.read().strip(b"\0"):
                    raise FormatError("data after the gzip stream", path=name)
                return
            dec = zlib.decompressobj(31)
    if not dec.eof:
        raise FormatError("the gzip stream is truncated", path=name)


def zstd_frames_end(src: BinaryIO, name: str) -> int:
    """Walk the zstd frames of ``src`` by their headers (block contents skipped): the offset where the last one
    ends. A stream cut short, or anything after its frames but zero padding, is a ``FormatError`` (pure reading,
    no decompression)."""
    src.seek(0, os.SEEK_END)
    size = src.tell()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        src.seek(pos)
        data = src.read(n)
        if len(data) != n:
            raise FormatError("the zstd stream is truncated", path=name, offset=pos)
        pos += n
        return data

    while pos < size:
        magic = int.from_bytes(take(4), "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
            pos += int.from_bytes(take(4), "little")
            continue
        if magic != 0xFD2FB528:
            src.seek(pos - 4)
            if not src.read().strip(b"\0"):
                return pos - 4
            raise FormatError("data after the zstd frames", path=name, offset=pos - 4)
        fhd = take(1)[0]
        single = (fhd >> 5) & 1
        fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        pos += (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
        while True:
            header = int.from_bytes(take(3), "little")
            kind, length = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise FormatError("a reserved zstd block type", path=name, offset=pos - 3)
            pos += 1 if kind == 1 else length
            if header & 1:
                break
        if fhd & 4:
            pos += 4
        if pos > size:
            raise FormatError("the zstd stream is truncated", path=name, offset=size)
    return pos


def _zstd_chunks(src: BinaryIO, name: str) -> Iterator[bytes]:
    """Decompressed chunks (each at most ``CHUNK``) of a zstd stream of one or more frames."""
    zstd_frames_end(src, name)
    src.seek(0)
    reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True, read_size=CHUNK)
    while True:
        try:
            out = reader.read(CHUNK)
        except zstandard.ZstdError as exc:
            raise FormatError(f"bad zstd data: {exc}", path=name) from None
        if not out:
            return
        yield out


def unpack_blob(blob: str, tar_path: str, *, progress: Progress | None = None) -> tuple[str, str]:
    """Write the blob's tar to ``tar_path`` (decompressed if it is gzip or zstd). Returns ``(compression,
    "sha256:<hex of the tar>")``: the digest is the layer's diff ID."""
    h = hashlib.sha256()
    total = os.path.getsize(blob)
    with open(blob, "rb") as src, open(tar_path, "wb") as out:
        kind = compression_of(src.read(4))
        src.seek(0)
        if kind == "gzip":
            chunks: Iterator[bytes] = _gzip_chunks(src, blob)
        elif kind == "zstd":
            chunks = _zstd_chunks(src, blob)
        else:
            chunks = iter(lambda: src.read(CHUNK), b"")
        for chunk in chunks:
            h.update(chunk)
            out.write(chunk)
            if progress:
                progress(src.tell(), total)
    return kind, "sha256:" + h.hexdigest()


@dataclass
class TarEntry:
    """One member of a layer tar, as the applier needs it."""

    kind: str
    name: bytes  # as in the tar (the applier cleans it)
    link: bytes  # symlink target, or the path a hard link names
    perm: int  # permission bits with setuid, setgid, sticky
    uid: int
    gid: int
    mtime: int  # whole seconds
    size: int
    devmajor: int = 0
    devminor: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)  # sorted by name, as the reference sets them
    offset: int = 0  # of its header in the tar
    sparse: list[tuple[int, int]] | None = None  # data regions of a sparse file
    _reader: Callable[[], IO[bytes]] | None = None
    _data_at: int = -1  # where a plain file's bytes start in the tar (read straight from it)
    _tar: IO[bytes] | None = None

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        """The file's data as ``(offset, bytes)``, ascending; holes of a sparse file are left out."""
        if self._tar is not None:  # a plain file: its bytes in one run of the tar
            f = self._tar
            f.seek(self._data_at)
            pos = 0
            while pos < self.size:
                data = f.read(min(CHUNK, self.size - pos))
                if not data:
                    raise FormatError(f"the tar ends inside {self.name.decode(errors='replace')}",
                                      offset=self.offset)
                yield pos, data
                pos += len(data)
            return
        if self._reader is None:
            return
        f = self._reader()
        regions = self.sparse if self.sparse is not None else [(0, self.size)]
        for start, length in regions:
            if length <= 0:
                continue
            f.seek(start)
            pos = start
            end = start + length
            while pos < end:
                try:
                    data = f.read(min(CHUNK, end - pos))
                except tarfile.TarError as exc:
                    raise FormatError(f"{self.name.decode(errors='replace')}: {exc}", offset=self.offset) from None
                if not data:
                    raise FormatError(f"the tar ends inside {self.name.decode(errors='replace')}",
                                      offset=self.offset)
                yield pos, data
                pos += len(data)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _entry(tf: tarfile.TarFile, info: tarfile.TarInfo) -> TarEntry:
    kind = _KINDS.get(info.type)
    if kind is None:
        raise UnsupportedError(f"tar entry {info.name!r} has type {info.type!r}, which a layer cannot hold",
                               offset=info.offset)
    xattrs = sorted((_bytes(k[len(XATTR_PREFIX):]), _bytes(v)) for k, v in info.pax_headers.items()
                    if k.startswith(XATTR_PREFIX))
    name = _bytes(info.name)
    if kind == DIRECTORY and not name.endswith(b"/"):
        name += b"/"
    entry = TarEntry(kind, name, _bytes(info.linkname), info.mode & 0o7777, int(info.uid), int(info.gid),
                     math.floor(info.mtime), int(info.size), int(info.devmajor or 0), int(info.devminor or 0),
                     xattrs, int(info.offset))
    if kind == REGULAR:
        sparse: list[tuple[int, int]] | None = getattr(info, "sparse", None)
        entry.sparse = [(int(off), int(n)) for off, n in sparse] if sparse is not None else None
        if sparse is None and tf.fileobj is not None:
            entry._tar, entry._data_at = cast(IO[bytes], tf.fileobj), int(info.offset_data)
            return entry

        def reader(info: tarfile.TarInfo = info) -> IO[bytes]:
            f = tf.extractfile(info)
            assert f is not None
            return f

        entry._reader = reader
    return entry


def read_entries(tar_path: str) -> Iterator[TarEntry]:
    """The entries of a tar file, in order. A member's data must be read before the next entry is taken."""
    try:
        tf = tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError as exc:
        if os.path.getsize(tar_path) == 0:
            return  # an empty layer
        raise FormatError(f"not a tar: {exc}", path=tar_path) from None
    with tf:
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as exc:
                raise FormatError(f"bad tar data: {exc}", path=tar_path, offset=tf.offset) from None
            if info is None:
                return
            tf.members.clear()  # type: ignore[attr-defined]  # keep memory flat whatever the number of entries
            yield _entry(tf, info)
