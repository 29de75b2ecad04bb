"""Redistribution: a machine that holds v1 fetches only what v2 adds (fast-forward pull), layers are shared between
volumes through the layer store (pulling them again fetches nothing), history that diverged is refused as git
refuses a non-fast-forward, and gc removes only the blobs no volume uses. Bytes are counted at a proxy of the
tests' own in front of docker-registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlaybd.remote.lazy import RemoteLayers
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD
from .registry import FaultProxy, registry

pytestmark = pytest.mark.slow
MiB = 1 << 20


def cli(*args: object, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OVERLAYBD, *map(str, args)], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    if ok:
        assert res.returncode == 0, f"overlaybd {' '.join(map(str, args))}: {res.stderr}"
    return res


def pull_json(*args: object) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cli("pull", *args, "--output", "json").stdout)
    return out


def device(path: Path) -> bytes:
    with Volume(str(path), opener=RemoteLayers()).open() as dev:
        return dev.pread(0, dev.size)


def write(path: Path, offset: int, data: bytes) -> None:
    with Volume(str(path)).open(writable=True) as dev:
        dev.pwrite(offset, data)
        dev.flush()


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OVERLAYBD_LAYER_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


class Origin:
    """A volume with three snapshots pushed as v1, v2, v3 (each adding one), read back through a byte-counting
    proxy. It stands for another machine: its layer store is its own."""

    def __init__(self, tmp: Path, host: str, proxy: FaultProxy) -> None:
        self.vol = tmp / "origin"
        self.store = tmp / "origin-store"
        self.proxy = proxy
        self.ref = f"{proxy.address}/team/vol"
        self.layer_sizes: list[int] = []
        self.contents: list[bytes] = []
        cli("create", self.vol, "--size", "48M")
        for n in range(3):
            write(self.vol, n * 8 * MiB, os.urandom((4 if n == 0 else 1) * MiB))  # a 4 MiB base, 1 MiB updates
            cli("snapshot", self.vol, "-m", f"v{n + 1}")
            pushed = json.loads(cli("push", self.vol, f"{host}/team/vol:v{n + 1}", "--output", "json",
                                    "--store", self.store).stdout)
            self.layer_sizes.append(pushed["layers"][-1]["size"])
            self.contents.append(device(self.vol))

    def served(self) -> int:
        return self.proxy.bytes_sent


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with registry(tmp_path / "reg") as host:
        proxy = FaultProxy(host)
        try:
            yield Origin(tmp_path, host, proxy)
        finally:
            proxy.close()


def test_fast_forward_fetches_only_the_new_snapshots(origin: Origin, tmp_path: Path) -> None:
    node = tmp_path / "node"
    before = origin.served()
    first = pull_json(f"{origin.ref}:v1", node)
    assert [layer["action"] for layer in first["layers"]] == ["fetched"]
    v1_bytes = origin.served() - before
    assert origin.layer_sizes[0] <= v1_bytes < origin.layer_sizes[0] + 64 * 1024
    identity = json.loads((node / "config.json").read_text())["lowers"][0]

    before = origin.served()
    update = pull_json(f"{origin.ref}:v2", node)  # the machine holds v1: only v2's snapshot comes
    got = origin.served() - before
    assert [layer["action"] for layer in update["layers"]] == ["fetched"]
    assert origin.layer_sizes[1] <= got <= 1.05 * origin.layer_sizes[1] + 16 * 1024, (got, origin.layer_sizes)
    assert device(node) == origin.contents[1]
    assert json.loads((node / "config.json").read_text())["lowers"][0] == {
        **identity, "repositories": [f"{origin.ref}:v1", f"{origin.ref}:v2"]}  # the same volume, one more snapshot

    before = origin.served()
    again = pull_json(f"{origin.ref}:v2", node)
    assert again["up_to_date"] is True and origin.layer_sizes[1] > origin.served() - before
    log = json.loads(cli("log", node, "--output", "json").stdout)
    assert [e["message"] for e in log] == ["v2", "v1"]
    assert log[0]["repositories"] == [f"{origin.ref}:v2"] and log[0]["digest"].startswith("sha256:")


def test_a_second_volume_takes_its_layers_from_the_store(origin: Origin, tmp_path: Path) -> None:
    pull_json(f"{origin.ref}:v2", tmp_path / "a")
    before = origin.served()
    second = pull_json(f"{origin.ref}:v3", tmp_path / "b")  # v1 and v2 are on this machine already
    assert [layer["action"] for layer in second["layers"]] == ["linked", "linked", "fetched"]
    got = origin.served() - before
    assert origin.layer_sizes[2] <= got <= 1.05 * origin.layer_sizes[2] + 16 * 1024
    assert device(tmp_path / "b") == origin.contents[2]
    # one blob on disk, whatever the number of volumes holding it
    a0 = os.stat(Volume(str(tmp_path / "a")).lowers[0])
    b0 = os.stat(Volume(str(tmp_path / "b")).lowers[0])
    assert (a0.st_dev, a0.st_ino) == (b0.st_dev, b0.st_ino)
    # a lazy pull of the same image reads nothing remote for the layers the store holds
    lazy = pull_json(f"{origin.ref}:v3", tmp_path / "c", "--lazy")
    assert [layer["action"] for layer in lazy["layers"]] == ["linked", "linked", "linked"]
    # a copied volume is standalone: it keeps its bytes when the store and the original are gone
    shutil.copytree(tmp_path / "b", tmp_path / "b-copy", symlinks=True)
    shutil.rmtree(tmp_path / "b")
    assert device(tmp_path / "b-copy") == origin.contents[2]


def test_local_volumes_that_pushed_share_with_later_pulls(origin: Origin, tmp_path: Path) -> None:
    """The machine that pushed v1..v3 holds their blobs: pulling v3 there fetches no layer."""
    before = origin.served()
    pulled = pull_json(f"{origin.ref}:v3", tmp_path / "here", "--store", origin.store)
    assert [layer["action"] for layer in pulled["layers"]] == ["linked"] * 3
    assert origin.served() - before < 64 * 1024  # manifest and config only
    assert device(tmp_path / "here") == origin.contents[2]


def test_diverged_history_and_unsnapshotted_writes_are_refused(origin: Origin, tmp_path: Path) -> None:
    node = tmp_path / "node"
    pull_json(f"{origin.ref}:v1", node)
    write(node, 40 * MiB, b"\x5a" * 4096)
    res = cli("pull", f"{origin.ref}:v2", node, ok=False)
    assert res.returncode == 2 and "not in a snapshot" in res.stderr
    kept = pull_json(f"{origin.ref}:v2", node, "--upper", "keep")
    assert len(kept["layers"]) == 1
    now = device(node)
    assert now[40 * MiB : 40 * MiB + 4096] == b"\x5a" * 4096  # the writes stay on top
    assert now[: 40 * MiB] == origin.contents[1][: 40 * MiB]
    cli("snapshot", node, "-m", "local change")  # now the volume has a snapshot v3 does not
    res = cli("pull", f"{origin.ref}:v3", node, ok=False)
    assert res.returncode == 2 and "differs from" in res.stderr and "snapshot 2" in res.stderr
    assert "Traceback" not in res.stderr
    other = tmp_path / "other"
    pull_json(f"{origin.ref}:v1", other)
    write(other, 0, b"\x11" * 4096)
    pull_json(f"{origin.ref}:v3", other, "--upper", "discard")
    assert device(other) == origin.contents[2]


def test_fast_forward_from_an_oci_layout_and_push_of_one_snapshot(origin: Origin, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    cli("push", f"{origin.vol}@0", f"oci:{layout}:v1")
    cli("push", f"{origin.vol}@1", f"oci:{layout}:v2")
    node = tmp_path / "node"
    assert len(pull_json(f"oci:{layout}:v1", node)["layers"]) == 1
    assert len(pull_json(f"oci:{layout}:v2", node, "--lazy")["layers"]) == 1
    assert device(node) == origin.contents[1]
    log = json.loads(cli("log", origin.vol, "--output", "json").stdout)
    assert f"oci:{layout}:v1" in log[-1]["repositories"] and f"oci:{layout}:v2" in log[-2]["repositories"]
    assert not any(r.startswith("oci:") for r in log[0]["repositories"])  # v3 was not pushed there


def test_gc_removes_only_what_no_volume_uses(origin: Origin, tmp_path: Path) -> None:
    pull_json(f"{origin.ref}:v2", tmp_path / "a")
    pull_json(f"{origin.ref}:v3", tmp_path / "b")
    store = tmp_path / "store" / "sha256"
    assert len(os.listdir(store)) == 3
    with Volume(str(tmp_path / "a")).open() as dev:  # open while gc runs: nothing it uses goes
        assert json.loads(cli("gc", "--output", "json").stdout)["removed"] == []
        shutil.rmtree(tmp_path / "b")
        assert len(json.loads(cli("gc", "--dry-run", "--output", "json").stdout)["removed"]) == 1
        assert len(os.listdir(store)) == 3
        report = json.loads(cli("gc", "--output", "json").stdout)
        assert [r["size"] for r in report["removed"]] == [origin.layer_sizes[2]]  # v3's, which only b used
        assert dev.pread(0, dev.size) == origin.contents[1]
    shutil.rmtree(tmp_path / "a")
    cli("gc")
    assert os.listdir(store) == []
