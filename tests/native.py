"""The C block path (overlaybd.formats.zfile._blocks) in tests: required where scripts/test.sh says so."""

from __future__ import annotations

import os

import pytest

from overlaybd.formats.zfile import blocks


def require_native() -> blocks.NativeRuns:
    """The native block runs, in use. Without them: a failure under OVERLAYBD_REQUIRE_NATIVE=1 (CI builds the
    extension, so its absence there is a defect), a skip that says why otherwise."""
    if blocks.NATIVE is None or blocks.ACTIVE is not blocks.NATIVE:
        why = "was not built" if blocks.NATIVE is None else "is turned off (OVERLAYBD_NATIVE=0)"
        if blocks.NATIVE is None and os.environ.get("OVERLAYBD_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the C extension overlaybd.formats.zfile._blocks {why} (OVERLAYBD_REQUIRE_NATIVE=1)")
        pytest.skip(f"the C extension overlaybd.formats.zfile._blocks {why}")
    return blocks.NATIVE
