#!/usr/bin/env bash
# The venv with the real dispy client from PyPI (pinned), pycos and pytest, at
# target/dispy-compat-venv: made when missing or holding another dispy. Used by the compat
# suite, the benchmarks against dispy and the e2e client pods (image e2e/dispy-python).
# Prints the venv's directory.
#   usage: node-image/tests/compat/venv.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
VENV=${CARGO_TARGET_DIR:-$ROOT/target}/dispy-compat-venv
DISPY_VERSION=4.15.2
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
fi
if ! "$VENV/bin/python" -c "import dispy, pytest; assert dispy.__version__ == '$DISPY_VERSION'" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "dispy==$DISPY_VERSION" "pycos==4.12.2" "pytest>=7,<9" >&2
fi
echo "$VENV"
