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

field_is_ns() { local v; v=$(k -n "$1" get "$2" -o jsonpath="$3") || return 1; [[ $v == "$4" ]]; }

# --- discovery: spec.nodes.discover finds bare-metal nodes by UDP broadcast -----------------
# Broadcasts must stay off the machine's real interfaces, so this operator runs in a private
# network namespace A joined by a veth pair to namespace B, where a bare-metal dispynode runs;
# socat in A forwards A's 127.0.0.1:<API port> to the API server in this shell's namespace.
# The operator here is a local process watching only its own namespace, run after the
# chart's operator is uninstalled (two operators must not share a JobCluster).
DISC_NS=dispy-discover
t_op_discover() {
  local tag=$$ a b va vb port dir root_net
  a=dspyopa$tag b=dspyopb$tag va=vopa$tag vb=vopb$tag
  dir=$(mktemp -d)
  DISC_DIR=$dir DISC_NETNS="$a $b" DISC_PIDS=""
  ip netns add $a && ip netns add $b || return 1
  ip link add $va type veth peer name $vb && ip link set $va netns $a && ip link set $vb netns $b || return 1
  ip -n $a addr add 10.232.0.1/24 brd + dev $va && ip -n $b addr add 10.232.0.2/24 brd + dev $vb || return 1
  ip -n $a link set $va up && ip -n $b link set $vb up && ip -n $a link set lo up && ip -n $b link set lo up || return 1
  port=$(sed -n 's#^ *server: https://127.0.0.1:\([0-9]*\)$#\1#p' "$KUBECONFIG" | head -1)
  [[ -n $port ]] || fail "no API server port in $KUBECONFIG" || return 1
  root_net=/proc/$BASHPID/ns/net
  ip netns exec $a socat TCP-LISTEN:"$port",bind=127.0.0.1,fork,reuseaddr \
    EXEC:"nsenter --net=$root_net socat STDIO TCP\:127.0.0.1\:$port" 2>"$dir/socat.log" &
  DISC_PIDS+=" $!"
  # on every address of B: a node bound to one address does not hear broadcasts
  ip netns exec $b "$REPO_DIR/target/debug/dispynode" --secret disc-secret --cpus 1 --name far-node \
    --daemon --dest-path-prefix "$dir/node" 2>"$dir/node.log" &
  DISC_PIDS+=" $!"
  ip netns exec $a env KUBECONFIG="$KUBECONFIG" RUST_LOG=info "$REPO_DIR/target/debug/dispy-operator" run \
    --namespaces $DISC_NS --metrics-addr 127.0.0.1:18091 --log-format text >"$dir/operator.log" 2>&1 &
  DISC_PIDS+=" $!"
  k create namespace $DISC_NS >/dev/null || return 1
  k -n $DISC_NS create secret generic disc --from-literal=secret=disc-secret >/dev/null || return 1
  k -n $DISC_NS apply -f - >/dev/null <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: found}
spec:
  secretRef: {name: disc}
  nodes: {replicas: 0, discover: true}
  computation:
    python:
      function: where
      source: |
        def where(n):
            return [n * n, os.getcwd()]
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: found-1}
spec: {cluster: found, args: [7]}
EOF
  wait_for 60 "found-1 Finished" field_is_ns $DISC_NS dj/found-1 '{.status.status}' Finished ||
    { tail -20 "$dir/operator.log"; return 1; }
  local node result
  node=$(k -n $DISC_NS get dj found-1 -o jsonpath='{.status.node}')
  [[ $node == far-node ]] || fail "job ran on '$node', not the discovered node far-node" || return 1
  result=$(k -n $DISC_NS get dj found-1 -o jsonpath='{.status.result}')
  # it ran in the node's own directory for the computation, in namespace B
  [[ $result == "[49,\"$dir/node/"* ]] || fail "result $result" || return 1
  wait_for 30 "the discovered node in the JobCluster's status" disc_node_listed ||
    fail "the JobCluster's status: $(k -n $DISC_NS get jc found -o jsonpath='{.status}')" || return 1
}
disc_node_listed() {
  [[ "$(k -n $DISC_NS get jc found -o jsonpath='{.status.nodeSummary[0].address} {.status.nodeSummary[0].name}')" == "10.232.0.2:9701 far-node" ]]
}
# cleanup, also when the test failed: the namespace (while the operator runs, so finalizers
# go), then our processes by PID, then the network namespaces
t_op_discover_cleanup() {
  k delete namespace $DISC_NS --wait=true --timeout=60s >/dev/null 2>&1
  local p
  for p in ${DISC_PIDS:-}; do kill "$p" 2>/dev/null; done
  for p in ${DISC_PIDS:-}; do wait "$p" 2>/dev/null; done
  for p in ${DISC_NETNS:-}; do ip netns del "$p" 2>/dev/null; done
  rm -rf "${DISC_DIR:-/nonexistent}"
  true
}
