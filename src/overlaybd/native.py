"""The optional C extensions (``_blocks``, ``_hits``, ``_lookup``): loading them, and saying why one is not in use.

Each has Python code beside it that does the same; ``OVERLAYBD_NATIVE=0`` turns them all off.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


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
