"""The cache's folders and files, opened safely: a folder must be the user's own and writable by nobody else (as
ssh asks of its key folders), and every file is opened relative to its folder's descriptor without following
symlinks, so no one can steer a write elsewhere by planting a link."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat

from ..errors import LayerIOError, OverlaybdError

DIR_MODE = 0o700
FILE_MODE = 0o600
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_HEX = re.compile(r"^[0-9a-f]{64}$")


class CacheError(OverlaybdError):
    """The cache cannot be used: its folder is unsafe or unusable, or an entry cannot be opened."""


def _check(fd: int, path: str) -> int:
    st = os.fstat(fd)
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise CacheError("not a folder", path=path)
    if st.st_uid != me:
        os.close(fd)
        raise CacheError(f"the cache folder belongs to uid {st.st_uid}, not to you (uid {me}); a cache must be "
                         "your own (set OVERLAYBD_CACHE_DIR to another folder)", path=path)
    if st.st_mode & 0o022:
        os.close(fd)
        raise CacheError(f"the cache folder is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); refusing it "
                         "as ssh refuses such key folders (chmod go-w, or set OVERLAYBD_CACHE_DIR)", path=path)
    return fd


def open_root(path: str) -> int:
    """The cache's top folder (created if missing), checked. The path itself may be a symlink the user made (to put
    the cache on another disk), but not one that another user owns."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache folder: {exc.strerror}", path=path) from None
    else:
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
            raise CacheError(f"the cache folder is a symlink owned by uid {st.st_uid}; refusing to follow it",
                             path=path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CacheError(f"cannot open the cache folder: {exc.strerror}", path=path) from None
    return _check(fd, path)


def open_subdir(parent: int, name: str, where: str) -> int:
    """A folder inside the cache (created if missing), opened without following a symlink, checked."""
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CacheError(f"cannot create a cache folder: {exc.strerror}", path=os.path.join(where, name)) from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        raise CacheError(f"cannot open a cache folder: {exc.strerror}", path=os.path.join(where, name)) from None
    return _check(fd, os.path.join(where, name))


def open_file(folder: int, name: str, flags: int, where: str, *, create: bool = False) -> int:
    """A regular file in a cache folder, never through a symlink: a link planted in its place is removed (the
    folder is ours) and, when ``create``, a fresh file made."""
    extra = os.O_CREAT if create else 0
    for _attempt in range(2):
        try:
            fd = os.open(name, flags | extra | _NOFOLLOW, FILE_MODE, dir_fd=folder)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            if not create:
                raise CacheError("a symlink where a cache file belongs; not followed",
                                 path=os.path.join(where, name)) from None
            os.unlink(name, dir_fd=folder)  # a symlink where our file belongs: ours is made in its place
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheError("not a regular file", path=os.path.join(where, name))
        return fd
    raise CacheError("cannot replace a symlink", path=os.path.join(where, name))


def same_file(fd: int, folder: int, name: str) -> bool:
    """Does ``name`` in ``folder`` still name the file open as ``fd``? (False once renamed, removed or replaced.)"""
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def lock_entry(folder: int, name: str, mode: int, where: str, *, create: bool = False) -> int:
    """Open and ``flock`` an entry's map, making sure the lock is on the file that the name still names (another
    process may have promoted or reset the entry between our open and our lock). Returns the descriptor; the
    caller closes it. FileNotFoundError if the entry is gone."""
    for _attempt in range(8):
        fd = open_file(folder, name, os.O_RDWR, where, create=create)
        try:
            fcntl.flock(fd, mode)
            if same_file(fd, folder, name):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise CacheError("an entry keeps changing under us", path=os.path.join(where, name))


def is_hex_digest(name: str) -> bool:
    return bool(_HEX.match(name))


def hex_of(digest: str) -> str:
    """``sha256:<hex>`` -> ``<hex>``: the only names the cache makes from a digest."""
    algo, sep, hexdigest = digest.partition(":")
    if algo != "sha256" or not sep or not _HEX.match(hexdigest):
        raise CacheError(f"bad digest {digest!r} (expected sha256:<64 hex digits>)")
    return hexdigest


def origin_key(origin: str) -> str:
    """The folder name of a repository's entries."""
    return hashlib.sha256(origin.encode()).hexdigest()[:32]


def hash_fd(fd: int, size: int, name: str) -> str:
    """``sha256:<hex>`` of the first ``size`` bytes of an open file."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[: min(len(buf), size - pos)]], pos)
        if n <= 0:
            raise LayerIOError("cache data file is short", path=name, offset=pos)
        h.update(view[:n])
        pos += n
    return "sha256:" + h.hexdigest()


class OriginFolder:
    """One repository's unproven entries (``CACHE/origins/<key>``): a checked folder, kept open."""

    def __init__(self, root: str, key: str, fd: int) -> None:
        self.key = key
        self.fd = fd
        self.where = os.path.join(root, "origins", key)

    @staticmethod
    def names(hexdigest: str) -> tuple[str, str, str]:
        """The entry's data, map and bad-mark file names."""
        return hexdigest + ".data", hexdigest + ".map", hexdigest + ".bad"

    def bad_reason(self, hexdigest: str) -> str | None:
        """Why the repository was caught serving other bytes for this blob, or None."""
        try:
            fd = open_file(self.fd, hexdigest + ".bad", os.O_RDONLY, self.where)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 4096).decode(errors="replace").strip() or "its bytes did not match the digest"
        finally:
            os.close(fd)
