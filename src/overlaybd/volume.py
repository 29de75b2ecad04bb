"""A volume: a directory holding an overlaybd-style ``config.json`` (lowers bottom→top, upper data/index, the keys
of the reference image config) and its layer files. Snapshots are the sealed lowers; the upper takes writes.

```
VOL/config.json        {"lowers": [{"file": ...}], "upper": {"data": ..., "index": ...}, "pyoverlaybd": {...}}
VOL/layers/NNNN-UUID.lsmt|.zfile   sealed snapshots
VOL/upper-XXXXXXXX.data|.index     the writable layer
VOL/.lock              flock: one writer at a time
```

Every change writes new files first and switches ``config.json`` atomically last, so a crash at any point leaves
either the old or the new volume, never a mix; files a crash orphaned are removed at the next change.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from . import operations
from .errors import LockedError, OverlaybdError, UsageError
from .formats.detect import open_layer
from .formats.lsmt.index import covered, merge_layers
from .formats.lsmt.layer import LsmtLayer
from .formats.lsmt.spec import SECTOR, format_uuid
from .formats.lsmt.stack import LsmtStack
from .formats.lsmt.writable import WritableBase
from .formats.output import Compression

CONFIG = "config.json"
_SEQ = re.compile(r"^\d{4}-")  # the sequence prefix of a layer file name
LAYERS = "layers"
LOCK = ".lock"
META = "pyoverlaybd"


class VolumeError(OverlaybdError):
    """A volume that is missing, malformed, or asked for something it does not have."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    number: int  # 0 = bottom
    file: str
    uuid: str
    parent_uuid: str
    message: str
    created: str
    virtual_size: int
    file_size: int


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Volume:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.reload()

    def reload(self) -> None:
        """Read config.json again: it is the truth, and other processes change it (snapshot, merge)."""
        cfg = os.path.join(self.path, CONFIG)
        try:
            with open(cfg) as f:
                self.config: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            raise VolumeError("not a volume (no config.json)", path=self.path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VolumeError(f"config.json is not valid JSON: {exc}", path=cfg) from None
        if not isinstance(self.config.get("lowers", []), list) or not isinstance(self.config.get("upper"), dict):
            raise VolumeError("config.json lacks 'lowers' or 'upper'", path=cfg)

    # -- paths -------------------------------------------------------------------------------------------------
    def _abs(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.path, p)

    @property
    def lowers(self) -> list[str]:
        return [self._abs(entry.get("file") or os.path.join(entry["dir"], "overlaybd.commit"))
                for entry in self.config.get("lowers", [])]

    @property
    def upper(self) -> tuple[str, str]:
        up = self.config["upper"]
        return self._abs(up["data"]), self._abs(up["index"])

    @property
    def size(self) -> int:
        return int(self.config.get(META, {}).get("size", 0))

    # -- creation ----------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, size: int | None, lowers: list[str] | None = None) -> Volume:
        """A new volume; ``lowers`` (bottom→top layer files) become its first snapshots, hard-linked in."""
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, CONFIG)):
            raise UsageError("a volume already exists here", path=path)
        lowers = lowers or []
        if size is None:
            if not lowers:
                raise UsageError("give --size for a volume without a base")
            with operations.open_stack(lowers) as stack:
                size = stack.size
        if size <= 0 or size % SECTOR:
            raise UsageError(f"size {size} must be a positive multiple of {SECTOR}")
        os.makedirs(os.path.join(path, LAYERS), exist_ok=True)
        files = [_share(src, os.path.join(path, LAYERS, f"{n:04d}-{_SEQ.sub('', os.path.basename(src))}"))
                 for n, src in enumerate(lowers)]
        parent = _top_uuid(files)
        data, index = _new_upper(path, size, parent)
        config = {"lowers": [{"file": f} for f in files], "upper": {"data": data, "index": index},
                  META: {"version": 1, "size": size, "created": {f: _now() for f in files}}}
        _write_config(path, config)
        return cls(path)

    # -- locking -----------------------------------------------------------------------------------------------
    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Held by whoever may change the volume (a writable server, snapshot, merge). Not reentrant."""
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        self.reload()
        created = self.config.get(META, {}).get("created", {})
        out = []
        with ExitStack() as owned:
            for n, path in enumerate(self.lowers):
                layer = self.open_lower(n, owned)
                out.append(Snapshot(n, path, format_uuid(layer.uuid), format_uuid(layer.parent_uuid),
                                    layer.header.message, created.get(path, ""), layer.virtual_size,
                                    os.path.getsize(path) if os.path.exists(path)
                                    else int(self.config["lowers"][n].get("size", 0))))
        return out

    def resolve(self, ref: str) -> int:
        """A snapshot by number (``3``, ``@3``), ``HEAD``/``HEAD~N``, or a unique prefix of its UUID."""
        snaps = self.snapshots()
        if not snaps:
            raise VolumeError("the volume has no snapshots", path=self.path)
        text = ref.strip().lstrip("@")
        if text.upper().startswith("HEAD"):
            back = text[4:]
            steps = int(back[1:] or 1) if back.startswith("~") else 0
            if back and not back.startswith("~"):
                raise VolumeError(f"bad snapshot reference {ref!r}", path=self.path)
            n = len(snaps) - 1 - steps
        elif text.isdigit():
            n = int(text)
        else:
            hits = [s.number for s in snaps if s.uuid.replace("-", "").startswith(text.replace("-", "").lower())]
            if len(hits) != 1:
                raise VolumeError(f"{ref!r} matches {len(hits)} snapshots", path=self.path)
            n = hits[0]
        if not 0 <= n < len(snaps):
            raise VolumeError(f"no snapshot {ref!r} (the volume has {len(snaps)})", path=self.path)
        return n

    def open(self, *, writable: bool = False, snapshot: int | None = None, record_trace: str | None = None
             ) -> LsmtStack:
        """The device: all snapshots plus the upper, or a snapshot (read-only).

        ``record_trace``: note which blocks of which layer are read, written to that file at close. A trace
        named by the config's ``recordTracePath`` is replayed in the background at open (prefetch)."""
        self.reload()
        lock = ExitStack()
        try:
            if writable:
                lock.enter_context(self.writer_lock())
            owned = ExitStack()
            lock.enter_context(owned)
            count = len(self.lowers) if snapshot is None else snapshot + 1
            lowers = self._open_lowers(count, owned)
            upper = None
            if snapshot is None:
                data, index = self.upper
                top = open_layer(data, index, owned=owned, writable=writable)
                if not isinstance(top, WritableBase):
                    raise VolumeError("the upper layer is not writable", path=data)
                upper = top
            stack = LsmtStack(lowers, upper)
            self._trace(stack, len(lowers), record_trace, lock)
        except BaseException:
            lock.close()
            raise
        stack.hold(lock)
        if self.size and stack.size != self.size:
            stack.size = self.size
        return stack

    def _trace(self, stack: LsmtStack, count: int, record_to: str | None, owned: ExitStack) -> None:
        from .remote import trace

        if record_to:
            recorder = trace.TraceRecorder(record_to)
            owned.callback(recorder.close)
            stack.sources = [trace.RecordingSource(src, k, recorder) if k < count else src
                             for k, src in enumerate(stack.sources)]
        replay_from = self.config.get("recordTracePath")
        if replay_from and not record_to and os.path.isfile(replay_from):
            with open(replay_from, "rb") as f:
                raw = f.read()
            if trace.is_trace(raw[:4]):
                trace.replay(trace.decode(raw, path=replay_from), stack.sources[:count])

    # -- changing ----------------------------------------------------------------------------------------------
    def snapshot(self, message: str = "", compression: Compression | None = None) -> Snapshot:
        """Commit the upper into a new sealed layer on top, and start a fresh empty upper."""
        with self.writer_lock():
            self.reload()
            data, index = self.upper
            number = len(self.lowers)
            new_uuid = str(uuidlib.uuid4())
            ext = "zfile" if compression else "lsmt"
            target = os.path.join(self.path, LAYERS, f"{number:04d}-{new_uuid}.{ext}")
            with ExitStack() as owned:
                # opened writable: its flock refuses a snapshot while anyone else has the upper open for writing
                upper = open_layer(data, index, owned=owned, writable=True)
                if not isinstance(upper, WritableBase):
                    raise VolumeError("the upper layer is not writable", path=data)
                parent = self._top_uuid()
                operations.commit(upper, target, uuid=new_uuid, parent_uuid=parent, message=message,
                                  compression=compression)
            new_data, new_index = _new_upper(self.path, self.size, new_uuid)
            config = dict(self.config)
            config["lowers"] = [*self.config.get("lowers", []), {"file": target}]
            config["upper"] = {**self.config["upper"], "data": new_data, "index": new_index}
            config.setdefault(META, {}).setdefault("created", {})[target] = _now()
            _write_config(self.path, config)
            self.config = config
            self._collect_garbage()
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
            snaps = self.snapshots()
            top = snaps[last]
            ext = "zfile" if compression else "lsmt"
            target = os.path.join(self.path, LAYERS, f"{first:04d}-{top.uuid}-merged.{ext}")
            with ExitStack() as owned:
                layers = [self.open_lower(n, owned) for n in range(first, last + 1)]
                operations.merge(layers, target, uuid=top.uuid, message=top.message, compression=compression,
                                 force=True)
            entries = self.config["lowers"]
            config = dict(self.config)
            config["lowers"] = [*entries[:first], {"file": target}, *entries[last + 1 :]]
            created = config.setdefault(META, {}).setdefault("created", {})
            created[target] = created.get(lowers[last], _now())
            _write_config(self.path, config)
            self.config = config
            self._collect_garbage()
        return self.snapshots()[first]

    def diff(self, a: int, b: int) -> list[tuple[int, int]]:
        """Byte ranges that snapshots after ``a`` up to ``b`` wrote or discarded (``a`` = -1: from empty)."""
        self.reload()
        lo, hi = sorted((a, b))
        with ExitStack() as owned:
            layers = [self.open_lower(n, owned) for n in range(lo + 1, hi + 1)]
            seg = merge_layers([layer.segments() for layer in layers[::-1]])
        starts, ends = covered(seg)
        return [(int(s) * SECTOR, int(e - s) * SECTOR) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]

    def clone(self, snapshot: int, target: str) -> Volume:
        """A new volume over the same read-only layers (hard links, so each volume can drop its own; layers
        not downloaded yet are shared by reference to the same repository)."""
        if all(os.path.exists(p) for p in self.lowers[: snapshot + 1]):
            return Volume.create(target, self.size, self.lowers[: snapshot + 1])
        new = Volume.create(target, self.size)
        config = dict(new.config)
        config["lowers"] = [dict(e) for e in self.config["lowers"][: snapshot + 1]]
        config["repoBlobUrl"] = self.config.get("repoBlobUrl", "")
        data, index = new.upper
        os.unlink(data)
        os.unlink(index)
        config["upper"] = dict(zip(("data", "index"), _new_upper(new.path, new.size, self._top_uuid(snapshot)),
                                   strict=True))
        _write_config(new.path, config)
        return Volume(new.path)

    # -- layers ------------------------------------------------------------------------------------------------
    def open_lower(self, n: int, owned: ExitStack) -> LsmtLayer | WritableBase:
        """Snapshot ``n`` as a layer: its local file, or (lazily pulled, not downloaded yet) its remote blob."""
        path = self.lowers[n]
        if os.path.exists(path):
            return open_layer(path, owned=owned)
        entry = self.config["lowers"][n]
        if "digest" not in entry:
            raise VolumeError(f"snapshot {n}: layer file is missing", path=path)
        from .remote.lazy import open_remote_layer

        download = bool((self.config.get("download") or {}).get("enable"))
        return open_remote_layer(self.config.get("repoBlobUrl", ""), entry["digest"], int(entry["size"]), owned,
                                 name=path, download_to=path if download else None)

    def _open_lowers(self, count: int, owned: ExitStack) -> list[LsmtLayer | WritableBase]:
        """Snapshots ``0..count-1``; remote ones are opened concurrently (each costs round trips for its index)."""
        remote = [n for n in range(count) if not os.path.exists(self.lowers[n])]
        if len(remote) < 2:
            return [self.open_lower(n, owned) for n in range(count)]
        from concurrent.futures import ThreadPoolExecutor

        stacks = [ExitStack() for _ in range(count)]
        try:
            with ThreadPoolExecutor(max_workers=min(8, count), thread_name_prefix="open-layer") as pool:
                layers = list(pool.map(lambda n: self.open_lower(n, stacks[n]), range(count)))
        except BaseException:
            for st in stacks:
                st.close()
            raise
        for st in stacks:
            owned.enter_context(st)
        return layers

    def _top_uuid(self, snapshot: int | None = None) -> str | None:
        n = len(self.lowers) - 1 if snapshot is None else snapshot
        if n < 0:
            return None
        with ExitStack() as owned:
            return format_uuid(self.open_lower(n, owned).uuid)

    def _collect_garbage(self) -> None:
        """Remove files in the volume no config references (left by an earlier crash or change)."""
        keep = set(self.lowers) | set(self.upper) | {os.path.dirname(p) for p in self.lowers}
        for folder in (self.path, os.path.join(self.path, LAYERS)):
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if path in keep or name in (CONFIG, LOCK, LAYERS) or not os.path.isfile(path):
                    continue
                if name.endswith((".lsmt", ".zfile", ".data", ".index", ".tmp")):
                    os.unlink(path)


def _share(src: str, dst: str) -> str:
    """Hard-link a layer file into a volume (a copy across filesystems)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        import shutil

        shutil.copyfile(src, dst)
    return dst


def _top_uuid(files: list[str]) -> str | None:
    if not files:
        return None
    with ExitStack() as owned:
        return format_uuid(open_layer(files[-1], owned=owned).uuid)


def _new_upper(path: str, size: int, parent: str | None) -> tuple[str, str]:
    tag = uuidlib.uuid4().hex[:8]
    data = os.path.join(path, f"upper-{tag}.data")
    index = os.path.join(path, f"upper-{tag}.index")
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
