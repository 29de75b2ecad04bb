"""Just enough of ext2/3/4 to read a file by path out of a block device (for the interop tests).

superblock (byte 1024) -> group descriptors -> inode table -> inode -> extent tree (or the classic block map) ->
bytes. Directories are scanned linearly (an htree directory's index blocks look like empty entries to a linear
scan, so that works for them too). Read-only, no journal replay, no inline data, no encryption.

Layout references: the Linux kernel's ``Documentation/filesystems/ext4/`` (on-disk format) and ``fs/ext4/ext4.h``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Pread = Callable[[int, int], bytes]

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
ROOT_INODE = 2

INCOMPAT_64BIT = 0x80
INCOMPAT_INLINE_DATA = 0x8000
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
EXTENT_MAGIC = 0xF30A
EXT_INIT_MAX_LEN = 32768

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000


class Ext4Error(Exception):
    pass


@dataclass(frozen=True)
class Superblock:
    inodes_count: int
    blocks_count: int
    first_data_block: int
    block_size: int
    blocks_per_group: int
    inodes_per_group: int
    magic: int
    inode_size: int
    feature_incompat: int
    desc_size: int
    volume_name: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Superblock:
        if len(raw) < 1024:
            raise Ext4Error("superblock is cut short")
        (inodes_count, blocks_lo, _r_blocks, _free_blocks, _free_inodes, first_data_block, log_block_size,
         _log_cluster, blocks_per_group, _clusters_per_group, inodes_per_group) = struct.unpack_from("<11I", raw, 0)
        magic = struct.unpack_from("<H", raw, 0x38)[0]
        if magic != EXT4_MAGIC:
            raise Ext4Error(f"no ext2/3/4 magic at byte {SUPERBLOCK_OFFSET + 0x38}: 0x{magic:04x}")
        rev_level = struct.unpack_from("<I", raw, 0x4C)[0]
        inode_size = struct.unpack_from("<H", raw, 0x58)[0] if rev_level >= 1 else 128
        feature_incompat = struct.unpack_from("<I", raw, 0x60)[0]
        volume_name = raw[0x78:0x88].rstrip(b"\x00")
        desc_size = struct.unpack_from("<H", raw, 0xFE)[0]
        blocks_hi = struct.unpack_from("<I", raw, 0x150)[0]
        if feature_incompat & INCOMPAT_64BIT:
            blocks = blocks_lo | blocks_hi << 32
            desc_size = desc_size or 64
        else:
            blocks = blocks_lo
            desc_size = 32
        return cls(inodes_count, blocks, first_data_block, 1024 << log_block_size, blocks_per_group,
                   inodes_per_group, magic, inode_size, feature_incompat, desc_size, volume_name)


@dataclass(frozen=True)
class Inode:
    number: int
    mode: int
    size: int
    flags: int
    block: bytes  # i_block: 60 bytes (extent tree root or block map)

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & S_IFMT == S_IFREG


@dataclass(frozen=True)
class DirEntry:
    inode: int
    name: bytes
    file_type: int


@dataclass(frozen=True)
class Extent:
    logical: int  # first file block
    length: int  # blocks
    physical: int  # first device block
    uninitialized: bool  # reads as zeros


class Ext4:
    def __init__(self, pread: Pread) -> None:
        self._pread = pread
        self.sb = Superblock.parse(pread(SUPERBLOCK_OFFSET, 1024))
        self.block_size = self.sb.block_size

    def read_block(self, block: int, count: int = 1) -> bytes:
        return self._pread(block * self.block_size, count * self.block_size)

    # -- inodes ----------------------------------------------------------------------------------------------
    def inode_table(self, group: int) -> int:
        sb = self.sb
        gdt = (sb.first_data_block + 1) * self.block_size
        raw = self._pread(gdt + group * sb.desc_size, sb.desc_size)
        table = struct.unpack_from("<I", raw, 0x08)[0]
        if sb.desc_size >= 64:
            table |= struct.unpack_from("<I", raw, 0x28)[0] << 32
        return int(table)

    def inode(self, number: int) -> Inode:
        sb = self.sb
        if not 1 <= number <= sb.inodes_count:
            raise Ext4Error(f"inode {number} out of range (1..{sb.inodes_count})")
        group, index = divmod(number - 1, sb.inodes_per_group)
        at = self.inode_table(group) * self.block_size + index * sb.inode_size
        raw = self._pread(at, min(sb.inode_size, 256))
        mode = struct.unpack_from("<H", raw, 0x00)[0]
        size = struct.unpack_from("<I", raw, 0x04)[0] | struct.unpack_from("<I", raw, 0x6C)[0] << 32
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        return Inode(number, mode, size, flags, bytes(raw[0x28:0x28 + 60]))

    # -- block mapping ---------------------------------------------------------------------------------------
    def extents(self, inode: Inode) -> list[Extent]:
        if inode.flags & INLINE_DATA_FL:
            raise Ext4Error(f"inode {inode.number} keeps its data inline (not supported here)")
        if inode.flags & EXTENTS_FL:
            return sorted(self._walk_extent_node(inode.block), key=lambda e: e.logical)
        return list(self._block_map(inode))

    def _walk_extent_node(self, node: bytes) -> Iterator[Extent]:
        magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC:
            raise Ext4Error(f"bad extent header magic 0x{magic:04x}")
        for k in range(entries):
            at = 12 + 12 * k
            if depth == 0:
                ee_block, ee_len, start_hi, start_lo = struct.unpack_from("<IHHI", node, at)
                uninit = ee_len > EXT_INIT_MAX_LEN
                length = ee_len - EXT_INIT_MAX_LEN if uninit else ee_len
                yield Extent(ee_block, length, start_hi << 32 | start_lo, uninit)
            else:
                _ei_block, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, at)
                yield from self._walk_extent_node(self.read_block(leaf_hi << 32 | leaf_lo))

    def _block_map(self, inode: Inode) -> Iterator[Extent]:
        """The ext2/3 map: 12 direct pointers, then single, double and triple indirect blocks."""
        ptrs = struct.unpack_from("<15I", inode.block, 0)
        per_block = self.block_size // 4
        nblocks = -(-inode.size // self.block_size)
        logical = 0

        def walk(block: int, level: int) -> Iterator[Extent]:
            nonlocal logical
            if level == 0:
                if block:
                    yield Extent(logical, 1, block, False)
                logical += 1
                return
            if not block:
                logical += per_block ** level
                return
            for child in struct.unpack(f"<{per_block}I", self.read_block(block)):
                if logical >= nblocks:
                    return
                yield from walk(child, level - 1)

        for k, ptr in enumerate(ptrs):
            if logical >= nblocks:
                return
            yield from walk(ptr, 0 if k < 12 else k - 11)

    def read_file(self, inode: Inode) -> bytes:
        out = bytearray(inode.size)
        bs = self.block_size
        for ext in self.extents(inode):
            start = ext.logical * bs
            if start >= inode.size or ext.uninitialized:
                continue
            n = min(ext.length * bs, inode.size - start)
            out[start : start + n] = self._pread(ext.physical * bs, n)
        return bytes(out)

    # -- directories -----------------------------------------------------------------------------------------
    def list_dir(self, inode: Inode) -> list[DirEntry]:
        if not inode.is_dir:
            raise Ext4Error(f"inode {inode.number} is not a directory")
        data = self.read_file(inode)
        entries: list[DirEntry] = []
        bs = self.block_size
        for base in range(0, len(data), bs):
            pos = base
            end = min(base + bs, len(data))
            while pos + 8 <= end:
                ino, rec_len, name_len, file_type = struct.unpack_from("<IHBB", data, pos)
                if rec_len < 8 or pos + rec_len > end:
                    raise Ext4Error(f"directory inode {inode.number}: bad entry at byte {pos}")
                if ino:
                    entries.append(DirEntry(ino, bytes(data[pos + 8 : pos + 8 + name_len]), file_type))
                pos += rec_len
        return entries

    def lookup(self, path: str) -> Inode:
        node = self.inode(ROOT_INODE)
        for part in [p for p in path.split("/") if p]:
            found = [e for e in self.list_dir(node) if e.name == part.encode()]
            if not found:
                raise FileNotFoundError(path)
            node = self.inode(found[0].inode)
        return node

    def read_path(self, path: str) -> bytes:
        node = self.lookup(path)
        if not node.is_reg:
            raise Ext4Error(f"{path} is not a regular file")
        return self.read_file(node)
