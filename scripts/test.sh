#!/usr/bin/env bash
# Set up, then run every test (unit, property, interop with ../shared/fixtures, real peers), lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
lint=(src tests scripts)
[ -d benchmarks ] && lint+=(benchmarks)
.venv/bin/ruff check "${lint[@]}"
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
