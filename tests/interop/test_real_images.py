"""Published OverlayBD images (../shared/fixtures/real): the ext4 base layer overlaybd ships, and the hello-world
image converted by accelerated-container-image, read end to end down to a file inside its ext4 filesystem."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import tarfile
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

import overlaybd
from overlaybd.formats.detect import peel
from overlaybd.formats.lsmt.spec import format_uuid
from overlaybd.formats.zfile.spec import KNOWN_FLAGS
from overlaybd.inspection import check_layer, describe_layer
from overlaybd.source.base import ExtentKind
from overlaybd.source.file import FileSource

from .ext4_reader import EXT4_MAGIC, SUPERBLOCK_OFFSET, Ext4
from .payloads import file_sha256

GIB = 1 << 30
EXT4_64_UUID = "C02FB491-B4D4-4904-8684-A014D032AF78"  # as stored (uppercase text) in the base layer's header
HELLO_UUID = "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"
REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION = "containerd.io/snapshot/overlaybd/"


def _superblock_magic(layer: Any) -> int:
    sb = layer.pread(SUPERBLOCK_OFFSET, 1024)
    return int(struct.unpack_from("<H", sb, 56)[0])


# -- ext4_64: the base layer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ext4_64(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ext4_64")
    with tarfile.open(real_dir / "ext4_64.tar.gz", "r:gz") as tf:
        assert tf.getnames() == ["ext4_64"]
        tf.extractall(folder, filter="data")
    path = folder / "ext4_64"
    assert path.stat().st_size == 4737695
    return path


def test_ext4_64_layer_description(ext4_64: Path) -> None:
    info = describe_layer(str(ext4_64))
    assert info["wrappers"] == ["zfile"]
    assert info["format"] == "lsmt-committed"
    assert info["virtual_size"] == 64 * GIB == 68719476736
    z = info["zfile"]
    assert (z["algorithm"], z["block_size"], z["blocks"], z["crc"]) == ("lz4", 4096, 132309, True)
    assert z["original_size"] == info["index"]["offset"] + 16 * info["index"]["records_on_disk"] + 4096
    assert info["header"]["uuid"] == info["trailer"]["uuid"] == EXT4_64_UUID.lower()
    assert info["header"]["parent_uuid"] == "00000000-0000-0000-0000-000000000000"
    assert info["zeroed_records"] > 0 and info["zeroed_bytes"] > 0


def test_ext4_64_check_every_crc(ext4_64: Path) -> None:
    report = check_layer(str(ext4_64))
    assert report["errors"] == []
    assert report["format"] == "zfile+lsmt-committed"
    assert report["blocks_checked"] == 132309
    assert overlaybd.verify_zfile(str(ext4_64)).nblocks == 132309


def test_ext4_64_legacy_header_and_uuid_text(ext4_64: Path) -> None:
    with FileSource(ext4_64) as f:
        peeled = peel(f)
        assert peeled.zfile is not None
        # a 2021 writer: garbage in the flag bits the format does not define (we mask them, as the reference)
        assert peeled.zfile.header.flags & ~KNOWN_FLAGS != 0
        lsmt = peeled.source
        for at in (0, lsmt.size - 4096):
            raw = lsmt.pread(at + 56, 74)
            assert raw[:37] == EXT4_64_UUID.encode() + b"\x00"
            assert raw[37:] == b"00000000-0000-0000-0000-000000000000\x00"


def test_ext4_64_contents(ext4_64: Path) -> None:
    with overlaybd.open_layer(str(ext4_64)) as layer:
        assert layer.size == 64 * GIB
        assert format_uuid(layer.uuid) == EXT4_64_UUID.lower()
        assert int(layer.segments().zeroed.sum()) > 0
        totals = dict.fromkeys(ExtentKind, 0)
        for ext in layer.extents():
            totals[ext.kind] += ext.length
        # records cover the whole device: data where mkfs wrote, zeroed records (discards) everywhere else
        seg = layer.segments()
        assert totals[ExtentKind.ZERO] == int(seg.length[seg.zeroed].sum()) * 512 > 0
        assert totals[ExtentKind.DATA] == int(seg.length[~seg.zeroed].sum()) * 512 > 0
        assert totals[ExtentKind.HOLE] == 0
        assert _superblock_magic(layer) == EXT4_MAGIC
        fs = Ext4(layer.pread)
        assert fs.sb.block_size == 4096 and fs.sb.blocks_count * 4096 == 64 * GIB
        names = sorted(e.name for e in fs.list_dir(fs.inode(2)))
        assert names == [b".", b"..", b"lost+found"]  # freshly made: nothing else in it
        assert fs.lookup("/lost+found").is_dir


# -- hello-world: an OCI layout with a converted image ---------------------------------------------------------------
class Oci:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.index = json.loads((root / "index.json").read_text())

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        assert algo == "sha256"
        return self.root / "blobs" / "sha256" / hexdigest

    def blob(self, descriptor: dict[str, Any]) -> bytes:
        data = self.blob_path(descriptor["digest"]).read_bytes()
        assert len(data) == descriptor["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
        return data

    def json_blob(self, descriptor: dict[str, Any]) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.blob(descriptor))
        return value

    def by_ref_name(self, name: str) -> dict[str, Any]:
        manifests: list[dict[str, Any]] = self.index["manifests"]
        found = [m for m in manifests if m.get("annotations", {}).get(REF_NAME) == name]
        assert len(found) == 1, f"{len(found)} manifests tagged {name!r}"
        return found[0]


@pytest.fixture(scope="module")
def oci(real_dir: Path) -> Oci:
    return Oci(real_dir / "hello-world-oci")


@pytest.fixture(scope="module")
def converted(oci: Oci) -> dict[str, Any]:
    """The converted image's manifest, config and its one layer descriptor."""
    manifest = oci.json_blob(oci.by_ref_name("amd64-converted"))
    assert len(manifest["layers"]) == 1
    return {"manifest": manifest, "config": oci.json_blob(manifest["config"]), "layer": manifest["layers"][0]}


@pytest.fixture(scope="module")
def original_amd64(oci: Oci) -> dict[str, Any]:
    """The linux/amd64 image the conversion started from (the index entry for that platform, not the converted
    one): its manifest, config and gzip layer."""
    entries = [m for m in oci.index["manifests"]
               if m.get("platform", {}).get("architecture") == "amd64" and m.get("platform", {}).get("os") == "linux"
               and m.get("annotations", {}).get(REF_NAME) != "amd64-converted"]
    assert len(entries) == 1
    manifest = oci.json_blob(entries[0])
    assert len(manifest["layers"]) == 1
    return {"manifest": manifest, "config": oci.json_blob(manifest["config"]), "layer": manifest["layers"][0]}


def test_hello_layer_descriptor(oci: Oci, converted: dict[str, Any]) -> None:
    layer = converted["layer"]
    ann = layer["annotations"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert ann[ANNOTATION + "blob-digest"] == layer["digest"]
    assert ann[ANNOTATION + "blob-size"] == str(layer["size"])
    assert ann[ANNOTATION + "version"] == "0.1.0"
    path = oci.blob_path(layer["digest"])
    assert path.stat().st_size == layer["size"]
    assert "sha256:" + file_sha256(path) == layer["digest"]
    # an overlaybd image's diff_ids are the blob digests themselves
    assert converted["config"]["rootfs"]["diff_ids"] == [layer["digest"]]


def test_hello_layer_structure(oci: Oci, converted: dict[str, Any]) -> None:
    path = str(oci.blob_path(converted["layer"]["digest"]))
    info = describe_layer(path)
    assert info["wrappers"] == ["tar", "zfile"]
    assert info["tar"] == {"member": "overlaybd.commit", "payload_offset": 1536, "payload_size": 639491}
    z = info["zfile"]
    assert (z["algorithm"], z["block_size"], z["crc"], z["header_overwritten"]) == ("lz4", 4096, True, True)
    assert z["blocks"] == 17463 and z["original_size"] == 17463 * 4096
    assert info["format"] == "lsmt-committed"
    assert info["virtual_size"] == 64 * GIB
    assert info["header"]["uuid"].upper() == info["trailer"]["uuid"].upper() == HELLO_UUID
    assert info["index"] == {"offset": 71512064, "records_on_disk": 768}
    assert info["records"] == 515
    report = check_layer(path)
    assert report["errors"] == [] and report["warnings"] == []
    assert report["blocks_checked"] == 17463
    assert overlaybd.verify_zfile(path).nblocks == 17463


def test_hello_uuid_is_the_chain_id(converted: dict[str, Any], original_amd64: dict[str, Any]) -> None:
    """The convertor names layer 0 after the chain ID of the original layers (= the first diff_id): its first
    32 hex digits, as a UUID."""
    diff_ids = original_amd64["config"]["rootfs"]["diff_ids"]
    assert len(diff_ids) == 1
    chain = diff_ids[0].removeprefix("sha256:")
    assert str(uuidlib.UUID(chain[:32])).upper() == HELLO_UUID


def test_hello_original_diff_id(oci: Oci, original_amd64: dict[str, Any]) -> None:
    raw = gzip.decompress(oci.blob(original_amd64["layer"]))
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == original_amd64["config"]["rootfs"]["diff_ids"][0]


def test_hello_file_inside_the_ext4(oci: Oci, converted: dict[str, Any], original_amd64: dict[str, Any],
                                    tmp_path: Path) -> None:
    """/hello read out of the ext4 filesystem inside the overlaybd layer is the file the original layer holds."""
    with tarfile.open(oci.blob_path(original_amd64["layer"]["digest"]), "r:gz") as tf:
        member = tf.getmember("hello")
        f = tf.extractfile(member)
        assert f is not None
        want = f.read()
    assert len(want) == member.size > 0
    with overlaybd.open_layer(str(oci.blob_path(converted["layer"]["digest"]))) as layer:
        assert layer.size == 64 * GIB
        assert format_uuid(layer.uuid).upper() == HELLO_UUID
        assert _superblock_magic(layer) == EXT4_MAGIC
        fs = Ext4(layer.pread)
        root = {e.name: e for e in fs.list_dir(fs.inode(2))}
        assert b"hello" in root and b"lost+found" in root
        inode = fs.inode(root[b"hello"].inode)
        assert inode.is_reg and inode.size == member.size
        assert inode.mode & 0o7777 == member.mode & 0o7777 == 0o775
        got = fs.read_file(inode)
    assert got == want
    # the same through a one-layer stack, by path
    with overlaybd.open_stack([str(oci.blob_path(converted["layer"]["digest"]))]) as stack:
        assert Ext4(stack.pread).read_path("/hello") == want
