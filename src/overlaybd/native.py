"""The optional C extensions (``_blocks``, ``_hits``, ``_lookup``, ``_appender``, ``_fusedev``, ``_nbdwrite``,
``_nbdread``): loading them, and
saying why one is not in use.

Each has Python code beside it that does the same; ``OVERLAYBD_NATIVE=0`` turns them all off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
from types import ModuleType

BLOCKS = "overlaybd.formats.zfile._blocks"
HITS = "overlaybd.cache._hits"
LOOKUP = "overlaybd.formats.lsmt._lookup"
APPENDER = "overlaybd.formats.lsmt._appender"
FUSEDEV = "overlaybd.export._fusedev"
NBDWRITE = "overlaybd.export.nbd._nbdwrite"
NBDREAD = "overlaybd.export.nbd._nbdread"


def switched_off() -> bool:
    return os.environ.get("OVERLAYBD_NATIVE", "1") == "0"


def load(name: str, *, even_if_switched_off: bool = False) -> ModuleType | None:
    """The extension module ``name``, or None where it was not built (or is switched off)."""
    if switched_off() and not even_if_switched_off:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def why_not() -> str:
    """Why an extension is not in use here."""
    return "OVERLAYBD_NATIVE=0" if switched_off() else "the C extension was not built"


@functools.cache
def blocks_module() -> ModuleType | None:
    """``_blocks`` (loaded even when switched off: the tests compare both paths), set to the newer libzstd."""
    module = load(BLOCKS, even_if_switched_off=True)
    if module is not None:
        _prefer_bundled_zstd(module)
    return module


def _prefer_bundled_zstd(module: ModuleType) -> None:
    """The zstandard wheel carries its own libzstd, usually newer and faster than the system's (1.5.7 against
    Debian 12's 1.5.4: 1.5x at compressing 64 KiB blocks). Its cffi backend exports the zstd functions, so the
    extension can call them; it keeps the newer of the two, and the linked one if anything is amiss."""
    try:
        path = _cffi_library()
        if path is not None:
            module.use_zstd(path)
    except (ImportError, OSError, RuntimeError):
        pass


def _cffi_library() -> str | None:
    """The file of ``zstandard._cffi``, found as the import system finds it, without importing zstandard."""
    spec = importlib.util.find_spec("zstandard")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_cffi" + suffix)
            if os.path.isfile(path):
                return path
    return None


# What ``overlaybd --version`` prints, from the extensions alone: the modules that use them (and numpy) stay
# unloaded.
def describe_blocks() -> str:
    """Which ZFile block path is in use, and its codec versions."""
    m = blocks_module()
    if m is not None and not switched_off():
        return f"native (liblz4 {m.LZ4_VERSION}, zstd {m.zstd_version()}, CRC32C {'SSE4.2' if m.HW_CRC else 'table'})"
    return f"python ({why_not()})"


def describe_hits() -> str:
    """How cache hits are read."""
    return "lock-free (C, generation-checked)" if load(HITS) is not None else f"locked (Python; {why_not()})"


def describe_lookups() -> str:
    """How merged indexes are searched."""
    return "C (interpolated search)" if load(LOOKUP) is not None else "numpy searchsorted"


def describe_writes() -> str:
    """How a writable layer appends, how attach serves its device and how serve takes plain writes and reads."""
    appends = "C, without the GIL" if load(APPENDER) is not None else f"Python ({why_not()})"
    attach = ("C for plain reads, one-record writes and fsyncs" if load(FUSEDEV) is not None and
              load(APPENDER) is not None else "C for plain reads" if load(FUSEDEV) is not None
              else f"Python ({why_not()})")
    serve = ("C, without the GIL" if load(NBDWRITE) is not None and load(APPENDER) is not None
             else f"Python ({why_not()})")
    reads = ("C, without the GIL" if load(NBDREAD) is not None and load(LOOKUP) is not None
             else f"Python ({why_not()})")
    return f"{appends}; attach: {attach}; serve writes: {serve}; serve reads of the merged index: {reads}"
