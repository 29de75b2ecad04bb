"""Writable LSMT layers: the log-structured data+index pair and the sparse form.

Writes append data to the data file, then one record per piece to the index file (through the layer's
:mod:`.appender`): writes put their data in parallel, each in space it reserved, and a record is logged only once
its data is written. The in-memory index takes the logged records before every lookup. ``flush()`` makes every
earlier write durable, data first (fdatasync data, then index, with no record logged in between). A record
that points past the end of the data file can only be an unflushed write torn by a crash: it and everything
logged after it are ignored on open (a zeroed record points at no data: it is never torn). So are all-zero records
at the end of the index file (a crash after the file grew, before their bytes were written); an all-zero record
before a record that is not is corruption.

An index file holds at most ``MAX_RW_INDEX_RECORDS`` records (the reference refuses to open a larger one, and does
not check when it writes): a write that would log more fails with :class:`~overlaybd.errors.IndexFullError`
(ENOSPC to FUSE and NBD clients), and the layer stays readable.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import uuid as uuidlib

import numpy as np

from ...errors import (
    BadMagicError,
    CorruptIndexError,
    IndexFullError,
    LayerIOError,
    LimitError,
    LockedError,
    UsageError,
)
from ...source.base import Capability
from ...source.file import FileSource, punch_hole, write_all
from .appender import Appender, open_appender
from .header import RECORD, pack_record
from .index import MutableIndex, Segments, drop_invalid, replay
from .layer import read_header
from .mapping import MutableLevel
from .spec import (
    FIELD,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SPARSE,
    HEADER_SIZE,
    INVALID_OFFSET,
    MAX_RECORD_SECTORS,
    MAX_RW_INDEX_RECORDS,
    MAX_VIRTUAL_SIZE,
    NULL_UUID,
    RECORD_SIZE,
    SECTOR,
    WRITE_SPLIT_SECTORS,
    LsmtHeader,
    check_virtual_size,
    decode_records,
    encode_records,
)
from .view import LsmtView

log = logging.getLogger(__name__)
_MASK50, _MASK55 = (1 << 50) - 1, (1 << 55) - 1
_FEW = 64  # records the index takes one insert at a time (or 1/8 of its records, if more: an insert moves the records
# of one chunk); more are replayed and overlaid in numpy, which costs in proportion to the whole index
# records appended that wait for the index until a writer maps them (lookups do at once): an insert costs the same
# whatever the batch (one chunk of the index moves), so small batches keep each pause short (4,096 records into an
# index of a million: 16 ms, where 65,536 took 432 ms on the event loop of serve)
CATCH_UP_AT = 1 << 12
# Space allocated ahead of the appends, past the end of the files (their sizes do not change): a flush then
# finds the blocks its writes landed in already allocated, and only marks them written.
DATA_AHEAD = 64 << 20
INDEX_AHEAD = 1 << 20


def create_writable(data_path: str, index_path: str, virtual_size: int, *, uuid: bytes | None = None,
                    parent_uuid: bytes = NULL_UUID, sparse: bool = False) -> None:
    """``overlaybd-create``: a new empty writable pair. Files are created exclusively, mode 0644."""
    if virtual_size % SECTOR or not 0 <= virtual_size <= MAX_VIRTUAL_SIZE:
        raise UsageError(f"virtual size {virtual_size} must be a multiple of {SECTOR} up to {MAX_VIRTUAL_SIZE}")
    uid = uuid if uuid is not None else uuidlib.uuid4().bytes
    flags = FLAG_HEADER | FLAG_DATA | (FLAG_SPARSE if sparse else 0)
    data_hdr = LsmtHeader(flags=flags, virtual_size=virtual_size, uuid=uid, parent_uuid=parent_uuid)
    index_hdr = LsmtHeader(flags=FLAG_HEADER, index_offset=HEADER_SIZE, virtual_size=virtual_size, uuid=uid,
                           parent_uuid=parent_uuid)
    created: list[str] = []
    try:
        for path, hdr in ((data_path, data_hdr), (index_path, index_hdr)):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise LayerIOError(f"cannot create: {exc.strerror}", path=path) from exc
            created.append(path)
            try:
                write_all(fd, hdr.pack(), 0, path)
                if sparse and path == data_path:
                    try:
                        os.ftruncate(fd, HEADER_SIZE + virtual_size)
                    except OSError as exc:
                        raise LayerIOError(f"cannot make the file {HEADER_SIZE + virtual_size} bytes long: "
                                           f"{exc.strerror}", path=path) from exc
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        for path in created:
            os.unlink(path)
        raise


class WritableBase(LsmtView):
    """What the two writable layer kinds share: a data file with an LSMT header, held under ``flock`` (one writer
    at a time; opened ``readonly`` it takes no lock), an in-memory mutable index of what is mapped, and reads
    through it. :class:`WritableLayer` appends data and logs 16-byte index records to a separate ``.index``
    file; :class:`SparseLayer` (``FLAG_SPARSE``) writes in place, and its allocated ranges are its index."""

    capabilities = Capability.WRITE | Capability.FLUSH
    source_tag = 0

    def __init__(self, data_path: str, *, readonly: bool) -> None:
        self.readonly = readonly
        self.data = FileSource(data_path, writable=not readonly)
        self.name = data_path
        try:
            if not readonly:
                try:
                    fcntl.flock(self.data.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise LockedError("another process has this writable layer open", path=data_path) from exc
            self.header = read_header(self.data, 0)
            h = self.header
            if not h.is_header or not h.is_data or h.is_sealed:
                raise BadMagicError(f"LSMT header flags 0x{h.flags:x} are not a writable data file", path=data_path,
                                    offset=FIELD["flags"])
            check_virtual_size(h, at=0, path=data_path)
        except BaseException:
            self.data.close()
            raise
        self.size = self.header.virtual_size
        if readonly:
            self.capabilities = Capability.NONE
        self._lock = threading.RLock()
        self.index = MutableIndex()
        self.sources = [self.data]
        self.levels = [self.level()]

    @property
    def virtual_size(self) -> int:
        return self.header.virtual_size

    @property
    def uuid(self) -> bytes:
        return self.header.uuid

    @property
    def parent_uuid(self) -> bytes:
        return self.header.parent_uuid

    def level(self, source: int = 0) -> MutableLevel:
        """The layer's index as a level of a stack (source ``source``), up to date at every lookup."""
        return MutableLevel(self.index, source=source, lock=self._lock, catch_up=self._catch_up)

    def _catch_up(self) -> None:
        """(Under ``_lock``) bring the index up to date with what was written; nothing to do here."""

    def segments(self) -> Segments:
        with self._lock:
            self._catch_up()
            return self.index.segments()

    def records(self) -> int:
        """Records in the in-memory index now."""
        with self._lock:
            self._catch_up()
            return len(self.index)

    def close(self) -> None:
        self.data.close()
        super().close()


class WritableLayer(WritableBase):
    """The log-structured data+index pair."""

    capabilities = Capability.WRITE | Capability.WRITE_ZEROES | Capability.TRIM | Capability.FLUSH

    def __init__(self, data_path: str, index_path: str, *, readonly: bool = False,
                 max_records: int = MAX_RW_INDEX_RECORDS) -> None:
        super().__init__(data_path, readonly=readonly)
        self.max_records = max_records  # records the index file may hold; writes that would log more are refused
        try:
            self.index_file = FileSource(index_path, writable=not readonly)
        except BaseException:
            self.data.close()
            raise
        self.index_path = index_path
        self._appender: Appender | None = None
        self._untaken = b""  # records taken from the appender that the index does not hold yet
        try:
            self._load_index()
        except BaseException:
            self.close()
            raise

    def _load_index(self) -> None:
        ih = read_header(self.index_file, 0)
        path = self.index_path
        if not ih.is_header or ih.is_data or ih.is_sealed or ih.index_offset != HEADER_SIZE:
            raise BadMagicError(f"LSMT index-file header (flags 0x{ih.flags:x}, index_offset {ih.index_offset}) is "
                                f"not a writable index file", path=path, offset=0)
        count = (self.index_file.size - HEADER_SIZE) // RECORD_SIZE
        if count > MAX_RW_INDEX_RECORDS:
            raise LimitError(f"index file holds {count} records (limit {MAX_RW_INDEX_RECORDS})", path=path,
                             offset=HEADER_SIZE + RECORD_SIZE * MAX_RW_INDEX_RECORDS)
        raw = self.index_file.pread(HEADER_SIZE, count * RECORD_SIZE)
        kept = _without_zero_tail(raw, path)
        zero_tail = count - kept
        if zero_tail:
            log.warning("%s: ignoring %d all-zero index record(s) at the end: the file grew before they were "
                        "written (cut off by a crash)", path, zero_tail)
            raw = raw[:kept * RECORD_SIZE]
            count = kept
        try:  # a layer another process writes (opened read-only) may have grown since its data file was opened:
            # each record read was appended after its data was written, so the data file's size now covers it
            self.data.size = max(self.data.size, os.fstat(self.data.fd).st_size)
        except OSError as exc:
            raise LayerIOError(f"cannot stat: {exc.strerror}", path=self.name) from exc
        rec = decode_records(raw)
        keep = rec["offset"] != INVALID_OFFSET
        positions = np.flatnonzero(keep)
        log_ = drop_invalid(rec)
        below = np.flatnonzero(log_.moffset < HEADER_SIZE // SECTOR)
        if below.size:
            k = int(below[0])
            raise CorruptIndexError(f"index record {int(positions[k])} maps to sector {int(log_.moffset[k])}, inside "
                                    f"the data file's header", path=path,
                                    offset=HEADER_SIZE + RECORD_SIZE * int(positions[k]))
        data_sectors = self.data.size // SECTOR
        # a zeroed record points at no data (its moffset is where the data cursor stood, which space reserved by a
        # write still in flight, or one that failed, can have moved past the end): it is never torn
        bad = np.flatnonzero(~log_.zeroed & (log_.moffset + log_.length > data_sectors))
        self.torn_records = zero_tail
        if bad.size:
            k = int(bad[0])
            self.torn_records += len(log_) - k
            log.warning("%s: ignoring %d index record(s) from record %d on: they point past the end of the data "
                        "file (%d bytes); an unflushed write was cut off", path, self.torn_records,
                        int(positions[k]), self.data.size)
            log_ = log_.take(slice(0, k))
        # zeroed records past the end read as zeros here, but the reference's tools refuse the layer: earlier
        # versions pointed them at the data cursor, which a failed or interrupted write left past the end
        self.zeroed_past_end = int(np.count_nonzero(log_.zeroed & (log_.moffset > data_sectors)))
        self.index = MutableIndex.from_segments(replay(log_).with_tag(self.source_tag))
        self.levels = [self.level()]
        # appends go after the last whole sector / record, past anything torn
        data_end = -(-self.data.size // SECTOR) * SECTOR
        index_end = HEADER_SIZE + count * RECORD_SIZE if len(log_) == positions.size else \
            HEADER_SIZE + int(positions[len(log_)]) * RECORD_SIZE
        if self.torn_records and not self.readonly:
            # drop the torn records before anything is appended: new data would otherwise bring those left
            # beyond the new records back to life, pointing at the new data
            try:
                os.ftruncate(self.index_file.fd, index_end)
                os.fsync(self.index_file.fd)
            except OSError as exc:
                raise LayerIOError(f"cannot drop torn index records: {exc.strerror}", path=path,
                                   offset=index_end) from exc
        self._appender = open_appender(self.data.fd, data_end, DATA_AHEAD, self.index_file.fd, index_end,
                                       INDEX_AHEAD, HEADER_SIZE + self.max_records * RECORD_SIZE)

    # -- writes ------------------------------------------------------------------------------------------------
    # A write takes its place in the data file (the appender's reserve), writes its data there with no lock held,
    # then appends its records (_publish). Writes thus put their data in parallel; their records go to the index
    # file one at a time, each after its own data, and the index takes them in that order (``_catch_up``, under
    # the index lock, before every lookup). The appender's sync holds its lock across both syncs, so no record is
    # appended between them: any record the index sync makes durable was appended, hence its data written, before
    # the data sync began. Writes served in C (``export._fusedev``) go through the same appender without the GIL.
    @property
    def appender(self) -> Appender:
        """Where this layer appends (``export._fusedev`` calls it from C)."""
        assert self._appender is not None
        return self._appender

    def _publish(self, offset: int, length: int, at: int, zeroed: bool) -> None:
        """Append one record: ``length`` bytes (at most WRITE_SPLIT_SECTORS sectors) at device ``offset`` read from
        data-file byte ``at`` (its data already written there), or read as zeros (``zeroed``)."""
        s0, n, mstart = offset // SECTOR, length // SECTOR, at // SECTOR
        self._log_records(pack_record(s0, n, mstart, bool(zeroed)), 0 if zeroed else at + length)

    def _log_records(self, records: bytes, data_end: int) -> None:
        """Append records (their data written up to ``data_end``); the index maps them at its next lookup, or
        now if many wait."""
        appender = self.appender
        try:
            pending = appender.append(records, data_end)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._full(len(records) // RECORD_SIZE) from exc
            raise LayerIOError(f"write failed: {exc.strerror}", path=self.index_path,
                               offset=appender.index_end) from exc
        if pending >= CATCH_UP_AT:
            self.catch_up()

    def catch_up(self) -> None:
        """Map the records appended so far (lookups do it anyway: this keeps what waits for them small)."""
        with self._lock:
            self._catch_up()

    def _catch_up(self) -> None:
        """(Under ``_lock``) map the records appended since the last call, in the order they were appended."""
        appender = self._appender
        if appender is None or not (appender.pending or self._untaken):
            return
        # Records taken stay here until the index holds them all: if mapping them fails (MemoryError), the next
        # call maps them again, then what came after (mapping a prefix of them twice ends as mapping it once).
        raw = self._untaken = self._untaken + appender.take()
        self.data.size = max(self.data.size, appender.data_high)  # reads of them check bounds against size
        tag = self.source_tag
        if len(raw) <= max(_FEW, len(self.index) // 8) * RECORD_SIZE:
            for w0, w1 in RECORD.iter_unpack(raw):
                self.index.insert(w0 & _MASK50, w0 >> 50, w1 & _MASK55, bool(w1 >> 55 & 1), tag)
        else:
            self.index.apply(drop_invalid(decode_records(raw)).with_tag(tag))
        self._untaken = b""

    def _full(self, records: int) -> IndexFullError:
        return IndexFullError(f"the index file holds all the {self.max_records} records it may: {records} more "
                              f"refused (commit the layer to go on writing)", path=self.index_path,
                              offset=self.appender.index_end)

    def _append(self, offset: int, length: int, data: memoryview | None, step: int) -> None:
        records = -(-(length // SECTOR) // step)
        if self.appender.index_end + records * RECORD_SIZE > HEADER_SIZE + self.max_records * RECORD_SIZE:
            raise self._full(records)  # before any space is taken (the append checks it again, and decides)
        if data is not None:
            at = self._reserve(length)
            try:
                self.appender.write(data, at)
            except OSError as exc:
                raise LayerIOError(f"write failed: {exc.strerror}", path=self.name, offset=at) from exc
        else:
            # a zeroed record points at the data file's end, as the reference's do (its tools refuse a layer with
            # a record past that end): not at the data cursor, which a write still in flight or one that failed
            # has moved past the end
            try:
                at = os.fstat(self.data.fd).st_size // SECTOR * SECTOR
            except OSError as exc:
                raise LayerIOError(f"write failed: {exc.strerror}", path=self.name) from exc
        s0 = offset // SECTOR
        n = length // SECTOR
        if n <= step:  # one record (the common case): no arrays
            self._publish(offset, length, at, data is None)
            return
        starts = np.arange(s0, s0 + n, step, dtype=np.int64)
        lens = np.minimum(step, s0 + n - starts)
        mstart = at // SECTOR
        if data is not None:
            moffs = mstart + (starts - s0)
            zeroed = False
        else:
            moffs = np.full(starts.size, mstart, np.int64)
            zeroed = True
        recs = encode_records(starts, lens, moffs, np.full(starts.size, zeroed), 0)
        self._log_records(recs, at + length if data is not None else 0)

    def _reserve(self, length: int) -> int:
        try:
            return self.appender.reserve(length)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # the index filled since _append looked (another writer)
                raise self._full(1) from exc
            raise LayerIOError(f"cannot reserve space: {exc.strerror}", path=self.name) from exc

    def _write_aligned(self, offset: int, data: memoryview) -> None:
        self._append(offset, len(data), data, WRITE_SPLIT_SECTORS)

    def _write_zeroes_aligned(self, offset: int, length: int) -> None:
        self._append(offset, length, None, MAX_RECORD_SECTORS)

    def _trim_aligned(self, offset: int, length: int) -> None:
        self._append(offset, length, None, MAX_RECORD_SECTORS)

    def _flush(self) -> None:
        # Every write that returned before this call is in the page cache already. Data goes first, and no record
        # is logged until the index is synced too, so a durable index record never points at data that is not
        # durable (reads go on meanwhile: they take the index lock only).
        try:
            self.appender.sync(self.name, self.index_path)
        except OSError as exc:
            raise LayerIOError(f"fdatasync failed: {exc.strerror}", path=exc.filename) from exc

    def close(self) -> None:
        appender = getattr(self, "_appender", None)
        if appender is not None:
            appender.detach()
        if appender is not None and (appender.data_ahead or appender.index_ahead):
            # give back what was allocated ahead: a truncation to the same size frees blocks past the end
            for f in (self.data, self.index_file):
                if f.fd < 0 or not f.regular:
                    continue
                try:
                    os.ftruncate(f.fd, os.fstat(f.fd).st_size)
                except OSError as exc:
                    log.warning("%s: cannot free the space allocated ahead: %s", f.name, exc.strerror)
        super().close()
        if hasattr(self, "index_file"):
            self.index_file.close()


def _without_zero_tail(raw: bytes, path: str) -> int:
    """How many of the records in ``raw`` come before the all-zero ones that end it (records a crash left unwritten
    after the file grew); CorruptIndexError if an all-zero record comes before one that is not."""
    words = np.frombuffer(raw, dtype="<u8")
    written = np.flatnonzero((words[0::2] | words[1::2]) != 0)
    kept = int(written[-1]) + 1 if written.size else 0
    if written.size != kept:
        k = int(np.flatnonzero(np.diff(np.concatenate(([-1], written))) > 1)[0])
        zero = int(written[k - 1]) + 1 if k else 0
        raise CorruptIndexError(f"index record {zero} is all zeros, and record {int(written[k])} after it is not",
                                path=path, offset=HEADER_SIZE + RECORD_SIZE * zero)
    return kept


class SparseLayer(WritableBase):
    """A sparse writable layer: the data file is the header followed by the raw device; its allocated ranges
    are the index. A discard punches a hole, as the reference does: the range becomes unmapped (it reads as
    zeros on its own, and shows the layers below in a stack)."""

    capabilities = Capability.WRITE | Capability.WRITE_ZEROES | Capability.TRIM | Capability.FLUSH

    def __init__(self, data_path: str, *, readonly: bool = False) -> None:
        super().__init__(data_path, readonly=readonly)
        if not self.header.is_sparse:
            self.close()
            raise BadMagicError("not a sparse writable layer", path=data_path, offset=FIELD["flags"])
        self.index = MutableIndex.from_segments(sparse_segments(self.data.fd, self.data.size))
        self.levels = [self.level()]

    def _write_aligned(self, offset: int, data: memoryview) -> None:
        with self._lock:
            write_all(self.data.fd, data, HEADER_SIZE + offset, self.name)
            s0 = offset // SECTOR
            self.index.insert(s0, len(data) // SECTOR, s0 + HEADER_SIZE // SECTOR, False, self.source_tag)

    def _trim_aligned(self, offset: int, length: int) -> None:
        with self._lock:
            punch_hole(self.data.fd, HEADER_SIZE + offset, length, self.name)
            self.index.remove(offset // SECTOR, length // SECTOR)

    def _flush(self) -> None:
        self.data.flush()

    def segments(self) -> Segments:
        """Rebuilt from the file's allocation, as the reference does on open (record cuts matter to commit)."""
        with self._lock:
            return sparse_segments(self.data.fd, self.data.size)


def sparse_segments(fd: int, file_size: int) -> Segments:
    """Allocated extents past the header, cut at the 16383-sector record limit."""
    offs: list[int] = []
    lens: list[int] = []
    pos = HEADER_SIZE
    while pos < file_size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = file_size
        s, e = start // SECTOR, -(-end // SECTOR)
        while s < e:
            n = min(MAX_RECORD_SECTORS, e - s)
            offs.append(s - HEADER_SIZE // SECTOR)
            lens.append(n)
            s += n
        pos = end
    o = np.asarray(offs, dtype=np.int64)
    return Segments.build(o, lens, o + HEADER_SIZE // SECTOR, False, 0)
