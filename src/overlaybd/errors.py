"""Every error pyoverlaybd raises derives from :class:`OverlaybdError`.

The tree (the module that defines each one, where it is not this one)::

    OverlaybdError
    ├── FormatError                 bytes on disk are not what the format says
    │   ├── BadMagicError           a header/trailer magic or flag does not match
    │   ├── TruncatedError          the file ends before a structure it declares
    │   ├── CorruptIndexError       index records overlap, are unordered or point outside the file
    │   ├── ChecksumError           a CRC32C (block, index or header digest) does not match
    │   ├── UnsupportedError        a valid but unsupported feature (dictionary, MINI_LZO, ...)
    │   ├── LimitError              a declared count is absurd; refused before allocating
    │   ├── DigestMismatchError     bytes whose sha256 (or size) is not what their descriptor says
    │   ├── InvalidDigestError      a digest that is not ``algorithm:hex`` (remote.errors)
    │   └── ApplyError              a layer tar that cannot be applied to its ext4 (convert.applier)
    ├── SourceError                 misuse of a BlockSource
    │   ├── OutOfBoundsError        a request outside [0, size)
    │   ├── ReadOnlyError           a write to a source that has no write capability
    │   └── IndexFullError          a writable layer's index file holds all the records it may (ENOSPC)
    ├── LayerIOError                the operating system refused a read or write (wraps OSError)
    ├── LockedError                 another writer holds the layer
    ├── UsageError                  arguments that cannot work together
    │   └── HostsFileError          a registry's hosts.toml that cannot be used (remote.hosts)
    ├── CacheError                  the cache folder is unsafe or unusable (cache.folder)
    ├── StoreError                  the shared layer store refused a blob (layerstore)
    ├── VolumeError                 a volume directory that cannot be opened or changed as asked (volume)
    ├── RemoteError                 a registry or OCI layout failed (remote.errors)
    │   ├── AuthError               credentials refused, or a token that could not be had
    │   ├── NotFoundError           no such repository, tag, manifest or blob
    │   ├── RangeRefusedError       a mirror sent a whole blob for a range read: the next host serves it
    │   └── TransportError          the connection failed after its retries
    ├── ProtocolError               an NBD peer broke the protocol (export.nbd.protocol)
    ├── BusyError                   a volume's requests did not drain in time for a snapshot (export.nbd.gate)
    └── Ext2fsError                 libext2fs returned an error (convert.ext2fs)

Messages name the file (``path``) and, where it matters, the byte ``offset``.
"""

from __future__ import annotations

import errno


class OverlaybdError(Exception):
    """Root of every error raised by pyoverlaybd."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        self.message = message
        self.path = path
        self.offset = offset
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{': '.join(where)}: {self.message}" if where else self.message


class FormatError(OverlaybdError):
    """The bytes on disk do not follow the format."""


class BadMagicError(FormatError):
    """A magic number or a mandatory flag does not match."""


class TruncatedError(FormatError):
    """The file ends before a structure it declares."""


class CorruptIndexError(FormatError):
    """An index is out of order, overlapping, or points outside its file."""


class ChecksumError(FormatError):
    """A CRC32C check failed."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        block: int | None = None,
        expected: int | None = None,
        actual: int | None = None,
    ) -> None:
        self.block = block
        self.expected = expected
        self.actual = actual
        super().__init__(message, path=path, offset=offset)


class UnsupportedError(FormatError):
    """A valid feature this implementation (like the reference) does not support."""


class LimitError(FormatError):
    """A declared size or count is beyond the format's limits."""


class DigestMismatchError(FormatError):
    """Bytes whose sha256 (or size) is not what the descriptor says."""


class SourceError(OverlaybdError):
    """A request a BlockSource cannot serve."""


class OutOfBoundsError(SourceError):
    """A request outside the source."""


class ReadOnlyError(SourceError):
    """A write to a source without write capability."""


class IndexFullError(SourceError):
    """A write to a writable layer whose index file holds all the records it may: the layer would no longer open."""


class LayerIOError(OverlaybdError):
    """An operating-system error during I/O, with the file and offset."""


class LockedError(OverlaybdError):
    """Another process holds the writable layer."""


class UsageError(OverlaybdError):
    """Arguments that cannot work together."""


def errno_of(exc: BaseException) -> int:
    """The POSIX errno a failed block request reports, the one table FUSE and NBD both use.

    A write to a read-only source is ``EROFS``, a request outside the device ``EINVAL``, a write to a layer whose
    index is full ``ENOSPC``, a read or write the operating system refused keeps the operating system's errno, and
    everything else (corrupt or unverifiable bytes included: never wrong data) is ``EIO``. The NBD server narrows
    this to the errors its protocol names.
    """
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    if isinstance(exc, OutOfBoundsError):
        return errno.EINVAL
    if isinstance(exc, IndexFullError):
        return errno.ENOSPC
    if isinstance(exc, LayerIOError) and isinstance(exc.__cause__, OSError) and exc.__cause__.errno:
        return exc.__cause__.errno
    return errno.EIO
