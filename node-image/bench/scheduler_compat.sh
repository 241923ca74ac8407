#!/usr/bin/env bash
# Our dispyscheduler versus dispy 4.15.2's dispyscheduler.py on the same two of our nodes, two
# SharedJobCluster clients with JOBS trivial jobs each: jobs/s, wrong results, hangs. Prints;
# asserts nothing. Runs inside a private network namespace (needs root). Uses the debug build
# (the machine is shared: no release build here), so our numbers are a lower bound.
#   usage: node-image/bench/scheduler_compat.sh [JOBS] [RUNS]     (default 2000 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/target/dispy-compat-venv
if ! "$VENV/bin/python" -c "import dispy; assert dispy.__version__ == '4.15.2'" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q dispy==4.15.2 pycos==4.12.2 "pytest>=7,<9"
fi
cargo build -q -p dispynode --bin dispynode --bin dispyscheduler
echo "== machine: $(nproc) cpus, $($VENV/bin/python --version), load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$(id -u)" = 0 ] || { echo "needs root for a private network namespace"; exit 1; }
unshare -n bash -c "ip link set lo up; $VENV/bin/python $ROOT/node-image/bench/scheduler_compat.py $ROOT/target/debug/dispynode $ROOT/target/debug/dispyscheduler ${1:-2000} ${2:-2}"
