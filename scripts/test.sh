#!/usr/bin/env bash
# Set up, then run every test (unit, property, interop with ../shared/fixtures), lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
