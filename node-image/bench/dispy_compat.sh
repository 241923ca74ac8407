#!/usr/bin/env bash
# dispy 4.15.2's dispynode.py versus our dispynode for the same dispy client and 2,000 trivial
# jobs: jobs/s, wrong results, hangs, node RSS. Prints; asserts nothing. Runs inside a private
# network namespace (both nodes broadcast), so it needs root.
#   usage: node-image/bench/dispy_compat.sh [JOBS] [RUNS]     (default 2000 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/target/dispy-compat-venv
if ! "$VENV/bin/python" -c "import dispy; assert dispy.__version__ == '4.15.2'" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q dispy==4.15.2 pycos==4.12.2 "pytest>=7,<9"
fi
cargo build --release -q -p dispynode --bin dispynode
echo "== machine: $(nproc) cpus, $($VENV/bin/python --version), load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$(id -u)" = 0 ] || { echo "needs root for a private network namespace"; exit 1; }
unshare -n bash -c "ip link set lo up; $VENV/bin/python $ROOT/node-image/bench/dispy_compat.py $ROOT/target/release/dispynode ${1:-2000} ${2:-3}"
