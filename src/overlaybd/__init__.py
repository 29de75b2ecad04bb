"""pyoverlaybd: OverlayBD block images (LSMT layers, ZFile, stacks), byte-compatible with the reference.

The public API::

    from overlaybd import open_stack, open_layer, create, commit, merge, compress, Compression

Importing the package loads nothing but this module: each public name (and numpy, which the formats need) is
loaded the first time it is used (PEP 562 ``__getattr__``), so the command line starts without what it does
not need. ``__version__`` is the one place the version is written (``pyproject.toml`` reads it from here).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Any

    from .errors import OverlaybdError
    from .formats.output import Compression
    from .operations import commit, compress, create, decompress, merge, open_stack, seal, verify_zfile
    from .operations import open_layer_alone as open_layer
    from .source.base import BlockSource, Capability, Extent, ExtentKind

# public name -> (the module relative to the package, the name there)
_PUBLIC = {
    "OverlaybdError": ("errors", "OverlaybdError"), "Compression": ("formats.output", "Compression"),
    "open_layer": ("operations", "open_layer_alone"),
    **{name: ("source.base", name) for name in ("BlockSource", "Capability", "Extent", "ExtentKind")},
    **{name: ("operations", name) for name in ("commit", "compress", "create", "decompress", "merge", "open_stack",
                                               "seal", "verify_zfile")},
}

__all__ = ["BlockSource", "Capability", "Compression", "Extent", "ExtentKind", "OverlaybdError", "commit",
           "compress", "create", "decompress", "merge", "open_layer", "open_stack", "seal", "verify_zfile"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'overlaybd' has no attribute {name!r}")
    where, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(f"{__name__}.{where}"), attr)
    globals()[name] = value  # loaded once: later reads do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
