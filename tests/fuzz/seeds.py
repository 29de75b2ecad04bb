"""The files the fuzzer mutates: reference fixtures and published images, read from ../shared/fixtures (never
copied into the project)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

HELLO_WORLD_BLOB = "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"


@dataclass(frozen=True)
class Seed:
    """``files`` in the order the commands take them; ``shape`` says how: ``layer`` (one file), ``pair`` (a
    writable data file and its index), ``stack`` (layers bottom to top) or ``stack+upper`` (layers, then a
    writable data file and its index on top)."""

    name: str
    files: tuple[tuple[str, bytes], ...]
    shape: str
    weight: float

    def file(self, name: str) -> bytes:
        return dict(self.files)[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.files)


LAYERS = {  # reference file -> weight (how often it is picked)
    "a/committed.lsmt": 1.0, "a/sealed.lsmt": 1.0, "a/sparse_committed.lsmt": 0.5, "b/layer2.lsmt": 1.0,
    "c/layer1.lz4.bs4k.zfile": 1.0, "c/layer1.lz4.bs4k.nocrc.zfile": 1.5, "c/layer1.lz4.bs64k.zfile": 1.0,
    "c/layer1.zstd.bs4k.zfile": 1.0, "c/layer1.zstd.bs64k.zfile": 1.0, "c/layer1.zstd.bs64k.nocrc.zfile": 1.5,
    "c/layer1.lz4.bs4k.zfile.tar": 1.5, "c/raw_odd.lz4.bs4k.zfile": 1.0, "d/merged.zfile": 0.5,
}


def load_seeds(fixtures: Path, *, heavy: bool) -> dict[str, Seed]:
    """Every seed whose files exist. ``heavy`` adds the 4.7 MB ext4 base layer (132,309 blocks)."""
    ref = fixtures / "reference"
    real = fixtures / "real"
    seeds: dict[str, Seed] = {}
    for rel, weight in LAYERS.items():
        if (ref / rel).exists():
            seeds[rel] = Seed(rel, ((Path(rel).name, (ref / rel).read_bytes()),), "layer", weight)
    if (ref / "a/rw.data").exists():
        seeds["a/rw"] = Seed("a/rw", (("rw.data", (ref / "a/rw.data").read_bytes()),
                                      ("rw.index", (ref / "a/rw.index").read_bytes())), "pair", 1.0)
    if all((ref / f"b/layer{k}.lsmt").exists() for k in (1, 2, 3)):
        seeds["b/stack"] = Seed("b/stack", tuple((f"layer{k}.lsmt", (ref / f"b/layer{k}.lsmt").read_bytes())
                                                 for k in (1, 2, 3)), "stack", 1.0)
    tar = ref / "c/layer1.lz4.bs4k.zfile.tar"
    if "b/stack" in seeds and "a/rw" in seeds and tar.exists():
        # the same stack with its bottom layer tar-wrapped and ZFile'd, and a writable layer on top
        lowers = (("layer1.zfile.tar", tar.read_bytes()), *seeds["b/stack"].files[1:])
        seeds["mixed/stack+upper"] = Seed("mixed/stack+upper", (*lowers, *seeds["a/rw"].files), "stack+upper", 1.5)
    if (real / HELLO_WORLD_BLOB).exists():
        seeds["real/hello-world"] = Seed("real/hello-world", (("hello-world.tar", (real / HELLO_WORLD_BLOB)
                                                                                   .read_bytes()),), "layer", 0.5)
    if heavy and (real / "ext4_64.tar.gz").exists():
        with tarfile.open(fileobj=io.BytesIO((real / "ext4_64.tar.gz").read_bytes()), mode="r:gz") as tf:
            member = tf.extractfile("ext4_64")
            assert member is not None
            seeds["real/ext4_64"] = Seed("real/ext4_64", (("ext4_64", member.read()),), "layer", 0.2)
    return seeds
