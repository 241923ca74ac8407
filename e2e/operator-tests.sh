# The operator's end-to-end bring-up, sourced by e2e/test.sh (which provides k, fail, wait_for,
# $HELM, $REPO_DIR): the chart's operator installed for the Rust tests of e2e/tests (DispyJobs,
# node loss, restarts, TLS, leader election, ...) and uninstalled after them. Under the process
# kubelet the operator's pod is a local process and node pods are local dispynode processes.

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
