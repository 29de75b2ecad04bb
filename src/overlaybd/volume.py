"""A volume: a directory holding an overlaybd-style ``config.json`` (lowers bottom→top, upper data/index, the keys
of the reference image config) and its layer files. Snapshots are the sealed lowers; the upper takes writes.

```
VOL/config.json        {"lowers": [{"file": "layers/..."}], "upper": {"data": ..., "index": ...}, "pyoverlaybd": {...}}
VOL/layers/NNNN-UUID.lsmt|.zfile   sealed snapshots
VOL/upper-XXXXXXXX.data|.index     the writable layer
VOL/.lock              flock: one writer at a time
```

**Self-contained.** Every path in ``config.json`` is relative to the volume's directory, so a volume may be copied
(``cp -a``, ``rsync -a``, tar) or moved and opens as itself; a path that leads outside the directory is refused, so
a copy never opens, locks or writes a file of another volume. Configs of earlier versions (absolute paths) still
open: their paths are read relative to the folder they were written in (where the upper was), wherever the volume
is now, and the next change writes them relative.

**Atomic changes.** A change records the files it is about to make (``pending`` in config.json), writes them, then
switches ``config.json`` atomically, so a crash at any point leaves either the old or the new volume; clean-up then
removes only files the volume recorded as its own (never another file someone put in the directory).

**Layers.** Snapshots are opened through a ``LayerOpener``: local files by default; ``overlaybd.remote.lazy``
gives one that also opens layers pulled lazily (still in their repository).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

from . import operations, trace
from .errors import LockedError, UsageError
from .formats.detect import open_layer
from .formats.lsmt.index import covered, merge_layers
from .formats.lsmt.layer import LsmtLayer
from .formats.lsmt.spec import SECTOR, format_uuid
from .formats.lsmt.stack import LowerLayer, LsmtStack
from .formats.lsmt.writable import WritableBase
from .formats.output import Compression
from .volume_config import (  # re-exported: the volume's names, wherever they are defined
    COMMIT_FILE as COMMIT_FILE,
)
from .volume_config import (
    CONFIG as CONFIG,
)
from .volume_config import (
    META as META,
)
from .volume_config import (
    VERSION as VERSION,
)
from .volume_config import (
    Snapshot as Snapshot,
)
from .volume_config import (
    VolumeError as VolumeError,
)
from .volume_config import (
    lower_paths,
    read_config,
    read_snapshot,
    relative_config,
    resolve_snapshot,
    snapshot_of,
)

LAYERS = "layers"
LOCK = ".lock"
Layer = LsmtLayer | WritableBase


class LayerOpener(Protocol):
    """Opens a volume's snapshots ``numbers`` (their files, or wherever they are)."""

    def open_lowers(self, volume: Volume, numbers: Sequence[int], owned: ExitStack) -> list[Layer]: ...


class LocalLayers:
    """Snapshots from their local files; one still in a repository (pulled lazily) is a clear error."""

    def open_lowers(self, volume: Volume, numbers: Sequence[int], owned: ExitStack) -> list[Layer]:
        return [self.open_local(volume, n, owned) for n in numbers]

    @staticmethod
    def open_local(volume: Volume, n: int, owned: ExitStack) -> Layer:
        path = volume.lowers[n]
        if os.path.exists(path):
            return open_layer(path, owned=owned)
        if volume.in_repository(n):
            raise VolumeError(f"snapshot {n} is still in its repository (pulled lazily): open the volume with "
                              "overlaybd's remote support (overlaybd.remote.lazy.RemoteLayers)", path=path)
        raise VolumeError(f"snapshot {n}: layer file is missing", path=path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Volume:
    """A volume directory: its config, its snapshots (sealed lowers) and its writable upper (module docstring).
    ``open()`` gives the device as an ``LsmtStack``; ``snapshot()``, ``merge()``, ``clone()`` change it atomically.
    """

    def __init__(self, path: str, *, opener: LayerOpener | None = None) -> None:
        self.path = os.path.abspath(path)
        self.opener: LayerOpener = opener or LocalLayers()
        self.reload()

    def reload(self) -> None:
        """Read config.json again: it is the truth, and other processes change it (snapshot, merge)."""
        self.config: dict[str, Any] = read_config(self.path)

    # -- paths -------------------------------------------------------------------------------------------------
    def file(self, recorded: str) -> str:
        """A path recorded in config.json (relative to the volume) as an absolute path."""
        return os.path.join(self.path, recorded)

    @property
    def lowers(self) -> list[str]:
        return lower_paths(self.path, self.config)

    def in_repository(self, n: int) -> bool:
        """Whether snapshot ``n`` has no local file because it is still in its repository (pulled lazily)."""
        return not os.path.exists(self.lowers[n]) and "digest" in self.config["lowers"][n]

    @property
    def upper(self) -> tuple[str, str]:
        up = self.config["upper"]
        return self.file(up["data"]), self.file(up["index"])

    @property
    def size(self) -> int:
        return int(self.config.get(META, {}).get("size", 0))

    # -- creation ----------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, size: int | None, lowers: list[str] | None = None, *,
               opener: LayerOpener | None = None) -> Volume:
        """A new volume in a new or empty directory; ``lowers`` (bottom→top layer files) become its first
        snapshots, hard-linked in (copied across file systems)."""
        lowers = lowers or []
        if size is None:
            if not lowers:
                raise UsageError("give --size for a volume without a base")
            with operations.open_stack(lowers) as stack:
                size = stack.size
        with new_volume_dir(path) as target:
            os.makedirs(os.path.join(target, LAYERS), exist_ok=True)
            files = [_share(src, os.path.join(target, LAYERS, f"{n:04d}-{_unnumbered(os.path.basename(src))}"))
                     for n, src in enumerate(lowers)]
            parent = None
            if files:
                with ExitStack() as owned:
                    parent = format_uuid(open_layer(files[-1], owned=owned).uuid)
            now = _now()
            entries = [{"file": f} for f in files]
            return cls.assemble(target, size, entries, parent_uuid=parent, created={f: now for f in files},
                                opener=opener)

    @classmethod
    def assemble(cls, path: str, size: int, lowers: list[dict[str, Any]], *, parent_uuid: str | None,
                 settings: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                 created: dict[str, str] | None = None, opener: LayerOpener | None = None) -> Volume:
        """Write a volume from layers already in its directory: ``lowers`` are config entries (``file`` or
        ``dir``, paths inside ``path``; ``digest``/``size`` for layers still in a repository), ``settings`` the
        reference's other config keys (``repoBlobUrl``, ``download``, ``recordTracePath``), ``meta`` more of
        ours. A fresh upper is made on top. The directory should come from ``new_volume_dir``."""
        path = os.path.abspath(path)
        if size <= 0 or size % SECTOR:
            raise UsageError(f"size {size} must be a positive multiple of {SECTOR}")
        data, index = _new_upper(path, size, parent_uuid)

        def rel(p: str) -> str:
            return os.path.relpath(p, path) if os.path.isabs(p) else p

        config: dict[str, Any] = dict(settings or {})
        config["lowers"] = [{k: rel(v) if k in ("file", "dir") else v for k, v in e.items()} for e in lowers]
        config["upper"] = {"data": rel(data), "index": rel(index)}
        config[META] = {**(meta or {}), "version": VERSION, "size": size,
                        "created": {rel(k): v for k, v in (created or {}).items()}}
        _write_config(path, relative_config(config, path, os.path.join(path, CONFIG)))
        return cls(path, opener=opener)

    # -- locking -----------------------------------------------------------------------------------------------
    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Held by whoever may change the volume (a writable server, snapshot, merge). Not reentrant."""
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise LockedError(f"the volume is in use by {holder} (served writable, or another change)",
                                  path=self.path) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        """Read from the layers' headers; a layer in another form (ZFile, tar, pulled lazily) is opened."""
        self.reload()
        found = [read_snapshot(self.path, self.config, n) for n in range(len(self.lowers))]
        rest = [n for n, snap in enumerate(found) if snap is None]
        with ExitStack() as owned:
            for n, layer in zip(rest, self.opener.open_lowers(self, rest, owned), strict=True):
                found[n] = snapshot_of(self.path, self.config, n, layer.uuid, layer.parent_uuid, layer.header.message,
                                       layer.virtual_size)
        return [snap for snap in found if snap is not None]

    def resolve(self, ref: str) -> int:
        """A snapshot by number (``3``, ``@3``), ``HEAD``/``HEAD~N``, or a unique prefix of its UUID."""
        return resolve_snapshot(self.path, self.snapshots(), ref)

    def open(self, *, writable: bool = False, snapshot: int | None = None, record_trace: str | None = None
             ) -> LsmtStack:
        """The device: all snapshots plus the upper, or a snapshot (read-only).

        ``record_trace``: note which blocks of which layer are read, written to that file at close. A trace
        named by the config's ``recordTracePath`` is replayed in the background at open (prefetch)."""
        self.reload()
        owned = ExitStack()
        try:
            if writable:
                owned.enter_context(self.writer_lock())
            count = len(self.lowers) if snapshot is None else snapshot + 1
            lowers: list[LowerLayer] = list(self.opener.open_lowers(self, range(count), owned))
            if record_trace:
                recorder = trace.TraceRecorder(record_trace)
                owned.callback(recorder.close)
                lowers = [trace.RecordedLayer(layer, k, recorder) for k, layer in enumerate(lowers)]
            else:
                self._prefetch(lowers)
            upper = None
            if snapshot is None:
                data, index = self.upper
                top = open_layer(data, index, owned=owned, writable=writable)
                if not isinstance(top, WritableBase):
                    raise VolumeError("the upper layer is not writable", path=data)
                upper = top
            stack = LsmtStack(lowers, upper, owned=owned, size=self.size or None)
        except BaseException:
            owned.close()
            raise
        return stack

    def _prefetch(self, lowers: Sequence[LowerLayer]) -> None:
        replay_from = self.config.get("recordTracePath")
        if replay_from and os.path.isfile(replay_from):
            with open(replay_from, "rb") as f:
                raw = f.read()
            if trace.is_trace(raw[:4]):
                trace.replay(trace.decode(raw, path=replay_from), [layer.data for layer in lowers])

    # -- changing ----------------------------------------------------------------------------------------------
    def snapshot(self, message: str = "", compression: Compression | None = None) -> Snapshot:
        """Commit the upper into a new sealed layer on top, and start a fresh upper."""
        with self.writer_lock():
            self.reload()
            data, index = self.upper
            number = len(self.lowers)
            new_uuid = str(uuidlib.uuid4())
            target = os.path.join(LAYERS, f"{number:04d}-{new_uuid}.{'zfile' if compression else 'lsmt'}")
            new_data, new_index = _upper_names()
            self._record_pending([target, new_data, new_index])
            with ExitStack() as owned:
                # opened writable: its flock refuses a snapshot while anyone else has the upper open for writing
                upper = open_layer(data, index, owned=owned, writable=True)
                if not isinstance(upper, WritableBase):
                    raise VolumeError("the upper layer is not writable", path=data)
                operations.commit(upper, self.file(target), uuid=new_uuid, parent_uuid=self._top_uuid(),
                                  message=message, compression=compression)
            operations.create(self.file(new_data), self.file(new_index), self.size, parent_uuid=new_uuid)
            config = dict(self.config)
            config["lowers"] = [*self.config.get("lowers", []), {"file": target}]
            config["upper"] = {**self.config["upper"], "data": new_data, "index": new_index}
            config[META] = {**config.get(META, {}), "created": {**config.get(META, {}).get("created", {}),
                                                                target: _now()}}
            self._switch(config, dropped=list(self.config["upper"].values()))
        return self.snapshots()[-1]

    def merge(self, first: int, last: int, compression: Compression | None = None) -> Snapshot:
        """Flatten snapshots ``first..last`` (inclusive) into one that keeps the top one's UUID."""
        with self.writer_lock():
            self.reload()
            lowers = self.lowers
            if not (0 <= first <= last < len(lowers)):
                raise VolumeError(f"no snapshot range {first}..{last} (the volume has {len(lowers)})",
                                  path=self.path)
            if first == last:
                return self.snapshots()[first]
            top = self.snapshots()[last]
            target = os.path.join(LAYERS, f"{first:04d}-{top.uuid}-merged.{'zfile' if compression else 'lsmt'}")
            self._record_pending([target])
            with ExitStack() as owned:
                layers = self.opener.open_lowers(self, range(first, last + 1), owned)
                operations.merge(layers, self.file(target), uuid=top.uuid, message=top.message,
                                 compression=compression, force=True)
            entries = self.config["lowers"]
            config = dict(self.config)
            config["lowers"] = [*entries[:first], {"file": target}, *entries[last + 1 :]]
            created = dict(config.get(META, {}).get("created", {}))
            created[target] = created.get(entries[last].get("file") or entries[last].get("dir"), _now())
            config[META] = {**config.get(META, {}), "created": created}
            self._switch(config, dropped=[e.get("file") or e["dir"] for e in entries[first : last + 1]])
        return self.snapshots()[first]

    def diff(self, a: int, b: int) -> list[tuple[int, int]]:
        """Byte ranges that snapshots after ``a`` up to ``b`` wrote or discarded (``a`` = -1: from empty)."""
        self.reload()
        lo, hi = sorted((a, b))
        with ExitStack() as owned:
            layers = self.opener.open_lowers(self, range(lo + 1, hi + 1), owned)
            seg = merge_layers([layer.segments() for layer in layers[::-1]])
        starts, ends = covered(seg)
        return [(int(s) * SECTOR, int(e - s) * SECTOR) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]

    def clone(self, snapshot: int, target: str) -> Volume:
        """A new volume over the same read-only layers (hard links, so each volume can drop its own; layers
        not downloaded yet are shared by reference to the same repository)."""
        self.reload()
        if all(os.path.exists(p) for p in self.lowers[: snapshot + 1]):
            return Volume.create(target, self.size, self.lowers[: snapshot + 1], opener=self.opener)
        parent = self._top_uuid(snapshot)
        with new_volume_dir(target) as path:
            os.makedirs(os.path.join(path, LAYERS), exist_ok=True)
            entries = []
            for n, entry in enumerate(self.config["lowers"][: snapshot + 1]):
                base = _unnumbered(os.path.basename(entry.get("file") or entry["dir"]))
                name = os.path.join(LAYERS, f"{n:04d}-{base}")
                kept = {k: v for k, v in entry.items() if k not in ("file", "dir")}
                source = self.lowers[n]
                if os.path.exists(source):
                    kept["file"] = _share(source, os.path.join(path, name))
                else:
                    kept["dir"] = name
                entries.append(kept)
            settings: dict[str, Any] = {k: self.config[k] for k in ("repoBlobUrl", "download") if k in self.config}
            return Volume.assemble(path, self.size, entries, parent_uuid=parent, settings=settings,
                                   opener=self.opener)

    # -- layers ------------------------------------------------------------------------------------------------
    def open_lower(self, n: int, owned: ExitStack) -> Layer:
        """Snapshot ``n`` as a layer, through the volume's opener."""
        return self.opener.open_lowers(self, [n], owned)[0]

    def _top_uuid(self, snapshot: int | None = None) -> str | None:
        n = len(self.lowers) - 1 if snapshot is None else snapshot
        if n < 0:
            return None
        with ExitStack() as owned:
            return format_uuid(self.open_lower(n, owned).uuid)

    # -- changes made by others (pull, push) ---------------------------------------------------------------------
    def begin_change(self, names: list[str]) -> None:
        """Before making files in the volume (paths relative to it), under ``writer_lock``: record them as the
        volume's own, so that a crash before ``extend`` leaves nothing the next change cannot remove."""
        self._record_pending(names)

    def extend(self, entries: list[dict[str, Any]], *, fresh_upper: bool, top_uuid: str) -> None:
        """Add snapshots on top (config entries whose files are in place, paths relative to the volume; the new
        top layer's uuid is ``top_uuid``), under ``writer_lock``. ``fresh_upper``: the upper's writes are dropped
        and a new empty upper starts on the new top; otherwise the upper stays, its writes above the new ones."""
        dropped: list[str] = []
        upper = dict(self.config["upper"])
        if fresh_upper:
            new_data, new_index = _upper_names()
            self._record_pending([new_data, new_index])
            operations.create(self.file(new_data), self.file(new_index), self.size, parent_uuid=top_uuid)
            dropped = [upper["data"], upper["index"]]
            upper.update(data=new_data, index=new_index)
        config = dict(self.config)
        config["lowers"] = [*self.config.get("lowers", []), *entries]
        config["upper"] = upper
        now = _now()
        meta = config.get(META, {})
        config[META] = {**meta, "created": {**meta.get("created", {}),
                                            **{e.get("file") or e["dir"]: now for e in entries}}}
        self._switch(config, dropped=dropped)

    def note_repository(self, n: int, reference: str, digest: str, size: int) -> None:
        """Snapshot ``n`` is blob ``digest`` in repository ``reference`` (what a push or pull learned)."""
        with self.writer_lock():
            self.reload()
            config = dict(self.config)
            lowers = [dict(e) for e in config["lowers"]]
            entry = lowers[n]
            entry.setdefault("digest", digest)
            entry.setdefault("size", size)
            if entry["digest"] == digest and reference not in entry.get("repositories", []):
                entry["repositories"] = [*entry.get("repositories", []), reference]
            config["lowers"] = lowers
            _write_config(self.path, config)
            self.config = config

    def has_unsnapshotted_writes(self) -> bool:
        data, index = self.upper
        with ExitStack() as owned:
            upper = open_layer(data, index, owned=owned)
            return bool(len(upper.segments()))

    # -- atomic changes and clean-up -----------------------------------------------------------------------------
    def _referenced(self, config: dict[str, Any]) -> set[str]:
        out = {e.get("file") or e.get("dir") for e in config.get("lowers", [])}
        out.update(config["upper"].values())
        return {p for p in out if p}

    def _record_pending(self, names: list[str]) -> None:
        """Before making files: note them in config.json as the volume's own, so that if we die before the switch,
        the next change knows it may remove them. Notes of files already gone are dropped."""
        meta = dict(self.config.get(META, {}))
        still = [p for p in meta.get("pending", []) if os.path.lexists(self.file(p)) or _temporaries(self.file(p))]
        meta["pending"] = sorted(set(still) | set(names))
        config = {**self.config, META: meta}
        _write_config(self.path, config)
        self.config = config

    def _switch(self, config: dict[str, Any], dropped: list[str]) -> None:
        """Make ``config`` the volume (atomically), then remove the files it no longer uses that are the volume's
        own: ``dropped`` and what earlier changes left pending."""
        meta = dict(config.get(META, {}))
        keep = self._referenced(config)
        meta["pending"] = sorted((set(meta.get("pending", [])) | set(dropped)) - keep)
        meta["created"] = {k: v for k, v in meta.get("created", {}).items() if k in keep}
        config = {**config, META: meta}
        _switch_config(self.path, config)
        self.config = config
        for name in meta["pending"]:
            _remove_own(self.file(name))


def _remove_own(path: str) -> None:
    """Remove a file (or a layer folder) the volume made, and the temporary files of an interrupted write of it."""
    for tmp in _temporaries(path):
        os.unlink(tmp)
    if os.path.isdir(path) and not os.path.islink(path):
        commit = os.path.join(path, COMMIT_FILE)
        if os.path.lexists(commit):
            os.unlink(commit)
        for name in os.listdir(path):
            if name.startswith(".download-"):
                os.unlink(os.path.join(path, name))
        try:
            os.rmdir(path)
        except OSError:
            pass
    elif os.path.lexists(path):
        os.unlink(path)


def _temporaries(path: str) -> list[str]:
    """The temporary files ``formats.output`` makes while writing ``path`` (``.NAME.*.tmp`` beside it)."""
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if n.startswith(f".{name}.") and n.endswith(".tmp")]


@contextmanager
def new_volume_dir(path: str) -> Iterator[str]:
    """A new or empty directory for a volume (anything else is refused, so nothing of someone else's is ever in a
    volume); if what is built there fails, the directory is left as it was found (removed, or emptied)."""
    path = os.path.abspath(path)
    made = not os.path.lexists(path)
    if not made:
        if os.path.exists(os.path.join(path, CONFIG)):
            raise UsageError("a volume already exists here", path=path)
        if not os.path.isdir(path) or os.path.islink(path):
            raise UsageError("not a directory", path=path)
        if os.listdir(path):
            raise UsageError("the directory is not empty (a volume needs a new or empty directory)", path=path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the volume's directory: {exc.strerror}", path=path) from None
    try:
        yield path
    except BaseException:
        if made:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for name in os.listdir(path):
                full = os.path.join(path, name)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    os.unlink(full)
        raise


def _share(src: str, dst: str) -> str:
    """Hard-link a layer file into a volume (a copy across filesystems)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dst)
    return dst


def _unnumbered(name: str) -> str:
    """A layer file name without the ``NNNN-`` sequence prefix a volume gives it."""
    head, sep, rest = name.partition("-")
    return rest if sep and len(head) == 4 and head.isdigit() else name


def _upper_names() -> tuple[str, str]:
    tag = uuidlib.uuid4().hex[:8]
    return f"upper-{tag}.data", f"upper-{tag}.index"


def _new_upper(path: str, size: int, parent: str | None) -> tuple[str, str]:
    data, index = (os.path.join(path, n) for n in _upper_names())
    operations.create(data, index, size, parent_uuid=parent)
    return data, index


def _write_config(path: str, config: dict[str, Any]) -> None:
    tmp = os.path.join(path, CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, CONFIG))
    _fsync_dir(path)


def _switch_config(path: str, config: dict[str, Any]) -> None:
    """The moment a change takes effect (a name of its own, so tests can stop a change just before it)."""
    _write_config(path, config)
