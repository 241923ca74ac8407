#!/usr/bin/env bash
# dispy 4.15.2's dispynode.py versus our dispynode for the same dispy client and 2,000 trivial
# jobs: jobs/s, wrong results, hangs, node RSS. Prints; asserts nothing. Runs inside a private
# network namespace (both nodes broadcast), so it needs root.
#   usage: node-image/bench/dispy_compat.sh [JOBS] [RUNS]     (default 2000 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$(bash $ROOT/node-image/tests/compat/venv.sh)
cargo build --release -q -p dispynode --bin dispynode
echo "== machine: $(nproc) cpus, $($VENV/bin/python --version), load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$(id -u)" = 0 ] || { echo "needs root for a private network namespace"; exit 1; }
unshare -n bash -c "ip link set lo up; $VENV/bin/python $ROOT/node-image/bench/dispy_compat.py $ROOT/target/release/dispynode ${1:-2000} ${2:-3}"
