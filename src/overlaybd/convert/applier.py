"""A layer tar applied to an ext4 with the reference's semantics (overlaybd ``libtar.cpp`` and ``whiteout.cpp``):

* names are cleaned (``//``, ``.``, ``..`` resolved lexically; a leading ``/`` or ``..`` stays at the root); the
  missing parents of an entry are created (mode 0755, owner 0, time 0), whiteouts included;
* ``.wh.NAME`` removes ``NAME``; ``.wh..wh..opq`` empties its directory except what this layer already unpacked;
  neither is created;
* an existing path is replaced: a non-directory is unlinked, a directory removed (what this layer unpacked in it
  stays, and then the replacement fails) unless the new entry is a directory too, which keeps it and its contents;
* regular files (holes kept where the tar stores the file sparse), directories, hard links (to what the tar named
  earlier), symlinks, character and block devices, FIFOs;
* then owner, ``SCHILY.xattr.*`` (security.capability, trusted.*, user.*, ...), access/change/modification time
  (whole seconds) and permission bits with setuid/setgid/sticky (not for a symlink); a hard link sets them on the
  inode it shares; directory times are set again at the end, in the order the directories came.

Where this differs from the reference: a parent that is a symlink is followed (inside the image, as containerd's
applier does) where the reference refuses the entry; a symlink keeps the target the tar gives, not a cleaned one;
``.wh.`` with no name is ignored instead of removing its directory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import FormatError
from . import ext2fs, tarlayer
from .ext4 import Attributes, Ext4Image
from .tarlayer import TarEntry

log = logging.getLogger(__name__)

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
MAX_NAME = 255
MAX_SYMLINKS = 40
IMPLICIT_DIR_MODE = 0o755
Path = tuple[bytes, ...]


class ApplyError(FormatError):
    """A tar entry that cannot be applied (the message names it and its offset in the tar)."""


def clean(name: bytes) -> tuple[bool, Path]:
    """``(rooted, components)`` of a tar name after the reference's ``clean_name`` (Plan 9 lexical rules); leading
    ``..`` components are dropped, as they resolve to the root anyway (pure)."""
    rooted = name.startswith(b"/")
    out: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not rooted:
                out.append(part)
            continue
        out.append(part)
    while out and out[0] == b"..":
        out.pop(0)
    return rooted, tuple(out)


@dataclass
class ApplyStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    removed: int = 0

    def as_json(self) -> dict[str, int]:
        return {"entries": self.entries, "files": self.files, "bytes": self.bytes, "whiteouts": self.whiteouts,
                "removed": self.removed}


class Applier:
    """Applies tars to one open ``Ext4Image``, keeping a name cache of the directories it visits."""

    def __init__(self, fs: Ext4Image) -> None:
        self.fs = fs
        self._dirs: dict[int, dict[bytes, tuple[int, int]]] = {}

    # -- the directory cache ---------------------------------------------------------------------------------------
    def children(self, ino: int) -> dict[bytes, tuple[int, int]]:
        known = self._dirs.get(ino)
        if known is None:
            known = {e.name: (e.ino, e.file_type) for e in self.fs.entries(ino)}
            self._dirs[ino] = known
        return known

    def _added(self, parent: int, name: bytes, ino: int, file_type: int) -> None:
        self.children(parent)[name] = (ino, file_type)
        if file_type == ext2fs.EXT2_FT_DIR:
            self._dirs[ino] = {}

    # -- resolving -------------------------------------------------------------------------------------------------
    def resolve_dir(self, parts: Path, *, create: bool, entry: TarEntry) -> tuple[int, Path] | None:
        """The directory ``parts`` names (symlinks followed inside the image), created where missing when
        ``create``; ``(inode, real path)``, or None when it is missing and not to be created."""
        todo = list(reversed(parts))
        inos = [ext2fs.EXT2_ROOT_INO]
        path: list[bytes] = []
        hops = 0
        while todo:
            name = todo.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if path:
                    path.pop()
                    inos.pop()
                continue
            here = inos[-1]
            found = self.children(here).get(name)
            if found is None:
                if not create:
                    return None
                self._check_name(name, entry)
                ino = self.fs.mkdir(here, name, IMPLICIT_DIR_MODE)
                self._added(here, name, ino, ext2fs.EXT2_FT_DIR)
                found = (ino, ext2fs.EXT2_FT_DIR)
            ino, file_type = found
            if file_type == ext2fs.EXT2_FT_SYMLINK:
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise self._error(entry, "too many symlinks in its path")
                target = self.fs.readlink(ino)
                if target.startswith(b"/"):
                    inos, path = [ext2fs.EXT2_ROOT_INO], []
                todo.extend(reversed(target.split(b"/")))
                continue
            if file_type != ext2fs.EXT2_FT_DIR:
                raise self._error(entry, f"{b'/'.join([*path, name]).decode(errors='replace')} is not a directory")
            inos.append(ino)
            path.append(name)
        return inos[-1], tuple(path)

    @staticmethod
    def _error(entry: TarEntry, what: str) -> ApplyError:
        return ApplyError(f"tar entry {entry.name.decode(errors='replace')!r}: {what}", offset=entry.offset)

    def _check_name(self, name: bytes, entry: TarEntry) -> None:
        if len(name) > MAX_NAME:
            raise self._error(entry, f"a name of {len(name)} bytes (ext4 allows {MAX_NAME})")

    # -- removing --------------------------------------------------------------------------------------------------
    def remove_all(self, parent: int, name: bytes, path: Path, unpacked: set[Path], *, keep_dir: bool = False
                   ) -> int:
        """The reference's ``remove_all``: remove ``name`` and everything under it, except what ``unpacked``
        holds (a directory still holding such entries stays). ``keep_dir``: empty it but keep it. Returns the
        number of entries removed."""
        if keep_dir:
            found: tuple[int, int] | None = (parent, ext2fs.EXT2_FT_DIR)
        else:
            found = self.children(parent).get(name)
        if found is None:
            return 0
        removed = 0
        # post-order walk without recursion: (parent inode, name, inode, type, path, children listed?)
        stack: list[tuple[int, bytes, int, int, Path, bool]] = [(parent, name, found[0], found[1], path, False)]
        while stack:
            up, nm, ino, file_type, p, listed = stack.pop()
            if file_type != ext2fs.EXT2_FT_DIR:
                if p not in unpacked:
                    self.fs.unlink(up, nm, ino)
                    del self.children(up)[nm]
                    removed += 1
                continue
            if not listed:
                stack.append((up, nm, ino, file_type, p, True))
                for child, (cino, ctype) in list(self.children(ino).items()):
                    stack.append((ino, child, cino, ctype, (*p, child), False))
                continue
            if keep_dir and ino == parent and p == path:
                continue
            if p in unpacked or self.children(ino):
                continue
            self.fs.rmdir(up, nm, ino)
            del self.children(up)[nm]
            self._dirs.pop(ino, None)
            removed += 1
        return removed

    # -- applying ----------------------------------------------------------------------------------------------------
    def apply(self, entries: Iterable[TarEntry]) -> ApplyStats:
        stats = ApplyStats()
        unpacked: set[Path] = set()
        dir_times: list[tuple[Path, int]] = []
        for entry in entries:
            stats.entries += 1
            self._apply_one(entry, unpacked, dir_times, stats)
        for path, mtime in dir_times:
            where = self.resolve_dir(path, create=False, entry=TarEntry("dir", b"/".join(path), b"", 0, 0, 0, 0, 0))
            if where is not None:
                self.fs.set_time(where[0], mtime)
        return stats

    def _apply_one(self, entry: TarEntry, unpacked: set[Path], dir_times: list[tuple[Path, int]],
                   stats: ApplyStats) -> None:
        rooted, parts = clean(entry.name)
        if not parts:
            self._apply_to_root(entry, rooted, unpacked, dir_times)
            return
        where = self.resolve_dir(parts[:-1], create=True, entry=entry)
        assert where is not None
        parent, parent_path = where
        base = parts[-1]
        path = (*parent_path, base)
        if base.startswith(WHITEOUT):
            stats.whiteouts += 1
            if base == OPAQUE:
                stats.removed += self.remove_all(parent, b"", parent_path, unpacked, keep_dir=True)
            elif len(base) > len(WHITEOUT):
                target = base[len(WHITEOUT):]
                stats.removed += self.remove_all(parent, target, (*parent_path, target), unpacked)
            return
        self._check_name(base, entry)
        is_dir = entry.kind == tarlayer.DIRECTORY
        existing = self._clear_for(entry, parent, base, path, unpacked, is_dir)
        attrs = Attributes(entry.uid, entry.gid, entry.mtime, entry.perm)
        ino, file_type, set_already = self._create(entry, attrs, parent, base, existing)
        if entry.xattrs:
            self.fs.set_xattrs(ino, entry.xattrs)
        if not set_already:
            self.fs.set_attributes(ino, attrs, keep_perm=file_type == ext2fs.EXT2_FT_SYMLINK)
        if is_dir:
            dir_times.append((path, entry.mtime))
        elif entry.kind == tarlayer.REGULAR:
            stats.files += 1
            stats.bytes += entry.size
        unpacked.add(path)

    def _apply_to_root(self, entry: TarEntry, rooted: bool, unpacked: set[Path],
                       dir_times: list[tuple[Path, int]]) -> None:
        """An entry naming the root: ``./`` gives the root its attributes; anything else is ignored."""
        if entry.kind != tarlayer.DIRECTORY or rooted:
            log.info("tar entry %r resolves to the root: ignored", entry.name)
            return
        if entry.xattrs:
            self.fs.set_xattrs(ext2fs.EXT2_ROOT_INO, entry.xattrs)
        self.fs.set_attributes(ext2fs.EXT2_ROOT_INO, Attributes(entry.uid, entry.gid, entry.mtime, entry.perm))
        unpacked.add(())
        dir_times.append(((), entry.mtime))

    def _clear_for(self, entry: TarEntry, parent: int, base: bytes, path: Path, unpacked: set[Path],
                   is_dir: bool) -> tuple[int, int] | None:
        """Make room for the entry: what is at its name goes, except a directory that a directory replaces (kept,
        and returned as ``(inode, file type)``)."""
        existing = self.children(parent).get(base)
        if existing is None:
            return None
        ino, file_type = existing
        if file_type != ext2fs.EXT2_FT_DIR:
            self.fs.unlink(parent, base, ino)
            del self.children(parent)[base]
            return None
        if is_dir:
            return existing
        self.remove_all(parent, base, path, unpacked)
        if base in self.children(parent):
            raise self._error(entry, "replaces a directory holding entries of this same layer")
        return None

    def _create(self, entry: TarEntry, attrs: Attributes, parent: int, base: bytes,
                existing: tuple[int, int] | None) -> tuple[int, int, bool]:
        """Make the entry's inode (or keep the existing directory); ``(inode, file type, attributes set)``: a new
        file or device is made with its attributes, the rest get them afterwards."""
        fs = self.fs
        kind = entry.kind
        if kind == tarlayer.DIRECTORY:
            if existing is not None:
                return existing[0], existing[1], False
            ino = fs.mkdir(parent, base, entry.perm)
            self._added(parent, base, ino, ext2fs.EXT2_FT_DIR)
            return ino, ext2fs.EXT2_FT_DIR, False
        if kind == tarlayer.REGULAR:
            ino = fs.create(parent, base, attrs)
            self._added(parent, base, ino, ext2fs.EXT2_FT_REG_FILE)
            fs.write_data(ino, entry.pieces(), entry.size)
            return ino, ext2fs.EXT2_FT_REG_FILE, True
        if kind == tarlayer.SYMLINK:
            if not entry.link:
                raise self._error(entry, "a symlink without a target")
            ino = fs.symlink(parent, base, entry.link)
            self._added(parent, base, ino, ext2fs.EXT2_FT_SYMLINK)
            return ino, ext2fs.EXT2_FT_SYMLINK, False
        if kind == tarlayer.HARDLINK:
            _, target = clean(entry.link)
            where = self.resolve_dir(target[:-1], create=False, entry=entry) if target else None
            found = self.children(where[0]).get(target[-1]) if where is not None else None
            if found is None:
                raise self._error(entry, f"a hard link to {entry.link.decode(errors='replace')!r}, which is not "
                                         "in the image")
            ino, file_type = found
            if file_type == ext2fs.EXT2_FT_DIR:
                raise self._error(entry, "a hard link to a directory")
            fs.hard_link(parent, base, ino)
            self._added(parent, base, ino, file_type)
            return ino, file_type, False
        ino = fs.mknod(parent, base, tarlayer.KIND_MODES[kind], attrs, entry.devmajor, entry.devminor)
        file_type = {tarlayer.CHARDEV: ext2fs.EXT2_FT_CHRDEV, tarlayer.BLOCKDEV: ext2fs.EXT2_FT_BLKDEV}.get(
            kind, ext2fs.EXT2_FT_FIFO)
        self._added(parent, base, ino, file_type)
        return ino, file_type, True
