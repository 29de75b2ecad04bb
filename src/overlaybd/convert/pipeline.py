"""Conversion of an image: each layer of a manifest applied to an ext4 and committed as the reference convertor
commits it; an index converted manifest by manifest.

Per manifest, in a private working folder: a sparse raw image of the device (``--vsize``) is formatted as the
reference's ``make_extfs`` does (or filled from the base layer without mkfs), then for each layer:

1. the blob is fetched (sha256 checked), unpacked to a plain tar whose sha256 must be the config's diff ID;
2. the tar is applied to the raw image through libext2fs (``applier``): no root, no mount;
3. the blocks libext2fs wrote that differ from the earlier layers become the layer's records (``delta``);
4. the layer is committed by the reference's compaction straight from the raw image: tar-wrapped ZFile (LZ4,
   4 KiB blocks unless asked otherwise, CRC on, header overwritten), uuid from the layer's chain ID, parent uuid
   from the one below; the first layer has the device's virtual size, the others 0, as ``overlaybd-create``
   makes them.

Then the config and manifest (``imagespec``) go up; for an index, each manifest by digest, then the index under
the tag. The same source gives the same bytes every time, on any machine, as root or not.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, UsageError
from ..formats.detect import open_layer
from ..formats.lsmt.commit import write_compacted
from ..formats.lsmt.spec import NULL_UUID, parse_uuid
from ..formats.lsmt.stack import LowerLayer, LsmtStack
from ..formats.lsmt.writable import WritableBase
from ..formats.output import Compression, copy_out, write_layer_file
from ..remote.layout import OciLayout, hash_file
from ..remote.reference import Reference
from ..remote.repository import Repository
from ..remote.transfer import open_repository
from ..source.file import FileSource
from . import baselayer, imagespec, source, tarlayer
from .applier import Applier
from .delta import changed_runs
from .ext4 import Ext4Image
from .imagespec import Blob

log = logging.getLogger(__name__)
GiB = 1 << 30
Events = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    vsize: int = 64 * GiB  # bytes, of the device made by mkfs
    algorithm: str = "lz4"
    block_size: int = 4096
    oci: bool = False
    mkfs: bool = True
    base_layer: str = baselayer.DEFAULT_PATH
    concurrency: int = 4
    workdir: str | None = None

    def check(self) -> None:
        if self.algorithm not in ("lz4", "zstd"):
            raise UsageError(f"unknown algorithm {self.algorithm!r} (lz4 or zstd)")
        if self.block_size not in (4096, 8192, 16384, 32768, 65536):
            raise UsageError(f"block size {self.block_size} (4, 8, 16, 32 or 64 KiB)")
        if self.vsize <= 0 or self.vsize % GiB:
            raise UsageError(f"virtual size {self.vsize} bytes: a positive whole number of GiB")
        if self.concurrency < 1:
            raise UsageError("concurrency must be at least 1")
        if not self.mkfs and not os.path.isfile(self.base_layer):
            raise UsageError("without mkfs the base layer is needed (overlaybd's baselayers/ext4_64; "
                             "--base-layer PATH)", path=self.base_layer)

    @property
    def compression(self) -> Compression:
        return Compression(self.algorithm, self.block_size, overwrite_header=True)


@dataclass
class LayerReport:
    source: str  # the source layer's digest
    diff_id: str
    compression: str  # of the source blob
    digest: str  # the overlaybd blob
    size: int
    uuid: str
    parent_uuid: str
    entries: int = 0
    written: int = 0  # bytes of the device the layer changed
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ManifestReport:
    digest: str
    size: int
    media_type: str
    config: str
    platform: dict[str, Any] | None
    layers: list[LayerReport] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "mediaType": self.media_type, "config": self.config,
                "platform": self.platform, "layers": [layer.as_json() for layer in self.layers]}


@dataclass
class Report:
    reference: str
    digest: str
    media_type: str
    manifests: list[ManifestReport] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # attestation manifests of the source index

    def as_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest, "mediaType": self.media_type,
                "manifests": [m.as_json() for m in self.manifests], "dropped": self.dropped}


def convert(src: Reference, dst: Reference, options: Options, *, insecure: bool = False,
            events: Events | None = None) -> Report:
    """Convert the image ``src`` names and push the result to ``dst`` (tagged ``dst``'s tag, "latest" by
    default)."""
    options.check()
    if dst.digest:
        raise UsageError(f"{dst}: the destination takes a tag, not a digest")
    src_repo = open_repository(src, insecure=insecure)
    dst_repo = open_repository(dst, create=True, insecure=insecure)
    tag = dst.tag or "latest"
    top = source.resolve(src_repo, src.selector)
    say = events or (lambda _msg: None)
    if not top.is_index:
        result = convert_manifest(src_repo, dst_repo, top, options, events=say)
        publish_manifest(dst_repo, result, tag)
        return Report(str(dst), result.digest, result.media_type, [result])
    index = imagespec.read_index(top.raw, f"index {top.digest}")
    todo = []
    report = Report(str(dst), "", "")
    for n, descriptor in enumerate(index.get("manifests") or []):
        if imagespec.is_attestation(descriptor):
            report.dropped.append(str(descriptor.get("digest")))
            say(f"skipping attestation manifest {descriptor.get('digest')}")
            continue
        todo.append((n, descriptor))
    if not todo:
        raise UsageError(f"{src}: the index lists no image to convert")
    converted: dict[int, tuple[str, Blob]] = {}
    with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
        futures: list[tuple[int, Future[ManifestReport]]] = [
            (n, pool.submit(_convert_child, src_repo, dst_repo, d, options, say)) for n, d in todo]
        for n, fut in futures:
            child = fut.result()
            report.manifests.append(child)
            converted[n] = (child.media_type, Blob(child.digest, child.size))
    raw = imagespec.converted_index(index, converted, options.oci)
    media = imagespec.INDEX_OCI if options.oci else str(index.get("mediaType") or top.media_type or
                                                         imagespec.INDEX_OCI)
    report.digest = dst_repo.put_manifest(raw, media, tag)
    report.media_type = media
    return report


def _convert_child(src_repo: Repository, dst_repo: Repository, descriptor: dict[str, Any], options: Options,
                   say: Events) -> ManifestReport:
    top = source.child_manifest(src_repo, descriptor)
    result = convert_manifest(src_repo, dst_repo, top, options, events=say, platform=descriptor.get("platform"))
    publish_manifest(dst_repo, result, None)
    return result


@dataclass
class _Converted(ManifestReport):
    raw: bytes = b""


def publish_manifest(repo: Repository, result: ManifestReport, tag: str | None) -> None:
    """Put a converted manifest: tagged, or by digest only (a manifest an index lists; in an OCI layout it is
    stored as a blob, not listed in index.json)."""
    assert isinstance(result, _Converted)
    if tag is None and isinstance(repo, OciLayout):
        with tempfile.NamedTemporaryFile(dir=repo.path, prefix=".manifest-") as tmp:
            tmp.write(result.raw)
            tmp.flush()
            repo.put_blob(tmp.name, result.digest, result.size)
        return
    got = repo.put_manifest(result.raw, result.media_type, tag)
    if got != result.digest:
        raise FormatError(f"the repository stored the manifest as {got}, expected {result.digest}")


def convert_manifest(src_repo: Repository, dst_repo: Repository, top: source.Top, options: Options, *,
                     events: Events | None = None, platform: dict[str, Any] | None = None) -> _Converted:
    """Convert one image manifest: layers, config, manifest (uploaded, except the manifest itself)."""
    say = events or (lambda _msg: None)
    manifest = imagespec.read_manifest(top.raw, f"manifest {top.digest}")
    layers = list(manifest.get("layers") or [])
    for n, d in enumerate(layers):
        if imagespec.ANN_DIGEST in (d.get("annotations") or {}):
            raise UsageError(f"manifest {top.digest}: layer {n} is an overlaybd layer already")
    base = tempfile.mkdtemp(prefix="overlaybd-convert-", dir=options.workdir)
    try:
        config_raw = source.fetch_json(src_repo, manifest.get("config") or {}, base, "config")
        config = imagespec.read_config(config_raw, f"config {(manifest.get('config') or {}).get('digest')}")
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(layers):
            raise FormatError(f"manifest {top.digest} has {len(layers)} layers, its config {len(diff_ids)} "
                              "diff IDs")
        builder = _Builder(base, options, src_repo, dst_repo, say)
        blobs, reports = builder.run(layers, diff_ids)
        config_out = imagespec.converted_config(config, blobs)
        config_blob = Blob(imagespec.sha256_digest(config_out), len(config_out))
        _put_bytes(dst_repo, base, config_out, config_blob)
        raw = imagespec.converted_manifest(manifest, config_blob, blobs, options.oci)
        media = imagespec.media_types(options.oci)[0]
        return _Converted(imagespec.sha256_digest(raw), len(raw), media, config_blob.digest, platform, reports,
                          raw=raw)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _put_bytes(repo: Repository, folder: str, data: bytes, blob: Blob) -> None:
    path = os.path.join(folder, blob.digest.replace(":", "-"))
    with open(path, "wb") as f:
        f.write(data)
    repo.put_blob(path, blob.digest, blob.size)
    os.unlink(path)


class _Builder:
    """The layers of one manifest, in a working folder: fetch and unpack runs one layer ahead of apply and commit,
    uploads run behind them."""

    def __init__(self, folder: str, options: Options, src: Repository, dst: Repository, say: Events) -> None:
        self.folder = folder
        self.options = options
        self.src = src
        self.dst = dst
        self.say = say
        self.raw = os.path.join(folder, "device.raw")
        self.lowers: list[str] = []  # committed layer files, bottom to top (base layer first without mkfs)

    def run(self, layers: list[dict[str, Any]], diff_ids: list[str]) -> tuple[list[Blob], list[LayerReport]]:
        chains = imagespec.chain_ids(diff_ids)
        blobs: list[Blob] = []
        reports: list[LayerReport] = []
        uploads: list[Future[str]] = []
        with ThreadPoolExecutor(max_workers=1) as fetcher, ThreadPoolExecutor(max_workers=1) as uploader:
            size = self.options.vsize
            if not self.options.mkfs:
                blobs.append(self._base_layer(uploader, uploads))
                size = _device_size(self.lowers[0])
            ahead: Future[tuple[str, str, str]] | None = fetcher.submit(self._unpack, 0, layers[0]) if layers \
                else None
            for n, descriptor in enumerate(layers):
                assert ahead is not None
                tar, kind, diff_id = ahead.result()
                ahead = fetcher.submit(self._unpack, n + 1, layers[n + 1]) if n + 1 < len(layers) else None
                if diff_id != diff_ids[n]:
                    raise FormatError(f"layer {n} ({descriptor.get('digest')}) unpacks to {diff_id}, its config "
                                      f"says {diff_ids[n]}")
                started = time.monotonic()
                uuid = imagespec.chain_uuid(chains[n])
                parent = imagespec.chain_uuid(chains[n - 1]) if n else ""
                report = LayerReport(str(descriptor.get("digest")), diff_id, kind, "", 0, uuid, parent)
                path = self._layer(n, tar, size, uuid, parent or None, report)
                os.unlink(tar)
                digest = hash_file(path)
                blob = Blob(digest, os.path.getsize(path))
                report.digest, report.size = blob.digest, blob.size
                report.seconds = round(time.monotonic() - started, 3)
                blobs.append(blob)
                reports.append(report)
                self.say(f"layer {n}: {descriptor.get('digest')} -> {digest} ({report.entries} entries, "
                         f"{report.seconds:.1f} s)")
                uploads.append(uploader.submit(self.dst.put_blob, path, blob.digest, blob.size))
            for fut in uploads:
                fut.result()
        return blobs, reports

    def _unpack(self, n: int, descriptor: dict[str, Any]) -> tuple[str, str, str]:
        blob = os.path.join(self.folder, f"source-{n}.blob")
        source.fetch_blob(self.src, descriptor, blob, what=f"layer {n}")
        tar = os.path.join(self.folder, f"source-{n}.tar")
        with open(blob, "rb") as f:
            plain = tarlayer.compression_of(f.read(4)) == "tar"
        if plain:  # the blob is the tar: its digest (checked as it came) is the diff ID
            os.replace(blob, tar)
            return tar, "tar", str(descriptor["digest"])
        kind, diff_id = tarlayer.unpack_blob(blob, tar)
        os.unlink(blob)
        return tar, kind, diff_id

    def _base_layer(self, uploader: ThreadPoolExecutor, uploads: list[Future[str]]) -> Blob:
        """Without mkfs: the base layer under everything, its device as the start of the raw image."""
        base = self.options.base_layer
        wrapped = baselayer.wrap(base, os.path.join(self.folder, "base.tar"))
        blob = Blob(hash_file(wrapped.path), wrapped.size)
        self.lowers.append(wrapped.path)
        with ExitStack() as owned:
            layer = open_layer(base, owned=owned)
            stack = LsmtStack([layer], owned=None)
            copy_out(self.raw, stack, force=True)
        uploads.append(uploader.submit(self.dst.put_blob, wrapped.path, blob.digest, blob.size))
        return blob

    def _layer(self, n: int, tar: str, size: int, uuid: str, parent: str | None, report: LayerReport) -> str:
        if n == 0 and self.options.mkfs:
            fs = Ext4Image.make(self.raw, size)
        else:
            fs = Ext4Image.open(self.raw)
        try:
            stats = Applier(fs).apply(tarlayer.read_entries(tar))
        except BaseException:
            fs.abandon()
            raise
        report.entries = stats.entries
        written = fs.close()
        out = os.path.join(self.folder, f"layer-{n}.tar")
        with ExitStack() as owned:
            lowers: list[LowerLayer] = []
            for p in self.lowers:
                layer = open_layer(p, owned=owned)
                assert not isinstance(layer, WritableBase)
                lowers.append(layer)
            raw = owned.enter_context(FileSource(self.raw))
            below = LsmtStack(lowers, size=raw.size) if lowers else None
            changes = changed_runs(raw, below, written)
            report.written = changes.data_bytes + changes.zero_bytes
            seg = changes.segments()
            # what overlaybd-create + commit give: the first layer has the device's size, the others 0
            vsize = size if n == 0 else 0

            def produce(fd: int, base: int) -> int:
                return write_compacted(fd, base, seg, [raw], virtual_size=vsize, uuid=parse_uuid(uuid),
                                       parent_uuid=parse_uuid(parent) if parent else NULL_UUID, name=out)[1]

            write_layer_file(out, produce, compression=self.options.compression, tar=True)
        self.lowers.append(out)
        return out


def _device_size(path: str) -> int:
    with ExitStack() as owned:
        return int(open_layer(path, owned=owned).virtual_size)


