"""Push a volume's snapshots to a repository; pull an image into a volume (eager or lazy)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..formats.detect import open_layer, peel
from ..formats.lsmt.layer import LsmtLayer
from ..formats.lsmt.spec import format_uuid
from ..formats.lsmt.writable import WritableBase
from ..formats.output import Compression, compress_to, write_atomically
from ..layerstore import LayerStore, place
from ..source.file import FileSource, write_all
from ..volume import CONFIG, LAYERS, Volume, new_volume_dir
from .errors import RemoteError
from .layout import OciLayout, hash_file
from .lazy import RemoteLayers, open_remote_layer, repository_for
from .oci import (
    CONFIG_OCI,
    INDEX_TYPES,
    MANIFEST_OCI,
    Descriptor,
    Manifest,
    image_config,
    layer_descriptor,
    manifest,
    pick_from_index,
    sha256_digest,
)
from .reference import Reference
from .registry import RegistryClient, RegistryRepository
from .repository import Progress, Repository

log = logging.getLogger(__name__)
BLOBS = "blobs"


def open_repository(ref: Reference, *, create: bool = False, insecure: bool = False) -> Repository:
    if ref.kind == "oci":
        return OciLayout(ref.repository, create=create)
    if not ref.is_local_host and insecure:
        log.warning("%s: plain HTTP (--insecure)", ref.host)
    return RegistryRepository.shared(RegistryClient.shared(ref.host, insecure=insecure), ref.repository)


@dataclass
class PushReport:
    reference: str
    manifest_digest: str
    layers: list[dict[str, Any]] = field(default_factory=list)


def _blob_for_layer(vol: Volume, n: int, repo: Repository, progress: Progress | None) -> tuple[str, str, int]:
    """The tar-wrapped ZFile blob of snapshot ``n``: the layer file itself when it already is one (a pulled
    layer goes back byte for byte), else built once and kept in VOL/blobs/."""
    entry = vol.config["lowers"][n]
    path = vol.lowers[n]
    if not os.path.exists(path):  # lazily pulled, not downloaded: fetch it whole (verified) to re-upload
        folder = os.path.join(vol.path, BLOBS)
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, entry["digest"].split(":")[1] + ".tar")
        if not os.path.exists(local):
            repository_for(blob_url_of(vol, n)).fetch_blob(entry["digest"], int(entry["size"]), local, progress)
        return local, entry["digest"], int(entry["size"])
    with FileSource(path) as f:
        peeled = peel(f)
        wrapped = bool(peeled.tar) and bool(peeled.zfile)
        zfile_only = not peeled.tar and bool(peeled.zfile)
    if wrapped:
        if entry.get("digest") and int(entry.get("size", -1)) == os.path.getsize(path):
            return path, entry["digest"], int(entry["size"])
        return path, _cached_hash(vol, path), os.path.getsize(path)
    folder = os.path.join(vol.path, BLOBS)
    os.makedirs(folder, exist_ok=True)
    blob = os.path.join(folder, os.path.basename(path) + ".tar")
    if not os.path.exists(blob):
        if zfile_only:
            _wrap(path, blob)
        else:
            with FileSource(path) as f:
                # as the reference convertor (overlaybd-commit -z -t): LZ4, 4 KiB blocks, CRC, header overwritten
                compress_to(blob, f, Compression("lz4", 4096, overwrite_header=True), tar=True, progress=progress)
    return blob, _cached_hash(vol, blob), os.path.getsize(blob)


def blob_url_of(vol: Volume, n: int) -> str:
    """The repository snapshot ``n`` of ``vol`` was pulled from (for its blob, when not local)."""
    return str(vol.config["lowers"][n].get("repoBlobUrl") or vol.config.get("repoBlobUrl", ""))


def _wrap(src: str, dst: str) -> None:
    """The tar envelope around an existing ZFile, written atomically like every layer file."""

    def produce(fd: int, base: int) -> int:
        pos = base
        with open(src, "rb") as f:
            while block := f.read(4 << 20):
                write_all(fd, block, pos, dst)
                pos += len(block)
        return pos - base

    write_atomically(dst, produce, tar=True)


def _cached_hash(vol: Volume, path: str) -> str:
    """sha256 of a layer blob, remembered beside it (keyed by size and mtime) so a push hashes it once."""
    st = os.stat(path)
    memo = os.path.join(vol.path, BLOBS, os.path.basename(path) + ".sha256")
    key = f"{st.st_size} {st.st_mtime_ns}"
    try:
        with open(memo) as f:
            saved_key, digest = f.read().rsplit(" ", 1)
        if saved_key == key:
            return digest.strip()
    except (OSError, ValueError):
        pass
    digest = hash_file(path)
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    with open(memo, "w") as f:
        f.write(f"{key} {digest}")
    return digest


def push(vol: Volume, ref: Reference, *, insecure: bool = False, progress: Progress | None = None,
         upto: int | None = None, store: LayerStore | None = None) -> PushReport:
    """Push snapshots ``0..upto`` (default: all) as an image. Each snapshot then records the reference and its
    blob's digest (``log`` shows them), and blobs built for the push are kept in the layer store."""
    repo = open_repository(ref, create=True, insecure=insecure)
    snaps = vol.snapshots()
    if not snaps:
        raise UsageError("the volume has no snapshots to push (run overlaybd snapshot first)", path=vol.path)
    if upto is not None:
        if not 0 <= upto < len(snaps):
            raise UsageError(f"no snapshot {upto} (the volume has {len(snaps)})", path=vol.path)
        snaps = snaps[: upto + 1]
    report = PushReport(str(ref), "")
    layers = []
    for snap in snaps:
        entry = vol.config["lowers"][snap.number]
        mount_from = _mount_sources(blob_url_of(vol, snap.number), repo)
        action = None
        if not os.path.exists(snap.file) and isinstance(repo, RegistryRepository):
            # lazily pulled: maybe the registry has it, or can mount it, and nothing need be downloaded
            digest, size = entry["digest"], int(entry["size"])
            action = repo.exists_or_mount(digest, size, mount_from)
        if action is None:
            path, digest, size = _blob_for_layer(vol, snap.number, repo, progress)
            if isinstance(repo, RegistryRepository):
                action = repo.put_blob(path, digest, size, progress, mount_from=mount_from)
            else:
                action = repo.put_blob(path, digest, size, progress)
            if store is not None:
                store.adopt(digest, path)
        layers.append(layer_descriptor(digest, size, snap.message))
        report.layers.append({"snapshot": snap.number, "digest": digest, "size": size, "action": action})
    config_raw = image_config([d.digest for d in layers])
    config_desc = Descriptor(CONFIG_OCI, sha256_digest(config_raw), len(config_raw))
    with tempfile.NamedTemporaryFile(dir=vol.path, prefix=".config-") as tmp:
        tmp.write(config_raw)
        tmp.flush()
        repo.put_blob(tmp.name, config_desc.digest, config_desc.size)
    raw = manifest(config_desc, layers)
    report.manifest_digest = repo.put_manifest(raw, MANIFEST_OCI, ref.tag or (None if ref.digest else "latest"))
    for layer in report.layers:
        vol.note_repository(layer["snapshot"], str(ref), layer["digest"], layer["size"])
    return report


def _mount_sources(origin: str, repo: Repository) -> tuple[str, ...]:
    """Repositories of the same registry a blob can be mounted from (the one it was pulled from)."""
    if isinstance(repo, RegistryRepository) and origin.startswith("http"):
        try:
            src = RegistryRepository.from_blob_url(origin)
        except RemoteError:
            return ()
        if src.client.host == repo.client.host:
            return (src.repo,)
    return ()


def resolve_manifest(repo: Repository, selector: str) -> tuple[Manifest, str]:
    raw, media, digest = repo.get_manifest(selector)
    if media in INDEX_TYPES or (not media and b'"manifests"' in raw):
        chosen = pick_from_index(raw)
        raw, media, digest = repo.get_manifest(chosen.digest)
    return Manifest.parse(raw), digest


@dataclass
class Pulled:
    """What a pull did: the volume, and per new snapshot how its layer came ("linked" from the layer store,
    "fetched", or "lazy"); ``up_to_date`` when the volume already had every snapshot."""

    volume: Volume
    layers: list[dict[str, Any]] = field(default_factory=list)
    up_to_date: bool = False

    @property
    def fetched_bytes(self) -> int:
        return sum(int(layer["size"]) for layer in self.layers if layer["action"] == "fetched")


def pull(ref: Reference, target: str, *, lazy: bool = False, background: bool = False, insecure: bool = False,
         progress: Progress | None = None, prefetch: str | None = None, store: LayerStore | None = None,
         upper: str | None = None) -> Pulled:
    """Make a volume from an image (in a new or empty directory), or bring an existing volume up to it.

    New: every layer downloaded and verified, or (``lazy``) only referenced; a pull that fails leaves the directory
    as it found it. Existing: the volume's snapshots must be the image's first ones (same blob digest, or the
    same layer uuid); only the missing ones are added, on top (fast-forward). Unsnapshotted writes need ``upper``:
    "keep" (they stay on top of the new snapshots) or "discard". Layers the layer ``store`` holds are hard-linked,
    not fetched; fetched ones are kept there for the next volume."""
    repo = open_repository(ref, insecure=insecure)
    mf, digest = resolve_manifest(repo, ref.selector)
    bad = [n for n, d in enumerate(mf.layers) if not d.is_overlaybd]
    if bad:
        raise UsageError(f"{ref} is not an overlaybd image: layer {bad[0]} has no overlaybd annotations")
    if not mf.layers:
        raise UsageError(f"{ref} has no layers")
    if os.path.exists(os.path.join(target, CONFIG)):
        return _fast_forward(ref, repo, mf.layers, Volume(target, opener=RemoteLayers()), lazy=lazy,
                             progress=progress, store=store, upper=upper)
    with new_volume_dir(target) as path:
        os.makedirs(os.path.join(path, LAYERS), exist_ok=True)
        entries, report = _place(ref, repo, mf.layers, 0, path, lazy=lazy, progress=progress, store=store)
        with ExitStack() as owned:
            top = _open_entry(repo, path, entries[-1], owned)
            size = top.virtual_size
            parent = format_uuid(top.uuid)
            for entry in entries[-2::-1]:  # layers may leave it 0 (as the reference's converted upper layers do):
                if size:  # the device's size is the topmost one given, as the reference reads it
                    break
                size = _open_entry(repo, path, entry, owned).virtual_size
        settings: dict[str, Any] = {"repoBlobUrl": repo.blob_url()}
        if background:
            settings["download"] = {"enable": True}
        if prefetch:
            settings["recordTracePath"] = prefetch
        vol = Volume.assemble(path, size, entries, parent_uuid=parent, settings=settings,
                              meta={"origin": {"reference": str(ref), "manifest": digest}}, opener=RemoteLayers())
        return Pulled(vol, report)


def _place(ref: Reference, repo: Repository, layers: list[Descriptor], first: int, root: str, *, lazy: bool,
           progress: Progress | None, store: LayerStore | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Config entries (paths relative to the volume at ``root``) for image layers ``first..``, numbered from
    ``first``: linked from the store where it has them, else fetched (into the store) or left remote (lazy)."""
    entries: list[dict[str, Any]] = []
    report: list[dict[str, Any]] = []
    for n, d in enumerate(layers[first:], start=first):
        name = os.path.join(LAYERS, f"{n:04d}-{d.digest.split(':')[1][:16]}")
        entry: dict[str, Any] = {"digest": d.digest, "size": d.size, "repositories": [str(ref)],
                                 "repoBlobUrl": repo.blob_url()}
        dest = os.path.join(root, name + ".tar")
        if store is not None and store.link_into(d.digest, d.size, dest):
            action = "linked"
        elif lazy:
            action = "lazy"
        else:
            action = place(store, d.digest, d.size, dest, _downloader(repo, d, progress))
        if action == "lazy":
            entry["dir"] = name
        else:
            entry["file"] = name + ".tar"
        entries.append(entry)
        report.append({"snapshot": n, "digest": d.digest, "size": d.size, "action": action})
    return entries, report


def _downloader(repo: Repository, d: Descriptor, progress: Progress | None) -> Callable[[str], None]:
    def download(dest: str) -> None:
        repo.fetch_blob(d.digest, d.size, dest, progress)

    return download


def _open_entry(repo: Repository, root: str, entry: dict[str, Any], owned: ExitStack) -> LsmtLayer | WritableBase:
    if "file" in entry:
        return open_layer(os.path.join(root, entry["file"]), owned=owned)
    return open_remote_layer(repo.blob_url(), entry["digest"], int(entry["size"]), owned,
                             name=os.path.join(root, entry["dir"]))


def _fast_forward(ref: Reference, repo: Repository, layers: list[Descriptor], vol: Volume, *, lazy: bool,
                  progress: Progress | None, store: LayerStore | None, upper: str | None) -> Pulled:
    with vol.writer_lock():
        vol.reload()
        have = len(vol.lowers)
        first_different = _first_difference(vol, repo, layers)
        if first_different is not None:
            theirs = f"{ref} has {len(layers)} snapshot(s)"
            raise UsageError(f"the volume's history differs from {ref} at snapshot {first_different} "
                             f"({theirs}); not a fast-forward (pull into a new volume instead)", path=vol.path)
        if have == len(layers):
            return Pulled(vol, [], up_to_date=True)
        dirty = vol.has_unsnapshotted_writes()
        if dirty and upper not in ("keep", "discard"):
            raise UsageError("the volume has writes not in a snapshot: snapshot them first, or say what to do with "
                             "them (--upper keep: on top of the new snapshots; --upper discard)", path=vol.path)
        names = [os.path.join(LAYERS, f"{n:04d}-{d.digest.split(':')[1][:16]}") for n, d in
                 enumerate(layers[have:], start=have)]
        vol.begin_change([n + ".tar" for n in names] + names)
        entries, report = _place(ref, repo, layers, have, vol.path, lazy=lazy, progress=progress, store=store)
        with ExitStack() as owned:
            top = _open_entry(repo, vol.path, entries[-1], owned)
            top_uuid, top_size = format_uuid(top.uuid), top.virtual_size
        if top_size and top_size != vol.size:
            raise UsageError(f"{ref} is a device of {top_size} bytes, the volume one of {vol.size}", path=vol.path)
        vol.extend(entries, fresh_upper=not dirty or upper == "discard", top_uuid=top_uuid)
    for n, d in enumerate(layers[:have]):
        vol.note_repository(n, str(ref), d.digest, d.size)
    return Pulled(vol, report)


def _first_difference(vol: Volume, repo: Repository, layers: list[Descriptor]) -> int | None:
    """The first of the volume's snapshots that the image does not have at the same place, or None. Identity is
    the blob digest where the volume knows it, else the layer's uuid and parent uuid (read from the repository)."""
    for n, entry in enumerate(vol.config["lowers"]):
        if n >= len(layers):
            return n
        if entry.get("digest") == layers[n].digest:
            continue
        with ExitStack() as owned:
            mine = vol.open_lower(n, owned)
            theirs = _open_entry(repo, vol.path, {"dir": os.path.join(LAYERS, ".probe"), "digest": layers[n].digest,
                                                  "size": layers[n].size}, owned)
            if (mine.uuid, mine.parent_uuid) != (theirs.uuid, theirs.parent_uuid):
                return n
    return None
