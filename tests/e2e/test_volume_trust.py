"""A volume directory is self-contained, and a volume touches only files it made.

Copies (``cp -a``, ``rsync -a``, tar), moves and renames open as themselves and never open, lock or write a file of
another volume; old volumes (absolute paths in config.json) still open after a move; clean-up never removes a file
the volume did not record as its own; create, pull and clone refuse a non-empty target and a failed one leaves
nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from overlaybd.cli.main import main
from overlaybd.errors import OverlaybdError
from overlaybd.volume import Volume

from .nbd_helpers import require

MiB = 1 << 20


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, f"overlaybd {' '.join(map(str, argv))}: {err}"
    return out


def write(vol: Path, offset: int, data: bytes) -> None:
    with Volume(str(vol)).open(writable=True) as dev:
        dev.pwrite(offset, data)
        dev.flush()


def read(vol: Path, offset: int, length: int, snapshot: int | None = None) -> bytes:
    with Volume(str(vol)).open(snapshot=snapshot) as dev:
        return dev.pread(offset, length)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` -> (size, mtime_ns): what a write into it would change."""
    out = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def vol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A volume with two snapshots and unsnapshotted writes in its upper."""
    path = tmp_path / "vol"
    ok(capsys, "create", path, "--size", "16M")
    write(path, 0, b"\x11" * 4096)
    ok(capsys, "snapshot", path, "-m", "one")
    write(path, MiB, b"\x22" * 4096)
    ok(capsys, "snapshot", path, "-m", "two", "--compress", "lz4")
    write(path, 2 * MiB, b"\x33" * 4096)
    return path


def _copy(how: str, src: Path, dst: Path) -> None:
    if how == "cp":
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    elif how == "rsync":
        subprocess.run([require("rsync"), "-a", f"{src}/", str(dst)], check=True)
    else:
        archive = src.parent / "vol.tar"
        subprocess.run(["tar", "-C", str(src.parent), "-cf", str(archive), src.name], check=True)
        dst.mkdir()
        subprocess.run(["tar", "-C", str(dst), "--strip-components=1", "-xf", str(archive)], check=True)


@pytest.mark.parametrize("how", ["cp", "rsync", "tar"])
def test_a_copy_opens_as_itself_and_never_touches_the_original(vol: Path, tmp_path: Path, how: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    _copy(how, vol, copy)
    before = files_of(vol)
    write(copy, 3 * MiB, b"\x44" * 4096)
    ok(capsys, "snapshot", copy, "-m", "three")
    ok(capsys, "merge", copy, "0..1")
    write(copy, 4 * MiB, b"\x55" * 4096)
    assert files_of(vol) == before, "writing through the copy changed the original"
    assert read(copy, 0, 4096) == b"\x11" * 4096
    assert read(copy, 3 * MiB, 4096) == b"\x44" * 4096
    assert read(copy, 4 * MiB, 4096) == b"\x55" * 4096
    assert read(vol, 3 * MiB, 4096) == bytes(4096)
    assert read(vol, 2 * MiB, 4096) == b"\x33" * 4096
    # every file the copy names is inside the copy
    for snap in Volume(str(copy)).snapshots():
        assert Path(snap.file).resolve().is_relative_to(copy.resolve())
    assert all(Path(p).resolve().is_relative_to(copy.resolve()) for p in Volume(str(copy)).upper)


def test_a_copy_holds_its_own_lock(vol: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    _copy("cp", vol, copy)
    with Volume(str(vol)).open(writable=True), Volume(str(copy)).open(writable=True) as dev:
        dev.pwrite(0, b"x" * 512)  # the original being open writable does not lock out its copy


def test_a_moved_volume_opens(vol: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(vol), str(moved))
    assert read(moved, 0, 4096) == b"\x11" * 4096
    assert read(moved, 2 * MiB, 4096) == b"\x33" * 4096
    out = json.loads(ok(capsys, "log", moved, "--output", "json"))
    assert [e["message"] for e in out] == ["two", "one"]
    ok(capsys, "snapshot", moved, "-m", "three")
    assert read(moved, MiB, 4096, snapshot=1) == b"\x22" * 4096


def _make_old_style(vol: Path) -> None:
    """config.json as earlier versions wrote it: absolute paths everywhere, no format version."""
    cfg = json.loads((vol / "config.json").read_text())
    cfg["lowers"] = [{**e, "file": str(vol / e["file"])} for e in cfg["lowers"]]
    cfg["upper"] = {k: str(vol / v) for k, v in cfg["upper"].items()}
    meta = cfg["pyoverlaybd"]
    meta["created"] = {str(vol / k): v for k, v in meta.get("created", {}).items()}
    for key in list(meta):
        if key not in ("size", "created"):
            del meta[key]
    meta["version"] = 1
    (vol / "config.json").write_text(json.dumps(cfg, indent=2))


def test_an_old_volume_still_opens_and_moves(vol: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_old_style(vol)
    assert read(vol, MiB, 4096) == b"\x22" * 4096
    copy = tmp_path / "copy"
    _copy("cp", vol, copy)
    before = files_of(vol)
    write(copy, 5 * MiB, b"\x66" * 4096)
    ok(capsys, "snapshot", copy, "-m", "three")
    assert files_of(vol) == before
    assert read(copy, 5 * MiB, 4096) == b"\x66" * 4096
    assert read(copy, 0, 4096) == b"\x11" * 4096
    # the snapshot rewrote the copy's config with paths relative to the volume
    cfg = json.loads((copy / "config.json").read_text())
    assert not any(os.path.isabs(e["file"]) for e in cfg["lowers"])
    moved = tmp_path / "moved"
    shutil.move(str(vol), str(moved))
    assert read(moved, 2 * MiB, 4096) == b"\x33" * 4096
    assert [e["message"] for e in json.loads(ok(capsys, "log", moved, "--output", "json"))] == ["two", "one"]


def test_a_config_naming_files_outside_the_volume_is_refused(vol: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    _copy("cp", vol, other)
    cfg = json.loads((vol / "config.json").read_text())
    cfg["upper"] = {"data": str(other / cfg["upper"]["data"]), "index": str(other / cfg["upper"]["index"])}
    (vol / "config.json").write_text(json.dumps(cfg))
    before = files_of(other)
    with pytest.raises(OverlaybdError, match="outside the volume"):
        Volume(str(vol)).open(writable=True)
    cfg["upper"] = {"data": "../other/" + Path(cfg["upper"]["data"]).name, "index": "../x.index"}
    (vol / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli(capsys, "snapshot", vol)
    assert rc == 1 and "outside the volume" in err and "Traceback" not in err
    assert files_of(other) == before


def test_clean_up_removes_only_files_the_volume_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the repro of the issue: a file that merely looks like a layer file is not the volume's to remove
    folder = tmp_path / "p"
    folder.mkdir()
    rc, _, err = cli(capsys, "create", folder / "sub", "--size", "16M")
    assert rc == 0, err
    vol = folder / "sub"
    (vol / "experiment.data").write_bytes(b"x\n")
    (vol / "notes.index").write_bytes(b"y\n")
    (vol / "layers" / "mine.lsmt").write_bytes(b"z\n")
    (vol / "upper-0000beef.data").write_bytes(b"w\n")  # even with a name the volume would choose
    write(vol, 0, b"\x77" * 4096)
    ok(capsys, "snapshot", vol)
    write(vol, 0, b"\x78" * 4096)
    ok(capsys, "snapshot", vol, "--compress", "zstd")
    ok(capsys, "merge", vol)
    for name in ("experiment.data", "notes.index", "layers/mine.lsmt", "upper-0000beef.data"):
        assert (vol / name).exists(), f"{name} was removed"
    # what the volume itself dropped is gone: one upper pair, one merged layer
    assert len(list(vol.glob("upper-*.data"))) == 2  # its own, and the look-alike
    assert len([p for p in (vol / "layers").iterdir() if p.name != "mine.lsmt"]) == 1
    assert read(vol, 0, 4096) == b"\x78" * 4096


def test_files_orphaned_by_a_crash_are_removed(vol: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot that dies after writing its layer and before switching config.json leaves files it recorded as
    its own: the next change removes exactly those."""
    from overlaybd import volume as volume_module

    def crash(*_a: object, **_k: object) -> None:
        raise RuntimeError("crash before the switch")

    planted = vol / "layers" / "0002-keep-me.lsmt"
    planted.write_bytes(b"not ours")
    before = set(files_of(vol))
    monkeypatch.setattr(volume_module, "_switch_config", crash)
    with pytest.raises(RuntimeError):
        Volume(str(vol)).snapshot("lost")
    monkeypatch.undo()
    left = set(files_of(vol)) - before
    assert left, "the crashed snapshot should have left its new files"
    ok(capsys, "snapshot", vol, "-m", "three")
    now = set(files_of(vol))
    assert not (left & now), f"orphans not removed: {left & now}"
    assert planted.exists()
    assert read(vol, 2 * MiB, 4096) == b"\x33" * 4096


def test_create_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "experiment.data").write_bytes(b"x\n")
    rc, _, err = cli(capsys, "create", folder, "--size", "16M")
    assert rc == 2 and "not empty" in err
    assert sorted(os.listdir(folder)) == ["experiment.data"]
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(capsys, "create", empty, "--size", "16M")


def test_clone_refuses_a_non_empty_target_and_clones_are_independent(vol: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "clone"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, "clone", f"{vol}@0", target)
    assert rc == 2 and "not empty" in err
    assert os.listdir(target) == ["keep.txt"]
    target2 = tmp_path / "clone2"
    ok(capsys, "clone", f"{vol}@0", target2)
    before = files_of(vol)
    write(target2, 0, b"\x99" * 4096)
    ok(capsys, "snapshot", target2)
    ok(capsys, "merge", target2)
    assert files_of(vol) == before
    assert read(vol, 0, 4096, snapshot=0) == b"\x11" * 4096


def test_a_failed_create_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "not-a-layer"
    bogus.write_bytes(b"\0" * 100)
    target = tmp_path / "new"
    rc, _, err = cli(capsys, "create", target, "--from", bogus, bogus)
    assert rc != 0 and "Traceback" not in err
    assert not target.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, _ = cli(capsys, "create", empty, "--from", bogus, bogus)
    assert rc != 0
    assert empty.is_dir() and not os.listdir(empty)
