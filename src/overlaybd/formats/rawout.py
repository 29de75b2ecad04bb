"""A file written atomically, and a device's data pieces copied into a sparse raw file: without numpy, so that
``overlaybd export`` and ``cat`` of a small stack start in milliseconds (``output`` builds on this for every
other form).

The file is built under a temporary name in the destination's folder, synced, then renamed, so a failure never
leaves a half-written file under the final name. Data is copied through one reused buffer in chunks of up to
``COPY_CHUNK`` bytes, cut from the start of each run of data; inside a chunk, ``ZERO_BLOCK`` blocks of zeros
(counted from the chunk's start) are not written and stay holes.
"""

from __future__ import annotations

import os

from ..errors import LayerIOError, TruncatedError, UsageError
from ..source.writes import write_all

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    #: called after each chunk with the bytes of the device covered so far and its size
    Progress = Callable[[int, int], None]

# bytes read, then written, at a time: a buffer that stays in the CPU's cache between the read's copy and the
# write's (8 MiB took 3-5x the kernel time of 256 KiB for a dense 1 GiB export in bench_export.py)
COPY_CHUNK = 256 << 10
ZERO_BLOCK = 4096  # the unit in which zeros inside data are left as holes (as qemu-img convert -S 4k)
_ZEROS = bytes(ZERO_BLOCK)

#: one piece of a device's data: logical ``[start, end)`` in bytes, read from file number ``source`` at ``at``
Piece = tuple[int, int, int, int]


def tmp_beside(path: str) -> tuple[int, str]:
    """A new file (0644) beside ``path``, named after it: ``.NAME.XXXXXXXX.tmp``; its descriptor and path."""
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.join(folder, "." + os.path.basename(path) + ".")
    for _ in range(100):
        tmp = stem + os.urandom(4).hex() + ".tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise LayerIOError(f"cannot create a file: {exc.strerror}", path=folder) from exc
        os.fchmod(fd, 0o644)
        return fd, tmp
    raise LayerIOError("cannot create a file: 100 names taken", path=folder)


def set_length(fd: int, length: int, path: str) -> None:
    """``ftruncate``, its refusal (a file system's size limit, a full disk) a LayerIOError naming ``path``."""
    try:
        os.ftruncate(fd, length)
    except OSError as exc:
        raise LayerIOError(f"cannot make the file {length} bytes long: {exc.strerror}", path=path) from exc


def write_atomically(path: str, fill: Callable[[int], int], *, force: bool = False) -> int:
    """Make ``path`` with ``fill(fd)``, which writes the file and returns its length: under a temporary name,
    cut to that length, synced once, renamed. Returns the length."""
    if os.path.exists(path) and not force:
        raise UsageError("output exists (use --force to replace it)", path=path)
    fd, tmp = tmp_beside(path)
    try:
        size = fill(fd)
        set_length(fd, size, path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return size


def chunked(runs: Iterable[tuple[int, int]], chunk: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` pieces of at most ``chunk`` bytes covering ``runs``."""
    for start, end in runs:
        for pos in range(start, end, chunk):
            yield pos, min(chunk, end - pos)


def nonzero_runs(view: memoryview | bytes | bytearray) -> list[tuple[int, int]]:
    """``[a, b)`` ranges of ``view`` holding a non-zero byte, in whole ZERO_BLOCK blocks (the last may be short)."""
    data = view if isinstance(view, (bytes, bytearray)) else view.tobytes()
    return scan_blocks(data, len(data))


def scan_blocks(data: bytes | bytearray, n: int) -> list[tuple[int, int]]:
    """``nonzero_runs`` of ``data[:n]``, read in place (``startswith`` compares a block with no copy: about as fast
    as numpy's scan of the same bytes)."""
    out: list[tuple[int, int]] = []
    start = -1
    whole = n - n % ZERO_BLOCK
    zeros = _ZEROS
    for a in range(0, whole, ZERO_BLOCK):
        if data.startswith(zeros, a):
            if start >= 0:
                out.append((start, a))
                start = -1
        elif start < 0:
            start = a
    if whole < n and data.count(0, whole, n) != n - whole:
        if start < 0:
            start = whole
        out.append((start, n))
    elif start >= 0:
        out.append((start, whole))
    return out


def joined_runs(pieces: Sequence[Piece]) -> Iterator[tuple[int, int]]:
    """``[start, end)`` of the pieces (sorted, disjoint), neighbours joined."""
    start = end = -1
    for a, b, _src, _at in pieces:
        if a == end:
            end = b
            continue
        if end > start:
            yield start, end
        start, end = a, b
    if end > start:
        yield start, end


def copy_pieces(path: str, size: int, files: Sequence[str], pieces: Sequence[Piece], *, force: bool = False,
                progress: Progress | None = None) -> int:
    """Write a device of ``size`` bytes whose data is ``pieces`` (sorted, disjoint, inside ``[0, size)``; the rest
    reads as zeros) to ``path`` as a sparse raw file, atomically; the bytes of file number ``k`` come from
    ``files[k]``. Returns the file's length."""
    fds: list[int] = []
    try:
        for name in files:
            try:
                fds.append(os.open(name, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise LayerIOError(f"cannot open: {exc.strerror}", path=name) from exc

        def fill(fd: int) -> int:
            set_length(fd, size, path)  # first: a device the file system cannot hold fails before any copy
            _copy(fd, path, size, files, fds, pieces, progress)
            return size

        return write_atomically(path, fill, force=force)
    finally:
        for src in fds:
            os.close(src)


def _copy(fd: int, path: str, size: int, files: Sequence[str], fds: Sequence[int], pieces: Sequence[Piece],
          progress: Progress | None) -> None:
    buf = bytearray(COPY_CHUNK)
    whole = memoryview(buf)
    k = 0  # the first piece that may meet the chunk
    for pos, n in chunked(joined_runs(pieces), COPY_CHUNK):
        end = pos + n
        while pieces[k][1] <= pos:
            k += 1
        j = k
        while j < len(pieces) and pieces[j][0] < end:
            a, b, src, at = pieces[j]
            lo, hi = max(a, pos), min(b, end)
            _read_exact(fds[src], whole[lo - pos : hi - pos], at + (lo - a), files[src])
            j += 1
        for a, b in scan_blocks(buf, n):
            write_all(fd, whole[a:b], pos + a, path)
        if progress is not None:
            progress(end, size)


def _read_exact(fd: int, view: memoryview, offset: int, name: str) -> None:
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise LayerIOError(f"read failed: {exc.strerror}", path=name, offset=offset + done) from exc
        if got == 0:
            raise TruncatedError(f"file ends before {len(view) - done} bytes it should hold", path=name,
                                 offset=offset + done)
        done += got
