"""An ext4 filesystem in a sparse raw image, made and changed through libext2fs: no kernel mount, no root.

``make_filesystem`` formats as the reference's ``make_extfs`` (PhotonLibOS) does: 4 KiB blocks, an inode per 16 KiB,
256-byte inodes, 5 % reserved, flex_bg groups of one, no journal, no metadata_csum; the features 64bit, sparse_super,
sparse_super2 (one backup, in group 1), filetype, resize_inode, dir_index, ext_attr, dir_nlink, large_file,
huge_file, flex_bg, extents, extra_isize; the fixed UUID ``bdf7bb2e-c231-43ce-87c2-299792458ef5``; half-MD4
directory hashes with the zero hash seed (what ``make_extfs`` leaves); a root directory and a two-block
``lost+found``; then the resize inode.

Times: the reference builds its libext2fs without timestamps, so every time the library would take from the clock
is 0 (superblock write, mount-check and creation times; inode times that no tar entry sets). This engine gives the
same: it writes those fields as 0 itself (the system library stamps the clock), and ``Ext4Image.close`` clears the
superblock times the library stamps on its way out (in every copy of the superblock). An inode freed here gets
the reference's deletion time, 0xFFFFFFFF. ``s_kbytes_written`` stays 1, as the reference's I/O manager (without
statistics) leaves it.

``Ext4Image`` offers inode-level operations; paths and tar semantics are the applier's.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from . import ext2fs
from .ext2fs import Ext2fsError, ext2_inode_large

BLOCK_SIZE = 4096
INODE_RATIO = 16384
INODE_SIZE = 256
RESERVED_RATIO = 0.05
REFERENCE_UUID = "bdf7bb2e-c231-43ce-87c2-299792458ef5"
DELETED_DTIME = 0xFFFFFFFF
FIRST_INO = 11  # EXT2_GOOD_OLD_FIRST_INO: inodes below it are reserved

COMPAT = 0x0008 | 0x0010 | 0x0020 | 0x0200  # ext_attr, resize_inode, dir_index, sparse_super2
INCOMPAT = 0x0002 | 0x0040 | 0x0080 | 0x0200  # filetype, extents, 64bit, flex_bg
RO_COMPAT = 0x0001 | 0x0002 | 0x0008 | 0x0020 | 0x0040  # sparse_super, large_file, huge_file, dir_nlink, extra_isize
HASH_HALF_MD4 = 1

FILE_TYPES = {stat.S_IFREG: ext2fs.EXT2_FT_REG_FILE, stat.S_IFDIR: ext2fs.EXT2_FT_DIR,
              stat.S_IFCHR: ext2fs.EXT2_FT_CHRDEV, stat.S_IFBLK: ext2fs.EXT2_FT_BLKDEV,
              stat.S_IFIFO: ext2fs.EXT2_FT_FIFO, stat.S_IFSOCK: ext2fs.EXT2_FT_SOCK,
              stat.S_IFLNK: ext2fs.EXT2_FT_SYMLINK}
WRITE_CHUNK = 1 << 20
INODE_BYTES = ctypes.sizeof(ext2_inode_large)


@dataclass(frozen=True, slots=True)
class Attributes:
    """What a tar entry sets on its inode: owner, time (whole seconds) and permission bits."""

    uid: int
    gid: int
    mtime: int
    perm: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A directory entry: its name (bytes, as stored), inode and file type (``EXT2_FT_*``)."""

    name: bytes
    ino: int
    file_type: int


def superblock_template(size: int, uuid: str = REFERENCE_UUID) -> bytes:
    """The ``ext2_super_block`` parameters ``make_extfs`` hands to ``ext2fs_initialize`` (pure)."""
    if size < 16 * BLOCK_SIZE * 256:
        raise UsageError(f"a device of {size} bytes is too small for an ext4 (at least 16 MiB)")
    blocks = size // BLOCK_SIZE
    sb = bytearray(ext2fs.SUPERBLOCK_SIZE)
    struct.pack_into("<I", sb, ext2fs.SB_REV_LEVEL, 1)
    struct.pack_into("<III", sb, ext2fs.SB_FEATURE_COMPAT, COMPAT, INCOMPAT, RO_COMPAT)
    struct.pack_into("<II", sb, ext2fs.SB_LOG_BLOCK_SIZE, 2, 2)
    struct.pack_into("<H", sb, ext2fs.SB_DESC_SIZE, 64)
    sb[ext2fs.SB_LOG_GROUPS_PER_FLEX] = 0
    struct.pack_into("<H", sb, ext2fs.SB_INODE_SIZE, INODE_SIZE)
    struct.pack_into("<I", sb, ext2fs.SB_BLOCKS_COUNT, blocks & 0xFFFFFFFF)
    struct.pack_into("<I", sb, ext2fs.SB_BLOCKS_COUNT_HI, blocks >> 32)
    struct.pack_into("<I", sb, ext2fs.SB_INODES_COUNT, min(blocks * BLOCK_SIZE // INODE_RATIO, 0xFFFFFFFF))
    reserved = int(RESERVED_RATIO * blocks)
    struct.pack_into("<I", sb, ext2fs.SB_R_BLOCKS_COUNT, reserved & 0xFFFFFFFF)
    struct.pack_into("<I", sb, ext2fs.SB_R_BLOCKS_COUNT_HI, reserved >> 32)
    struct.pack_into("<II", sb, ext2fs.SB_BACKUP_BGS, 1, 0xFFFFFFFF)
    return bytes(sb)


def superblock_offsets(sb: bytes) -> list[int]:
    """Byte offsets of every copy of the superblock (primary, and the sparse_super2 backups) (pure)."""
    blocks = struct.unpack_from("<I", sb, ext2fs.SB_BLOCKS_COUNT)[0] | \
        struct.unpack_from("<I", sb, ext2fs.SB_BLOCKS_COUNT_HI)[0] << 32
    per_group = struct.unpack_from("<I", sb, ext2fs.SB_BLOCKS_PER_GROUP)[0]
    block_size = 1024 << struct.unpack_from("<I", sb, ext2fs.SB_LOG_BLOCK_SIZE)[0]
    groups = -(-blocks // per_group) if per_group else 0
    out = [ext2fs.SUPERBLOCK_SIZE]
    for group in struct.unpack_from("<II", sb, ext2fs.SB_BACKUP_BGS):
        if 0 < group < groups:
            out.append(group * per_group * block_size)
    return out


def settle_superblocks(fd: int) -> list[tuple[int, int]]:
    """Give every superblock copy the values the reference leaves: no write time, ``s_kbytes_written`` 1.
    Returns the byte ranges changed."""
    primary = os.pread(fd, ext2fs.SUPERBLOCK_SIZE, ext2fs.SUPERBLOCK_SIZE)
    changed = []
    for offset in superblock_offsets(primary):
        sb = bytearray(os.pread(fd, ext2fs.SUPERBLOCK_SIZE, offset))
        before = bytes(sb)
        struct.pack_into("<I", sb, ext2fs.SB_WTIME, 0)
        sb[ext2fs.SB_WTIME_HI] = 0
        struct.pack_into("<Q", sb, ext2fs.SB_KBYTES_WRITTEN, 1)
        if bytes(sb) != before:
            os.pwrite(fd, bytes(sb), offset)
            changed.append((offset, ext2fs.SUPERBLOCK_SIZE))
    return changed


class Ext4Image:
    """An open ext4 in a raw image file; every block written is recorded for the layer's delta. ``close`` writes it
    out; after a failure, ``abandon`` drops what is only in memory (the image file is then to be thrown away)."""

    def __init__(self, path: str, fs: ctypes.c_void_p, tracker: ext2fs.WriteTracker) -> None:
        self.path = path
        self.lib = ext2fs.library()
        self.fs = fs
        self.tracker = tracker
        self.block_size = ext2fs.filsys_head.from_address(fs.value or 0).blocksize

    # -- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def make(cls, path: str, size: int, *, uuid: str = REFERENCE_UUID) -> Ext4Image:
        """Format ``path`` (made a new sparse file of ``size`` bytes: the format relies on a zeroed device) as
        ``make_extfs`` does; the result is open, and closing it writes it out."""
        try:
            parsed = uuidlib.UUID(uuid)
        except ValueError:
            raise UsageError(f"bad filesystem UUID {uuid!r}") from None
        with open(path, "wb") as f:
            f.truncate(size)
        lib = ext2fs.library()
        tracker = ext2fs.WriteTracker()
        fs = ctypes.c_void_p()
        param = ctypes.create_string_buffer(superblock_template(size), ext2fs.SUPERBLOCK_SIZE)
        lib.check(lib.opened(tracker, lambda: int(lib.lib.ext2fs_initialize(
            path.encode(), ext2fs.EXT2_FLAG_64BITS, param, lib.test_io, ctypes.byref(fs)))),
            "setting up the superblock", path=path)
        image = cls(path, fs, tracker)
        try:
            image._format(parsed.bytes)
        except BaseException:
            image.abandon()
            raise
        return image

    @classmethod
    def open(cls, path: str) -> Ext4Image:
        lib = ext2fs.library()
        tracker = ext2fs.WriteTracker()
        fs = ctypes.c_void_p()
        lib.check(lib.opened(tracker, lambda: int(lib.lib.ext2fs_open(
            path.encode(), ext2fs.EXT2_FLAG_RW | ext2fs.EXT2_FLAG_64BITS, 0, 0, lib.test_io, ctypes.byref(fs)))),
            "opening the ext4", path=path)
        image = cls(path, fs, tracker)
        try:
            lib.check(lib.lib.ext2fs_read_bitmaps(fs), "reading the bitmaps", path=path)
        except BaseException:
            image.abandon()
            raise
        return image

    def _format(self, fs_uuid: bytes) -> None:
        sb = self._super()
        ctypes.memmove(sb + ext2fs.SB_UUID, fs_uuid, 16)
        ctypes.c_uint64.from_address(sb + ext2fs.SB_KBYTES_WRITTEN).value = 1
        ctypes.c_uint8.from_address(sb + ext2fs.SB_DEF_HASH_VERSION).value = HASH_HALF_MD4
        ctypes.c_int16.from_address(sb + ext2fs.SB_MAX_MNT_COUNT).value = -1
        for field in (ext2fs.SB_MKFS_TIME, ext2fs.SB_LASTCHECK):
            ctypes.c_uint32.from_address(sb + field).value = 0
        for field in (ext2fs.SB_MKFS_TIME_HI, ext2fs.SB_LASTCHECK_HI):
            ctypes.c_uint8.from_address(sb + field).value = 0
        lib = self.lib.lib
        self._check(lib.ext2fs_allocate_tables(self.fs), "allocating the group tables")
        self._check(lib.ext2fs_mkdir(self.fs, ext2fs.EXT2_ROOT_INO, ext2fs.EXT2_ROOT_INO, None),
                    "making the root directory")
        self._settle_new(ext2fs.EXT2_ROOT_INO, stat.S_IFDIR | 0o755)
        self._check(lib.ext2fs_mkdir(self.fs, ext2fs.EXT2_ROOT_INO, 0, b"lost+found"), "making lost+found")
        found = self.lookup(ext2fs.EXT2_ROOT_INO, b"lost+found")
        assert found
        self._settle_new(found, stat.S_IFDIR | 0o700)
        for _ in range(2):
            self._check(lib.ext2fs_expand_dir(self.fs, found), "expanding lost+found")
        lib.ext2fs_inode_alloc_stats2(self.fs, 1, 1, 0)  # the bad-blocks inode and the other reserved ones
        for ino in range(ext2fs.EXT2_ROOT_INO + 1, FIRST_INO):
            lib.ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0)
        self._check(lib.ext2fs_create_resize_inode(self.fs), "creating the resize inode")
        self._settle_new(ext2fs.EXT2_RESIZE_INO, None)

    def _super(self) -> int:
        return int(ext2fs.filsys_head.from_address(self.fs.value or 0).super)

    def close(self) -> np.ndarray:
        """Write everything out; returns the byte ranges written since the image was opened, as ``(offset,
        length)`` rows (unsorted, may overlap)."""
        try:
            self._check(self.lib.lib.ext2fs_close2(self.fs, 0), "writing the filesystem out")
            self.fs = ctypes.c_void_p()
            fd = os.open(self.path, os.O_RDWR)
            try:
                for offset, length in settle_superblocks(fd):
                    self.tracker.ranges.extend((offset, length))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            if self.fs:
                self.lib.lib.ext2fs_free(self.fs)
                self.fs = ctypes.c_void_p()
        return np.frombuffer(self.tracker.ranges, dtype=np.int64).reshape(-1, 2)

    def abandon(self) -> None:
        """Drop the open filesystem without writing what is only in memory (after an error)."""
        if self.fs:
            self.lib.lib.ext2fs_free(self.fs)
            self.fs = ctypes.c_void_p()

    def _check(self, code: int, doing: str, *args: object) -> None:
        """Raise if libext2fs returned an error; ``doing % args`` says what failed (formatted only then)."""
        if code:
            self.lib.check(code, doing % args if args else doing, path=self.path)

    # -- inodes --------------------------------------------------------------------------------------------------
    def read_inode(self, ino: int) -> ext2_inode_large:
        inode = ext2_inode_large()
        self._check(self.lib.lib.ext2fs_read_inode_full(self.fs, ino, ctypes.byref(inode), INODE_BYTES),
                    "reading inode %s", ino)
        return inode

    def write_inode(self, ino: int, inode: ext2_inode_large) -> None:
        self._check(self.lib.lib.ext2fs_write_inode_full(self.fs, ino, ctypes.byref(inode), INODE_BYTES),
                    "writing inode %s", ino)

    def _settle_new(self, ino: int, mode: int | None) -> None:
        """An inode the library made: its mode as asked, and no times (the library stamps the clock)."""
        inode = self.read_inode(ino)
        if mode is not None:
            inode.i_mode = mode
        set_times(inode, 0)
        inode.i_crtime = inode.i_crtime_extra = 0
        self.write_inode(ino, inode)

    def set_attributes(self, ino: int, attrs: Attributes, *, keep_perm: bool = False) -> None:
        """Owner, time (access, change and modification alike) and permission bits (``keep_perm``: not those, as
        for a symlink)."""
        inode = self.read_inode(ino)
        set_attributes(inode, attrs, keep_perm=keep_perm)
        self.write_inode(ino, inode)

    def set_time(self, ino: int, mtime: int) -> None:
        inode = self.read_inode(ino)
        set_times(inode, mtime)
        self.write_inode(ino, inode)

    # -- directories ---------------------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int:
        ino = ext2fs.ext2_ino_t()
        code = self.lib.lib.ext2fs_lookup(self.fs, parent, name, len(name), None, ctypes.byref(ino))
        if code == ext2fs.EXT2_ET_FILE_NOT_FOUND:
            return 0
        self._check(code, "looking up %r in inode %s", name, parent)
        return int(ino.value)

    def entries(self, directory: int) -> list[Entry]:
        out: list[Entry] = []

        def visit(_dir: int, _entry: int, dirent: ctypes._Pointer[ext2fs.ext2_dir_entry], _offset: int,
                  _blocksize: int, _buf: bytes, _priv: int) -> int:
            d = dirent.contents
            if d.inode:
                length = d.name_len & 0xFF
                name = ctypes.string_at(ctypes.addressof(d) + 8, length)
                if name not in (b".", b".."):
                    out.append(Entry(name, int(d.inode), d.name_len >> 8))
            return 0

        callback = ext2fs.DirIterateCallback(visit)
        self._check(self.lib.lib.ext2fs_dir_iterate2(self.fs, directory, 0, None, callback, None),
                    "listing directory inode %s", directory)
        return out

    def _link(self, parent: int, name: bytes, ino: int, file_type: int) -> None:
        lib = self.lib.lib
        code = lib.ext2fs_link(self.fs, parent, name, ino, file_type)
        if code == ext2fs.EXT2_ET_DIR_NO_SPACE:
            self._check(lib.ext2fs_expand_dir(self.fs, parent), "expanding directory inode %s", parent)
            code = lib.ext2fs_link(self.fs, parent, name, ino, file_type)
        self._check(code, "linking %r into directory inode %s", name, parent)

    def _new_inode(self, parent: int, mode: int) -> int:
        ino = ext2fs.ext2_ino_t()
        self._check(self.lib.lib.ext2fs_new_inode(self.fs, parent, mode, None, ctypes.byref(ino)),
                    "allocating an inode")
        return int(ino.value)

    def mkdir(self, parent: int, name: bytes, perm: int) -> int:
        lib = self.lib.lib
        ino = self._new_inode(parent, stat.S_IFDIR)
        code = lib.ext2fs_mkdir(self.fs, parent, ino, name)
        if code == ext2fs.EXT2_ET_DIR_NO_SPACE:
            self._check(lib.ext2fs_expand_dir(self.fs, parent), "expanding directory inode %s", parent)
            code = lib.ext2fs_mkdir(self.fs, parent, ino, name)
        self._check(code, "making directory %r", name)
        self._settle_new(ino, stat.S_IFDIR | (perm & 0o7777))
        return ino

    def create(self, parent: int, name: bytes, attrs: Attributes) -> int:
        """An empty regular file (extent-mapped) with its attributes."""
        lib = self.lib.lib
        ino = self._new_inode(parent, stat.S_IFREG | 0o666)
        self._link(parent, name, ino, ext2fs.EXT2_FT_REG_FILE)
        lib.ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0)
        inode = new_inode(stat.S_IFREG, attrs)
        handle = ctypes.c_void_p()
        self._check(lib.ext2fs_extent_open2(self.fs, ino, ctypes.byref(inode), ctypes.byref(handle)),
                    "starting an extent tree")
        lib.ext2fs_extent_free(handle)
        self.write_inode(ino, inode)
        return ino

    def write_data(self, ino: int, pieces: Iterable[tuple[int, bytes | memoryview]], size: int) -> None:
        """Write ``(offset, bytes)`` pieces (ascending; gaps stay holes) and set the file's size."""
        lib = self.lib.lib
        handle = ctypes.c_void_p()
        self._check(lib.ext2fs_file_open(self.fs, ino, ext2fs.EXT2_FILE_WRITE, ctypes.byref(handle)),
                    "opening inode %s", ino)
        written = ctypes.c_uint()
        written_ref = ctypes.byref(written)
        pos = 0
        try:
            for offset, data in pieces:
                if offset != pos:
                    self._check(lib.ext2fs_file_llseek(handle, offset, ext2fs.EXT2_SEEK_SET, None),
                                "seeking in inode %s", ino)
                length = len(data)
                done = 0
                while done < length:
                    n = min(WRITE_CHUNK, length - done)
                    chunk = data if n == length else bytes(data[done : done + n])
                    self._check(lib.ext2fs_file_write(handle, chunk, n, written_ref), "writing inode %d", ino)
                    if written.value != n:
                        raise Ext2fsError(f"short write to inode {ino}: {written.value} of {n} bytes",
                                          path=self.path)
                    done += n
                pos = offset + length
            if pos != size:  # a trailing hole (the writes set the size up to the data)
                self._check(lib.ext2fs_file_set_size2(handle, size), "setting the size of inode %s", ino)
        finally:
            code = lib.ext2fs_file_close(handle)
        self._check(code, "closing inode %s", ino)

    def symlink(self, parent: int, name: bytes, target: bytes) -> int:
        if not target or len(target) >= self.block_size:
            raise Ext2fsError(f"symlink {name!r}: a target of {len(target)} bytes (1 to {self.block_size - 1})",
                              path=self.path)
        lib = self.lib.lib
        code = lib.ext2fs_symlink(self.fs, parent, 0, name, target)
        if code == ext2fs.EXT2_ET_DIR_NO_SPACE:
            self._check(lib.ext2fs_expand_dir(self.fs, parent), "expanding directory inode %s", parent)
            code = lib.ext2fs_symlink(self.fs, parent, 0, name, target)
        self._check(code, "making symlink %r", name)
        ino = self.lookup(parent, name)
        self._settle_new(ino, None)
        return ino

    def mknod(self, parent: int, name: bytes, file_format: int, attrs: Attributes, rdev_major: int = 0,
              rdev_minor: int = 0) -> int:
        """A character or block device, FIFO or socket (``file_format``: ``stat.S_IFCHR`` ...)."""
        lib = self.lib.lib
        file_type = FILE_TYPES[file_format]
        ino = self._new_inode(parent, 0o10755)
        self._link(parent, name, ino, file_type)
        lib.ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0)
        inode = new_inode(file_format, attrs)
        if rdev_major < 256 and rdev_minor < 256:
            inode.i_block[0] = rdev_major * 256 + rdev_minor
        else:
            inode.i_block[1] = (rdev_minor & 0xFF) | (rdev_major << 8) | ((rdev_minor & ~0xFF) << 12)
        self.write_inode(ino, inode)
        return ino

    def hard_link(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.read_inode(ino)
        inode.i_links_count += 1
        self.write_inode(ino, inode)
        self._link(parent, name, ino, FILE_TYPES.get(stat.S_IFMT(inode.i_mode), 0))

    def readlink(self, ino: int) -> bytes:
        inode = self.read_inode(ino)
        size = inode.i_size | inode.i_size_high << 32
        if not self.lib.lib.ext2fs_inode_has_valid_blocks2(self.fs, ctypes.byref(inode)):
            return bytes(inode.i_block)[:size]
        return self.read_data(ino, size)

    def read_data(self, ino: int, size: int) -> bytes:
        lib = self.lib.lib
        handle = ctypes.c_void_p()
        self._check(lib.ext2fs_file_open(self.fs, ino, 0, ctypes.byref(handle)), "opening inode %s", ino)
        try:
            buf = ctypes.create_string_buffer(size)
            got = ctypes.c_uint()
            self._check(lib.ext2fs_file_read(handle, buf, size, ctypes.byref(got)), "reading inode %s", ino)
            return buf.raw[: got.value]
        finally:
            lib.ext2fs_file_close(handle)

    # -- removing --------------------------------------------------------------------------------------------------
    def unlink(self, parent: int, name: bytes, ino: int) -> None:
        """Remove the entry ``name`` (not a directory) and drop one link of its inode."""
        self._check(self.lib.lib.ext2fs_unlink(self.fs, parent, name, ino, 0), "unlinking %r", name)
        self._drop_link(ino)

    def rmdir(self, parent: int, name: bytes, ino: int) -> None:
        """Remove the empty directory ``name``: its entry, its inode, and its ``..`` link to ``parent``."""
        self._check(self.lib.lib.ext2fs_unlink(self.fs, parent, name, ino, 0), "unlinking %r", name)
        self._drop_link(ino)
        self._drop_link(ino)
        up = self.read_inode(parent)
        if up.i_links_count > 1:
            up.i_links_count -= 1
            self.write_inode(parent, up)

    def _drop_link(self, ino: int) -> None:
        """One link less; at none, the inode is freed with its blocks and attributes (the reference's
        ``remove_inode``)."""
        lib = self.lib.lib
        inode = self.read_inode(ino)
        if inode.i_links_count == 0:
            return
        inode.i_links_count -= 1
        if inode.i_links_count == 0:
            inode.i_dtime = DELETED_DTIME
            self._check(lib.ext2fs_free_ext_attr(self.fs, ino, ctypes.byref(inode)),
                        "freeing the attributes of inode %s", ino)
            if lib.ext2fs_inode_has_valid_blocks2(self.fs, ctypes.byref(inode)):
                self._check(lib.ext2fs_punch(self.fs, ino, ctypes.byref(inode), None, 0, 2**64 - 1),
                            "freeing the blocks of inode %s", ino)
            lib.ext2fs_inode_alloc_stats2(self.fs, ino, -1, int(stat.S_ISDIR(inode.i_mode)))
        self.write_inode(ino, inode)

    # -- extended attributes -----------------------------------------------------------------------------------------
    def set_xattrs(self, ino: int, attrs: Iterable[tuple[bytes, bytes]]) -> None:
        """Set (add or replace) extended attributes, keeping the others."""
        lib = self.lib.lib
        handle = ctypes.c_void_p()
        self._check(lib.ext2fs_xattrs_open(self.fs, ino, ctypes.byref(handle)), "opening the xattrs of %s", ino)
        try:
            self._check(lib.ext2fs_xattrs_read(handle), "reading the xattrs of inode %s", ino)
            for key, value in attrs:
                self._check(lib.ext2fs_xattr_set(handle, key, value, len(value)),
                            "setting xattr %s of inode %s", key.decode(errors='replace'), ino)
        finally:
            code = lib.ext2fs_xattrs_close(ctypes.byref(handle))
        self._check(code, "writing the xattrs of inode %s", ino)


def new_inode(file_format: int, attrs: Attributes) -> ext2_inode_large:
    """A fresh inode as ``ext2fs_write_new_inode`` would complete it (extra fields sized), but with our times."""
    inode = ext2_inode_large()
    inode.i_mode = file_format
    inode.i_links_count = 1
    inode.i_extra_isize = ctypes.sizeof(ext2_inode_large) - 128
    set_attributes(inode, attrs)
    return inode


def set_attributes(inode: ext2_inode_large, attrs: Attributes, *, keep_perm: bool = False) -> None:
    inode.i_uid, inode.l_i_uid_high = attrs.uid & 0xFFFF, (attrs.uid >> 16) & 0xFFFF
    inode.i_gid, inode.l_i_gid_high = attrs.gid & 0xFFFF, (attrs.gid >> 16) & 0xFFFF
    set_times(inode, attrs.mtime)
    if not keep_perm:
        inode.i_mode = (inode.i_mode & 0o170000) | (attrs.perm & 0o7777)


def set_times(inode: ext2_inode_large, seconds: int) -> None:
    """Access, change and modification time alike, whole seconds; times outside 32 bits signed go in the extra
    epoch bits, as the kernel stores them."""
    low = seconds & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    epoch = ((seconds - signed_low) >> 32) & 3
    inode.i_atime = inode.i_ctime = inode.i_mtime = low
    inode.i_atime_extra = inode.i_ctime_extra = inode.i_mtime_extra = epoch
