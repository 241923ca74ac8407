#!/usr/bin/env bash
# Our dispyscheduler versus dispy 4.15.2's dispyscheduler.py on the same two of our nodes, two
# SharedJobCluster clients with JOBS trivial jobs each: jobs/s, wrong results, hangs. Prints;
# asserts nothing. Runs inside a private network namespace (needs root). Uses the release build
# (PROFILE=debug for the debug one).
#   usage: [SCHED_CPU=F] node-image/bench/scheduler_compat.sh [JOBS] [RUNS]   (default 2000 2)
# SCHED_CPU=0.25 caps each scheduler at a quarter of a core (see scheduler_compat.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$(bash $ROOT/node-image/tests/compat/venv.sh)
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build -q --release -p dispynode --bin dispynode --bin dispyscheduler
else
  cargo build -q -p dispynode --bin dispynode --bin dispyscheduler
fi
echo "== machine: $(nproc) cpus, $($VENV/bin/python --version), load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$(id -u)" = 0 ] || { echo "needs root for a private network namespace"; exit 1; }
unshare -n bash -c "ip link set lo up; $VENV/bin/python $ROOT/node-image/bench/scheduler_compat.py $ROOT/target/$PROFILE/dispynode $ROOT/target/$PROFILE/dispyscheduler ${1:-2000} ${2:-2}"
