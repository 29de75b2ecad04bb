"""The optional C extensions in tests: required where scripts/test.sh says so (OVERLAYBD_REQUIRE_NATIVE=1, as
root in CI, which builds them), skipped with the reason otherwise."""

from __future__ import annotations

import os

import pytest

from overlaybd import native
from overlaybd.formats.zfile import blocks


def require_extension(loaded: object | None, name: str) -> None:
    """Fail or skip, saying why, unless ``loaded`` (the extension ``name``, as the code uses it) is there."""
    if loaded is not None:
        return
    if native.switched_off():
        pytest.skip(f"the C extension {name} is turned off (OVERLAYBD_NATIVE=0)")
    if os.environ.get("OVERLAYBD_REQUIRE_NATIVE") == "1":
        pytest.fail(f"the C extension {name} was not built (OVERLAYBD_REQUIRE_NATIVE=1)")
    pytest.skip(f"the C extension {name} was not built")


def require_native() -> blocks.NativeRuns:
    """The native block runs, in use."""
    require_extension(blocks.NATIVE if blocks.ACTIVE is blocks.NATIVE else None, "overlaybd.formats.zfile._blocks")
    assert blocks.NATIVE is not None
    return blocks.NATIVE
