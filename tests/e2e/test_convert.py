"""``overlaybd convert`` end to end: images built here (whiteouts, opaque directories, hard links, xattrs, devices,
setuid, sparse files, long and non-ASCII names, PAX headers) converted, then each device (the stack of the first k
converted layers) read back entry by entry against the tree the tars describe: debugfs and ``e2fsck -fn``
without root, a kernel mount as root. The hello-world image of ../shared/fixtures; reproducible digests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from overlaybd.testing.ociimage import write_image

from .convert_trees import (
    E,
    Model,
    Node,
    debugfs_listing,
    expected_kernel,
    kernel_tree,
    make_tar,
    same_tree,
    sparse_tar,
)
from .nbd_helpers import OVERLAYBD, run

pytestmark = pytest.mark.slow
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
LONG = "n" * 255
UID_BIG = 3_000_000  # beyond the octal field: PAX uid


def layers(tmp: Path) -> tuple[list[bytes], list[list[E]], dict[bytes, Node]]:
    big = os.urandom(300_000)
    l0 = [
        E("./", "dir", perm=0o755, mtime=1_600_000_000),
        E("etc/", "dir"), E("etc/passwd", data=b"root:x:0:0\n"), E("etc/hosts", data=b"127.0.0.1 localhost\n"),
        E("bin/", "dir"), E("bin/su", data=b"su" * 100, perm=0o4755), E("bin/wall", data=b"w", perm=0o2755),
        E("bin/ping", data=b"ping", perm=0o755, xattrs={"security.capability": CAP}),
        E("bin/busybox", data=big, perm=0o755, uid=1000, gid=1000),
        E("bin/sh", "link", link="bin/busybox", perm=0o755, uid=1000, gid=1000),
        E("bin/ash", "link", link="./bin//busybox", perm=0o755, uid=1000, gid=1000),
        E("usr/lib/", "dir", xattrs={"user.note": b"kept", "trusted.t": b"\x00\x01"}),
        E("usr/lib/libx.so", data=b"x" * 5000), E("usr/lib/liby.so", data=b""),
        E("lib", "symlink", link="usr/lib", perm=0o777),
        E("usr/share/doc/deep/" + "d" * 120 + "/" + LONG, data=b"long names"),
        E("usr/share/long-link", "symlink", link="/" + "t" * 200),
        E("usr/share/é文件", data=b"non-ASCII"), E(b"usr/share/bytes-\xff\xfe", data=b"not UTF-8"),
        E("dev/", "dir"), E("dev/null", "chr", perm=0o666, dev=(1, 3)), E("dev/sda", "blk", perm=0o660, dev=(8, 0)),
        E("dev/big", "chr", perm=0o600, dev=(300, 70000)), E("run/initctl", "fifo", perm=0o600),
        E("tmp/", "dir", perm=0o1777), E("home/user/", "dir", perm=0o700, uid=UID_BIG, gid=UID_BIG),
        E("home/user/.profile", data=b"# profile", uid=UID_BIG, gid=UID_BIG, mtime=4_200_000_000.75),
        E("old", data=b"from 1960", mtime=-300_000_000), E("opt/a/b", data=b"b"), E("opt/a/c", data=b"c"),
    ]
    l1 = [
        E("etc/.wh.passwd"), E("etc/hostname", data=b"converted\n"),
        E("usr/lib/.wh..wh..opq"), E("usr/lib/new.so", data=b"new"),
        E("bin/su/", "dir", perm=0o750),  # a file replaced by a directory
        E("home/user", data=b"a file now"),  # a directory (with contents) replaced by a file
        E("bin/.wh.sh"),  # one of three hard links removed
        E("tmp/", "dir", perm=0o700, mtime=1_500_000_000),  # an existing directory: new attributes, kept contents
        E("ghost/.wh.nothing"),  # whiteout under a missing parent: the parent is made, as the reference does
        E("lib/via-link.so", data=b"through the symlink"),  # the parent is a symlink: followed, inside the image
        E("dev/null", "chr", perm=0o640, dev=(1, 5)),  # a device replaced
    ]
    l2 = [
        E("opt/keep", data=b"this layer's"), E("opt/.wh..wh..opq"),  # unpacked before the opaque marker: kept
        E("etc/passwd", data=b"root:x:0:0\nu:x:1:1\n"), E("etc/hosts2", "link", link="etc/hosts"),
        E("bin/busybox", data=b"replaced", perm=0o755),  # a hard-linked file replaced: the other link keeps it
    ]
    sparse_data = [(0, b"head"), (1 << 20, b"middle" * 100), ((8 << 20) - 4, b"tail")]
    sparse_layer = sparse_tar(tmp, "sparse.bin", 8 << 20, sparse_data)
    full = bytearray(8 << 20)
    for off, data in sparse_data:
        full[off:off + len(data)] = data
    sparse_node = Node("file", perm=0o640, data=bytes(full), size=len(full))
    l3_entries = [E("sparse.bin", data=bytes(full), perm=0o640)]
    return [make_tar(l0), make_tar(l1), make_tar(l2), sparse_layer], [l0, l1, l2, l3_entries], \
        {b"sparse.bin": sparse_node}


def convert(src: str, dst: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([*OVERLAYBD, "convert", src, dst, "--output", "json", *extra], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def device(tmp: Path, layout: Path, digests: list[str], name: str) -> Path:
    raw = tmp / name
    run(*OVERLAYBD, "cat", *[str(blob(layout, d)) for d in digests], "-o", str(raw))
    return raw


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[list[E]], dict[bytes, Node]]:
    tmp = tmp_path_factory.mktemp("convert")
    tars, entries, sparse = layers(tmp)
    write_image(str(tmp / "src"), tars, compression="gzip")
    report = convert(f"oci:{tmp / 'src'}", f"oci:{tmp / 'dst'}:v1", "--vsize", "1")
    digests = [layer["digest"] for layer in report["manifests"][0]["layers"]]
    return tmp, digests, entries, sparse


def model_after(entries: list[list[E]], sparse: dict[bytes, Node], k: int) -> Model:
    model = Model()
    for layer in entries[: k + 1]:
        model.apply(layer, sparse)
    return model


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_each_layer_reads_back_as_the_tars_describe(converted: tuple[Path, list[str], list[list[E]],
                                                                     dict[bytes, Node]], k: int) -> None:
    tmp, digests, entries, sparse = converted
    raw = device(tmp, tmp / "dst", digests[: k + 1], f"device-{k}.raw")
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    model = model_after(entries, sparse, k)
    # without root: debugfs lists every directory; names, types, permissions and owners as the model has them
    dirs = [p for p, n in model.tree.items() if n.kind == "dir"]
    listing = debugfs_listing(raw, dirs)
    want = {p: (n.kind, n.perm, n.uid, n.gid) for p, n in model.tree.items() if p}
    kinds = {0o100000: "file", 0o040000: "dir", 0o120000: "symlink", 0o020000: "chr", 0o060000: "blk",
             0o010000: "fifo"}
    got = {p: (kinds[m & 0o170000], m & 0o7777, uid, gid) for p, (m, uid, gid, _size) in listing.items()}
    assert got == want
    if os.geteuid() != 0:
        pytest.skip("the kernel mount needs root; debugfs and e2fsck checked the image")
    mnt = tmp / f"mnt-{k}"
    mnt.mkdir()
    run("mount", "-o", "loop,ro", str(raw), str(mnt))
    try:
        problems = same_tree(kernel_tree(mnt), expected_kernel(model))
    finally:
        run("umount", str(mnt))
    assert not problems, "\n".join(problems)
    raw.unlink()


def test_sparse_file_keeps_its_holes(converted: tuple[Path, list[str], list[list[E]], dict[bytes, Node]]) -> None:
    tmp, digests, _, _ = converted
    raw = device(tmp, tmp / "dst", digests, "sparse.raw")
    out = subprocess.run(["debugfs", "-R", "stat /sparse.bin", str(raw)], capture_output=True, text=True).stdout
    assert "Size: 8388608" in out
    blocks = int(out.split("Blockcount: ")[1].split()[0])
    assert blocks <= 4 * 8  # head, middle, tail: a few 4 KiB blocks, not 8 MiB
    raw.unlink()


def test_times_and_ids_beyond_the_tar_fields(converted: tuple[Path, list[str], list[list[E]],
                                                             dict[bytes, Node]]) -> None:
    tmp, digests, _, _ = converted
    raw = device(tmp, tmp / "dst", digests[:1], "times.raw")
    out = subprocess.run(["debugfs", "-R", "stat /home/user/.profile", str(raw)], capture_output=True,
                         text=True).stdout
    assert f"User: {UID_BIG} Group: {UID_BIG}" in " ".join(out.split())
    assert "2103" in out  # 4,200,000,000 s: past 2038, in the extra epoch bits
    old = subprocess.run(["debugfs", "-R", "stat /old", str(raw)], capture_output=True, text=True).stdout
    assert "1960" in old
    raw.unlink()


def test_hello_world(tmp_path: Path, real_dir: Path) -> None:
    layout = real_dir / "hello-world-oci"
    report = convert(f"oci:{layout}:amd64", f"oci:{tmp_path / 'out'}:hw", "--oci")
    layer = report["manifests"][0]["layers"][0]
    assert layer["uuid"] == "01bb4fce-3eb1-b56b-05ad-f99504dafd31"  # from the chain ID, as the reference
    raw = device(tmp_path, tmp_path / "out", [layer["digest"]], "hello.raw")
    subprocess.run(["debugfs", "-R", f"dump /hello {tmp_path / 'hello'}", str(raw)], check=True,
                   capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    amd64 = next(m for m in index["manifests"] if (m.get("annotations") or {}).get(
        "org.opencontainers.image.ref.name") == "amd64")
    mf = json.loads(blob(layout, amd64["digest"]).read_bytes())
    with tarfile.open(blob(layout, mf["layers"][0]["digest"]), "r:gz") as tar:
        member = tar.extractfile("hello")
        assert member is not None
        assert (tmp_path / "hello").read_bytes() == member.read()
    # the manifest and config are shaped as the reference's conversion of the same image (fixture tag
    # amd64-converted): same keys, media types, annotations; the layer differs (its ext4 is built by another
    # library version), so the digests do
    ours = json.loads(blob(tmp_path / "out", report["digest"]).read_bytes())
    ref = next(m for m in index["manifests"] if (m.get("annotations") or {}).get(
        "org.opencontainers.image.ref.name") == "amd64-converted")
    theirs = json.loads(blob(layout, ref["digest"]).read_bytes())
    assert ours["mediaType"] == theirs["mediaType"] and ours["config"]["mediaType"] == theirs["config"]["mediaType"]
    assert list(ours["layers"][0]["annotations"]) == list(theirs["layers"][0]["annotations"])
    ours_cfg = json.loads(blob(tmp_path / "out", ours["config"]["digest"]).read_bytes())
    theirs_cfg = json.loads(blob(layout, theirs["config"]["digest"]).read_bytes())
    ours_cfg.pop("rootfs")
    theirs_cfg.pop("rootfs")
    assert ours_cfg == theirs_cfg


def test_reproducible_twice_in_other_folders_and_as_nobody(tmp_path: Path) -> None:
    tars = [make_tar([E("a/", "dir"), E("a/f", data=os.urandom(50_000)), E("a/l", "symlink", link="f")]),
            make_tar([E("a/.wh.f"), E("b", data=b"b", xattrs={"user.x": b"1"})])]
    src = tmp_path / "src"
    write_image(str(src), tars, compression="zstd")
    first = convert(f"oci:{src}", f"oci:{tmp_path / 'one'}:t", "--vsize", "1",
                    "--workdir", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    second = convert(f"oci:{src}", f"oci:{tmp_path / 'two'}:t", "--vsize", "1",
                     "--workdir", str(tmp_path / "elsewhere"))
    assert first["digest"] == second["digest"]
    assert blob(tmp_path / "one", first["digest"]).read_bytes() == blob(tmp_path / "two", second["digest"]).read_bytes()
    if os.geteuid() != 0:
        return
    shared = Path(tempfile.mkdtemp(prefix="overlaybd-nobody-"))  # pytest's folders are root's own (0700)
    try:
        shared.chmod(0o777)
        copy = shared / "src"
        shutil.copytree(src, copy)
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        env = {**os.environ, "HOME": str(shared), "TMPDIR": str(shared)}
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *OVERLAYBD,
                              "convert", f"oci:{copy}", f"oci:{shared / 'three'}:t", "--vsize", "1", "--output",
                              "json"], capture_output=True, text=True, env=env, cwd=shared)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["digest"] == first["digest"]
        assert (shared / "three").stat().st_uid != 0
    finally:
        shutil.rmtree(shared)

def test_multi_arch_index_drops_attestations(tmp_path: Path) -> None:
    from overlaybd.testing.ociimage import write_index

    src = str(tmp_path / "src")
    amd = write_image(src, [make_tar([E("arch", data=b"amd64")])], name=None, architecture="amd64")
    arm = write_image(src, [make_tar([E("arch", data=b"arm64")])], name=None, architecture="arm64",
                      compression="tar")
    write_index(src, {"amd64": amd, "arm64": arm}, name="multi")
    report = convert(f"oci:{src}:multi", f"oci:{tmp_path / 'out'}:multi", "--vsize", "1", "--concurrency", "2")
    assert len(report["manifests"]) == 2 and len(report["dropped"]) == 1
    index = json.loads(blob(tmp_path / "out", report["digest"]).read_bytes())
    assert index["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    for entry in index["manifests"]:
        mf = json.loads(blob(tmp_path / "out", entry["digest"]).read_bytes())
        assert mf["mediaType"] == entry["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert mf["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar"
    tags = [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in json.loads((tmp_path / "out" / "index.json").read_text())["manifests"]]
    assert tags == ["multi"]  # the per-platform manifests are blobs of the layout, not tags


def test_bad_input_is_one_readable_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = make_tar([E("f", data=b"x" * 2000)])
    write_image(str(src), [good[:1024]], compression="tar")  # truncated inside the file
    out = subprocess.run([*OVERLAYBD, "convert", f"oci:{src}", f"oci:{tmp_path / 'out'}"], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("overlaybd: error:") and len(out.stderr.strip().splitlines()) == 1
    lie = tmp_path / "lie"
    write_image(str(lie), [good], compression="gzip", config={"rootfs": {"type": "layers",
                                                                        "diff_ids": ["sha256:" + "0" * 64]}})
    out = subprocess.run([*OVERLAYBD, "convert", f"oci:{lie}", f"oci:{tmp_path / 'out2'}"], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "its config says" in out.stderr
    assert not (tmp_path / "out2" / "index.json").exists() or \
        not json.loads((tmp_path / "out2" / "index.json").read_text())["manifests"]
    fine = tmp_path / "fine"
    write_image(str(fine), [good])
    convert(f"oci:{fine}", f"oci:{tmp_path / 'obd'}", "--vsize", "1")
    out = subprocess.run([*OVERLAYBD, "convert", f"oci:{tmp_path / 'obd'}", f"oci:{tmp_path / 'again'}"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "an overlaybd layer already" in out.stderr


def test_no_mkfs_puts_the_base_layer_under(tmp_path: Path, real_dir: Path) -> None:
    import gzip

    base = tmp_path / "ext4_64"
    with gzip.open(real_dir / "ext4_64.tar.gz") as f, tarfile.open(fileobj=f) as tar:
        member = tar.extractfile(tar.getmembers()[0])
        assert member is not None
        base.write_bytes(member.read())
    src = tmp_path / "src"
    write_image(str(src), [make_tar([E("etc/motd", data=b"on the base layer")])])
    report = convert(f"oci:{src}", f"oci:{tmp_path / 'out'}", "--no-mkfs", "--base-layer", str(base))
    mf = json.loads(blob(tmp_path / "out", report["digest"]).read_bytes())
    assert len(mf["layers"]) == 2 and mf["layers"][0]["size"] == 4_739_584  # the reference's wrapped ext4_64
    raw = device(tmp_path, tmp_path / "out", [d["digest"] for d in mf["layers"]], "nomkfs.raw")
    assert subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True).returncode == 0
    out = subprocess.run(["debugfs", "-R", "cat /etc/motd", str(raw)], capture_output=True).stdout
    assert out == b"on the base layer"


def reference_tools() -> Path | None:
    for candidate in (os.environ.get("OVERLAYBD_REFERENCE_TOOLS"), shutil.which("obd-writer")):
        if candidate:
            path = Path(candidate)
            folder = path if path.is_dir() else path.parent
            if (folder / "obd-writer").exists():
                return folder
    return None


def test_reference_reader_reads_our_layers_to_the_same_device(
        converted: tuple[Path, list[str], list[list[E]], dict[bytes, Node]]) -> None:
    tools = reference_tools()
    if tools is None:
        pytest.skip("the reference tools are not built (../shared/reference-tools/build.sh; then set "
                    "OVERLAYBD_REFERENCE_TOOLS to their output folder)")
    tmp, digests, _, _ = converted
    Path("/etc/overlaybd").mkdir(exist_ok=True)
    if not Path("/etc/overlaybd/overlaybd.json").exists():
        Path("/etc/overlaybd/overlaybd.json").write_text("{}")
    layers = [str(blob(tmp / "dst", d)) for d in digests]
    theirs = tmp / "reference.raw"
    run(str(tools / "obd-writer"), "dump", str(theirs), *layers)
    ours = device(tmp, tmp / "dst", digests, "ours.raw")
    assert subprocess.run(["cmp", str(theirs), str(ours)]).returncode == 0
    theirs.unlink()
    ours.unlink()

