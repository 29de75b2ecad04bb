#!/usr/bin/env python3
"""Converting a container image: the ext4 engines that can apply a layer tar, and the whole conversion beside the
reference's pipeline; then reading a file from the converted image mounted lazily.

The tar: /usr/share/doc, /usr/lib/python3.11 and /usr/include (about 300 MB, 16,000 entries; --quick: /usr/include
only), made by GNU tar. Every engine builds an ext4 of the same size (64 GiB) from it; each result is checked with
``e2fsck -fn`` and must hold as many inodes as ours.

1. Engines (apply only): ours (libext2fs through ctypes on a sparse raw image, no root); debugfs driven by a
   command script (``mkdir``/``write``/``symlink``/``mknod``/``ln``/``sif``/``ea_set``, the files extracted first;
   no root); ``mke2fs -d`` from the tar extracted as root (owners need root); GNU tar into a kernel-mounted ext4
   (root); the reference's ``overlaybd-apply`` (libext2fs through Photon, on an LSMT layer); ``--fuse2fs``: GNU tar
   into a fuse2fs mount (slow: a minute). Extracting to the host (debugfs, mke2fs -d) is part of the engine.
2. Pipelines: ``overlaybd convert`` of a one-layer OCI image of the tar (fetch and verify, apply, commit as a
   tar-wrapped LZ4 ZFile, upload to an OCI layout) beside the reference's ``overlaybd-create --mkfs`` +
   ``overlaybd-apply`` + ``overlaybd-commit -z -t`` on the same tar, and beside GNU tar into a kernel ext4.
3. Lazy read (root): the image converted into docker-registry (behind a counting proxy), ``overlaybd mount``
   (lazy pull, loop device), then the first byte and the whole of one 1-8 MiB file: time and bytes fetched.

The reference tools are looked for in $OVERLAYBD_REFERENCE_TOOLS (../shared/reference-tools/build.sh builds them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from common import base_parser, emit_json, fmt, log, machine, median, table, versions, workdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.e2e.registry
from overlaybd.convert.applier import Applier  # noqa: E402
from overlaybd.convert.ext4 import Ext4Image  # noqa: E402
from overlaybd.convert.tarlayer import read_entries  # noqa: E402
from overlaybd.testing.ociimage import write_image  # noqa: E402
from tests.e2e.registry import FaultProxy, registry  # noqa: E402

OVERLAYBD = [sys.executable, "-m", "overlaybd.cli.main"]
SIZE = 64 << 30
MKFS = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-i", "16384", "-I", "256", "-m", "5",
        "-O", "^has_journal,^metadata_csum,^orphan_file,sparse_super2", "-E", "root_owner=0:0"]
TREES = ["usr/share/doc", "usr/lib/python3.11", "usr/include"]
QUICK_TREES = ["usr/include"]


def sh(*cmd: str, cwd: str | None = None, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()[-500:]}")
    return out.stdout


def inodes_used(image: Path) -> int:
    out = sh("dumpe2fs", "-h", str(image))
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Inode count"]) - int(fields["Free inodes"])


def fsck_ok(image: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


def drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# -- engines ---------------------------------------------------------------------------------------------------


def engine_ours(tar: Path, wd: Path) -> Path:
    image = wd / "ours.img"
    fs = Ext4Image.make(str(image), SIZE)
    Applier(fs).apply(read_entries(str(tar)))
    fs.close()
    return image


def debugfs_script(tar: Path, files: Path) -> bytes:
    """debugfs commands building the tar's tree (files from their extracted copies)."""
    lines: list[str] = []
    made: set[str] = set()
    with tarfile.open(tar) as tf:
        for m in tf:
            name = "/" + m.name.strip("/")
            parts = name.split("/")[1:-1]
            for k in range(1, len(parts) + 1):  # parents the tar does not list
                parent = "/" + "/".join(parts[:k])
                if parent not in made:
                    made.add(parent)
                    lines.append(f'mkdir "{parent}"')
            if m.isdir():
                made.add(name)
            lines += _debugfs_make(m, f'"{name}"', files)
            lines += _debugfs_attributes(m, f'"{name}"')
    return ("\n".join(lines) + "\n").encode()


def _debugfs_make(m: tarfile.TarInfo, q: str, files: Path) -> list[str]:
    """The commands that make one entry (a directory's ``mkdir`` fails when a parent line made it already:
    debugfs goes on)."""
    if m.isdir():
        return [f"mkdir {q}"]
    if m.isreg():
        return [f'write "{files / m.name}" {q}']
    if m.issym():
        return [f'symlink {q} "{m.linkname}"']
    if m.islnk():
        return [f'ln "/{m.linkname}" {q}', f'sif "/{m.linkname}" links_count 2']
    if m.ischr() or m.isblk():
        return [f"mknod {q} {'c' if m.ischr() else 'b'} {m.devmajor} {m.devminor}"]
    if m.isfifo():
        return [f"mknod {q} p"]
    return []


def _debugfs_attributes(m: tarfile.TarInfo, q: str) -> list[str]:
    kind = {tarfile.DIRTYPE: 0o40000, tarfile.SYMTYPE: 0o120000}.get(m.type, 0o100000)
    lines = [f"sif {q} uid {m.uid}", f"sif {q} gid {m.gid}", f"sif {q} mode 0{kind | m.mode:o}",
             f"sif {q} mtime {int(m.mtime)}", f"sif {q} atime {int(m.mtime)}", f"sif {q} ctime {int(m.mtime)}"]
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            lines.append(f'ea_set {q} {key[13:]} "{value}"')
    return lines


def engine_debugfs(tar: Path, wd: Path) -> Path:
    image, files = wd / "debugfs.img", wd / "debugfs-files"
    files.mkdir()
    sh("tar", "-xf", str(tar), "-C", str(files), "--no-same-owner")
    sh(*MKFS, str(image), "64G")
    script = wd / "debugfs.cmds"
    script.write_bytes(debugfs_script(tar, files))
    sh("debugfs", "-w", "-f", str(script), str(image))
    return image


def engine_mke2fs_d(tar: Path, wd: Path) -> Path:
    image, files = wd / "mke2fs.img", wd / "mke2fs-files"
    files.mkdir()
    sh("tar", "-xf", str(tar), "-C", str(files), "--same-owner", "--xattrs")
    sh(*MKFS, "-d", str(files), str(image), "64G")
    return image


def engine_kernel(tar: Path, wd: Path, mount_type: str = "kernel") -> Path:
    image, mnt = wd / f"{mount_type}.img", wd / f"{mount_type}-mnt"
    sh(*MKFS, str(image), "64G")
    mnt.mkdir()
    if mount_type == "kernel":
        sh("mount", "-o", "loop", str(image), str(mnt))
    else:
        sh("fuse2fs", str(image), str(mnt), "-o", "fakeroot")
    try:
        sh("tar", "-xf", str(tar), "-C", str(mnt), "--same-owner", "--xattrs")
    finally:
        sh("umount", str(mnt))
    mnt.rmdir()
    return image


def reference_tools() -> Path | None:
    env = os.environ.get("OVERLAYBD_REFERENCE_TOOLS")
    if env and (Path(env) / "overlaybd-apply").exists():
        return Path(env)
    found = shutil.which("overlaybd-apply")
    return Path(found).parent if found else None


def reference_pipeline(tools: Path, tar: Path, wd: Path) -> dict[str, Any]:
    """overlaybd-create --mkfs, overlaybd-apply, overlaybd-commit -z -t: seconds of each, the blob, the device."""
    d = wd / "reference"
    d.mkdir()
    Path("/etc/overlaybd").mkdir(exist_ok=True)
    if not Path("/etc/overlaybd/overlaybd.json").exists():
        Path("/etc/overlaybd/overlaybd.json").write_text("{}")
    (d / "config.json").write_text(json.dumps({"lowers": [], "upper": {"data": str(d / "data"),
                                                                       "index": str(d / "index")}}))
    times = {}
    t0 = time.perf_counter()
    sh(str(tools / "overlaybd-create"), str(d / "data"), str(d / "index"), "64", "-s", "--mkfs")
    times["create_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh(str(tools / "overlaybd-apply"), str(tar), str(d / "config.json"))
    times["apply_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh(str(tools / "overlaybd-commit"), str(d / "data"), str(d / "index"), str(d / "layer.tar"), "-z", "-t",
       "--uuid", "01bb4fce-3eb1-b56b-05ad-f99504dafd31")
    times["commit_s"] = time.perf_counter() - t0
    size = (d / "layer.tar").stat().st_size
    raw = wd / "reference.img"
    sh(*OVERLAYBD, "cat", str(d / "layer.tar"), "-o", str(raw))
    drop(d)
    return {**times, "total_s": sum(times.values()), "blob_bytes": size, "image": raw}


def ours_pipeline(layout: Path, wd: Path) -> dict[str, Any]:
    out = wd / "converted"
    t0 = time.perf_counter()
    report = json.loads(sh(*OVERLAYBD, "convert", f"oci:{layout}", f"oci:{out}", "--output", "json"))
    total = time.perf_counter() - t0
    layer = report["manifests"][0]["layers"][0]
    blob = out / "blobs" / "sha256" / layer["digest"].split(":")[1]
    raw = wd / "converted.img"
    sh(*OVERLAYBD, "cat", str(blob), "-o", str(raw))
    return {"total_s": total, "layer_s": layer["seconds"], "blob_bytes": layer["size"], "image": raw,
            "layout": out, "digest": report["digest"]}


# -- lazy read -------------------------------------------------------------------------------------------------


def lazy_read(wd: Path, layout: Path, probe: str) -> dict[str, Any]:
    """Convert the image into docker-registry (through a counting proxy); mount it lazily; read one file."""
    env = {**os.environ, "OVERLAYBD_CACHE_DIR": str(wd / "cache"), "OVERLAYBD_MOUNTS": str(wd / "mounts")}
    with registry(wd / "registry") as host:
        proxy = FaultProxy(host)
        try:
            ref = f"{proxy.address}/bench/converted:v1"
            sh(*OVERLAYBD, "convert", f"oci:{layout}", ref)
            mnt = wd / "lazy-mnt"
            mnt.mkdir()
            mark = proxy.bytes_sent
            t0 = time.perf_counter()
            sh(*OVERLAYBD, "mount", ref, str(mnt), env=env)
            mount_s = time.perf_counter() - t0
            mount_bytes = proxy.bytes_sent - mark
            try:
                path = mnt / probe
                mark = proxy.bytes_sent
                t0 = time.perf_counter()
                with open(path, "rb") as f:
                    first = f.read(1)
                    first_s = time.perf_counter() - t0
                    first_bytes = proxy.bytes_sent - mark
                    rest = f.read()
                whole_s = time.perf_counter() - t0
                whole_bytes = proxy.bytes_sent - mark
                size = len(first) + len(rest)
            finally:
                sh(*OVERLAYBD, "umount", str(mnt), env=env)
        finally:
            proxy.close()
    return {"file": probe, "file_bytes": size, "mount_s": mount_s, "mount_fetched": mount_bytes,
            "first_byte_s": first_s, "first_byte_fetched": first_bytes, "whole_s": whole_s,
            "whole_fetched": whole_bytes}


def probe_file(root: str, trees: list[str]) -> str:
    """A file of 1-8 MiB in the tree (else the largest): what the lazy read reads."""
    best: tuple[int, str] = (0, "")
    for tree in trees:
        for d, _, names in os.walk(os.path.join(root, tree)):
            for n in names:
                p = os.path.join(d, n)
                if os.path.islink(p):
                    continue
                size = os.path.getsize(p)
                if (1 << 20) <= size <= (8 << 20):
                    return os.path.relpath(p, root)
                best = max(best, (size, os.path.relpath(p, root)))
    return best[1]


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine and pipeline (median)")
    ap.add_argument("--fuse2fs", action="store_true", help="also GNU tar into a fuse2fs mount (about a minute)")
    ap.add_argument("--no-debugfs", action="store_true", help="leave out the debugfs engine")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    trees = QUICK_TREES if args.quick else TREES
    result: dict[str, Any] = {"benchmark": "convert", "machine": machine(), "versions": versions(),
                              "args": vars(args), "trees": trees}
    tools = reference_tools()
    with workdir(args.workdir, args.keep, "bench-convert-") as wd_s:
        wd = Path(wd_s)
        tar = wd / "layer.tar"
        sh("tar", "-cf", str(tar), "--xattrs", "-C", "/", *trees)
        count = sum(1 for _ in tarfile.open(tar))
        result["tar"] = {"bytes": tar.stat().st_size, "entries": count}
        log(f"tar: {tar.stat().st_size:,} bytes, {count:,} entries")
        result["engines"] = run_engines(args, tar, wd, tools)
        rows = []
        ours_s = median(result["engines"]["ours (libext2fs, ctypes)"]["seconds"])
        for name, e in result["engines"].items():
            rows.append([name, median(e["seconds"]), median(e["seconds"]) / ours_s, e["fsck_ok"], e["inodes"]])
        print(table(["engine (apply one tar to a fresh 64 GiB ext4)", "seconds", "/ ours", "e2fsck -fn", "inodes"],
                    rows, title=f"Engines: {result['tar']['bytes']:,} bytes, {count:,} entries"))
        print()

        layout = wd / "source"
        write_image(str(layout), [tar.read_bytes()], compression="tar", flavour="oci")
        result["pipelines"] = run_pipelines(args, tar, wd, tools, layout)
        print(table(["pipeline (one layer)", "seconds", "blob bytes", "ours / this"],
                    pipeline_rows(result["pipelines"]), title="Pipelines"))
        print()

        if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
            w = wd / "lazy"
            w.mkdir()
            probe = probe_file("/", trees)
            lazy = lazy_read(w, layout, probe)
            lazy["blob_bytes"] = int(median([p["blob_bytes"] for p in result["pipelines"]["ours"]]))
            result["lazy"] = lazy
            print(table(["lazy read", "seconds", "bytes fetched"], [
                ["mount (lazy pull: manifest, indexes)", lazy["mount_s"], lazy["mount_fetched"]],
                [f"first byte of /{probe}", lazy["first_byte_s"], lazy["first_byte_fetched"]],
                [f"whole file ({lazy['file_bytes']:,} bytes)", lazy["whole_s"], lazy["whole_fetched"]],
            ], title=f"Lazy read from docker-registry (image blob {lazy['blob_bytes']:,} bytes)"))
            print()
    emit_json(result, args.json)
    return 0


def run_engines(args: Any, tar: Path, wd: Path, tools: Any) -> dict[str, Any]:
    """Each engine applies the tar to a fresh ext4, ``args.repeats`` times; the first image is checked."""
    root = os.geteuid() == 0
    engines: dict[str, Any] = {"ours (libext2fs, ctypes)": lambda w: engine_ours(tar, w)}
    if not args.no_debugfs:
        engines["debugfs script"] = lambda w: engine_debugfs(tar, w)
    if root:
        engines["mke2fs -d (root)"] = lambda w: engine_mke2fs_d(tar, w)
        engines["GNU tar, kernel ext4 (root)"] = lambda w: engine_kernel(tar, w)
        if args.fuse2fs:
            engines["GNU tar, fuse2fs"] = lambda w: engine_kernel(tar, w, "fuse2fs")
    out: dict[str, Any] = {}
    for name, fn in engines.items():
        secs = []
        checked: dict[str, Any] = {}
        for r in range(args.repeats):
            w = wd / f"e{len(out)}-{r}"
            w.mkdir()
            log(f"engine {name}, run {r + 1}")
            t0 = time.perf_counter()
            image = fn(w)
            secs.append(time.perf_counter() - t0)
            if r == 0:
                checked = {"fsck_ok": fsck_ok(image), "inodes": inodes_used(image)}
            drop(w)
        out[name] = {"seconds": secs, **checked}
    if tools:
        secs = []
        for r in range(args.repeats):
            w = wd / f"ref-apply-{r}"
            w.mkdir()
            log(f"engine overlaybd-apply, run {r + 1}")
            ref = reference_pipeline(tools, tar, w)
            secs.append(ref["apply_s"])
            if r == 0:
                out["reference overlaybd-apply"] = {"fsck_ok": fsck_ok(ref["image"]),
                                                    "inodes": inodes_used(ref["image"])}
            drop(w)
        out["reference overlaybd-apply"]["seconds"] = secs
    return out


def run_pipelines(args: Any, tar: Path, wd: Path, tools: Any, layout: Path) -> dict[str, list[dict[str, Any]]]:
    """Ours, the reference's and GNU tar into a kernel ext4 (root), alternating, ``args.repeats`` times."""
    pipes: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": [], "kernel": []}
    for r in range(args.repeats):
        w = wd / f"p-{r}"
        w.mkdir()
        log(f"pipelines, run {r + 1}")
        ours = ours_pipeline(layout, w)
        ours_inodes = inodes_used(ours.pop("image"))
        ours.pop("layout")
        pipes["ours"].append({**ours, "inodes": ours_inodes})
        if tools:
            ref = reference_pipeline(tools, tar, w)
            ref_inodes = inodes_used(ref.pop("image"))
            pipes["reference"].append({**ref, "inodes": ref_inodes})
        if os.geteuid() == 0:
            t0 = time.perf_counter()
            image = engine_kernel(tar, w)
            pipes["kernel"].append({"total_s": time.perf_counter() - t0, "inodes": inodes_used(image)})
        drop(w)
    return pipes


def pipeline_rows(pipes: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    o = pipes["ours"]
    rows: list[list[Any]] = [
        ["overlaybd convert (fetch, verify, apply, commit, upload)", median([p["total_s"] for p in o]),
         median([p["blob_bytes"] for p in o]), "1.00"],
        ["  of which apply + commit of the layer", median([p["layer_s"] for p in o]), None, None]]
    if pipes["reference"]:
        ref_total = median([p["total_s"] for p in pipes["reference"]])
        rows.append(["reference create --mkfs + apply + commit -z -t", ref_total,
                     median([p["blob_bytes"] for p in pipes["reference"]]),
                     fmt(median([p["total_s"] for p in o]) / ref_total)])
        rows[1][3] = fmt(median([p["layer_s"] for p in o]) / ref_total)
    if pipes["kernel"]:
        k = median([p["total_s"] for p in pipes["kernel"]])
        rows.append(["GNU tar into a kernel ext4 (mkfs, mount, extract, umount)", k, None,
                     fmt(median([p["total_s"] for p in o]) / k)])
    return rows


if __name__ == "__main__":
    sys.exit(main())
