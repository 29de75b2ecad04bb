#!/usr/bin/env bash
# The package as users get it: build an sdist and a wheel (python -m build), install the wheel in a fresh venv, and
# run the unit and property tests against that install (not the source tree).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build -q --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
ls "$work"/dist/*.tar.gz "$work"/dist/*.whl >/dev/null
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$(ls "$work"/dist/*.whl)[test]"
where=$(cd "$work" && "$work/venv/bin/python" -c 'import overlaybd, sys; print(overlaybd.__file__)')
case "$where" in
  "$work"/venv/*) ;;
  *) echo "check_wheel: overlaybd imports from $where, not the installed wheel" >&2; exit 1 ;;
esac
test -f "$(dirname "$where")/py.typed"
echo "check_wheel: $(ls "$work"/dist | tr '\n' ' ')installed in a fresh venv; $("$work/venv/bin/overlaybd" --version | head -1)"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/unit tests/properties
