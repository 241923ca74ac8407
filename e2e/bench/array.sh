#!/usr/bin/env bash
# Benchmark (prints, asserts nothing): many trivial jobs three ways, on the same two node pods
# of 2 cpus each, in one run:
#   (a) N jobs as one DispyJobArray (arguments from a ConfigMap), from `kubectl apply` until
#       every index has ended;
#   (b) the same N jobs sent straight to the same node pods by the native client
#       (`dispy run` of the same array; no API server in the path): the physical limit here;
#   (c) M DispyJobs (one object each), created at once, until every one is Finished.
# For each: jobs/s, wrong results, the operator's peak RSS (sampled every 0.5 s) and its API
# requests per 1,000 jobs.
#
#   e2e/bench/array.sh [N] [M]      (defaults 100000 and 1000)
#
# The node pods belong to a JobCluster without a computation (`pool`), so that no client holds
# them between the runs; (a) and (c) use a JobCluster `trivial` on those pods
# (`spec.nodes.external`, the pool's Secret). Cluster and operator as in e2e/bench/lib.sh.
set -euo pipefail
N=${1:-100000}
M=${2:-1000}
NS=dispy-bench-array
METRICS=127.0.0.1:18091
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DISPY=$REPO_DIR/target/$PROFILE/dispy
work=$(mktemp -d)

k create namespace $NS >/dev/null
start_operator
k -n $NS apply -f - >/dev/null <<YAML
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: pool}
spec:
  nodes: {replicas: 2, cpus: 2}
YAML
wait_cluster pool 2
read -r -a nodes <<<"$(k -n $NS get jc pool -o jsonpath='{.status.nodeSummary[*].address}')"
secret=$(k -n $NS get secret pool-secret -o jsonpath='{.data.secret}' | base64 -d)
python3 -c "import sys; [print('[%d]' % i) for i in range(int(sys.argv[1]))]" "$N" >"$work/lines"
computation='python: {source: "def f(i):\n    return i\n", function: f}'
# the array, the same in (a) and (b): its arguments from the ConfigMap `args`
array='apiVersion: dispy.io/v1alpha1
kind: DispyJobArray
metadata: {name: big}
spec:
  cluster: trivial
  argsFrom: {configMapRef: {name: args, key: jobs}}'

# peak_rss_during CMD...: runs CMD, sampling the operator's RSS; prints the peak in KiB
peak_rss_during() {
  local peak=0 r
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    r=$(rss_kib) && ((r > peak)) && peak=$r
    sleep 0.5
  done
  wait "$pid"
  echo "$peak"
}
# wrong FILE: rows of FILE (JSON lines) whose result is not their index, or not Finished
wrong() {
  python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(len(rows), sum(1 for r in rows if r.get("status") != "Finished" or r.get("result") != r["index"]))' "$1"
}

# (b) the native client: the same array, straight to the node pods
cat >"$work/native.yaml" <<YAML
apiVersion: v1
kind: ConfigMap
metadata: {name: args}
data:
  jobs: $(python3 -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read()))' "$work/lines")
---
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: trivial}
spec:
  computation:
    $computation
---
$array
YAML
node_flags=()
for n in "${nodes[@]}"; do node_flags+=(--node "$n"); done
b_start=$(date +%s.%N)
"$DISPY" run -q -f "$work/native.yaml" "${node_flags[@]}" --secret "$secret" -o jsonl >"$work/native.jsonl" || true
b_end=$(date +%s.%N)
read -r b_rows b_wrong < <(wrong "$work/native.jsonl")

# (a) the DispyJobArray through the operator
k -n $NS create configmap args --from-file=jobs="$work/lines" >/dev/null
k -n $NS apply -f - >/dev/null <<YAML
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: trivial}
spec:
  computation:
    $computation
  secretRef: {name: pool-secret}
  nodes: {replicas: 0, external: [$(IFS=,; echo "${nodes[*]}")]}
YAML
wait_cluster trivial 2
array_done() {
  for _ in $(seq 7200); do
    [[ $(k -n $NS get dja big -o jsonpath='{.status.completionTime}' 2>/dev/null) != "" ]] && return
    sleep 0.5
  done
  echo "the array did not end in an hour"; return 1
}
a_req0=$(requests)
a_start=$(date +%s.%N)
k -n $NS apply -f - >/dev/null <<<"$array"
a_peak=$(peak_rss_during array_done)
a_end=$(date +%s.%N)
sleep 2  # the last status write
a_req=$(($(requests) - a_req0))
"$DISPY" results dja/big -n $NS >"$work/array.jsonl"
read -r a_rows a_wrong < <(wrong "$work/array.jsonl")
a_maps=$(k -n $NS get configmap -l dispy.io/job-array=big --no-headers | wc -l)

# (c) M DispyJobs
c_req0=$(requests)
c_start=$(date +%s.%N)
jobs_done() {
  python3 "$E2E_DIR/bench/load_jobs.py" $NS trivial "$M" "${BENCH_THREADS:-8}" --created-only
  for _ in $(seq 7200); do
    [[ $(metric jobs '{status="Finished"}') == "$M" ]] && return
    sleep 0.2
  done
  echo "the DispyJobs did not finish in 24 minutes"; return 1
}
c_peak=$(peak_rss_during jobs_done)
c_end=$(date +%s.%N)
sleep 2
c_req=$(($(requests) - c_req0))
c_wrong=$(k -n $NS get dj -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
print(sum(1 for j in items if j["status"].get("result") != int(j["metadata"]["name"][1:])))')

awk -v n="$N" -v m="$M" -v as="$a_start" -v ae="$a_end" -v bs="$b_start" -v be="$b_end" \
  -v cs="$c_start" -v ce="$c_end" -v ar="$a_req" -v cr="$c_req" -v ap="$a_peak" -v cp="$c_peak" \
  -v arows="$a_rows" -v aw="$a_wrong" -v brows="$b_rows" -v bw="$b_wrong" -v cw="$c_wrong" \
  -v maps="$a_maps" -v hwm="$(hwm_kib)" 'BEGIN {
  printf "2 node pods x 2 cpus, a trivial Python function, a fork per job\n"
  printf "(a) DispyJobArray, %d jobs:  %.1f s, %.0f jobs/s; %d rows, %d wrong; %d result ConfigMaps\n", n, ae - as, n / (ae - as), arows, aw, maps
  printf "    operator: peak RSS %.1f MiB, %d API requests (%.2f per 1,000 jobs)\n", ap / 1024, ar, ar * 1000 / n
  printf "(b) native client, %d jobs: %.1f s, %.0f jobs/s; %d rows, %d wrong\n", n, be - bs, n / (be - bs), brows, bw
  printf "    (a) / (b):              %.2f\n", (n / (ae - as)) / (n / (be - bs))
  printf "(c) DispyJobs, %d:           %.1f s, %.0f jobs/s; %d wrong\n", m, ce - cs, m / (ce - cs), cw
  printf "    operator: peak RSS %.1f MiB, %d API requests (%.0f per 1,000 jobs)\n", cp / 1024, cr, cr * 1000 / m
  printf "operator peak RSS, whole run: %.1f MiB\n", hwm / 1024
}'
echo "binaries: $PROFILE"
