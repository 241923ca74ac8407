#!/usr/bin/env bash
# End-to-end tests of the local Kubernetes harness: builds what is missing
# (reusing caches), brings up a private cluster (own state dir and ports, so a
# developer's `e2e/cluster up` is left alone), runs the tests, always tears the
# cluster down, and ends with the line `N passed, N failed`.
#
# Against a real cluster instead (kind, k3d, ...): E2E_KUBECONFIG=path bash e2e/test.sh
# runs only the tests that do not need the process kubelet, and builds/starts nothing.
set -uo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$E2E_DIR/.." && pwd)"
export E2E_STATE_DIR="${E2E_TEST_STATE_DIR:-$E2E_DIR/.state/test}"
export E2E_APISERVER_PORT="${E2E_TEST_APISERVER_PORT:-16443}"
export E2E_ETCD_PORT="${E2E_TEST_ETCD_PORT:-23890}"
export E2E_CONTROLLER_MANAGER_PORT="${E2E_TEST_CONTROLLER_MANAGER_PORT:-20257}"
export E2E_SCHEDULER_PORT="${E2E_TEST_SCHEDULER_PORT:-20259}"
export E2E_NODES=2
# node i is 127.0.0.(10+i), as the tests expect, whatever the caller's environment says
export E2E_NODE_IP_BASE="${E2E_TEST_NODE_IP_BASE:-10}"
BIN="${E2E_BUILD_DIR:-$E2E_DIR/.build}/bin"
NS=e2e-harness

passed=0
failed=0
failures=()
phase_start=0
LOCAL=1
[[ -n "${E2E_KUBECONFIG:-}" ]] && LOCAL=0

phase() { phase_start=$(date +%s); echo "=== $1"; }
phase_done() { echo "=== $1 took $(( $(date +%s) - phase_start ))s"; }
# a phase that fails counts as a failure and ends the run (teardown still runs)
phase_failed() { failed=$((failed + 1)); failures+=("$1"); echo "=== $1 FAILED"; exit 1; }

teardown() {
  if [[ $LOCAL == 1 ]]; then
    phase "teardown"
    "$E2E_DIR/cluster" down || true
    phase_done "teardown"
  fi
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  teardown
  if ((${#failures[@]})); then
    printf 'failed: %s\n' "${failures[@]}"
  fi
  echo "$passed passed, $failed failed"
  if ((failed > 0 || rc != 0)); then exit 1; fi
  exit 0
}
trap finish EXIT
trap 'echo "interrupted"; failed=$((failed + 1)); exit 1' INT TERM

k() { "$KUBECTL" "$@"; }

# run_test NAME FUNCTION: a test fails when its function returns non-zero
run_test() {
  local name=$1 fn=$2 t0 out
  t0=$(date +%s)
  out=$(mktemp)
  if "$fn" >"$out" 2>&1; then
    passed=$((passed + 1))
    echo "ok   - $name ($(( $(date +%s) - t0 ))s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "FAIL - $name ($(( $(date +%s) - t0 ))s)"
    sed 's/^/       | /' "$out" | tail -n 40
  fi
  rm -f "$out"
}

fail() { echo "assertion failed: $*"; return 1; }

# rust_tests CARGO-TEST-ARGS...: the Rust end-to-end tests (ignored by a plain cargo test; see
# e2e/tests/src/lib.rs), one at a time, against this cluster; each test counts as one
rust_tests() {
  local out rc p f name
  out=$(mktemp)
  (cd "$REPO_DIR" && KUBECONFIG="$KUBECONFIG" KUBECTL="$KUBECTL" HELM="$HELM" E2E_STATE_DIR="$E2E_STATE_DIR" \
    E2E_LOCAL=$LOCAL E2E_OPERATOR_NAMESPACE=dispy-system RUST_BACKTRACE=0 \
    cargo test -q "$@" -- --ignored --test-threads=1 --format=pretty) >"$out" 2>&1
  rc=$?
  while read -r name; do echo "ok   - $name"; done < <(sed -n 's/^test \(.*\) \.\.\. ok$/\1/p' "$out")
  while read -r name; do echo "FAIL - $name"; failures+=("$name"); done < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$out")
  p=$(grep -aEo 'test result: (ok|FAILED)\. [0-9]+ passed; [0-9]+ failed' "$out" | awk '{p+=$4} END {print p+0}')
  f=$(grep -aEo 'test result: (ok|FAILED)\. [0-9]+ passed; [0-9]+ failed' "$out" | awk '{f+=$6} END {print f+0}')
  passed=$((passed + p))
  failed=$((failed + f))
  if ((rc != 0)); then
    # the failures' panics and output; a build failure counts as one failed test
    sed -n '/^failures:$/,/^test result/p' "$out" | sed 's/^/       | /' | tail -n 120
    if ((f == 0)); then
      failed=$((failed + 1)); failures+=("cargo test $*")
      sed 's/^/       | /' "$out" | tail -n 40
    fi
  fi
  rm -f "$out"
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls until COMMAND succeeds
wait_for() {
  local timeout=$1 what=$2 i
  shift 2
  for ((i = 0; i < timeout * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  fail "timed out after ${timeout}s waiting for: $what"
}


# --- tests -------------------------------------------------------------------

# bring-up for the operator's Rust tests: the chart's operator (under the process kubelet its
# pod is a local process, and node pods are local dispynode processes)
OP_NS=dispy-system

op_ready() { [[ "$(k -n $OP_NS get pods -l app.kubernetes.io/name=dispy-operator -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}')" == True ]]; }

op_install() {
  "$HELM" install dispy "$REPO_DIR/charts/dispy-operator" -n $OP_NS --create-namespace \
    --set-string 'metrics.bindAddress=$(POD_IP)' --set logFormat=text \
    --wait --timeout 120s || return 1
  wait_for 60 "operator Ready" op_ready
}

# the tests' namespaces go first, while the operator runs (their DispyJobs' finalizers are its)
op_uninstall() {
  k delete namespace -l dispy.io/e2e=true --wait=true --timeout=120s >/dev/null || fail "the tests' namespaces not deleted" || return 1
  "$HELM" uninstall dispy -n $OP_NS --wait --timeout 60s || return 1
  k delete namespace $OP_NS --wait=false >/dev/null 2>&1
}

node_ready() { [[ "$(k get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]; }

t_cluster_up_twice_and_after_a_crash() {
  local api_pid out
  api_pid=$(cat "$E2E_STATE_DIR/pids/kube-apiserver")
  out=$("$E2E_DIR/cluster" up 2>&1) || { echo "$out"; fail "second up failed"; }
  grep -q "already up" <<<"$out" || fail "second up did not see the running cluster: $out"
  [[ "$(cat "$E2E_STATE_DIR/pids/kube-apiserver")" == "$api_pid" ]] || fail "second up restarted the API server"
  # a crash: the API server dies; up notices, cleans up by PID and starts anew
  kill -KILL "$api_pid"
  out=$("$E2E_DIR/cluster" up 2>&1) || { echo "$out"; fail "up after a crash failed"; }
  grep -q "not healthy" <<<"$out" || fail "up did not notice the crash: $out"
  [[ "$(k get --raw /readyz)" == ok ]] || fail "API server not ready after restart"
  node_ready e2e-node-1 && node_ready e2e-node-2 || fail "nodes not Ready after restart"
}

# processes whose command line or working directory is in the state directory
leftovers() {
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    if tr '\0' ' ' < "$d/cmdline" 2>/dev/null | grep -qF -- "$E2E_STATE_DIR" ||
      [[ "$(readlink "$d/cwd" 2>/dev/null)" == "$E2E_STATE_DIR"* ]]; then
      echo "$pid $(tr '\0' ' ' < "$d/cmdline" 2>/dev/null)"
    fi
  done
}

t_down_leaves_nothing() {
  # a running pod, so that down has a process to stop (after the restart
  # above the namespace is new: wait for its service account)
  wait_for 60 "service account default" k -n $NS get serviceaccount default || return 1
  k -n $NS run sleeper --image=e2e/shell --restart=Never --command -- sh -c 'sleep 600' >/dev/null || return 1
  k -n $NS wait --for=condition=Ready pod/sleeper --timeout=60s || return 1
  local pid left
  pid=$(k -n $NS get pod sleeper -o jsonpath='{.status.containerStatuses[0].containerID}'); pid=${pid#process://}
  [[ -d /proc/$pid ]] || fail "sleeper process $pid not running"
  "$E2E_DIR/cluster" down || fail "down failed"
  left=$(leftovers)
  [[ -z $left ]] || fail "processes left behind: $left"
  [[ ! -d /proc/$pid ]] || fail "pod process $pid left behind"
  [[ ! -e $E2E_STATE_DIR ]] || fail "state directory $E2E_STATE_DIR left behind"
}

# --- main --------------------------------------------------------------------

if [[ $LOCAL == 1 ]]; then
  phase "build control plane (Go; cached when sources are unchanged)"
  bash "$E2E_DIR/controlplane/build.sh" || phase_failed "build control plane"
  phase_done "build control plane"
  phase "build process kubelet (Rust)"
  (cd "$REPO_DIR" && cargo build -q -p process-kubelet -p dispynode -p dispy-operator -p dispy-cli) || phase_failed "build process kubelet"
  phase_done "build process kubelet"
  phase "the dispy client from PyPI (image e2e/dispy-python)"
  bash "$REPO_DIR/node-image/tests/compat/venv.sh" >/dev/null || phase_failed "the dispy client venv"
  phase_done "the dispy client from PyPI (image e2e/dispy-python)"
  phase "build the Rust end-to-end tests"
  (cd "$REPO_DIR" && cargo test -q --no-run -p dispy-e2e && cargo test -q --no-run -p dispy-operator --test chart) ||
    phase_failed "build the Rust end-to-end tests"
  phase_done "build the Rust end-to-end tests"
  phase "cluster up"
  "$E2E_DIR/cluster" up || {
    for f in "$E2E_STATE_DIR"/logs/*.log; do echo "--- $f"; tail -n 20 "$f"; done
    phase_failed "cluster up"
  }
  phase_done "cluster up"
  export KUBECONFIG="$E2E_STATE_DIR/admin.kubeconfig"
  KUBECTL="$BIN/kubectl"
  HELM="$BIN/helm"
else
  export KUBECONFIG="$E2E_KUBECONFIG"
  KUBECTL="${KUBECTL:-kubectl}"
  HELM="${HELM:-helm}"
fi

phase "tests"
if [[ $LOCAL == 1 ]]; then
  # the process kubelet: nodes, Deployments, restarts, deletion, env and volumes, probes, tokens
  rust_tests -p dispy-e2e --test kubelet
fi
# the API server as the operator relies on it, helm, dispy's CRDs, `dispy results`, the chart's
# render checks
rust_tests -p dispy-e2e --test api_server --test helm --test crds --test cli_results
rust_tests -p dispy-operator --test chart
if [[ $LOCAL == 1 ]]; then
  # the chart installed, upgraded and uninstalled; the operator as a local process (no other
  # operator runs during these)
  rust_tests -p dispy-e2e --test chart_install --test cluster_pods
  # DispyJobs end to end, with the operator the chart installs
  run_test "bring-up: the operator from the chart installed and Ready" op_install
  rust_tests -p dispy-e2e --test install --test examples --test jobs --test node_loss --test operator_restart \
    --test node_pool --test metrics --test provisional --test tls --test scheduler --test job_arrays \
    --test leader_election --test ttl --test pod_security
  # last while it runs: what the operator asked of the API server (its audit log) against the
  # chart's rules
  rust_tests -p dispy-e2e --test rbac
  run_test "bring-down: the operator from the chart uninstalled" op_uninstall
  # an operator in a private network namespace finds a bare-metal node by UDP broadcast
  rust_tests -p dispy-e2e --test discovery
fi
if [[ $LOCAL == 1 ]]; then
  # these two restart and then remove the cluster: keep them last
  run_test "cluster up twice is a no-op; up after a crash recovers" t_cluster_up_twice_and_after_a_crash
  k create namespace $NS >/dev/null
  run_test "cluster down stops every process it started, pods included" t_down_leaves_nothing
fi
if [[ $LOCAL == 0 ]]; then
  k delete namespace -l dispy.io/e2e=true --wait=false >/dev/null
  k delete crd widgets.e2e.dispy.io --wait=false >/dev/null
fi
phase_done "tests"
