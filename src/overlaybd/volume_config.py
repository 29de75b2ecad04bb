"""A volume's ``config.json`` read and checked, and its snapshots listed from their layers' headers: the part of
``overlaybd.volume`` that needs neither numpy nor the layer readers, so ``overlaybd log`` starts in milliseconds.
``overlaybd.volume`` gives every name here too.
"""

from __future__ import annotations

import json
import os

from .errors import OverlaybdError
from .formats.lsmt.glance import read_ends
from .formats.lsmt.header import format_uuid

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Any

CONFIG = "config.json"
META = "pyoverlaybd"
VERSION = 2
COMMIT_FILE = "overlaybd.commit"  # the reference's name for a layer kept in a folder (``lowers[].dir``)


class VolumeError(OverlaybdError):
    """A volume that is missing, malformed, or asked for something it does not have."""


class Snapshot:
    """One snapshot of a volume, as ``log`` lists it. Immutable; equal when every field is. (A plain class, not a
    dataclass: loading dataclasses costs the command line's start 15 ms.)"""

    __slots__ = ("number", "file", "uuid", "parent_uuid", "message", "created", "virtual_size", "file_size",
                 "digest", "repositories")
    number: int  # 0 = bottom
    file: str
    uuid: str
    parent_uuid: str
    message: str
    created: str
    virtual_size: int
    file_size: int
    digest: str | None  # the snapshot's blob in repositories (what pull fetched or push sent)
    repositories: tuple[str, ...]  # where push and pull saw it

    def __init__(self, number: int, file: str, uuid: str, parent_uuid: str, message: str, created: str,
                 virtual_size: int, file_size: int, digest: str | None = None,
                 repositories: tuple[str, ...] = ()) -> None:
        values = (number, file, uuid, parent_uuid, message, created, virtual_size, file_size, digest, repositories)
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} (Snapshot is immutable)")

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, Snapshot) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "Snapshot(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def read_config(volume: str) -> dict[str, Any]:
    """The volume's config.json, its paths relative to ``volume`` and checked to stay inside it."""
    cfg = os.path.join(volume, CONFIG)
    try:
        with open(cfg) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise VolumeError("not a volume (no config.json)", path=volume) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VolumeError(f"config.json is not valid JSON: {exc}", path=cfg) from None
    if not isinstance(config, dict) or not isinstance(config.get("lowers", []), list) \
            or not isinstance(config.get("upper"), dict):
        raise VolumeError("config.json lacks 'lowers' or 'upper'", path=cfg)
    return relative_config(config, volume, cfg)


def lower_paths(volume: str, config: dict[str, Any]) -> list[str]:
    """The snapshots' layer files, bottom to top, as absolute paths."""
    return [os.path.join(volume, entry.get("file") or os.path.join(entry["dir"], COMMIT_FILE))
            for entry in config.get("lowers", [])]


def snapshot_of(volume: str, config: dict[str, Any], n: int, uuid: bytes, parent_uuid: bytes, message: str,
                virtual_size: int) -> Snapshot:
    """Snapshot ``n`` of a volume, given what its layer says of itself."""
    path = lower_paths(volume, config)[n]
    entry = config["lowers"][n]
    created = config.get(META, {}).get("created", {})
    return Snapshot(n, path, format_uuid(uuid), format_uuid(parent_uuid), message,
                    created.get(entry.get("file") or entry.get("dir"), ""), virtual_size,
                    os.path.getsize(path) if os.path.exists(path) else int(entry.get("size", 0)),
                    entry.get("digest"), tuple(entry.get("repositories", ())))


def read_snapshot(volume: str, config: dict[str, Any], n: int) -> Snapshot | None:
    """Snapshot ``n`` from its layer's header and trailer when the layer is a plain sealed file (what the layer
    reader says of it: uuids and size from the trailer, message from the header); None for another form."""
    ends = read_ends(lower_paths(volume, config)[n])
    if ends is None:
        return None
    t = ends.trailer
    return snapshot_of(volume, config, n, t.uuid, t.parent_uuid, ends.header.message, t.virtual_size)


def snapshots(volume: str) -> list[Snapshot] | None:
    """Every snapshot of ``volume`` from headers alone; None when one needs its layer opened."""
    config = read_config(os.path.abspath(volume))
    found = [read_snapshot(os.path.abspath(volume), config, n) for n in range(len(config.get("lowers", [])))]
    return None if any(snap is None for snap in found) else [snap for snap in found if snap is not None]


def resolve_snapshot(volume: str, snaps: list[Snapshot], ref: str) -> int:
    """The number of the snapshot of ``snaps`` (a volume's, bottom to top) that ``ref`` names: a number (``3``,
    ``@3``), ``HEAD``/``HEAD~N``, or a unique prefix of its UUID."""
    if not snaps:
        raise VolumeError("the volume has no snapshots", path=volume)
    text = ref.strip().lstrip("@")
    if text.upper().startswith("HEAD"):
        back = text[4:]
        if back and not (back.startswith("~") and (back[1:] == "" or back[1:].isdigit())):
            raise VolumeError(f"bad snapshot reference {ref!r}", path=volume)
        n = len(snaps) - 1 - (int(back[1:] or 1) if back else 0)
    elif text.isdigit():
        n = int(text)
    else:
        hits = [s.number for s in snaps if s.uuid.replace("-", "").startswith(text.replace("-", "").lower())]
        if len(hits) != 1:
            raise VolumeError(f"{ref!r} matches {len(hits)} snapshots", path=volume)
        n = hits[0]
    if not 0 <= n < len(snaps):
        raise VolumeError(f"no snapshot {ref!r} (the volume has {len(snaps)})", path=volume)
    return n


def relative_config(config: dict[str, Any], volume: str, cfg_path: str) -> dict[str, Any]:
    """``config`` with every path the volume uses relative to its folder, checked to stay inside it.

    Earlier versions wrote absolute paths: those are read relative to the folder the config was written in (the
    folder of its upper), wherever the volume is now."""
    up = config["upper"]
    if not isinstance(up.get("data"), str) or not isinstance(up.get("index"), str):
        raise VolumeError("config.json: 'upper' needs 'data' and 'index'", path=cfg_path)
    meta = dict(config.get(META) or {})
    old = int(meta.get("version") or 1) < VERSION
    home = os.path.dirname(up["data"]) if old and os.path.isabs(up["data"]) else None

    def inside(recorded: Any) -> str:
        if not isinstance(recorded, str) or not recorded:
            raise VolumeError(f"config.json: bad path {recorded!r}", path=cfg_path)
        rel = recorded
        if os.path.isabs(recorded):
            if home is not None and recorded.startswith(home + os.sep):
                rel = os.path.relpath(recorded, home)
            else:
                raise VolumeError(f"config.json names {recorded}, outside the volume (a volume uses only files in "
                                  "its own directory)", path=cfg_path)
        rel = os.path.normpath(rel)
        real = os.path.realpath(os.path.join(volume, rel))
        if rel.startswith(os.pardir) or os.path.isabs(rel) or \
                not real.startswith(os.path.realpath(volume) + os.sep):
            raise VolumeError(f"config.json names {recorded}, outside the volume (a volume uses only files in its "
                              "own directory)", path=cfg_path)
        return rel

    out = dict(config)
    lowers = []
    for entry in config.get("lowers", []):
        if not isinstance(entry, dict) or not (entry.get("file") or entry.get("dir")):
            raise VolumeError(f"config.json: a lower needs 'file' or 'dir': {entry!r}", path=cfg_path)
        entry = dict(entry)
        for key in ("file", "dir"):
            if entry.get(key):
                entry[key] = inside(entry[key])
        lowers.append(entry)
    out["lowers"] = lowers
    out["upper"] = {**up, "data": inside(up["data"]), "index": inside(up["index"])}
    meta["created"] = {inside(k): v for k, v in (meta.get("created") or {}).items() if _inside_or_none(k, inside)}
    meta["pending"] = [p for p in (meta.get("pending") or []) if _inside_or_none(p, inside)]
    meta["pending"] = [inside(p) for p in meta["pending"]]
    out[META] = meta
    return out


def _inside_or_none(recorded: Any, inside: Any) -> bool:
    try:
        inside(recorded)
    except VolumeError:
        return False
    return True
