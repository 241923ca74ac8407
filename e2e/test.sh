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
    E2E_LOCAL=$LOCAL E2E_OPERATOR_NAMESPACE=dispy-system \
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

# field_is KIND/NAME JSONPATH VALUE (in $NS): kubectl must succeed and print VALUE
field_is() { local v; v=$(k -n $NS get "$1" -o jsonpath="$2") || return 1; [[ $v == "$3" ]]; }
# none_left KIND SELECTOR: kubectl must succeed and list nothing
none_left() { local v; v=$(k -n $NS get "$1" -l "$2" -o name) || return 1; [[ -z $v ]]; }

# --- tests -------------------------------------------------------------------

# installing the chart's operator for the Rust tests; the discovery test
source "$E2E_DIR/operator-tests.sh"

node_ready() { [[ "$(k get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]; }



operator_checks() {
  k -n $NS apply -f - <<'EOF'
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: pool}
spec:
  nodes: {replicas: 1, cpus: 1, port: 9801}
EOF
  [[ $? == 0 ]] || return 1
  wait_for 60 "1 node pod Ready" node_pods_ready "True " || return 1
  wait_for 30 "status 1/1 Ready" field_is jc/pool '{.status.nodes} {.status.phase}' "1/1 Ready" || return 1
  field_is jc/pool '{.status.conditions[?(@.type=="Ready")].status}' True || fail "Ready condition" || return 1
  k -n $NS get secret pool-secret >/dev/null || fail "no generated Secret" || return 1
  field_is svc/pool-nodes '{.spec.clusterIP}' None || fail "no headless Service" || return 1
  k -n $NS scale jc/pool --replicas=2 || return 1
  wait_for 60 "2 node pods Ready" node_pods_ready "True True " || return 1
  wait_for 30 "status 2/2 Ready" field_is jc/pool '{.status.nodes} {.status.phase}' "2/2 Ready" || return 1
  # each on its own node's address (host network)
  out=$(k -n $NS get pods -l dispy.io/cluster=pool -o jsonpath='{range .items[*]}{.status.podIP}{" "}{end}')
  echo "pod IPs: $out"
  [[ $out =~ ^127\.0\.0\.1[0-9]\ 127\.0\.0\.1[0-9]\ $ ]] || fail "pods not on their nodes' addresses: $out" || return 1
  out=$(k -n $NS get jc pool) && echo "$out"
  grep -Eq '^pool +2/2 +2 ' <<<"$out" || fail "printer columns: $out" || return 1
  # a third pod has no node left (the harness has two, and the node port is a host port)
  k -n $NS scale jc/pool --replicas=3 || return 1
  wait_for 30 "status 2/3 Degraded" field_is jc/pool '{.status.nodes} {.status.phase}' "2/3 Degraded" || return 1
  field_is pod/pool-node-2 '{.status.phase}' Pending || fail "the third pod should wait for a node" || return 1
  k -n $NS scale jc/pool --replicas=1 || return 1
  wait_for 60 "scaled down to 1 pod" pool_pod_names pool-node-0 || return 1
  wait_for 30 "status 1/1" field_is jc/pool '{.status.nodes}' "1/1" || return 1
  k -n $NS delete jc pool --wait=true || return 1
  wait_for 60 "pods garbage-collected" none_left pods dispy.io/cluster=pool || return 1
}

# the operator (run here as a local process) gives a JobCluster its node pods, Service and Secret
pool_pod_names() { [[ "$(k -n $NS get pods -l dispy.io/cluster=pool -o jsonpath='{.items[*].metadata.name}')" == "$1" ]]; }
node_pods_ready() { [[ "$(k -n $NS get pods -l dispy.io/cluster=pool -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}')" == "$1" ]]; }
t_operator_node_pods() {
  local op_log="$E2E_STATE_DIR/operator.log" op_pid out rc=0
  k apply -f "$REPO_DIR/crds/dispy.io.yaml" >/dev/null || return 1
  "$REPO_DIR/target/debug/dispy-operator" run --node-image dispy/node --metrics-addr 127.0.0.1:0 --log-format text >"$op_log" 2>&1 &
  op_pid=$!
  operator_checks || rc=1
  kill "$op_pid" 2>/dev/null
  wait "$op_pid" 2>/dev/null
  if [[ $rc != 0 ]]; then echo "--- operator log"; tail -n 30 "$op_log"; fi
  return $rc
}


t_helm_installs_a_chart() {
  local chart
  chart=$(mktemp -d)
  mkdir -p "$chart/templates"
  printf 'apiVersion: v2\nname: e2e-hello\nversion: 0.1.0\n' > "$chart/Chart.yaml"
  printf 'message: hi\n' > "$chart/values.yaml"
  printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {{ .Release.Name }}-cm}\ndata: {message: {{ .Values.message | quote }}}\n' \
    > "$chart/templates/cm.yaml"
  "$HELM" install hello "$chart" -n $NS --set message=from-helm --wait --timeout 60s || return 1
  [[ "$(k -n $NS get configmap hello-cm -o jsonpath='{.data.message}')" == from-helm ]] || fail "chart's ConfigMap missing"
  "$HELM" uninstall hello -n $NS || return 1
  rm -rf "$chart"
}

# --- the dispy-operator Helm chart --------------------------------------------

CHART="$REPO_DIR/charts/dispy-operator"

# helm install: the operator runs as a pod (a process of the process kubelet) under its
# service account with the chart's RBAC, holds its Lease and reconciles a JobCluster
HELM_NS=dispy-system
operator_pod() { k -n $HELM_NS get pods -l app.kubernetes.io/name=dispy-operator -o jsonpath='{.items[0].metadata.name}'; }
lease_held_by() { local v; v=$(k -n $HELM_NS get lease dispy-operator -o jsonpath='{.spec.holderIdentity}') || return 1; [[ -n $1 && $v == *"$1"* ]]; }
lease_renewed_ns() { local v; v=$(k -n $HELM_NS get lease dispy-operator -o jsonpath='{.spec.renewTime}') || return 1; [[ -n $v && $v != "$1" ]]; }
ns_gone() { ! k get namespace "$1" >/dev/null 2>&1; }
crd_gone() { ! k get crd jobclusters.dispy.io dispyjobs.dispy.io >/dev/null 2>&1; }
# can_i ANSWER VERB RESOURCE [ARGS]: what the API server's authorizer says for the operator's account
can_i() {
  local want=$1 got
  shift
  got=$(k auth can-i --as=system:serviceaccount:$HELM_NS:dispy-operator "$@" 2>/dev/null)
  [[ $got == "$want" ]] || fail "can-i $* is '$got', want '$want'"
}
process_gone() { [[ -n $1 && ! -d /proc/$1 ]]; }

t_helm_install_operator() {
  local pod rc=0
  HELM_OPERATOR_PIDS=()
  wait_for 90 "namespace $HELM_NS from an earlier run gone" ns_gone $HELM_NS || return 1
  # the chart installs the CRDs itself: start without them (nothing before this test leaves a
  # dispy resource behind)
  k delete crd jobclusters.dispy.io dispyjobs.dispy.io --ignore-not-found --wait=true --timeout=60s || return 1
  wait_for 30 "dispy CRDs deleted" crd_gone || return 1
  # the operator binds its pod IP: under the process kubelet pods share the host's network
  "$HELM" install dispy-operator "$CHART" -n $HELM_NS --create-namespace \
    --set-string 'metrics.bindAddress=$(POD_IP)' --set 'logLevel=info\,dispy_operator=debug' --set logFormat=text \
    --wait --timeout 120s || rc=1
  if [[ $rc == 0 ]]; then helm_operator_checks || rc=1; fi
  if [[ $rc == 0 ]]; then helm_watch_namespaces_checks || rc=1; fi
  if [[ $rc != 0 ]]; then
    k -n $HELM_NS get deploy,pods -o wide
    k -n $HELM_NS get events --sort-by=.lastTimestamp | tail -n 15
    pod=$(operator_pod 2>/dev/null) && [[ -n $pod ]] && { echo "--- operator log"; k -n $HELM_NS logs "$pod" --tail=20; }
  fi
  k -n $NS delete jc helm-pool squares --ignore-not-found --wait=false >/dev/null 2>&1
  k -n default delete jc helm-unwatched --ignore-not-found --wait=false >/dev/null 2>&1
  if "$HELM" status dispy-operator -n $HELM_NS >/dev/null 2>&1; then
    "$HELM" uninstall dispy-operator -n $HELM_NS --wait --timeout 60s || fail "helm uninstall" || rc=1
  fi
  if [[ $rc == 0 ]]; then
    local p
    for p in "${HELM_OPERATOR_PIDS[@]}"; do
      wait_for 60 "operator process $p gone" process_gone "$p" || rc=1
    done
    ! k get clusterrole dispy-operator >/dev/null 2>&1 || fail "ClusterRole left after uninstall" || rc=1
    ! k -n $HELM_NS get role dispy-operator-leader-election >/dev/null 2>&1 || fail "Role left after uninstall" || rc=1
    ! k -n $NS get role dispy-operator >/dev/null 2>&1 || fail "Role in $NS left after uninstall" || rc=1
    # Helm keeps CRDs (and so every JobCluster and DispyJob) on uninstall
    k get crd jobclusters.dispy.io dispyjobs.dispy.io >/dev/null || fail "CRDs removed by uninstall" || rc=1
  fi
  # later tests install the chart into the same namespace: leave it fully gone
  k delete namespace $HELM_NS --ignore-not-found --wait=true --timeout=90s >/dev/null || fail "namespace $HELM_NS not deleted" || rc=1
  return $rc
}

helm_operator_checks() {
  local pod pid ip r1 out
  k -n $HELM_NS wait --for=condition=Available deployment/dispy-operator --timeout=60s || return 1
  k wait --for=condition=Established crd/jobclusters.dispy.io crd/dispyjobs.dispy.io --timeout=60s || fail "chart CRDs not established" || return 1
  "$HELM" status dispy-operator -n $HELM_NS | grep -q "kubectl apply -f docs/examples/checksums.yaml" || fail "NOTES do not say what to apply next" || return 1
  pod=$(operator_pod)
  [[ -n $pod ]] || fail "no operator pod" || return 1
  pid=$(k -n $HELM_NS get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}'); pid=${pid#process://}
  HELM_OPERATOR_PIDS+=("$pid")
  [[ -d /proc/$pid ]] || fail "operator process $pid not running" || return 1
  tr '\0' ' ' </proc/$pid/cmdline | grep -q "dispy-operator run .*--leader-elect" || fail "process is not the operator: $(tr '\0' ' ' </proc/$pid/cmdline)" || return 1
  [[ "$(k -n $HELM_NS get pod "$pod" -o jsonpath='{.spec.serviceAccountName}')" == dispy-operator ]] || fail "pod's service account" || return 1
  # its HTTP server: probes and Prometheus metrics on the pod's address
  ip=$(k -n $HELM_NS get pod "$pod" -o jsonpath='{.status.podIP}')
  curl -sf --max-time 5 "http://$ip:8080/healthz" >/dev/null || fail "/healthz on $ip:8080" || return 1
  curl -sf --max-time 5 "http://$ip:8080/readyz" >/dev/null || fail "/readyz on $ip:8080" || return 1
  curl -sf --max-time 5 "http://$ip:8080/metrics" | grep -q '^# TYPE ' || fail "/metrics has no Prometheus text" || return 1
  [[ "$(k -n $HELM_NS get svc dispy-operator-metrics -o jsonpath='{.spec.ports[0].port}')" == 8080 ]] || fail "metrics Service" || return 1
  # leader election: the pod holds the operator's Lease in its own namespace, and renews it
  wait_for 30 "Lease held by $pod" lease_held_by "$pod" ||
    fail "holder: $(k -n $HELM_NS get lease dispy-operator -o jsonpath='{.spec.holderIdentity}' 2>&1)" || return 1
  r1=$(k -n $HELM_NS get lease dispy-operator -o jsonpath='{.spec.renewTime}')
  wait_for 40 "Lease renewed" lease_renewed_ns "$r1" || return 1
  # least privilege, as the API server's authorizer sees the operator's account
  can_i yes create pods -n $NS || return 1
  can_i yes patch jobclusters.dispy.io/status -n $NS || return 1
  can_i yes patch leases/dispy-operator -n $HELM_NS || return 1
  can_i no patch leases/other -n $HELM_NS || return 1
  can_i no update leases/dispy-operator -n $HELM_NS || return 1
  can_i no create leases -n $NS || return 1
  can_i no list nodes || return 1
  can_i no delete secrets -n $NS || return 1
  can_i no update pods -n $NS || return 1
  can_i no create deployments.apps -n $NS || return 1
  can_i no create jobclusters.dispy.io -n $NS || return 1
  # and it is enough to run a JobCluster: node pods from the chart's node image, status written
  k -n $NS apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: helm-pool}
spec:
  nodes: {replicas: 1, cpus: 1, port: 9831}
EOF
  wait_for 90 "helm-pool 1/1 Ready" field_is jc/helm-pool '{.status.nodes} {.status.phase}' "1/1 Ready" ||
    fail "status: $(k -n $NS get jc helm-pool -o jsonpath='{.status}')" || return 1
  out=$(k -n $NS get pods -l dispy.io/cluster=helm-pool -o jsonpath='{.items[*].spec.containers[0].image}')
  [[ $out == "dispy/node:$(sed -n 's/^appVersion: *"\(.*\)"$/\1/p' "$CHART/Chart.yaml")" ]] || fail "node pod image: $out" || return 1
  k -n $NS delete jc helm-pool --wait=true --timeout=60s || return 1
  wait_for 60 "helm-pool pods garbage-collected" none_left pods dispy.io/cluster=helm-pool || return 1
  # the example the install's NOTES give runs as written
  "$HELM" get notes dispy-operator -n $HELM_NS | sed -n "/kubectl apply -f - <<'YAML'/,/^  YAML$/p" | sed '1d;$d;s/^  //' >"$E2E_STATE_DIR/notes-example.yaml"
  grep -q "kind: DispyJob" "$E2E_STATE_DIR/notes-example.yaml" || fail "no example in the NOTES" || return 1
  k -n $NS apply -f "$E2E_STATE_DIR/notes-example.yaml" || return 1
  k -n $NS wait --for=condition=Complete dispyjob/squares-7 --timeout=90s || return 1
  field_is dj/squares-7 '{.status.status} {.status.result}' "Finished 49" ||
    fail "squares-7: $(k -n $NS get dj squares-7 -o jsonpath='{.status}')" || return 1
  k -n $NS delete -f "$E2E_STATE_DIR/notes-example.yaml" --wait=true --timeout=60s || return 1
}

# watchNamespaces: an upgrade swaps the ClusterRole for a Role in the watched namespace; the
# restarted operator still runs JobClusters there and leaves other namespaces alone
helm_watch_namespaces_checks() {
  local pod pid
  "$HELM" upgrade dispy-operator "$CHART" -n $HELM_NS --reuse-values --set "watchNamespaces={$NS}" --wait --timeout 120s || return 1
  k -n $HELM_NS rollout status deployment/dispy-operator --timeout=90s || return 1
  ! k get clusterrole dispy-operator >/dev/null 2>&1 || fail "ClusterRole still there with watchNamespaces" || return 1
  k -n $NS get role dispy-operator >/dev/null || fail "no Role in $NS" || return 1
  can_i yes create pods -n $NS || return 1
  can_i no create pods -n default || return 1
  can_i no list jobclusters.dispy.io --all-namespaces || return 1
  pod=$(operator_pod)
  pid=$(k -n $HELM_NS get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}'); pid=${pid#process://}
  HELM_OPERATOR_PIDS+=("$pid")
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--namespaces=$NS" || fail "the operator does not run with --namespaces=$NS" || return 1
  wait_for 60 "Lease held by the new pod $pod" lease_held_by "$pod" || return 1
  k -n default apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: helm-unwatched}
spec:
  nodes: {replicas: 1, cpus: 1, port: 9832}
EOF
  k -n $NS apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: helm-pool}
spec:
  nodes: {replicas: 1, cpus: 1, port: 9833}
EOF
  wait_for 90 "helm-pool 1/1 Ready" field_is jc/helm-pool '{.status.nodes} {.status.phase}' "1/1 Ready" ||
    fail "status: $(k -n $NS get jc helm-pool -o jsonpath='{.status}')" || return 1
  [[ -z "$(k -n default get jc helm-unwatched -o jsonpath='{.status}')" ]] || fail "a JobCluster outside watchNamespaces got a status" || return 1
  [[ -z "$(k -n default get pods -l dispy.io/cluster=helm-unwatched -o name)" ]] || fail "a JobCluster outside watchNamespaces got pods" || return 1
  k -n default delete jc helm-unwatched --wait=true --timeout=30s || return 1
  k -n $NS delete jc helm-pool --wait=true --timeout=60s || return 1
  wait_for 60 "helm-pool pods garbage-collected" none_left pods dispy.io/cluster=helm-pool || return 1
}

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
  (cd "$REPO_DIR" && cargo build -q -p process-kubelet -p dispynode -p dispy-operator) || phase_failed "build process kubelet"
  phase_done "build process kubelet"
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
k create namespace $NS >/dev/null || phase_failed "create namespace $NS"
if [[ $LOCAL == 1 ]]; then
  # the process kubelet: nodes, Deployments, restarts, deletion, env and volumes, probes, tokens
  rust_tests -p dispy-e2e --test kubelet
fi
run_test "helm installs and uninstalls a chart" t_helm_installs_a_chart
# the API server as the operator relies on it, dispy's CRDs, the chart's render checks
rust_tests -p dispy-e2e --test api_server --test crds
rust_tests -p dispy-operator --test chart
if [[ $LOCAL == 1 ]]; then
  run_test "helm chart: install, operator pod Available under its account, CRDs, Lease, metrics, RBAC, watchNamespaces upgrade, uninstall" t_helm_install_operator
fi
if [[ $LOCAL == 1 ]]; then
  run_test "operator: node pods, Service, Secret, status, scale, garbage collection" t_operator_node_pods
  # DispyJobs end to end, with the operator the chart installs (e2e/tests/tests/*.rs)
  run_test "bring-up: the operator from the chart installed and Ready" op_install
  rust_tests -p dispy-e2e --test install --test examples --test jobs --test node_loss --test operator_restart \
    --test node_pool --test metrics --test provisional --test tls --test leader_election
  run_test "bring-down: the operator from the chart uninstalled" op_uninstall
  run_test "operator in a private network namespace: spec.nodes.discover finds a bare-metal node by UDP broadcast and runs a job there" t_op_discover
  t_op_discover_cleanup
fi
if [[ $LOCAL == 1 ]]; then
  # these two restart and then remove the cluster: keep them last
  run_test "cluster up twice is a no-op; up after a crash recovers" t_cluster_up_twice_and_after_a_crash
  k create namespace $NS >/dev/null 2>&1
  run_test "cluster down stops every process it started, pods included" t_down_leaves_nothing
fi
if [[ $LOCAL == 0 ]]; then
  k delete namespace $NS --wait=false >/dev/null
  k delete crd widgets.e2e.dispy.io --wait=false >/dev/null
fi
phase_done "tests"
