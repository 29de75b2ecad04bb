"""A volume through its whole life, against a bytearray: writes, discards, zero writes, flushes, reopens, commits
(plain, ZFile'd, tar-wrapped), seals in place and merges. The stack device always reads as the model."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from contextlib import ExitStack

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from overlaybd import operations
from overlaybd.formats.detect import open_layer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.formats.lsmt.writable import WritableLayer
from overlaybd.formats.output import Compression
from overlaybd.source.base import ExtentKind
from overlaybd.testing.contract import BlockSourceContract

SIZE = 256 * 1024

offsets = st.one_of(st.integers(0, SIZE), st.sampled_from([0, 1, 511, 512, 4095, 4096, SIZE - 1, SIZE - 512, SIZE]))
lengths = st.one_of(st.integers(0, 4096), st.integers(0, 70000), st.sampled_from([0, 1, 512, 513, 4096, SIZE]))
compressions = st.sampled_from([None, ("lz4", 4096), ("zstd", 4096), ("lz4", 65536), ("zstd", 16384)])


def _scratch_root() -> str | None:
    """tmpfs where there is one: the volume fsyncs on every flush and commit, which a disk makes slow."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def clip(offset: int, length: int) -> tuple[int, int]:
    offset = min(offset, SIZE)
    return offset, min(length, SIZE - offset)


def _compression(spec: tuple[str, int] | None) -> Compression | None:
    return None if spec is None else Compression(spec[0], spec[1], threads=1)


class VolumeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="obd-volume-", dir=_scratch_root())
        self.model = bytearray(SIZE)
        self.lowers: list[str] = []
        self.counter = 0
        self.upper = self._new_upper()
        self.dev: LsmtStack = self._open()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        self.counter += 1
        return os.path.join(self.dir, f"{self.counter:03d}.{name}")

    def _new_upper(self) -> tuple[str, str]:
        data, index = self._path("data"), self._path("index")
        operations.create(data, index, SIZE)
        return data, index

    def _open(self) -> LsmtStack:
        return operations.open_stack(self.lowers, upper=self.upper, writable=True)

    def _reopen(self) -> None:
        self.dev.close()
        self.dev = self._open()

    def _upper_layer(self) -> WritableLayer:
        upper = self.dev.upper
        assert isinstance(upper, WritableLayer)
        return upper

    # -- rules -------------------------------------------------------------------------------------------------
    @rule(offset=offsets, length=lengths, seed=st.integers(0, 2**32 - 1), fill=st.booleans())
    def write(self, offset: int, length: int, seed: int, fill: bool) -> None:
        offset, length = clip(offset, length)
        rng = random.Random(seed)
        data = bytes([rng.randrange(1, 256)]) * length if fill else rng.randbytes(length)
        self.dev.pwrite(offset, data)
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=lengths)
    def trim(self, offset: int, length: int) -> None:
        offset, length = clip(offset, length)
        self.dev.trim(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule(offset=offsets, length=lengths)
    def write_zeroes(self, offset: int, length: int) -> None:
        offset, length = clip(offset, length)
        self.dev.write_zeroes(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        self.dev.flush()

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        offset, length = clip(offset, length)
        got = self.dev.pread(offset, length)
        assert got == bytes(self.model[offset : offset + length]), f"pread({offset}, {length}) differs"

    @rule()
    def reopen(self) -> None:
        self.dev.flush()
        self._reopen()

    @rule(compression=compressions, tar=st.booleans())
    def commit(self, compression: tuple[str, int] | None, tar: bool) -> None:
        """Commit the upper into a sealed layer, push it, start an empty upper."""
        self.dev.flush()
        out = self._path("lsmt")
        operations.commit(self._upper_layer(), out, compression=_compression(compression), tar=tar)
        self.dev.close()
        self.lowers.append(out)
        self.upper = self._new_upper()
        self.dev = self._open()

    @rule()
    def seal(self) -> None:
        """Seal the upper in place (``overlaybd-commit --seal``) and push the data file as a lower."""
        self.dev.flush()
        self.dev.close()
        data, index = self.upper
        operations.seal(data, index)
        self.lowers.append(data)
        self.upper = self._new_upper()
        self.dev = self._open()

    @precondition(lambda self: len(self.lowers) >= 1)
    @rule(compression=compressions)
    def merge(self, compression: tuple[str, int] | None) -> None:
        """Flatten every lower into one layer and stack on that instead."""
        out = self._path("merged")
        with ExitStack() as owned:
            layers = [open_layer(p, owned=owned) for p in self.lowers]
            operations.merge(layers, out, compression=_compression(compression))
        self.dev.flush()
        self.dev.close()
        self.lowers = [out]
        self.dev = self._open()

    @rule()
    def extents(self) -> None:
        """The extents tile the device; ZERO/HOLE read as zeros; sub-ranges are clipped full extents."""
        BlockSourceContract(label="volume", random_reads=8).run_on(self.dev, bytes(self.model),
                                                                   ["extents", "sub_extents"])
        layers = {e.layer for e in self.dev.extents() if e.kind is not ExtentKind.HOLE}
        assert layers <= set(range(len(self.lowers) + 1)), layers

    # -- invariants --------------------------------------------------------------------------------------------
    @invariant()
    def device_equals_model(self) -> None:
        assert self.dev.size == SIZE
        got = self.dev.pread(0, SIZE)
        if got != self.model:
            first = next(i for i in range(SIZE) if got[i] != self.model[i])
            raise AssertionError(f"device differs from the model from byte {first} (lowers={len(self.lowers)})")

    def teardown(self) -> None:
        try:
            self.dev.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestVolume = VolumeMachine.TestCase
TestVolume.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
