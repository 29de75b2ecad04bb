"""One mutant through the commands (``check``, ``info``, ``map``, ``cat``, and ``zfile decompress`` where the
file is a ZFile of other bytes) on each ZFile block path, and the invariants every outcome must keep:

1. no traceback: every error is an :class:`OverlaybdError` (the CLI turns it into one line and exit 1 or 2);
2. the error is one line, names the file (or, for an output the file system refuses, the output), and a format
   error gives the offset;
3. the C and the Python block paths give the same outcome (exit code, error type and offset, what is printed,
   the bytes written), the codec's own wording aside;
4. ``check`` saying ok means the layer (or ZFile) can be read: ``info`` and ``cat`` (or ``zfile decompress``)
   succeed;
5. a neutral mutant (see ``damage``) that is accepted reads exactly the bytes of the unmutated seed;
6. where the independent oracle (``tests/oracle.py``) can tell what opening and reading the mutant must do (a raw
   LSMT file, a writable pair, or an LSMT stream edited inside an intact ZFile), ``cat`` does that: it fails with
   the error kind predicted, or writes exactly the predicted device.

Commands run in-process as ``overlaybd.cli.main`` runs them (``build_parser`` then the command's ``run``), so the
exception itself is seen before it becomes a line on stderr.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import traceback
from collections.abc import Iterable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from overlaybd.cli.main import build_parser
from overlaybd.errors import FormatError, LayerIOError, OverlaybdError, UsageError
from overlaybd.formats.zfile import blocks

from ..oracle import Expectation, LsmtImage, NotDetected, Raises, Reads, expect_lsmt_file, expect_writable
from .damage import Applied, Step, apply
from .locate import unwrap
from .seeds import Seed

_CODEC_WORDS = re.compile(r"( does not decompress)[^\n\"]*")


@dataclass
class Outcome:
    command: str
    rc: int = 0
    error: str = ""  # the exception's type name
    offset: int | None = None
    message: str = ""  # normalized: the work folder and the codec's own wording taken out
    stdout: str = ""
    digest: str = ""  # of what cat / zfile decompress wrote
    crash: str = ""  # a traceback: any exception that is not an OverlaybdError
    exc: BaseException | None = field(default=None, repr=False, compare=False)

    def key(self) -> tuple[object, ...]:
        return (self.command, self.rc, self.error, self.offset, self.message, self.stdout, self.digest, self.crash)


CHUNK = 1 << 20


def content_digest(path: str) -> str:
    """The bytes of a (sparse) file as a reader sees them: its size and its non-zero MiB chunks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        chunks: set[int] = set()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            chunks.update(range(data // CHUNK, -(-hole // CHUNK)))
            pos = hole
        return _digest(size, ((k * CHUNK, os.pread(fd, CHUNK, k * CHUNK)) for k in sorted(chunks)))
    finally:
        os.close(fd)


def bytes_digest(data: bytes) -> str:
    """:func:`content_digest` of a file holding ``data``."""
    return _digest(len(data), ((at, data[at : at + CHUNK]) for at in range(0, len(data), CHUNK)))


def _digest(size: int, chunks: Iterable[tuple[int, bytes]]) -> str:
    h = hashlib.sha256(size.to_bytes(8, "little"))
    for at, chunk in chunks:
        if chunk.strip(b"\x00"):
            h.update(at.to_bytes(8, "little") + chunk)
    return h.hexdigest()


def run_command(argv: list[str], folder: str, output: str | None = None) -> Outcome:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = Outcome(argv[0] if argv[0] != "zfile" else "zfile " + argv[1])
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            result.rc = int(args.run(args) or 0)
    except OverlaybdError as exc:
        result.rc = 2 if isinstance(exc, UsageError) else 1
        result.error = type(exc).__name__
        result.offset = exc.offset
        result.message = _normalize(str(exc), folder)
        result.exc = exc
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        result.crash = "".join(traceback.format_exception(exc)[-8:])
        result.exc = exc
    result.stdout = _normalize(out.getvalue(), folder)
    if output is not None and result.rc == 0 and not result.crash and os.path.exists(output):
        result.digest = content_digest(output)
        os.unlink(output)
    return result


def _normalize(text: str, folder: str) -> str:
    return _CODEC_WORDS.sub(r"\1", text.replace(folder, "<dir>"))


@dataclass
class Examined:
    outcomes: dict[str, list[Outcome]]  # block path -> the commands' outcomes
    neutral: bool
    problems: list[str]


def block_paths() -> list[tuple[str, blocks.BlockRuns]]:
    paths: list[tuple[str, blocks.BlockRuns]] = [("python", blocks.PYTHON)]
    if blocks.NATIVE is not None:
        paths.insert(0, ("native", blocks.NATIVE))
    return paths


def write_files(applied: Applied, folder: Path) -> list[str]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = []
    for name, data in applied.files.items():
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    return paths


def commands(shape: str, paths: list[str], out: str) -> list[tuple[list[str], str | None]]:
    if shape == "pair":
        data, index = paths
        return [(["check", data, "--index", index, "--output", "json"], None),
                (["info", data, "--index", index, "--output", "json"], None),
                (["cat", "--upper", data, index, "-o", out, "-f", "--output", "json"], out)]
    if shape == "stack+upper":
        *lowers, data, index = paths
        upper = ["--upper", data, index]
        return [(["check", *lowers, data, "--index", index, "--output", "json"], None),
                (["info", *lowers, "--output", "json"], None), (["map", *lowers, *upper, "--output", "json"], None),
                (["cat", *lowers, *upper, "-o", out, "-f", "--output", "json"], out)]
    return [(["check", *paths, "--output", "json"], None), (["info", *paths, "--output", "json"], None),
            (["map", *paths, "--output", "json"], None), (["cat", *paths, "-o", out, "-f", "--output", "json"], out)]


def examine(seed: Seed, steps: list[Step], folder: Path, baseline: dict[str, str] | None = None) -> Examined:
    """Run the mutant of ``seed`` made by ``steps``; ``baseline``: the digests the unmutated seed's outputs have."""
    applied = apply(seed, steps)
    paths = write_files(applied, folder / "in")
    out = str(folder / "out.raw")
    outcomes: dict[str, list[Outcome]] = {}
    active = blocks.ACTIVE
    try:
        for label, runs in block_paths():
            blocks.ACTIVE = runs
            results = [run_command(argv, str(folder), output) for argv, output in commands(seed.shape, paths, out)]
            check = results[0]
            if check.rc == 0 and not check.crash and seed.shape == "layer" and _plain_zfile(check):
                # a ZFile of something other than a layer: what can be read of it is its decompressed bytes
                results.append(run_command(["zfile", "decompress", paths[0], out, "-f"], str(folder), out))
            outcomes[label] = results
    finally:
        blocks.ACTIVE = active
    problems = judge(outcomes, applied.neutral, paths, out, baseline)
    prediction = predict(seed, steps, applied)
    if prediction is not None:
        for label, results in outcomes.items():
            problems += [f"{label}: oracle: {p}" for p in _oracle_rules(prediction, results, out)]
    return Examined(outcomes, applied.neutral, problems)


LSMT_STEPS = {"lsmt_field", "lsmt_record", "lsmt_records"}
RENDER_LIMIT = 256 << 20  # predicted devices up to this size are rendered and compared byte for byte


def predict(seed: Seed, steps: list[Step], applied: Applied) -> Expectation | None:
    """What the oracle says opening the mutant and reading its device must do, where it can tell."""
    if seed.shape == "pair":
        data, index = (applied.files[n] for n in seed.names)
        return expect_writable(data, index)
    if seed.shape != "layer":
        return None
    name = seed.names[0]
    original = unwrap(seed.file(name))
    if original is not None and original.env is None and original.zlay is None:
        return expect_lsmt_file(applied.files[name])  # a raw LSMT file: the oracle reads any damage to it
    if steps and all(op in LSMT_STEPS for op, _, _ in steps):
        mutant = unwrap(applied.files[name])  # the ZFile around the edited stream was rebuilt intact
        return None if mutant is None else expect_lsmt_file(mutant.stream)
    return None


def _oracle_rules(exp: Expectation, results: list[Outcome], out: str) -> list[str]:
    cat = next(r for r in results if r.command == "cat")
    if cat.crash or (isinstance(cat.exc, LayerIOError) and cat.exc.path == out):
        return []  # reported already / the output's file system refused the size
    if isinstance(exp, NotDetected):
        return []
    if cat.rc != 0:
        if isinstance(exp, Reads) and exp.dropped and cat.error == "CorruptIndexError":
            return []  # records after a torn one still inside the file: refusing is right too
        if isinstance(exp, Reads):
            return [f"cat fails ({cat.error}: {cat.message}) where the oracle reads the device ({exp.why})"]
        if not isinstance(cat.exc, exp.types):
            return [f"cat fails with {cat.error} where the oracle expects "
                    f"{'/'.join(t.__name__ for t in exp.types)} ({exp.why}): {cat.message}"]
        return []
    if isinstance(exp, Raises):
        return [f"cat reads a device where the oracle expects {'/'.join(t.__name__ for t in exp.types)} ({exp.why})"]
    image = exp.image
    if isinstance(image, LsmtImage) and image.size <= RENDER_LIMIT and cat.digest != bytes_digest(image.render()):
        return [f"cat writes other bytes than the oracle's device ({exp.why})"]
    return []


def judge(outcomes: dict[str, list[Outcome]], neutral: bool, paths: list[str], out: str,
          baseline: dict[str, str] | None) -> list[str]:
    problems: list[str] = []
    for label, results in outcomes.items():
        for r in results:
            where = f"{label}: {r.command}"
            if r.crash:
                problems.append(f"{where}: traceback\n{r.crash}")
                continue
            if r.exc is not None:
                problems += [f"{where}: {p}" for p in _error_rules(r.exc, paths, out)]
        problems += [f"{label}: {p}" for p in _check_means_readable(results, out)]
        if neutral and baseline is not None:
            for r in results:
                want = baseline.get(r.command)
                if r.digest and want and r.digest != want:
                    problems.append(f"{label}: {r.command}: a neutral mutant read other bytes than the seed holds")
    labels = list(outcomes)
    for a, b in zip(labels, labels[1:], strict=False):
        for ra, rb in zip(outcomes[a], outcomes[b], strict=False):
            if ra.key() != rb.key():
                problems.append(f"{a} and {b} disagree on {ra.command}: {_brief(ra)} | {_brief(rb)}")
        if len(outcomes[a]) != len(outcomes[b]):
            problems.append(f"{a} and {b} ran different commands (check disagreed)")
    return problems


def _error_rules(exc: BaseException, paths: list[str], out: str) -> list[str]:
    text = str(exc)
    problems = []
    if "\n" in text:
        problems.append(f"message of {len(text.splitlines())} lines: {text!r}")
    if not any(p in text for p in [*paths, out]):
        problems.append(f"{type(exc).__name__} does not name the file: {text}")
    if isinstance(exc, FormatError) and getattr(exc, "offset", None) is None:
        problems.append(f"{type(exc).__name__} gives no offset: {text}")
    return problems


def _check_means_readable(results: list[Outcome], out: str) -> list[str]:
    check = results[0]
    if check.rc != 0 or check.crash:
        return []
    problems = []
    for r in results[1:]:
        if r.rc == 0 and not r.crash:
            continue
        if isinstance(r.exc, LayerIOError) and r.exc.path == out:
            continue  # the output's file system refused its size: not a verdict on the input
        if r.command in ("cat", "map") and _plain_zfile(check):
            continue  # a ZFile of other bytes: zfile decompress is what must work
        problems.append(f"check says ok but {r.command} fails: {r.error or 'traceback'} {r.message}")
    return problems


def _plain_zfile(check: Outcome) -> bool:
    """``check`` found a ZFile (perhaps in a tar envelope) of bytes that are no layer."""
    reports = json.loads(check.stdout)
    formats = [r.get("format", "") for r in (reports if isinstance(reports, list) else [reports])]
    return all(f.split("+")[-1] == "zfile" for f in formats)


def _brief(r: Outcome) -> str:
    if r.crash:
        return "traceback"
    if r.error:
        return f"exit {r.rc} {r.error} at {r.offset}: {r.message[:300]}"
    return f"exit {r.rc} {r.stdout[:300]!r} {r.digest[:12]}"
