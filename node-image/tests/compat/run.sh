#!/usr/bin/env bash
# The dispy compatibility suite: the real dispy client (PyPI, pinned) against our dispynode.
# Creates a venv with dispy and pytest, builds dispynode, and runs pytest INSIDE a private
# network namespace (dispy clients broadcast to 255.255.255.255; nothing here may reach the
# machine's real interfaces). Needs root (namespaces). Prints "N passed, M failed" last.
#   usage: node-image/tests/compat/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
HERE=node-image/tests/compat

if [ "$(id -u)" != 0 ]; then
  echo "the dispy compatibility suite needs root (private network namespaces)"
  echo "0 passed, 1 failed"
  exit 1
fi
VENV=$(bash $HERE/venv.sh)
command -v openssl >/dev/null || { apt-get update -q; DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl; }

cargo build -q -p dispynode --bin dispynode --bin dispynetrelay --bin dispyscheduler
export DISPYNODE=$ROOT/target/debug/dispynode
export DISPYNETRELAY=$ROOT/target/debug/dispynetrelay
export DISPYSCHEDULER=$ROOT/target/debug/dispyscheduler

status=0
timeout 1800 unshare -n bash -c "
  ip link set lo up
  cd $HERE
  $VENV/bin/python -m pytest -p no:cacheprovider -q -rfE $* ." 2>&1 | tee /tmp/dispy-compat.log || status=$?
# pytest's closing summary ("1 failed, 40 passed in 236.88s"), not other counts in the log
# (node logs and client output are in it too, some of it binary).
summary=$(grep -aE '^=* ?[0-9]+ (passed|failed|errors?|deselected)[^=]* in [0-9.]+s' /tmp/dispy-compat.log | tail -1 || true)
passed=$( { echo "$summary" | grep -Eo '[0-9]+ passed' || true; } | awk '{print $1}')
failed=$( { echo "$summary" | grep -Eo '[0-9]+ (failed|errors?)' || true; } | awk '{s+=$1} END {print s+0}')
if [ "$status" -ne 0 ] && [ "${failed:-0}" -eq 0 ]; then failed=1; fi
echo "${passed:-0} passed, ${failed:-0} failed"
exit $status
