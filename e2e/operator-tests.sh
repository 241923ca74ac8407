# End-to-end tests of the operator running DispyJobs, sourced by e2e/test.sh (which provides
# k, fail, wait_for, field_is, $HELM, $NS, $E2E_STATE_DIR, $REPO_DIR). The operator is the one
# the Helm chart installs; under the process kubelet its pod is a local process, so "killing
# the operator" is a SIGKILL to that process (the kubelet restarts it, as a container runtime
# would), and node pods are local dispynode processes.

OP_NS=dispy-system
JOBS_NS=dispy-jobs

op_pod() { k -n $OP_NS get pods -l app.kubernetes.io/name=dispy-operator -o jsonpath='{.items[0].metadata.name}'; }
# the PID behind a pod's first container (the process kubelet's container ID)
pod_pid() { local id; id=$(k -n "$1" get pod "$2" -o jsonpath='{.status.containerStatuses[0].containerID}') || return 1; echo "${id#process://}"; }
op_pid() { pod_pid $OP_NS "$(op_pod)"; }
jk() { k -n $JOBS_NS "$@"; }
job_field() { jk get dj "$1" -o jsonpath="$2"; }
job_is() { [[ "$(job_field "$1" '{.status.status}')" == "$2" ]]; }
all_jobs_terminal() {
  local s
  s=$(jk get dj -l "$1" -o jsonpath='{range .items[*]}{.status.status}{"\n"}{end}') || return 1
  [[ -n $s ]] && ! grep -Evq '^(Finished|Terminated|Cancelled|Abandoned)$' <<<"$s"
}
count_status() { jk get dj -l "$1" -o jsonpath='{range .items[*]}{.status.status}{"\n"}{end}' | grep -c "^$2\$"; }
pid_gone() { [[ ! -d /proc/$1 ]]; }

# --- the operator, from the chart ----------------------------------------------------------

t_op_install() {
  k create namespace $JOBS_NS >/dev/null 2>&1
  "$HELM" install dispy "$REPO_DIR/charts/dispy-operator" -n $OP_NS --create-namespace \
    --set-string 'metrics.bindAddress=$(POD_IP)' --set logFormat=text \
    --wait --timeout 120s || return 1
  wait_for 60 "operator Ready" op_ready || return 1
  # the chart's admission policy puts the operator's finalizer on a DispyJob as it is created
  k get mutatingadmissionpolicy dispy-operator-job-finalizer >/dev/null || fail "no MutatingAdmissionPolicy installed" || return 1
  local f
  f=$(printf 'apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: finalized}\nspec: {cluster: none}\n' |
    jk create -f - -o jsonpath='{.metadata.finalizers}') || return 1
  [[ $f == '["dispy.io/terminate"]' ]] || fail "finalizers in the create response: '$f'" || return 1
  jk delete dj finalized --wait=true --timeout=30s >/dev/null || fail "a job that never ran is not deleted" || return 1
}
op_ready() { [[ "$(k -n $OP_NS get pods -l app.kubernetes.io/name=dispy-operator -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}')" == True ]]; }

t_op_uninstall() {
  k delete namespace $JOBS_NS --wait=true --timeout=120s >/dev/null || fail "namespace $JOBS_NS not deleted" || return 1
  "$HELM" uninstall dispy -n $OP_NS --wait --timeout 60s || return 1
  k delete namespace $OP_NS --wait=false >/dev/null 2>&1
}

op_log_tail() { local p; p=$(op_pod) && k -n $OP_NS logs "$p" --tail="${1:-30}"; }

# --- the examples ----------------------------------------------------------------------------

jc_columns_ready() { jk get jc checksums | grep -Eq '^checksums +2/2 +4 +0 +4 +0 +Ready '; }

t_op_examples() {
  local f out
  for f in checksums program raises pinned; do
    jk apply -f "$REPO_DIR/docs/examples/$f.yaml" >/dev/null || fail "apply $f.yaml" || return 1
  done
  for j in checksums-md5 checksums-sha1 checksums-sha256 checksums-sha512 divide-ok sha1sum-a sha1sum-both where-free; do
    wait_for 90 "$j Finished" job_is $j Finished || { op_log_tail; return 1; }
  done
  wait_for 30 "divide-by-zero Terminated" job_is divide-by-zero Terminated || return 1
  [[ $(job_field checksums-md5 '{.status.result}') == 4d1951894d6260f544437f811c7384a4 ]] || fail "md5 result" || return 1
  [[ $(job_field checksums-md5 '{.status.stdout}') == "md5 103 bytes"* ]] || fail "md5 stdout" || return 1
  [[ $(job_field divide-ok '{.status.result}') == 0.25 ]] || fail "divide-ok result" || return 1
  [[ $(job_field divide-by-zero '{.status.exception}') == *ZeroDivisionError* ]] || fail "no traceback in status.exception" || return 1
  [[ $(job_field sha1sum-a '{.status.result}') == 0 ]] || fail "program exit code" || return 1
  [[ $(job_field sha1sum-a '{.status.stdout}') == *"a.txt"* ]] || fail "program stdout" || return 1
  [[ $(job_field where-free '{.status.result}') == *where-node-0* ]] || fail "node name in result" || return 1
  # a job pinned to a node the cluster does not have waits and says why
  wait_for 30 "where-pinned waits for its node" field_is_ns $JOBS_NS dj/where-pinned \
    '{.status.conditions[?(@.type=="Waiting")].reason}' NodeNotFound || return 1
  # kubectl wait on the conditions
  jk wait --for=condition=Complete dj/checksums-md5 dj/sha1sum-both --timeout=10s >/dev/null || fail "kubectl wait Complete" || return 1
  jk wait --for=condition=Failed dj/divide-by-zero --timeout=10s >/dev/null || fail "kubectl wait Failed" || return 1
  # selectable fields: the API server filters by status and cluster
  [[ "$(jk get dj --field-selector status.status=Terminated -o name)" == dispyjob.dispy.io/divide-by-zero ]] ||
    fail "field selector status.status=Terminated: $(jk get dj --field-selector status.status=Terminated -o name)" || return 1
  [[ "$(jk get dj --field-selector spec.cluster=checksums -o name | wc -l)" == 4 ]] ||
    fail "field selector spec.cluster=checksums: $(jk get dj --field-selector spec.cluster=checksums -o name)" || return 1
  out=$(jk get dispyjobs) && echo "$out"
  grep -Eq '^checksums-md5 +checksums +Finished +checksums-node-[01] +4d1951894d6260f544437f811c7384a4 ' <<<"$out" ||
    fail "dispyjob columns" || return 1
  # The jobs may all have run on the first node pod before the second is Ready.
  wait_for 60 "jobcluster checksums 2/2 Ready in its columns" jc_columns_ready ||
    { jk get jc checksums; return 1; }
  jk get jc checksums
  out=$(jk get dispy -o name)
  grep -q '^jobcluster.dispy.io/divide$' <<<"$out" && grep -q '^dispyjob.dispy.io/divide-ok$' <<<"$out" ||
    fail "kubectl get dispy lists both kinds" || return 1
  # Events on the jobs
  jk get events --field-selector involvedObject.name=checksums-md5,reason=Finished -o name | grep -q . ||
    fail "no Finished Event on the job" || return 1
  # each JobCluster got its own node port (host network: no two clusters on one port)
  out=$(jk get jc -o jsonpath='{range .items[*]}{.status.nodePort}{"\n"}{end}' | sort | uniq -d)
  [[ -z $out ]] || fail "two JobClusters share node port $out" || return 1
  jk delete -f "$REPO_DIR/docs/examples/raises.yaml" --wait=true --timeout=60s >/dev/null || fail "delete raises.yaml" || return 1
  for f in checksums program pinned; do jk delete -f "$REPO_DIR/docs/examples/$f.yaml" --wait=true --timeout=60s >/dev/null; done
  wait_for 60 "example pods gone" none_left_ns $JOBS_NS pods app.kubernetes.io/managed-by=dispy-operator || return 1
}
field_is_ns() { local v; v=$(k -n "$1" get "$2" -o jsonpath="$3") || return 1; [[ $v == "$4" ]]; }
none_left_ns() { local v; v=$(k -n "$1" get "$2" -l "$3" -o name) || return 1; [[ -z $v ]]; }

# --- a job whose cluster appears later -------------------------------------------------------

t_op_cluster_appears_later() {
  jk apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: early, labels: {test: later}}
spec: {cluster: later, args: [6, 7]}
EOF
  wait_for 30 "Waiting: ClusterNotFound" field_is_ns $JOBS_NS dj/early \
    '{.status.conditions[?(@.type=="Waiting")].reason}' ClusterNotFound || return 1
  [[ $(job_field early '{.status.message}') == *"JobCluster $JOBS_NS/later does not exist"* ]] || fail "message" || return 1
  jk get events --field-selector involvedObject.name=early,reason=ClusterNotFound -o name | grep -q . ||
    fail "no ClusterNotFound Event" || return 1
  jk apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: later}
spec:
  computation:
    python: {source: "def mul(a, b):\n    return a * b\n", function: mul}
  nodes: {replicas: 1, cpus: 1}
EOF
  wait_for 90 "early Finished once the cluster exists" job_is early Finished || { op_log_tail; return 1; }
  [[ $(job_field early '{.status.result}') == 42 ]] || fail "result" || return 1
  [[ -z $(job_field early '{.status.conditions[?(@.type=="Waiting")].status}') ]] || fail "Waiting condition left" || return 1
  jk delete jc later --wait=true --timeout=60s >/dev/null
}

# --- deleting a running job terminates it on its node ---------------------------------------

t_op_delete_running_job() {
  local dir="$E2E_STATE_DIR/op-delete" pid
  mkdir -p "$dir" && rm -f "$dir"/*
  jk apply -f - <<EOF || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: sleeper}
spec:
  computation:
    program: {command: ["sh", "-c", "echo \$\$ > \"\$0\"; exec sleep 300"]}
  nodes: {replicas: 1, cpus: 1}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: long-sleep}
spec: {cluster: sleeper, args: ["$dir/pid"]}
EOF
  wait_for 90 "long-sleep Running" job_is long-sleep Running || { op_log_tail; return 1; }
  wait_for 10 "the job wrote its pid" test -s "$dir/pid" || return 1
  pid=$(cat "$dir/pid")
  [[ -d /proc/$pid ]] || fail "job process $pid not running" || return 1
  jk delete dj long-sleep --wait=true --timeout=60s >/dev/null || fail "delete did not finish" || return 1
  wait_for 10 "job process $pid terminated" pid_gone "$pid" || return 1
  jk delete jc sleeper --wait=true --timeout=60s >/dev/null
}

# --- a node lost mid-run ---------------------------------------------------------------------

# kill_node_of JOB: SIGKILL the dispynode process of the pod the job runs on
kill_node_of() {
  local pod pid
  pod=$(job_field "$1" '{.status.pod}') && [[ -n $pod ]] || fail "job $1 has no pod" || return 1
  pid=$(pod_pid $JOBS_NS "$pod") && [[ -n $pid ]] || fail "no pid for pod $pod" || return 1
  echo "killing node pod $pod (pid $pid), which runs $1"
  kill -9 "$pid"
}

node_loss_cluster() {  # NAME REENTRANT
  jk apply -f - <<EOF
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: $1}
spec:
  computation:
    python: {source: "import time\ndef nap(i):\n    time.sleep(4)\n    return i\n", function: nap}
  nodes: {replicas: 2, cpus: 1}
  reentrant: $2
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: $1-a, labels: {test: $1}}
spec: {cluster: $1, args: [1]}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: $1-b, labels: {test: $1}}
spec: {cluster: $1, args: [2]}
EOF
}

t_op_reentrant_node_killed() {
  node_loss_cluster re true || return 1
  wait_for 90 "re-a Running" job_is re-a Running || { op_log_tail; return 1; }
  kill_node_of re-a || return 1
  wait_for 90 "both jobs end" all_jobs_terminal test=re || return 1
  [[ $(count_status test=re Finished) == 2 ]] || fail "not every job Finished: $(jk get dj -l test=re)" || return 1
  [[ $(job_field re-a '{.status.attempts}') == 2 ]] || fail "re-a should have run twice (attempts 2)" || return 1
  jk get events --field-selector involvedObject.name=re-a,reason=Requeued -o name | grep -q . ||
    fail "no Requeued Event" || return 1
  jk delete jc re --wait=true --timeout=60s >/dev/null
}

t_op_not_reentrant_node_killed() {
  node_loss_cluster nre false || return 1
  wait_for 90 "nre-a Running" job_is nre-a Running || { op_log_tail; return 1; }
  kill_node_of nre-a || return 1
  wait_for 60 "nre-a Abandoned" job_is nre-a Abandoned || return 1
  [[ $(job_field nre-a '{.status.message}') == *"not reentrant"* ]] || fail "message: $(job_field nre-a '{.status.message}')" || return 1
  jk wait --for=condition=Failed dj/nre-a --timeout=5s >/dev/null || fail "Failed condition" || return 1
  jk delete jc nre --wait=true --timeout=60s >/dev/null
}

# --- the operator killed mid-run -------------------------------------------------------------

t_op_killed_mid_run() {
  local dir="$E2E_STATE_DIR/op-count" n=40 i pid runs bad
  mkdir -p "$dir" && rm -f "$dir"/*
  jk delete dj -l test=counted --wait=true --timeout=60s >/dev/null
  {
    cat <<EOF
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: counted}
spec:
  computation:
    python:
      source: |
        import time
        def run(i, where):
            with open('%s/%d' % (where, i), 'a') as f:
                f.write('ran\n')
            time.sleep(0.5)
            return i * i
      function: run
  nodes: {replicas: 2, cpus: 2}
EOF
    for ((i = 0; i < n; i++)); do
      printf -- '---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: counted-%d, labels: {test: counted}}\nspec: {cluster: counted, args: [%d, "%s"]}\n' $i $i "$dir"
    done
  } | jk apply -f - >/dev/null || return 1
  wait_for 90 "some jobs Finished" at_least_finished test=counted 4 || { op_log_tail; return 1; }
  pid=$(op_pid) && [[ -n $pid ]] || fail "no operator pid" || return 1
  echo "killing the operator (pid $pid) with $(count_status test=counted Finished) of $n jobs Finished"
  kill -9 "$pid"
  wait_for 60 "operator restarted" op_restarted "$pid" || return 1
  wait_for 120 "every job ends" all_jobs_terminal test=counted || { op_log_tail 40; return 1; }
  [[ $(count_status test=counted Finished) == "$n" ]] || fail "not all Finished: $(jk get dj -l test=counted | grep -v Finished)" || return 1
  runs=$(cat "$dir"/* | wc -l)
  bad=$(for ((i = 0; i < n; i++)); do c=$(grep -c ran "$dir/$i" 2>/dev/null || echo 0); [[ $c == 1 ]] || echo "job $i ran $c times"; done)
  echo "$runs executions for $n jobs"
  [[ -z $bad ]] || fail "$bad" || return 1
  for ((i = 0; i < n; i += 13)); do
    [[ $(job_field counted-$i '{.status.result}') == $((i * i)) ]] || fail "counted-$i result" || return 1
  done
  jk delete dj -l test=counted --wait=true --timeout=60s >/dev/null
  jk delete jc counted --wait=true --timeout=60s >/dev/null
}
at_least_finished() { (( $(count_status "$1" Finished) >= $2 )); }
op_restarted() { local p; p=$(op_pid) && [[ -n $p && $p != "$1" ]] && op_ready; }

# --- a node pool for Python dispy clients ----------------------------------------------------

t_op_node_pool() {
  local out
  jk apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: pool}
spec:
  nodes: {replicas: 2, cpus: 1, port: 9811}
EOF
  wait_for 90 "pool 2/2 Ready" field_is_ns $JOBS_NS jc/pool '{.status.nodes} {.status.phase}' "2/2 Ready" || return 1
  out=$(jk get jc pool -o jsonpath='{range .status.nodeSummary[*]}{.address}{" "}{.ready}{"\n"}{end}')
  echo "$out"
  [[ $(grep -Ec '^127\.0\.0\.[0-9]+:9811 true$' <<<"$out") == 2 ]] || fail "pool addresses in status" || return 1
  # the addresses answer: a node is there
  for a in $(awk '{print $1}' <<<"$out"); do
    timeout 2 bash -c "exec 3<>/dev/tcp/${a%:*}/${a#*:}" || fail "nothing listens on $a" || return 1
  done
  jk delete jc pool --wait=true --timeout=60s >/dev/null
}

# --- metrics -----------------------------------------------------------------------------------

t_op_metrics() {
  local ip out
  jk apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: metered}
spec:
  computation:
    python: {source: "def one():\n    return 1\n", function: one}
  nodes: {replicas: 1, cpus: 1}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: metered-1}
spec: {cluster: metered}
EOF
  wait_for 90 "metered-1 Finished" job_is metered-1 Finished || return 1
  ip=$(k -n $OP_NS get pod "$(op_pod)" -o jsonpath='{.status.podIP}') || return 1
  out=$(curl -sf "http://$ip:8080/metrics") || fail "GET /metrics" || return 1
  grep -Eq '^dispy_operator_jobs\{status="Finished"\} [1-9]' <<<"$out" || fail "jobs gauge: $(grep jobs <<<"$out")" || return 1
  grep -q '^dispy_operator_scheduling_latency_seconds_count ' <<<"$out" || fail "latency histogram" || return 1
  grep -q '^dispy_operator_reconciles_total{controller="dispyjob"}' <<<"$out" || fail "reconciles" || return 1
  grep -q '^dispy_operator_leader 1' <<<"$out" || fail "leader gauge" || return 1
  [[ $(curl -sf "http://$ip:8080/readyz") == ok ]] || fail "/readyz" || return 1
  grep -Eq '^dispy_operator_status_writes_total [1-9]' <<<"$out" || fail "status writes counter" || return 1
  k -n $OP_NS get lease dispy-operator -o jsonpath='{.spec.holderIdentity}' | grep -q . || fail "no Lease holder" || return 1
  jk delete jc metered --wait=true --timeout=60s >/dev/null
}

# --- suspend, bounded output, deadlines, cleanup on delete -----------------------------------

t_op_suspend_output_deadline_cleanup() {
  local dir="$E2E_STATE_DIR/op-cleanup" cm shown whole
  mkdir -p "$dir" && rm -f "$dir"/cleanup
  jk apply -f - <<EOF || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: chatty}
spec:
  suspend: true
  computation:
    python:
      source: |
        def setup(marker):
            return 0
        def talk(n):
            print('x' * n + 'END')
            return n
        def cleanup(marker):
            open(marker, 'w').write('cleaned up')
      function: talk
      setup: {function: setup, args: ["$dir/cleanup"]}
      cleanup: cleanup
  nodes: {replicas: 1, cpus: 1}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: chatty-1}
spec: {cluster: chatty, args: [50000]}
EOF
  wait_for 90 "chatty 1/1 Suspended" field_is_ns $JOBS_NS jc/chatty '{.status.nodes} {.status.phase}' "1/1 Suspended" || return 1
  sleep 3
  [[ -z $(job_field chatty-1 '{.status.status}') || $(job_field chatty-1 '{.status.status}') == Created ]] ||
    fail "a job of a suspended cluster ran: $(job_field chatty-1 '{.status.status}')" || return 1
  jk patch jc chatty --type=merge -p '{"spec":{"suspend":false}}' >/dev/null || return 1
  wait_for 60 "chatty-1 Finished once resumed" job_is chatty-1 Finished || { op_log_tail; return 1; }
  shown=$(job_field chatty-1 '{.status.stdout}')
  (( ${#shown} < 9000 )) || fail "status.stdout holds ${#shown} bytes" || return 1
  [[ $shown == *"bytes cut"* && $shown == *END* ]] || fail "status.stdout is not the marked tail" || return 1
  cm=$(job_field chatty-1 '{.status.outputConfigMap}')
  [[ $cm == chatty-1-output ]] || fail "outputConfigMap: '$cm'" || return 1
  whole=$(jk get configmap "$cm" -o jsonpath='{.data.stdout}')
  (( ${#whole} >= 50003 )) || fail "the ConfigMap holds ${#whole} bytes of stdout, not all 50003" || return 1
  [[ $(jk get configmap "$cm" -o jsonpath='{.metadata.ownerReferences[0].name}') == chatty-1 ]] ||
    fail "the output ConfigMap is not owned by its job" || return 1
  # activeDeadlineSeconds: a job running too long is Terminated
  jk apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: slow}
spec:
  computation:
    python: {source: "import time\ndef nap(s):\n    time.sleep(s)\n", function: nap}
  nodes: {replicas: 1, cpus: 1}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: too-slow}
spec: {cluster: slow, args: [60], activeDeadlineSeconds: 2}
EOF
  wait_for 60 "too-slow Terminated by its deadline" job_is too-slow Terminated || return 1
  [[ $(job_field too-slow '{.status.message}') == *activeDeadlineSeconds* ]] ||
    fail "message: $(job_field too-slow '{.status.message}')" || return 1
  jk delete jc slow --wait=true --timeout=60s >/dev/null
  # deleting the JobCluster runs cleanup on its node before the pods go
  jk delete jc chatty --wait=true --timeout=60s >/dev/null || fail "delete chatty" || return 1
  [[ $(cat "$dir/cleanup" 2>/dev/null) == "cleaned up" ]] || fail "cleanup did not run on the node" || return 1
  jk delete dj chatty-1 too-slow --wait=true --timeout=60s >/dev/null
}

# --- what a running job sends: provisional results and files --------------------------------

t_op_provisional_and_sent_files() {
  local cm lines
  jk apply -f "$REPO_DIR/docs/examples/progress.yaml" >/dev/null || fail "apply progress.yaml" || return 1
  jk apply -f - <<'EOF' || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: halfway}
spec:
  computation:
    python:
      source: |
        import time
        def work(seconds):
            dispy_provisional_result({"stage": "halfway"})
            time.sleep(seconds)
            return "done"
      function: work
  nodes: {replicas: 1, cpus: 1}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: halfway-1}
spec: {cluster: halfway, args: [8]}
EOF
  wait_for 90 "halfway-1 ProvisionalResult while it runs" job_is halfway-1 ProvisionalResult || { op_log_tail; return 1; }
  [[ $(job_field halfway-1 '{.status.provisionalResult.stage}') == halfway ]] ||
    fail "provisionalResult: $(job_field halfway-1 '{.status.provisionalResult}')" || return 1
  wait_for 60 "halfway-1 Finished" job_is halfway-1 Finished || return 1
  wait_for 90 "progress-primes Finished" job_is progress-primes Finished || { op_log_tail; return 1; }
  [[ $(job_field progress-primes '{.status.result}') == 1229 ]] || fail "progress-primes result" || return 1
  [[ $(job_field progress-primes '{.status.provisionalResult.checked}') == 7500 ]] ||
    fail "provisionalResult: $(job_field progress-primes '{.status.provisionalResult}')" || return 1
  [[ $(job_field progress-primes '{.status.sentFiles[0].name} {.status.sentFiles[0].savedAs}') == "primes.txt primes.txt" ]] ||
    fail "sentFiles: $(job_field progress-primes '{.status.sentFiles}')" || return 1
  cm=$(job_field progress-primes '{.status.filesConfigMap}')
  [[ $cm == progress-primes-files ]] || fail "filesConfigMap: '$cm'" || return 1
  lines=$(jk get configmap "$cm" -o jsonpath='{.binaryData.primes\.txt}' | base64 -d | wc -l)
  [[ $lines == 1229 ]] || fail "the files ConfigMap's primes.txt has $lines lines, not 1229" || return 1
  [[ $(jk get configmap "$cm" -o jsonpath='{.metadata.ownerReferences[0].name}') == progress-primes ]] ||
    fail "the files ConfigMap is not owned by its job" || return 1
  jk delete -f "$REPO_DIR/docs/examples/progress.yaml" --wait=true --timeout=60s >/dev/null
  jk delete jc halfway --wait=true --timeout=60s >/dev/null
  jk delete dj halfway-1 --wait=true --timeout=60s >/dev/null
  wait_for 60 "the files ConfigMap goes with its job" none_left_ns $JOBS_NS configmaps dispy.io/job=progress-primes || return 1
}

# --- leader election: a standby takes over -----------------------------------------------

lease_holder() { k -n $OP_NS get lease dispy-operator -o jsonpath='{.spec.holderIdentity}'; }
ready_operators() { k -n $OP_NS get pods -l app.kubernetes.io/name=dispy-operator -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}'; }
holder_is_not() { local h; h=$(lease_holder) && [[ -n $h && $h != "$1" ]] && k -n $OP_NS get pod "$h" >/dev/null 2>&1; }
one_job() {  # NAME
  jk apply -f - <<EOF >/dev/null
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: $1}
spec: {cluster: elected, args: [3]}
EOF
}

t_op_leader_failover() {
  local old start
  "$HELM" upgrade dispy "$REPO_DIR/charts/dispy-operator" -n $OP_NS --reuse-values --set replicaCount=2 \
    --wait --timeout 120s >/dev/null || return 1
  wait_for 60 "two operator pods Ready" test_ready_twice || return 1
  jk apply -f - <<'EOF' >/dev/null || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: elected}
spec:
  computation:
    python: {source: "def sq(x):\n    return x * x\n", function: sq}
  nodes: {replicas: 1, cpus: 1}
EOF
  one_job elected-1 || return 1
  wait_for 60 "elected-1 Finished" job_is elected-1 Finished || return 1
  old=$(lease_holder)
  echo "leader: $old; deleting its pod (SIGTERM: it releases the Lease)"
  start=$(date +%s)
  k -n $OP_NS delete pod "$old" --wait=false >/dev/null || return 1
  wait_for 40 "another pod holds the Lease" holder_is_not "$old" || return 1
  echo "new leader $(lease_holder) after $(( $(date +%s) - start ))s"
  one_job elected-2 || return 1
  wait_for 60 "elected-2 Finished under the new leader" job_is elected-2 Finished || return 1
  [[ $(job_field elected-2 '{.status.result}') == 9 ]] || fail "result" || return 1
  jk delete dj elected-1 elected-2 --wait=true --timeout=60s >/dev/null
  jk delete jc elected --wait=true --timeout=60s >/dev/null
  "$HELM" upgrade dispy "$REPO_DIR/charts/dispy-operator" -n $OP_NS --reuse-values --set replicaCount=1 \
    --wait --timeout 120s >/dev/null || return 1
}
test_ready_twice() { [[ $(ready_operators) == "True True " ]]; }

# --- TLS between the operator and the nodes ---------------------------------------------

t_op_tls() {
  local dir="$E2E_STATE_DIR/op-tls" args
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=dispy-nodes \
    -keyout "$dir/tls.key" -out "$dir/tls.crt" >/dev/null 2>&1 || fail "openssl" || return 1
  jk create secret tls node-tls --cert="$dir/tls.crt" --key="$dir/tls.key" >/dev/null || return 1
  jk apply -f - <<'EOF' >/dev/null || return 1
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: private}
spec:
  tls: {secretRef: {name: node-tls}}
  computation:
    python: {source: "def greet(who):\n    return 'hello ' + who\n", function: greet}
  nodes: {replicas: 1, cpus: 1}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: private-1}
spec: {cluster: private, args: ["tls"]}
EOF
  wait_for 90 "private-1 Finished over TLS" job_is private-1 Finished || { op_log_tail; return 1; }
  [[ $(job_field private-1 '{.status.result}') == "hello tls" ]] || fail "result" || return 1
  # the node serves TLS only (it refuses plain-text clients), so the job went over TLS
  args=$(jk get pod private-node-0 -o jsonpath='{.spec.containers[0].args}')
  [[ $args == *--certfile* && $args == *--keyfile* ]] || fail "node pod args: $args" || return 1
  jk delete dj private-1 --wait=true --timeout=60s >/dev/null
  jk delete jc private --wait=true --timeout=60s >/dev/null
  jk delete secret node-tls >/dev/null
}

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
