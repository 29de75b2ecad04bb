"""Push a volume's snapshots to a repository; pull an image into a volume (eager or lazy)."""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..formats.detect import open_layer, peel
from ..formats.lsmt.layer import LsmtLayer
from ..formats.lsmt.spec import format_uuid
from ..formats.lsmt.writable import WritableBase
from ..formats.output import Compression, compress_to, write_atomically
from ..source.file import FileSource, write_all
from ..volume import LAYERS, Volume, new_volume_dir
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
    return RegistryRepository(RegistryClient(ref.host, insecure=insecure), ref.repository)


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
            repository_for(vol.config.get("repoBlobUrl", "")).fetch_blob(entry["digest"], int(entry["size"]), local,
                                                                         progress)
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


def push(vol: Volume, ref: Reference, *, insecure: bool = False, progress: Progress | None = None) -> PushReport:
    repo = open_repository(ref, create=True, insecure=insecure)
    snaps = vol.snapshots()
    if not snaps:
        raise UsageError("the volume has no snapshots to push (run overlaybd snapshot first)", path=vol.path)
    origin = vol.config.get("repoBlobUrl", "")
    mount_from: tuple[str, ...] = ()
    if isinstance(repo, RegistryRepository) and origin.startswith("http"):
        try:
            src = RegistryRepository.from_blob_url(origin)
            if src.client.host == repo.client.host:
                mount_from = (src.repo,)
        except RemoteError:
            pass
    report = PushReport(str(ref), "")
    layers = []
    for snap in snaps:
        entry = vol.config["lowers"][snap.number]
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
    return report


def resolve_manifest(repo: Repository, selector: str) -> tuple[Manifest, str]:
    raw, media, digest = repo.get_manifest(selector)
    if media in INDEX_TYPES or (not media and b'"manifests"' in raw):
        chosen = pick_from_index(raw)
        raw, media, digest = repo.get_manifest(chosen.digest)
    return Manifest.parse(raw), digest


def pull(ref: Reference, target: str, *, lazy: bool = False, background: bool = False, insecure: bool = False,
         progress: Progress | None = None, prefetch: str | None = None) -> Volume:
    """Make a volume from an image, in a new or empty directory: every layer downloaded and verified, or (lazy)
    only referenced. A pull that fails leaves the directory as it found it."""
    repo = open_repository(ref, insecure=insecure)
    mf, digest = resolve_manifest(repo, ref.selector)
    bad = [n for n, d in enumerate(mf.layers) if not d.is_overlaybd]
    if bad:
        raise UsageError(f"{ref} is not an overlaybd image: layer {bad[0]} has no overlaybd annotations")
    if not mf.layers:
        raise UsageError(f"{ref} has no layers")
    with new_volume_dir(target) as path:
        os.makedirs(os.path.join(path, LAYERS), exist_ok=True)
        entries: list[dict[str, Any]] = []
        for n, d in enumerate(mf.layers):
            name = os.path.join(path, LAYERS, f"{n:04d}-{d.digest.split(':')[1][:16]}")
            if lazy:
                entries.append({"dir": name, "digest": d.digest, "size": d.size})
            else:
                repo.fetch_blob(d.digest, d.size, name + ".tar", progress)
                entries.append({"file": name + ".tar", "digest": d.digest, "size": d.size})
        with ExitStack() as owned:
            top = entries[-1]
            layer: LsmtLayer | WritableBase
            if lazy:
                layer = open_remote_layer(repo.blob_url(), top["digest"], top["size"], owned, name=top["dir"])
            else:
                layer = open_layer(top["file"], owned=owned)
            size = layer.virtual_size
            parent = format_uuid(layer.uuid)
        settings: dict[str, Any] = {"repoBlobUrl": repo.blob_url()}
        if background:
            settings["download"] = {"enable": True}
        if prefetch:
            settings["recordTracePath"] = prefetch
        return Volume.assemble(path, size, entries, parent_uuid=parent, settings=settings,
                               meta={"origin": {"reference": str(ref), "manifest": digest}}, opener=RemoteLayers())
