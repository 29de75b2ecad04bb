"""Layer tars described entry by entry, the tree they describe after each layer (a model of the reference's apply
semantics, written here independently of the converter), and readers of a converted ext4: the kernel (a loop
mount, as root) and debugfs (no root)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

Path_ = tuple[bytes, ...]


@dataclass
class E:
    """A tar entry to write: kind is file, dir, symlink, link, chr, blk, fifo."""

    name: str | bytes
    kind: str = "file"
    data: bytes = b""
    perm: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    link: str | bytes = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def raw_name(self) -> bytes:
        return self.name if isinstance(self.name, bytes) else self.name.encode()

    @property
    def raw_link(self) -> bytes:
        return self.link if isinstance(self.link, bytes) else self.link.encode()


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
          "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


def make_tar(entries: list[E]) -> bytes:
    """A PAX tar of the entries (names and targets kept as bytes, xattrs as SCHILY.xattr records)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.raw_name.decode("utf-8", "surrogateescape"))
            ti.type = _TYPES[e.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = e.perm, e.uid, e.gid, e.mtime
            ti.linkname = e.raw_link.decode("utf-8", "surrogateescape")
            ti.devmajor, ti.devminor = e.dev
            ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return out.getvalue()


def sparse_tar(tmp: Path, name: str, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """A tar (GNU tar, POSIX sparse 1.0) holding one sparse file."""
    src = tmp / "sparse-src"
    src.mkdir(exist_ok=True)
    f = src / name
    with open(f, "wb") as out:
        out.truncate(size)
        for off, data in pieces:
            out.seek(off)
            out.write(data)
    os.utime(f, (1_700_000_000, 1_700_000_000))
    os.chmod(f, 0o640)
    tar = tmp / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "--owner=0", "--group=0", "--numeric-owner",
                    "--pax-option=delete=atime,delete=ctime", "-C", str(src), "-cf", str(tar), name], check=True)
    return tar.read_bytes()


@dataclass
class Node:
    kind: str
    perm: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    size: int = 0
    target: bytes = b""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def clean(name: bytes) -> Path_:
    parts: list[bytes] = []
    for p in name.split(b"/"):
        if p in (b"", b"."):
            continue
        if p == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return tuple(parts)


class Model:
    """The tree after each layer: path -> Node (hard links share their Node)."""

    def __init__(self) -> None:
        self.tree: dict[Path_, Node] = {(): Node("dir"), (b"lost+found",): Node("dir", perm=0o700)}

    def children(self, path: Path_) -> list[Path_]:
        return [p for p in self.tree if len(p) == len(path) + 1 and p[: len(path)] == path]

    def real(self, parts: Path_, create: bool) -> Path_ | None:
        out: list[bytes] = []
        todo = list(reversed(parts))
        while todo:
            name = todo.pop()
            if name == b"..":
                if out:
                    out.pop()
                continue
            if name in (b"", b"."):
                continue
            here = (*out, name)
            node = self.tree.get(here)
            if node is None:
                if not create:
                    return None
                self.tree[here] = node = Node("dir")
            if node.kind == "symlink":
                if node.target.startswith(b"/"):
                    out = []
                todo.extend(reversed(node.target.split(b"/")))
                continue
            out.append(name)
        return tuple(out)

    def remove_all(self, path: Path_, unpacked: set[Path_], keep: bool = False) -> None:
        node = self.tree.get(path)
        if node is None:
            return
        if node.kind != "dir":
            if path not in unpacked:
                del self.tree[path]
            return
        for child in self.children(path):
            self.remove_all(child, unpacked)
        if not keep and path not in unpacked and not self.children(path):
            del self.tree[path]

    def apply(self, entries: list[E], sparse: dict[bytes, Node] | None = None) -> None:
        unpacked: set[Path_] = set()
        dir_times: list[tuple[Path_, int]] = []
        for e in entries:
            parts = clean(e.raw_name)
            if not parts:
                continue
            parent = self.real(parts[:-1], create=True)
            assert parent is not None
            base = parts[-1]
            path = (*parent, base)
            if base == b".wh..wh..opq":
                self.remove_all(parent, unpacked, keep=True)
                continue
            if base.startswith(b".wh."):
                self.remove_all((*parent, base[4:]), unpacked)
                continue
            old = self.tree.get(path)
            if old is not None and (old.kind != "dir" or e.kind != "dir"):
                self.remove_all(path, unpacked)
            mtime = int(e.mtime // 1)
            if e.kind == "link":
                target = self.real(clean(e.raw_link), create=False)
                assert target is not None
                node = self.tree[target]
            elif e.kind == "dir" and path in self.tree:
                node = self.tree[path]
            else:
                node = Node(e.kind, perm=0o777, data=e.data, size=len(e.data),
                            target=e.raw_link if e.kind == "symlink" else b"", dev=e.dev)
            if sparse and e.raw_name in sparse:
                node = sparse[e.raw_name]
            node.uid, node.gid, node.mtime = e.uid, e.gid, mtime
            if node.kind != "symlink":
                node.perm = e.perm
            node.xattrs.update({k.encode(): v for k, v in e.xattrs.items()})
            self.tree[path] = node
            unpacked.add(path)
            if e.kind == "dir":
                dir_times.append((path, mtime))
        for path, mtime in dir_times:
            self.tree[path].mtime = mtime


def kernel_tree(root: Path) -> dict[Path_, tuple[object, ...]]:
    """Walk a mounted ext4: path -> (kind, perm, uid, gid, mtime, size/sha/target/dev, xattrs, inode)."""
    out: dict[Path_, tuple[object, ...]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames] if dirpath == base else [*dirnames, *filenames]:
            full = os.path.join(dirpath, name) if name else dirpath
            rel = tuple(p for p in os.path.relpath(full, base).split(b"/") if p != b".")
            st = os.lstat(full)
            kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chr",
                    stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}[stat.S_IFMT(st.st_mode)]
            if kind == "file":
                with open(full, "rb") as f:
                    what: object = hashlib.sha256(f.read()).hexdigest()
            elif kind == "symlink":
                what = os.readlink(full)
            elif kind in ("chr", "blk"):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                what = None
            names = [] if kind == "symlink" else os.listxattr(full, follow_symlinks=False)
            xattrs = {k.encode(): os.getxattr(full, k, follow_symlinks=False) for k in names}
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime), st.st_size, what,
                        xattrs, st.st_ino)
    return out


def expected_kernel(model: Model) -> dict[Path_, tuple[object, ...]]:
    """What ``kernel_tree`` should see (inode numbers stand for hard-link groups)."""
    out: dict[Path_, tuple[object, ...]] = {}
    for path, n in model.tree.items():
        if n.kind == "file":
            what: object = hashlib.sha256(n.data).hexdigest()
        elif n.kind == "symlink":
            what = n.target
        elif n.kind in ("chr", "blk"):
            what = n.dev
        else:
            what = None
        size = n.size if n.kind == "file" else len(n.target) if n.kind == "symlink" else None
        out[path] = (n.kind, n.perm, n.uid, n.gid, n.mtime, size, what, dict(n.xattrs), id(n))
    return out


def same_tree(got: dict[Path_, tuple[object, ...]], want: dict[Path_, tuple[object, ...]]) -> list[str]:
    """Differences between a kernel walk and the model (sizes of directories and lost+found not compared)."""
    problems = []
    for path in sorted(set(got) | set(want)):
        name = b"/".join(path).decode(errors="replace") or "/"
        if path not in got or path not in want:
            problems.append(f"{name}: {'missing' if path in want else 'unexpected'}")
            continue
        g, w = got[path], want[path]
        if path in ((), (b"lost+found",)):
            g, w = g[:4], w[:4]
        elif g[0] == "dir":
            g, w = g[:5], w[:5]
        else:
            g, w = g[:5] + g[6:8], w[:5] + w[6:8]
        if g != w:
            problems.append(f"{name}: got {g}, want {w}")
    groups: dict[object, set[object]] = {}
    for path, w in want.items():
        if w[0] == "file" and path in got:
            groups.setdefault(w[-1], set()).add(got[path][-1])
    problems += [f"hard links of one file are {inos}" for inos in groups.values() if len(inos) != 1]
    return problems


def debugfs_listing(image: Path, dirs: list[Path_]) -> dict[Path_, tuple[int, int, int, int]]:
    """``debugfs ls -p`` of directories: path -> (mode, uid, gid, size), read without mounting."""
    cmds = image.parent / "debugfs.cmds"
    cmds.write_bytes(b"".join(b'ls -p "/' + b"/".join(d) + b'"\n' for d in dirs))
    res = subprocess.run(["debugfs", "-f", str(cmds), str(image)], capture_output=True, check=True)
    out: dict[Path_, tuple[int, int, int, int]] = {}
    current: Path_ | None = None
    for line in res.stdout.split(b"\n"):
        if line.startswith(b"debugfs: ls -p "):
            current = clean(line[len(b"debugfs: ls -p "):].strip(b'"'))
            continue
        if current is None or not line.startswith(b"/"):
            continue
        fields = line.split(b"/")
        if len(fields) < 7:
            continue
        mode, uid, gid, name = int(fields[2], 8), int(fields[3]), int(fields[4]), b"/".join(fields[5:-2])
        if name in (b"", b".", b"..") or fields[1] == b"0":  # unused entries of a directory block
            continue
        size = int(fields[-2]) if fields[-2] else 0
        out[(*current, name)] = (mode, uid, gid, size)
    return out
