#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages the tests and benchmarks use, then a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in qemu-utils libnbd-bin fuse3 xfsprogs e2fsprogs mount docker-registry skopeo apache2-utils; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: missing Debian packages ${need[*]} (run as root to install them)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
