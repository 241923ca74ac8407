#!/usr/bin/env bash
# Benchmark (prints, asserts nothing): the operator's memory with N finished DispyJobs in its
# namespace. The jobs are loaded while the operator is stopped (created and given a Finished
# status the way the operator writes it, e2e/bench/load_jobs.py), then the operator starts
# and lists them all, as after a restart: the time until it has counted every one, its
# resident memory then, and its peak.
#
#   e2e/bench/finished-jobs.sh [N]      (default 100000)
#
# Cluster and operator as in e2e/bench/lib.sh (the one in $KUBECONFIG, or one of its own).
set -euo pipefail
N=${1:-100000}
NS=dispy-bench-mem
METRICS=127.0.0.1:18090
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

k create namespace $NS >/dev/null
start_operator
k -n $NS apply -f - >/dev/null <<YAML
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: trivial}
spec:
  computation:
    python: {source: "def f(i):\\n    return i\\n", function: f}
  nodes: {replicas: 2, cpus: 2}
YAML
wait_cluster trivial 2
idle=$(rss_kib)
stop_operator

load_start=$(date +%s.%N)
python3 "$E2E_DIR/bench/load_jobs.py" $NS trivial "$N" "${BENCH_THREADS:-8}"
load_end=$(date +%s.%N)
one=$(k -n $NS get dj j1 -o json | wc -c)

start_operator
start=$(date +%s.%N)
for _ in $(seq 1200); do
  [[ $(metric jobs '{status="Finished"}') == "$N" ]] && break
  sleep 0.5
done
[[ $(metric jobs '{status="Finished"}') == "$N" ]] || { echo "the operator did not count $N Finished jobs in 600 s"; exit 1; }
synced=$(date +%s.%N)
sleep 5
rss=$(rss_kib) hwm=$(hwm_kib)
awk -v n="$N" -v ls="$load_start" -v le="$load_end" -v s="$start" -v e="$synced" -v idle="$idle" \
  -v rss="$rss" -v hwm="$hwm" -v one="$one" 'BEGIN {
  printf "finished DispyJobs:        %d (%d bytes of JSON each, as kubectl gets one)\n", n, one
  printf "loading them took:         %.0f s (a create and a status apply each)\n", le - ls
  printf "operator counted them in:  %.1f s after its start\n", e - s
  printf "operator RSS, idle:        %.1f MiB (the JobCluster and its 2 node pods, no jobs)\n", idle / 1024
  printf "operator RSS, %6d jobs: %.1f MiB (%.2f KiB per job above idle)\n", n, rss / 1024, (rss - idle) / n
  printf "operator peak RSS:         %.1f MiB\n", hwm / 1024
}'
echo "binaries:                  $PROFILE ($OPERATOR_BIN)"
