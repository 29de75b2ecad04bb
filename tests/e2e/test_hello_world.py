"""The real OverlayBD image that the reference tools converted (hello-world, tag amd64-converted): pulled from its
OCI layout, pushed to a registry by us, pulled back lazily, attached and mounted; its /hello equals the /hello of
the original gzip layer in the same layout."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from overlaybd.remote.reference import parse_reference
from overlaybd.remote.transfer import pull, push

from .nbd_helpers import OVERLAYBD, require, run
from .registry import registry

pytestmark = pytest.mark.slow
CONVERTED_LAYER = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"


def original_hello(layout: Path) -> bytes:
    index = json.loads((layout / "index.json").read_text())
    amd64 = [m for m in index["manifests"] if (m.get("annotations") or {}).get(
        "org.opencontainers.image.ref.name") == "amd64"][0]
    mf = json.loads((layout / "blobs/sha256" / amd64["digest"].split(":")[1]).read_bytes())
    layer = layout / "blobs/sha256" / mf["layers"][0]["digest"].split(":")[1]
    with tarfile.open(layer, "r:gz") as tar:
        member = tar.extractfile("hello")
        assert member is not None
        return member.read()


def test_converted_image_round_trips_through_a_registry_and_mounts(tmp_path: Path, real_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    layout = real_dir / "hello-world-oci"
    local = pull(parse_reference(f"oci:{layout}:amd64-converted"), str(tmp_path / "local")).volume
    assert local.config["lowers"][0]["digest"] == CONVERTED_LAYER
    with registry(tmp_path / "reg") as host:
        report = push(local, parse_reference(f"{host}/library/hello-world:converted"))
        assert report.layers[0]["digest"] == CONVERTED_LAYER  # byte for byte, same digest
        lazy = pull(parse_reference(f"{host}/library/hello-world:converted"), str(tmp_path / "lazy"), lazy=True).volume
        assert not os.path.exists(lazy.lowers[0])
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
            pytest.skip("mounting needs root and /dev/fuse; the pull and push above ran")
        require("losetup")
        device = run(*OVERLAYBD, "attach", f"{lazy.path}@HEAD").strip()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            run("mount", "-t", "ext4", "-o", "ro,noload", device, str(mnt))
            try:
                assert (mnt / "hello").read_bytes() == original_hello(layout)
            finally:
                run("umount", str(mnt))
        finally:
            run(*OVERLAYBD, "detach", device)
