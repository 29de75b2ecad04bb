"""Shared test set-up: where ../shared/fixtures is, and a clear skip where it is absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT.parent / "shared" / "fixtures"
REFERENCE = FIXTURES / "reference"
REAL = FIXTURES / "real"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference fixtures come from ../shared/fixtures beside the project")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    return _need(REAL)


@pytest.fixture(scope="session")
def manifest(reference_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((reference_dir / "MANIFEST.json").read_text())
    return data
