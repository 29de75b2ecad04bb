#!/usr/bin/env bash
# Set up, then run the main job on an embedded default (local files only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
