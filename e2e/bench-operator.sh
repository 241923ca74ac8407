#!/usr/bin/env bash
# Benchmark (prints, asserts nothing): N DispyJobs of a trivial computation created at once on
# the local control plane, 2 node pods -> time until every job is Finished, jobs/s, the
# operator's peak RSS and the API requests it made.
#
#   e2e/bench-operator.sh [N]      (default 1000)
#
# Uses the cluster in $KUBECONFIG when set (e.g. after `eval "$(e2e/cluster env)"`); otherwise
# brings up e2e/cluster on its own ports and takes it down at the end. The operator runs as a
# local process here, so its memory and request count can be read.
set -euo pipefail
N=${1:-1000}
NS=dispy-bench
METRICS=127.0.0.1:18089
BENCH_EXTRA_NAMESPACES=$NS-ref
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/lib.sh"
proxy_pid=
trap '[[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null; bench_cleanup' EXIT

# the chart's admission policy, which puts the operator's finalizer on each DispyJob at creation
# (BENCH_FINALIZER_POLICY=false: the operator patches it on, one more write per job)
if [[ ${BENCH_FINALIZER_POLICY:-true} == true ]]; then
  "$BIN/helm" template dispy-operator "$REPO_DIR/charts/dispy-operator" --set "watchNamespaces={$NS}" \
    --api-versions admissionregistration.k8s.io/v1/MutatingAdmissionPolicy \
    --show-only templates/job-finalizer-policy.yaml | k apply -f - >/dev/null
  policy=on
else
  k delete mutatingadmissionpolicybinding dispy-operator-job-finalizer --ignore-not-found >/dev/null
  policy=off
fi
k create namespace $NS >/dev/null
# shellcheck disable=SC2086 # BENCH_OPERATOR_ARGS: more flags, e.g. "--event-qps 1000"
start_operator ${BENCH_OPERATOR_ARGS:-}
# BENCH_REUSE_WORKERS=true: the jobs run in long-lived workers instead of a fork each (the
# node's cost per job drops from ~1 ms of cpu to ~0.1 ms; the operator's work is the same)
REUSE=${BENCH_REUSE_WORKERS:-false}
k -n $NS apply -f - >/dev/null <<EOF
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: trivial}
spec:
  computation:
    python: {source: "def f(i):\\n    return i\\n", function: f, reuseWorkers: $REUSE}
  nodes: {replicas: 2, cpus: 2}
EOF
wait_cluster trivial 2
# BENCH_CREATORS (8) manifests created by as many kubectl processes at once: one kubectl sends
# its objects one after the other, which alone caps creation near 30/s here
PARTS=${BENCH_CREATORS:-8}
manifest="${TMPDIR:-/tmp}/dispy-bench-jobs"
for ((p = 0; p < PARTS; p++)); do
  for ((i = p; i < N; i += PARTS)); do
    printf -- '---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: j%d}\nspec: {cluster: trivial, args: [%d]}\n' $i $i
  done >"$manifest-$p.yaml"
done
# create_all NAMESPACE: the N DispyJobs, PARTS kubectl processes at once
create_all() {
  local creators=() p
  for ((p = 0; p < PARTS; p++)); do k -n "$1" create -f "$manifest-$p.yaml" >/dev/null & creators+=($!); done
  wait "${creators[@]}"
}

# The reference, same machine, same run: the API server creating the same DispyJobs in a
# namespace no operator watches (the ceiling for creates alone).
k create namespace $NS-ref >/dev/null
ref_start=$(date +%s.%N)
create_all $NS-ref
ref_end=$(date +%s.%N)
k delete namespace $NS-ref --wait=true --timeout=120s >/dev/null

# CPU time of every process on the machine by command, children included (the kubectl
# creators count under this script's bash, the job processes under their Python host)
cpu_snapshot() {
  python3 -c '
import os, sys
hz = os.sysconf("SC_CLK_TCK")
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open("/proc/%s/stat" % pid).read()
    except OSError:
        continue
    comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    print(pid, comm.replace(" ", "_"), sum(int(v) for v in rest[11:15]) / hz)' >"$1"
}
cpu_snapshot "$manifest-cpu-before"
proxy_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$KUBECTL" proxy --port "$proxy_port" >/dev/null 2>&1 &  # not through k(): $! must be kubectl
proxy_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$proxy_port/version" >/dev/null && break; sleep 0.1; done
before=$(requests)
start=$(date +%s.%N)
create_all $NS
created=$(date +%s.%N)
# Done when no DispyJob is other than Finished: a field selector with limit=1 makes each poll
# cheap for the API server (listing all 1,000 every time would load it as much as the jobs),
# and curl through one `kubectl proxy` makes it cheap here (a kubectl per poll took ~0.2 s of
# cpu, a tenth of the machine at 5 polls a second).
unfinished() {
  local page
  page=$(curl -sf "http://127.0.0.1:$proxy_port/apis/dispy.io/v1alpha1/namespaces/$NS/dispyjobs?fieldSelector=status.status%21%3DFinished&limit=1") || return 0
  [[ ${page//[[:space:]]/} != *'"items":[]'* ]]  # (pretty-printed for curl)
}
while unfinished; do
  (($(date +%s) - ${start%.*} < 600)) || { echo "not all Finished after 600 s"; exit 1; }
  sleep 0.2
done
end=$(date +%s.%N)
after=$(requests)
cpu_snapshot "$manifest-cpu-after"
hwm=$(hwm_kib)
wrong=$(k -n $NS get dj -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
print(sum(1 for j in items if j["status"].get("result") != int(j["metadata"]["name"][1:])))')

mode=$([[ $REUSE == true ]] && echo "reuseWorkers" || echo "a fork per job")
awk -v n="$N" -v mode="$mode" -v parts="$PARTS" -v rs="$ref_start" -v re="$ref_end" -v s="$start" -v c="$created" -v e="$end" -v hwm="$hwm" -v b="$before" -v a="$after" -v w="$wrong" 'BEGIN {
  printf "DispyJobs:                 %d (2 node pods x 2 cpus, trivial Python function, %s)\n", n, mode
  printf "creating them took:        %.1f s (%d kubectl create at once)\n", c - s, parts
  printf "reference, no operator:    %.1f s to create them (%.0f/s) in a namespace nobody watches\n", re - rs, n / (re - rs)
  printf "all Finished after:        %.1f s from the first create\n", e - s
  printf "throughput:                %.0f DispyJobs/s end to end\n", n / (e - s)
  printf "wrong results:             %d\n", w
  printf "operator peak RSS:         %.1f MiB\n", hwm / 1024
  printf "operator API requests:     %d (%.2f per job)\n", a - b, (a - b) / n
}'
echo "binaries:                  $PROFILE (operator), ${E2E_PROFILE:-what the kubelet maps} (node pods)"
echo "finalizer policy:          $policy; operator flags: ${BENCH_OPERATOR_ARGS:-defaults}"
# where the machine's time went between the first create and the last Finished
python3 - "$manifest-cpu-before" "$manifest-cpu-after" "$start" "$end" "$$" <<'PY'
import collections, sys
def load(path):
    return {pid: (comm, float(t)) for pid, comm, t in (l.split() for l in open(path))}
before, after, me = load(sys.argv[1]), load(sys.argv[2]), sys.argv[5]
secs = float(sys.argv[4]) - float(sys.argv[3])
use = collections.Counter()
for pid, (comm, t) in after.items():
    used = t - before.get(pid, (comm, 0.0))[1]
    use["kubectl creators + polls (this script)" if pid == me else comm] += used
total = sum(use.values())
print("CPU used during the run:   %.1f s of %.1f s (2 cpus), by command:" % (total, 2 * secs))
for comm, used in use.most_common(8):
    print("  %-40s %5.1f s  %3.0f%%" % (comm, used, 100 * used / total))
PY
echo "routine Events skipped:    $(curl -s "http://$METRICS/metrics" | awk '/^dispy_operator_events_skipped_total /{s=$2} END {print s+0}') (over --event-qps)"
