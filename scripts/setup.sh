#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages the tests and benchmarks use, then a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# gcc and the lz4/zstd headers build the C block path (src/overlaybd/formats/zfile/_blocks.c); without them the
# install still works, on the slower pure-Python path. The lz4 and zstd command-line tools are peers in
# benchmarks/bench_zfile_peers.py; microsocks is the SOCKS5 proxy the mirror tests pull through; fio (its nbd engine)
# writes through `serve` and through attach's loop device in tests and benchmarks; rsync copies a volume in a trust test.
pkgs=(qemu-utils libnbd-bin fuse3 xfsprogs e2fsprogs libext2fs2 fuse2fs mount docker-registry skopeo apache2-utils
      microsocks gcc libc6-dev liblz4-dev libzstd-dev lz4 zstd fio rsync)
if ! "$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'
then
  pkgs+=(python3-dev)
fi
need=()
for pkg in "${pkgs[@]}"; do
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

# FUSE for users other than root (rootless mounts through fuse2fs): Debian's udev rule makes /dev/fuse 0666;
# machines without udev leave it 0600.
if [ "$(id -u)" -eq 0 ] && [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  chmod 0666 /dev/fuse && echo "setup: /dev/fuse made 0666, as Debian's udev rule makes it"
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c 'from overlaybd.formats.zfile import blocks; print("setup: ZFile blocks:", blocks.describe())'
.venv/bin/python -c 'from overlaybd.cache import store; print("setup: cache reads:", store.describe_reads())'
.venv/bin/python -c 'from overlaybd.formats.lsmt import mapping; print("setup: index lookups:", mapping.describe_lookups())'
