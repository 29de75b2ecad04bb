#!/usr/bin/env bash
# Rerun every figure in BENCHMARKS.md, one script after another (never two at once), as root.
#   benchmarks/run_all.sh [--quick] [OUT_DIR]
# Each script's table goes to OUT_DIR/NAME.txt and its JSON line to OUT_DIR/NAME.json; OUT_DIR/load.txt records
# the 1-, 5- and 15-minute load averages before and after each script, and OUT_DIR/summary.txt the commit and times.
# The reference C++ tools join the rows that compare with them when $OVERLAYBD_REFERENCE_TOOLS is set.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
if [ "${1:-}" = "--quick" ]; then quick=(--quick); shift; fi
out=${1:-bench-results-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
py=.venv/bin/python
[ -x "$py" ] || ./scripts/setup.sh
# name and arguments, in the order BENCHMARKS.md reports them
runs=(
  "bench_stack_reads"
  "bench_zfile"
  "bench_zfile --python-blocks"
  "bench_index"
  "bench_nbd"
  "bench_loop"
  "bench_flush_floor"
  "bench_remote --profile --bare-mib 128"
  "bench_convert"
  "bench_nbd_memory"
  "bench_redistribution"
  "bench_zfile_peers --bounds"
  "bench_zfile_screen"
  "bench_nbd_floor"
  "bench_nbd --only metrics"
  "bench_nbd_upper"
  "bench_mirror"
  "bench_startup"
  "bench_export"
)
{ echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"; echo "started $(date -u +%FT%TZ)"; } \
  > "$out/summary.txt"
: > "$out/load.txt"
status=0
for run in "${runs[@]}"; do
  read -r name args <<< "$run"
  [ -f "benchmarks/$name.py" ] || { echo "skip $name: not in this checkout" | tee -a "$out/summary.txt"; continue; }
  tag=$name${args:+-$(echo "$args" | tr -c 'a-z0-9\n' '_' | tr -s '_' | sed 's/^_//; s/_$//')}
  echo "== $name $args" >&2
  echo "$tag before: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/load.txt"
  start=$(date +%s)
  # shellcheck disable=SC2086
  if "$py" "benchmarks/$name.py" "${quick[@]}" $args --json "$out/$tag.json" > "$out/$tag.txt"; then
    result=ok
  else
    result="failed ($?)"; status=1
  fi
  echo "$tag after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/load.txt"
  echo "$tag: $result, $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
done
echo "ended $(date -u +%FT%TZ)" >> "$out/summary.txt"
echo "results in $out" >&2
exit $status
