"""The main job on an embedded default: build a two-layer image, commit it compressed, stack, check, export.

Everything happens in a fresh folder (default: a temporary one); nothing touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

import overlaybd

MiB = 1 << 20


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", help="keep the files here (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        cli = os.path.join(os.path.dirname(sys.executable), "overlaybd")
        model = bytearray(64 * MiB)

        # layer 1: a base image written through a writable layer, committed as tar(ZFile zstd(LSMT))
        base_data, base_index = f"{work}/base.data", f"{work}/base.index"
        run([cli, "layer", "create", base_data, base_index, "64M"])
        with overlaybd.open_layer(base_data, base_index, writable=True) as rw:
            for i in range(0, 32 * MiB, MiB):
                text = "".join(f"block {i:#x} line {n}: the quick brown fox\n" for n in range(4000)).encode()
                block = (hashlib.shake_256(f"base{i}".encode()).digest(65536) + text)[:256 * 1024]
                rw.pwrite(i, block)
                model[i : i + len(block)] = block
            rw.flush()
        run([cli, "layer", "commit", base_data, base_index, f"{work}/base.layer", "-z", "-t", "--algorithm", "zstd",
             "--uuid", "b0000000-0000-4000-8000-000000000001", "-m", "base image"])

        # layer 2: changes on top (unaligned writes, a discard), then committed as tar(ZFile lz4(LSMT))
        top_data, top_index = f"{work}/top.data", f"{work}/top.index"
        run([cli, "layer", "create", top_data, top_index, "64M", "-u", "b0000000-0000-4000-8000-000000000001"])
        with overlaybd.open_stack([f"{work}/base.layer"], upper=(top_data, top_index), writable=True) as disk:
            disk.pwrite(12345, b"hello, overlaybd!" * 1000)
            model[12345 : 12345 + 17000] = b"hello, overlaybd!" * 1000
            disk.trim(4 * MiB, 2 * MiB)
            model[4 * MiB : 6 * MiB] = bytes(2 * MiB)
            disk.flush()
        run([cli, "layer", "commit", top_data, top_index, f"{work}/top.layer", "-z", "-t",
             "--uuid", "b0000000-0000-4000-8000-000000000002", "-m", "second snapshot"])

        layers = [f"{work}/base.layer", f"{work}/top.layer"]
        run([cli, "info", *layers])
        run([cli, "map", *layers])
        run([cli, "check", *layers])
        run([cli, "layer", "merge", *layers, "-o", f"{work}/flat.layer", "--algorithm", "zstd"])
        run([cli, "cat", *layers, "-o", f"{work}/disk.raw"])
        run([cli, "cat", f"{work}/flat.layer", "-o", f"{work}/flat.raw"])

        want = hashlib.sha256(model).hexdigest()
        results = {name: hashlib.sha256(open(f"{work}/{name}", "rb").read()).hexdigest()
                   for name in ("disk.raw", "flat.raw")}
        for name, got in results.items():
            print(f"{name}: sha256 {got} {'matches' if got == want else 'DIFFERS FROM'} the model")
        sizes = {p: os.path.getsize(p) for p in layers + [f"{work}/flat.layer"]}
        for p, n in sizes.items():
            print(f"{os.path.basename(p)}: {n} bytes")
        return 0 if all(g == want for g in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
