# Sourced by the e2e benchmarks: the local control plane (the one in $KUBECONFIG, or one of
# their own on ports of their own), the operator as a local process (so its memory and its
# API requests can be read), and the cleanup of both.
#
# Before sourcing: NS (the benchmark's namespace), METRICS (host:port of the operator's
# metrics). After: BIN, KUBECTL, k, REPO_DIR, PROFILE, op_pid, and these functions:
#   start_operator [FLAGS...]   the operator, watching $NS (and BENCH_EXTRA_NAMESPACES)
#   stop_operator               SIGTERM, then wait for it
#   requests                    the operator's API requests so far (its metric)
#   metric NAME [LABELS]        any operator metric's value ("" when absent)
#   rss_kib / hwm_kib           the operator's current / peak resident memory, in KiB
#   wait_cluster NAME NODES     until JobCluster NAME in $NS has NODES of NODES nodes up
# BENCH_PROFILE=debug uses the test builds instead of release ones; BENCH_BUILD=false builds
# nothing; BENCH_OPERATOR_BIN runs another operator build (to compare).

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(cd "$E2E_DIR/.." && pwd)"
BIN="${E2E_BUILD_DIR:-$E2E_DIR/.build}/bin"
PROFILE=${BENCH_PROFILE:-release}
flag=$([[ $PROFILE == release ]] && echo --release || true)
if [[ ${BENCH_BUILD:-true} == true ]]; then  # false: the binaries as they are
  (cd "$REPO_DIR" && cargo build -q $flag -p dispy-operator -p dispynode -p dispy-cli && cargo build -q -p process-kubelet)
fi
own_cluster=0
if [[ -z ${KUBECONFIG:-} ]]; then
  export E2E_PROFILE=$PROFILE  # the node pods' dispynode
  export E2E_STATE_DIR="$E2E_DIR/.state/bench" E2E_APISERVER_PORT=17443 E2E_ETCD_PORT=24890
  export E2E_CONTROLLER_MANAGER_PORT=21257 E2E_SCHEDULER_PORT=21259 E2E_NODE_IP_BASE=60
  "$E2E_DIR/cluster" up >/dev/null
  export KUBECONFIG="$E2E_STATE_DIR/admin.kubeconfig"
  own_cluster=1
fi
KUBECTL="$BIN/kubectl"
k() { "$KUBECTL" "$@"; }

op_pid=
bench_cleanup() {
  local rc=$?
  k delete namespace "$NS" ${BENCH_EXTRA_NAMESPACES:-} --ignore-not-found --wait=true --timeout=300s >/dev/null 2>&1 || true
  stop_operator
  k delete mutatingadmissionpolicybinding,mutatingadmissionpolicy dispy-operator-job-finalizer --ignore-not-found >/dev/null 2>&1 || true
  if [[ $own_cluster == 1 ]]; then "$E2E_DIR/cluster" down >/dev/null; fi
  return $rc
}
trap bench_cleanup EXIT
k apply --server-side -f "$REPO_DIR/crds/dispy.io.yaml" >/dev/null

OPERATOR_BIN=${BENCH_OPERATOR_BIN:-$REPO_DIR/target/$PROFILE/dispy-operator}  # another build, to compare
start_operator() {
  local namespaces=$NS ns
  for ns in ${BENCH_EXTRA_NAMESPACES:-}; do namespaces+=",$ns"; done
  RUST_LOG=warn "$OPERATOR_BIN" run --metrics-addr "$METRICS" --log-format text \
    --namespaces "$namespaces" "$@" >>"${TMPDIR:-/tmp}/dispy-bench-operator.log" 2>&1 &
  op_pid=$!
  for _ in $(seq 100); do curl -sf "http://$METRICS/metrics" >/dev/null && return; sleep 0.1; done
  echo "the operator did not serve its metrics"; return 1
}
stop_operator() {
  if [[ -n $op_pid ]]; then kill "$op_pid" 2>/dev/null && wait "$op_pid" 2>/dev/null; fi
  op_pid=
  return 0
}
metric() {
  curl -s "http://$METRICS/metrics" | awk -v m="dispy_operator_$1${2:-}" '$1 == m {print $2}'
}
requests() { metric api_requests_total; }
rss_kib() { awk '/VmRSS/{print $2}' "/proc/$op_pid/status"; }
hwm_kib() { awk '/VmHWM/{print $2}' "/proc/$op_pid/status"; }
wait_cluster() {
  for _ in $(seq 240); do
    [[ $(k -n "$NS" get jc "$1" -o jsonpath='{.status.nodes}') == "$2/$2" ]] && return
    sleep 0.5
  done
  echo "JobCluster $1: not $2/$2 nodes up"; return 1
}
