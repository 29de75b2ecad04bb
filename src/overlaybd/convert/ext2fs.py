"""libext2fs (e2fsprogs, Debian ``libext2fs2``) through ctypes: the library, the structures it shares with us (on-disk
layouts and the two I/O structures, stable across the ``libext2fs.so.2`` ABI), the calls we make and their errors.

Only the first fields of ``struct_ext2_filsys`` are read (``super`` and ``blocksize``, unchanged since 1.41); every
inode is read and written whole as ``ext2_inode_large``.

Writes are observed through the library's own ``test_io`` manager stacked on ``unix_io``: its write callbacks name
every block written, so a layer knows what it changed without comparing the whole device. A channel takes the
callbacks set when it is opened, so each open filesystem reports to its own tracker. ``UNIX_IO_NOZEROOUT`` is set
so that zeroing goes through ordinary (observed) writes instead of ``fallocate``.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import Any

from ..errors import OverlaybdError, UnsupportedError

errcode_t = ctypes.c_long
ext2_ino_t = ctypes.c_uint32
blk64_t = ctypes.c_uint64

EXT2_ROOT_INO = 2
EXT2_RESIZE_INO = 7
EXT2_FLAG_RW = 0x01
EXT2_FLAG_64BITS = 0x20000
EXT2_FILE_WRITE = 0x0001
EXT2_SEEK_SET = 0
EXT2_FT_REG_FILE = 1
EXT2_FT_DIR = 2
EXT2_FT_CHRDEV = 3
EXT2_FT_BLKDEV = 4
EXT2_FT_FIFO = 5
EXT2_FT_SOCK = 6
EXT2_FT_SYMLINK = 7
EXT4_EXTENTS_FL = 0x00080000
DIRENT_FLAG_INCLUDE_EMPTY = 1

# error codes of the ext2 table (ext2fs/ext2_err.h)
EXT2_ET_BASE = 2133571328
EXT2_ET_DIR_NO_SPACE = EXT2_ET_BASE + 38
EXT2_ET_FILE_NOT_FOUND = EXT2_ET_BASE + 76


class Ext2fsError(OverlaybdError):
    """libext2fs refused an operation (its own message, and what we were doing)."""


class ext2_inode_large(ctypes.Structure):  # noqa: N801 - the C name
    _fields_ = [
        ("i_mode", ctypes.c_uint16), ("i_uid", ctypes.c_uint16), ("i_size", ctypes.c_uint32),
        ("i_atime", ctypes.c_uint32), ("i_ctime", ctypes.c_uint32), ("i_mtime", ctypes.c_uint32),
        ("i_dtime", ctypes.c_uint32), ("i_gid", ctypes.c_uint16), ("i_links_count", ctypes.c_uint16),
        ("i_blocks", ctypes.c_uint32), ("i_flags", ctypes.c_uint32), ("l_i_version", ctypes.c_uint32),
        ("i_block", ctypes.c_uint32 * 15), ("i_generation", ctypes.c_uint32), ("i_file_acl", ctypes.c_uint32),
        ("i_size_high", ctypes.c_uint32), ("i_faddr", ctypes.c_uint32),
        ("l_i_blocks_hi", ctypes.c_uint16), ("l_i_file_acl_high", ctypes.c_uint16),
        ("l_i_uid_high", ctypes.c_uint16), ("l_i_gid_high", ctypes.c_uint16),
        ("l_i_checksum_lo", ctypes.c_uint16), ("l_i_reserved", ctypes.c_uint16),
        ("i_extra_isize", ctypes.c_uint16), ("i_checksum_hi", ctypes.c_uint16),
        ("i_ctime_extra", ctypes.c_uint32), ("i_mtime_extra", ctypes.c_uint32), ("i_atime_extra", ctypes.c_uint32),
        ("i_crtime", ctypes.c_uint32), ("i_crtime_extra", ctypes.c_uint32), ("i_version_hi", ctypes.c_uint32),
        ("i_projid", ctypes.c_uint32),
    ]


assert ctypes.sizeof(ext2_inode_large) == 160


class ext2_dir_entry(ctypes.Structure):  # noqa: N801
    _fields_ = [("inode", ctypes.c_uint32), ("rec_len", ctypes.c_uint16), ("name_len", ctypes.c_uint16),
                ("name", ctypes.c_char * 255)]


class filsys_head(ctypes.Structure):  # noqa: N801 - the first fields of struct_ext2_filsys
    _fields_ = [("magic", errcode_t), ("io", ctypes.c_void_p), ("flags", ctypes.c_int),
                ("device_name", ctypes.c_char_p), ("super", ctypes.c_void_p), ("blocksize", ctypes.c_uint)]


class io_manager_struct(ctypes.Structure):  # noqa: N801 - struct struct_io_manager (only passed around)
    _fields_ = [("magic", errcode_t), ("name", ctypes.c_char_p)]


SUPERBLOCK_SIZE = 1024
# offsets in struct ext2_super_block (the on-disk layout)
SB_BLOCKS_COUNT = 4
SB_R_BLOCKS_COUNT = 8
SB_LOG_BLOCK_SIZE = 24
SB_LOG_CLUSTER_SIZE = 28
SB_BLOCKS_PER_GROUP = 32
SB_WTIME = 48
SB_MAX_MNT_COUNT = 54
SB_LASTCHECK = 64
SB_REV_LEVEL = 76
SB_INODE_SIZE = 88
SB_FEATURE_COMPAT = 92
SB_FEATURE_INCOMPAT = 96
SB_FEATURE_RO_COMPAT = 100
SB_UUID = 104
SB_HASH_SEED = 236
SB_DEF_HASH_VERSION = 252
SB_DESC_SIZE = 254
SB_MKFS_TIME = 264
SB_BLOCKS_COUNT_HI = 336
SB_R_BLOCKS_COUNT_HI = 340
SB_KBYTES_WRITTEN = 376
SB_INODES_COUNT = 0
SB_LOG_GROUPS_PER_FLEX = 372
SB_BACKUP_BGS = 588
SB_WTIME_HI = 628
SB_MKFS_TIME_HI = 630
SB_LASTCHECK_HI = 631

WriteCallback = ctypes.CFUNCTYPE(None, ctypes.c_ulonglong, ctypes.c_int, errcode_t)
WriteCallback32 = ctypes.CFUNCTYPE(None, ctypes.c_ulong, ctypes.c_int, errcode_t)
BlksizeCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, errcode_t)
DirIterateCallback = ctypes.CFUNCTYPE(ctypes.c_int, ext2_ino_t, ctypes.c_int, ctypes.POINTER(ext2_dir_entry),
                                      ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class WriteTracker:
    """The byte ranges written through one open filesystem. Its callbacks are handed to ``test_io`` when the
    filesystem is opened (the channel keeps them), so each open filesystem reports to its own tracker."""

    def __init__(self) -> None:
        self.block_size = 1024
        self.ranges = array.array("q")  # offset, length, offset, length, ... (no Python object per write)
        extend = self.ranges.extend

        def write64(block: int, count: int, err: int) -> None:
            if not err:
                size = self.block_size
                extend((block * size, count * size) if count >= 0 else (block * size, -count))

        def write_byte(offset: int, count: int, err: int) -> None:
            if not err:
                extend((offset, count))

        def blksize(size: int, err: int) -> None:
            if not err:
                self.block_size = size

        self.callbacks = {"test_io_cb_write_blk64": WriteCallback(write64),
                          "test_io_cb_write_blk": WriteCallback32(write64),
                          "test_io_cb_write_byte": WriteCallback32(write_byte),
                          "test_io_cb_set_blksize": BlksizeCallback(blksize)}


class Library:
    """The loaded libext2fs with typed prototypes, and the write-observing I/O manager."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("ext2fs") or "libext2fs.so.2"
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise UnsupportedError(f"libext2fs is not installed (Debian package libext2fs2): {exc}") from None
        self.com_err: ctypes.CDLL | None
        try:
            self.com_err = ctypes.CDLL(ctypes.util.find_library("com_err") or "libcom_err.so.2")
            self.com_err.error_message.restype = ctypes.c_char_p
            self.com_err.error_message.argtypes = [errcode_t]
        except OSError:
            self.com_err = None
        self._declare()
        self.lib.initialize_ext2_error_table()
        self.unix_io = ctypes.c_void_p.in_dll(self.lib, "unix_io_manager")
        self.test_io = ctypes.c_void_p.in_dll(self.lib, "test_io_manager")
        ctypes.c_void_p.in_dll(self.lib, "test_io_backing_manager").value = self.unix_io.value
        os.environ["UNIX_IO_NOZEROOUT"] = "1"
        self.opening = threading.Lock()

    def _declare(self) -> None:
        lib = self.lib
        fs_p = ctypes.c_void_p
        ino_p = ctypes.POINTER(ext2_ino_t)
        inode_p = ctypes.POINTER(ext2_inode_large)
        protos: dict[str, tuple[Any, list[Any]]] = {
            "ext2fs_initialize": (errcode_t, [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                              ctypes.POINTER(fs_p)]),
            "ext2fs_open": (errcode_t, [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                                        ctypes.c_void_p, ctypes.POINTER(fs_p)]),
            "ext2fs_read_bitmaps": (errcode_t, [fs_p]),
            "ext2fs_allocate_tables": (errcode_t, [fs_p]),
            "ext2fs_close2": (errcode_t, [fs_p, ctypes.c_int]),
            "ext2fs_free": (None, [fs_p]),
            "ext2fs_mkdir": (errcode_t, [fs_p, ext2_ino_t, ext2_ino_t, ctypes.c_char_p]),
            "ext2fs_lookup": (errcode_t, [fs_p, ext2_ino_t, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ino_p]),
            "ext2fs_expand_dir": (errcode_t, [fs_p, ext2_ino_t]),
            "ext2fs_inode_alloc_stats2": (None, [fs_p, ext2_ino_t, ctypes.c_int, ctypes.c_int]),
            "ext2fs_create_resize_inode": (errcode_t, [fs_p]),
            "ext2fs_new_inode": (errcode_t, [fs_p, ext2_ino_t, ctypes.c_int, ctypes.c_void_p, ino_p]),
            "ext2fs_link": (errcode_t, [fs_p, ext2_ino_t, ctypes.c_char_p, ext2_ino_t, ctypes.c_int]),
            "ext2fs_unlink": (errcode_t, [fs_p, ext2_ino_t, ctypes.c_char_p, ext2_ino_t, ctypes.c_int]),
            "ext2fs_read_inode_full": (errcode_t, [fs_p, ext2_ino_t, inode_p, ctypes.c_int]),
            "ext2fs_write_inode_full": (errcode_t, [fs_p, ext2_ino_t, inode_p, ctypes.c_int]),
            "ext2fs_write_new_inode": (errcode_t, [fs_p, ext2_ino_t, inode_p]),
            "ext2fs_symlink": (errcode_t, [fs_p, ext2_ino_t, ext2_ino_t, ctypes.c_char_p, ctypes.c_char_p]),
            "ext2fs_extent_open2": (errcode_t, [fs_p, ext2_ino_t, inode_p, ctypes.POINTER(ctypes.c_void_p)]),
            "ext2fs_extent_free": (None, [ctypes.c_void_p]),
            "ext2fs_file_open": (errcode_t, [fs_p, ext2_ino_t, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]),
            "ext2fs_file_write": (errcode_t, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                              ctypes.POINTER(ctypes.c_uint)]),
            "ext2fs_file_read": (errcode_t, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                             ctypes.POINTER(ctypes.c_uint)]),
            "ext2fs_file_llseek": (errcode_t, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                               ctypes.POINTER(ctypes.c_uint64)]),
            "ext2fs_file_set_size2": (errcode_t, [ctypes.c_void_p, ctypes.c_uint64]),
            "ext2fs_file_close": (errcode_t, [ctypes.c_void_p]),
            "ext2fs_xattrs_open": (errcode_t, [fs_p, ext2_ino_t, ctypes.POINTER(ctypes.c_void_p)]),
            "ext2fs_xattrs_read": (errcode_t, [ctypes.c_void_p]),
            "ext2fs_xattr_set": (errcode_t, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
            "ext2fs_xattrs_close": (errcode_t, [ctypes.POINTER(ctypes.c_void_p)]),
            "ext2fs_free_ext_attr": (errcode_t, [fs_p, ext2_ino_t, inode_p]),
            "ext2fs_inode_has_valid_blocks2": (ctypes.c_int, [fs_p, inode_p]),
            "ext2fs_punch": (errcode_t, [fs_p, ext2_ino_t, inode_p, ctypes.c_char_p, blk64_t, blk64_t]),
            "ext2fs_dir_iterate2": (errcode_t, [fs_p, ext2_ino_t, ctypes.c_int, ctypes.c_char_p, DirIterateCallback,
                                                ctypes.c_void_p]),
            "initialize_ext2_error_table": (None, []),
        }
        for name, (restype, argtypes) in protos.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes

    def message(self, code: int) -> str:
        if self.com_err is not None:
            text = self.com_err.error_message(code)
            if text:
                return str(text.decode(errors="replace"))
        return f"error {code}"

    def check(self, code: int, doing: str, *, path: str | None = None) -> None:
        if code:
            raise Ext2fsError(f"{doing}: {self.message(code)}", path=path)


    def opened(self, tracker: WriteTracker, opener: Callable[[], int]) -> int:
        """Run ``opener`` (an ``ext2fs_open``/``ext2fs_initialize`` through ``test_io``) with ``tracker``'s
        callbacks in place, so the channel it opens reports to ``tracker``."""
        with self.opening:
            for var, cb in tracker.callbacks.items():
                ctypes.c_void_p.in_dll(self.lib, var).value = ctypes.cast(cb, ctypes.c_void_p).value
            try:
                return opener()
            finally:
                for var in tracker.callbacks:
                    ctypes.c_void_p.in_dll(self.lib, var).value = None


_library: Library | None = None
_library_lock = threading.Lock()


def library() -> Library:
    """The library, loaded once per process."""
    global _library
    with _library_lock:
        if _library is None:
            _library = Library()
        return _library
