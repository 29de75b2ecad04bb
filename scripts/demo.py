"""The main job on an embedded default (a local OCI image-layout directory as the repository; no network):

create a volume, write to it, snapshot it twice (compressed), push it to oci:WORK/repo, pull it back eagerly and
lazily into new volumes, check every device byte against a model, then flatten and export.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

from overlaybd.remote.lazy import RemoteLayers
from overlaybd.volume import Volume

MiB = 1 << 20


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out, end="", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", help="keep the files here (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        os.environ.setdefault("OVERLAYBD_CACHE_DIR", os.path.join(work, "cache"))
        cli = [os.path.join(os.path.dirname(sys.executable), "overlaybd")]
        model = bytearray(64 * MiB)
        vol_path = os.path.join(work, "vol")
        run([*cli, "create", vol_path, "--size", "64M"])

        vol = Volume(vol_path)
        with vol.open(writable=True) as disk:  # snapshot 0: a base image
            for i in range(0, 32 * MiB, MiB):
                text = "".join(f"block {i:#x} line {n}: the quick brown fox\n" for n in range(4000)).encode()
                block = (hashlib.shake_256(f"base{i}".encode()).digest(65536) + text)[: 256 * 1024]
                disk.pwrite(i, block)
                model[i : i + len(block)] = block
            disk.flush()
        run([*cli, "snapshot", vol_path, "-m", "base image", "--compress", "zstd"])
        with vol.open(writable=True) as disk:  # snapshot 1: unaligned writes and a discard
            disk.pwrite(12345, b"hello, overlaybd!" * 1000)
            model[12345 : 12345 + 17000] = b"hello, overlaybd!" * 1000
            disk.trim(4 * MiB, 2 * MiB)
            model[4 * MiB : 6 * MiB] = bytes(2 * MiB)
            disk.flush()
        run([*cli, "snapshot", vol_path, "-m", "second snapshot", "--compress", "lz4"])
        run([*cli, "log", vol_path])
        run([*cli, "diff", vol_path, "0", "1"])

        repo = f"oci:{os.path.join(work, 'repo')}:v1"
        run([*cli, "push", vol_path, repo])
        run([*cli, "push", vol_path, repo])  # again: every blob is already there
        run([*cli, "pull", repo, os.path.join(work, "eager")])
        run([*cli, "pull", repo, os.path.join(work, "lazy"), "--lazy"])
        lowers = Volume(os.path.join(work, "lazy")).lowers
        run([*cli, "check", *[os.path.join(work, "eager", "layers", f) for f in
                              sorted(os.listdir(os.path.join(work, "eager", "layers")))]])

        want = hashlib.sha256(model).hexdigest()
        ok = True
        for name in ("vol", "eager", "lazy"):
            with Volume(os.path.join(work, name), opener=RemoteLayers()).open() as dev:
                got = hashlib.sha256(dev.pread(0, dev.size)).hexdigest()
            print(f"{name}: device sha256 {got} {'matches' if got == want else 'DIFFERS FROM'} the model")
            ok &= got == want
        print(f"lazy pull downloaded no layer file: {not any(os.path.exists(p) for p in lowers)}")

        run([*cli, "merge", vol_path])
        run([*cli, "export", vol_path, os.path.join(work, "disk.raw")])
        with open(os.path.join(work, "disk.raw"), "rb") as f:
            flat = hashlib.sha256(f.read()).hexdigest()
        print(f"merged and exported: sha256 {flat} {'matches' if flat == want else 'DIFFERS FROM'} the model")
        ok &= flat == want
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
