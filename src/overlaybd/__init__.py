"""pyoverlaybd: OverlayBD block images (LSMT layers, ZFile, stacks), byte-compatible with the reference.

The public API::

    from overlaybd import open_stack, open_layer, create, commit, merge, compress, Compression
"""

from __future__ import annotations

__version__ = "0.1.0"

from contextlib import ExitStack  # noqa: E402

from .errors import OverlaybdError  # noqa: E402
from .formats.detect import open_layer as _open  # noqa: E402
from .formats.lsmt.layer import LsmtLayer  # noqa: E402
from .formats.lsmt.writable import WritableBase  # noqa: E402
from .formats.output import Compression  # noqa: E402
from .operations import commit, compress, create, decompress, merge, open_stack, seal, verify_zfile  # noqa: E402
from .source.base import BlockSource, Capability, Extent, ExtentKind  # noqa: E402


def open_layer(path: str, index: str | None = None, *, writable: bool = False) -> LsmtLayer | WritableBase:
    """Open one layer file (any form) on its own; close it when done."""
    owned = ExitStack()
    try:
        layer = _open(path, index, owned=owned, writable=writable)
    except BaseException:
        owned.close()
        raise
    layer.adopt(owned)
    return layer


__all__ = ["BlockSource", "Capability", "Compression", "Extent", "ExtentKind", "OverlaybdError", "commit",
           "compress", "create", "decompress", "merge", "open_layer", "open_stack", "seal", "verify_zfile"]
