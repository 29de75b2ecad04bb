#!/usr/bin/env bash
# Set up, then run every test (unit, property, interop with ../shared/fixtures, real peers), lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
lint=(src tests scripts)
[ -d benchmarks ] && lint+=(benchmarks)
.venv/bin/ruff check "${lint[@]}"
.venv/bin/mypy
# As root, setup.sh installed the compiler and headers, so the C block path must have been built.
if [ "$(id -u)" -eq 0 ]; then export OVERLAYBD_REQUIRE_NATIVE=1; fi
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
  echo "test: the ZFile, cache, index and NBD read and write tests again without the C extensions (OVERLAYBD_NATIVE=0)"
  OVERLAYBD_NATIVE=0 .venv/bin/python -m pytest -q tests/unit/test_zfile_blocks.py tests/unit/test_zfile_incompressible.py \
    tests/properties/test_zfile_properties.py \
    tests/unit/test_cache.py tests/unit/test_lookup.py tests/properties/test_index_properties.py \
    tests/interop/test_byte_identity.py tests/interop/test_reference_cases.py tests/interop/test_real_images.py \
    tests/unit/test_nbd_writes.py tests/unit/test_nbd_flushing.py tests/unit/test_nbd_sendfile.py \
    tests/unit/test_nbd_reads_hostile.py tests/unit/test_nbd_marks_hostile.py tests/unit/test_writable_chunks.py
  echo "test: the NBD server tests again on asyncio's own event loop (OVERLAYBD_UVLOOP=0)"
  OVERLAYBD_UVLOOP=0 .venv/bin/python -m pytest -q tests/unit/test_nbd_*.py tests/unit/test_serve_cli.py \
    tests/unit/test_served.py tests/e2e/test_nbd_hostile.py tests/e2e/test_nbd_clients.py
  echo "test: the built sdist and wheel, installed in a fresh venv"
  ./scripts/check_wheel.sh
fi
