"""What the command line loads to start: ``--version``, ``info`` of a sealed layer, ``log`` of a volume, and
``export`` and ``cat`` of a small stack of plain layers import none of numpy, requests, the codecs or
importlib.metadata (read from ``python -X importtime``: a structural check, no timings). The numpy-free readers
they use say what the full readers say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlaybd import volume_config
from overlaybd.cli.main import COMMANDS, MODULES, build_parser, modules_for
from overlaybd.formats.lsmt import glance
from overlaybd.formats.lsmt.spec import HEADER_SIZE, INVALID_OFFSET
from overlaybd.formats.output import Compression
from overlaybd.formats.zfile import blocks
from overlaybd.inspection import describe_layer
from overlaybd.volume import Volume

MiB = 1 << 20
HEAVY = ("numpy", "requests", "urllib3", "crc32c", "lz4", "zstandard", "importlib.metadata", "overlaybd.volume",
         "overlaybd.formats.lsmt.spec", "overlaybd.remote")


def imported(*argv: str) -> tuple[set[str], str]:
    """The modules ``python -m overlaybd ARGV`` imports, and what it printed."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "overlaybd", *argv], capture_output=True,
                         text=True, check=True)
    names = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    return names - {"package"}, run.stdout


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    vol = Volume.create(str(tmp_path_factory.mktemp("startup") / "vol"), 64 * MiB)
    for n in range(3):
        with vol.open(writable=True) as dev:
            dev.pwrite(n * MiB, os.urandom(64 << 10))
            dev.write_zeroes(32 * MiB + n * MiB, 8192)
        vol.snapshot(f"s{n}")
    return vol


def test_version_loads_nothing_heavy() -> None:
    names, out = imported("--version")
    assert out.startswith("overlaybd ") and "ZFile blocks:" in out and "serve event loop:" in out
    assert "overlaybd.cli.main" in names and not heavy(names)
    assert not names & {"asyncio", "uvloop", "typing"}  # it names serve's event loop without loading one
    assert {n for n in names if n.startswith("overlaybd.cli.")} <= {"overlaybd.cli.main", "overlaybd.cli.common"}


def test_info_of_a_sealed_layer_loads_nothing_heavy(volume: Volume) -> None:
    names, out = imported("info", volume.lowers[1], "--output", "json")
    assert not heavy(names)
    assert json.loads(out) == describe_layer(volume.lowers[1])


def test_log_loads_nothing_heavy(volume: Volume) -> None:
    names, out = imported("log", volume.path, "--output", "json")
    assert not heavy(names)
    listed = json.loads(out)
    assert [s["uuid"] for s in listed] == [s.uuid for s in reversed(volume.snapshots())]
    assert [s["message"] for s in listed] == ["s2", "s1", "s0"]


def test_export_and_cat_of_a_small_stack_load_nothing_heavy(volume: Volume, tmp_path: Path) -> None:
    for argv in (["export", volume.path, str(tmp_path / "a.raw")],
                 ["export", f"{volume.path}@1", str(tmp_path / "b.raw")],
                 ["cat", *volume.lowers, "-o", str(tmp_path / "c.raw"), "--output", "json"]):
        names, _out = imported(*argv)
        assert not heavy(names), argv
    with volume.open(snapshot=1) as dev:
        want = dev.pread(0, dev.size)
    assert (tmp_path / "b.raw").read_bytes() == want


def test_every_command_is_in_the_table_under_the_module_that_registers_it() -> None:
    def commands(parser: object) -> set[str]:
        sub = next(a for a in parser._actions if a.dest == "command")  # type: ignore[attr-defined]
        return set(sub.choices)

    assert commands(build_parser()) == set(COMMANDS)
    for module in MODULES:
        assert commands(build_parser([module])) == {c for c, m in COMMANDS.items() if m == module}
    assert modules_for(["-v", "info", "x"]) == ("info",) and modules_for(["--version"]) == ()
    assert modules_for(["bogus"]) == MODULES and modules_for(["-h"]) == MODULES and modules_for([]) == MODULES


def test_the_header_readers_say_what_the_layer_readers_say(volume: Volume, tmp_path: Path) -> None:
    for path in volume.lowers:
        assert glance.describe_small(path) == describe_layer(path)
    quick = volume_config.snapshots(volume.path)
    assert quick is not None
    # a compressed snapshot is opened by the layer reader; the listing is the same either way
    vol = Volume.create(str(tmp_path / "z"), 64 * MiB, volume.lowers)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, os.urandom(8192))
    vol.snapshot("zfile", Compression("lz4", 4096))
    assert volume_config.snapshots(vol.path) is None
    assert glance.describe_small(vol.lowers[-1]) is None
    full = vol.snapshots()
    assert [s.uuid for s in full[:3]] == [s.uuid for s in quick] and full[-1].message == "zfile"


def test_a_layer_the_header_reader_does_not_vouch_for_goes_to_the_full_reader(volume: Volume, tmp_path: Path) -> None:
    data = bytearray(Path(volume.lowers[0]).read_bytes())
    ends = glance.read_ends(volume.lowers[0])
    assert ends is not None and ends.trailer.index_size >= 2
    at = ends.trailer.index_offset
    first = bytes(data[at : at + 16])
    data[at : at + 16] = data[at + 16 : at + 32]  # two records in the wrong order: a corrupt index
    data[at + 16 : at + 32] = first
    bad = tmp_path / "bad.lsmt"
    bad.write_bytes(bytes(data))
    assert glance.read_ends(str(bad)) is not None and glance.describe_small(str(bad)) is None
    run = subprocess.run([sys.executable, "-m", "overlaybd", "info", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1 and "overlaps or precedes" in run.stderr
    padding = glance.index_totals(volume.lowers[0], ends)
    assert padding is not None and padding.records < ends.trailer.index_size  # padding records are dropped
    cut = tmp_path / "cut.lsmt"
    cut.write_bytes(bytes(data[:-HEADER_SIZE]))
    assert glance.read_ends(str(cut)) is None
    assert INVALID_OFFSET == (1 << 50) - 1


def test_zfile_compress_and_decompress_load_no_numpy_and_no_lsmt_reader(tmp_path: Path) -> None:
    """``zfile compress`` and ``decompress`` need the codecs, not numpy or the LSMT readers (jump tables are kept
    in ``array``s and summed in C, or with ``itertools``); decompress gives back the original, tar envelope or
    not."""
    heavy_for_zfile = ("numpy", "requests", "overlaybd.volume", "overlaybd.formats.lsmt.spec",
                       "overlaybd.formats.lsmt.layer", "overlaybd.operations")
    data = os.urandom(300_000) + bytes(200_000) + b"log line\n" * 30_000
    src = tmp_path / "plain"
    src.write_bytes(data)
    for tar in (False, True):
        z = tmp_path / f"z{int(tar)}"
        out = tmp_path / f"out{int(tar)}"
        names, _out = imported("zfile", "compress", "--algorithm", "zstd", "--bs", "16", *(["-t"] if tar else []),
                               str(src), str(z), "--output", "json")
        assert not [n for n in names if n in heavy_for_zfile], ("compress", tar)
        names, _out = imported("zfile", "decompress", str(z), str(out), "--output", "json")
        assert not [n for n in names if n in heavy_for_zfile], ("decompress", tar)
        assert out.read_bytes() == data


@pytest.mark.skipif(blocks.NATIVE is None, reason="the C block path is not built")
def test_zfile_commands_on_the_c_path_load_no_codec_module_typing_logging_or_ctypes(tmp_path: Path) -> None:
    """On the C block path, ``zfile compress`` and ``decompress`` load neither the Python codecs (lz4, zstandard)
    nor typing, logging, concurrent.futures, dataclasses (and inspect) or ctypes (its
    syscalls are in the extension); with OVERLAYBD_NATIVE=0 the same commands still round-trip, through the Python
    path and ctypes."""
    unwanted = ("lz4", "zstandard", "typing", "logging", "concurrent.futures", "dataclasses", "inspect", "ctypes")
    data = os.urandom(100_000) + b"log line\n" * 30_000
    src = tmp_path / "plain"
    src.write_bytes(data)
    z, out = tmp_path / "z", tmp_path / "out"
    names, _out = imported("zfile", "compress", "--algorithm", "zstd", "--bs", "16", str(src), str(z), "--output",
                           "json")
    assert not heavy_names(names, unwanted), "compress"
    names, _out = imported("zfile", "decompress", str(z), str(out), "--output", "json")
    assert not heavy_names(names, unwanted), "decompress"
    assert out.read_bytes() == data
    env = {**os.environ, "OVERLAYBD_NATIVE": "0"}
    for argv in (["compress", "--algorithm", "zstd", "--bs", "16", "-f", str(src), str(z)],
                 ["decompress", "-f", str(z), str(out)]):
        subprocess.run([sys.executable, "-m", "overlaybd", "zfile", *argv], check=True, env=env, capture_output=True)
    assert out.read_bytes() == data


def heavy_names(names: set[str], unwanted: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in unwanted))


@pytest.mark.parametrize("argv", [["--version"], ["log"]])
def test_a_reader_that_stops_reading_ends_the_command_quietly(volume: Volume, argv: list[str]) -> None:
    """Output into a pipe nobody reads (``overlaybd --version | head -0``): exit 141 as after SIGPIPE, and not a
    line of traceback on stderr."""
    args = [*argv, volume.path] if argv == ["log"] else argv
    r, w = os.pipe()
    os.close(r)  # every write gets EPIPE
    try:
        run = subprocess.run([sys.executable, "-m", "overlaybd", *args], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=60)
    finally:
        os.close(w)
    assert run.returncode == 141, run.stderr
    assert run.stderr == ""
