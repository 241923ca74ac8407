//! The process kubelet (e2e/kubelet) runs pods as a kubelet would, as local processes: nodes
//! Ready with Lease heartbeats, Deployments Available on distinct loopback pod IPs, crashes
//! restarted with their exit code and Events, deletion with a grace period and garbage
//! collection, env and volumes, readiness probes, service account tokens. Only with the
//! process kubelet (`e2e/test.sh` runs this file when the cluster is its own).

use std::time::{Duration, Instant};

use dispy_e2e::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams};
use kube::ResourceExt;

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: e2e/python:3
        command: [python3, -m, http.server, --bind, $(POD_IP), "8080"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 1
"#;

fn node_ip(i: u32) -> String {
    let base: u32 = std::env::var("E2E_NODE_IP_BASE")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(10);
    format!("127.0.0.{}", base + i)
}

async fn wait_available(ns: &TestNamespace, name: &str, timeout_secs: u64) {
    let deployments: Api<Deployment> = ns.api();
    wait_for(
        &format!("Deployment {name} Available"),
        timeout_secs,
        async || {
            let d = get_or_seen(&deployments, name).await?;
            let status = d.status.unwrap_or_default();
            let available = status.conditions.as_ref().is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
                })
            });
            if available && status.ready_replicas == d.spec.replicas {
                Ok(())
            } else {
                Err(format!("{status:?}"))
            }
        },
    )
    .await
}

async fn web_pods(ns: &TestNamespace) -> Vec<Pod> {
    let pods: Api<Pod> = ns.api();
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
}

fn container_status(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first().cloned())
        .unwrap_or_default()
}

async fn wait_pod_phase(pods: &Api<Pod>, name: &str, phases: &[&str], timeout_secs: u64) -> Pod {
    wait_for(
        &format!("pod {name} {phases:?}"),
        timeout_secs,
        async || {
            let pod = get_or_seen(pods, name).await?;
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phases.contains(&phase.as_str()) {
                Ok(pod)
            } else {
                Err(format!("{phase}: {:?}", pod.status))
            }
        },
    )
    .await
}

async fn wait_pod_ready(pods: &Api<Pod>, name: &str, timeout_secs: u64) -> Pod {
    wait_for(&format!("pod {name} Ready"), timeout_secs, async || {
        let pod = get_or_seen(pods, name).await?;
        if pod_ready(&pod) {
            Ok(pod)
        } else {
            Err(format!("{:?}", pod.status))
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn process_nodes_are_ready_untainted_and_renew_their_leases() {
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    for (i, name) in [(1, "e2e-node-1"), (2, "e2e-node-2")] {
        let node = nodes.get(name).await.unwrap();
        let status = node.status.clone().unwrap();
        let ready = status
            .conditions
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        assert_eq!(ready.as_deref(), Some("True"), "node {name} Ready");
        let ip = status
            .addresses
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address);
        assert_eq!(ip, Some(node_ip(i)), "{name} InternalIP");
        assert_eq!(
            status
                .capacity
                .unwrap_or_default()
                .get("cpu")
                .map(|q| q.0.clone()),
            Some("4".to_string()),
            "{name} cpu capacity"
        );
        // no not-ready taint left, so pods schedule
        assert!(
            node.spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .is_empty(),
            "{name} still tainted"
        );
    }
    // the heartbeat: the node Lease is renewed
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = async || {
        leases
            .get("e2e-node-1")
            .await
            .map_err(|e| e.to_string())
            .map(|l| l.spec.and_then(|s| s.renew_time).map(|t| t.0))
    };
    let first = renew().await.expect("a Lease for e2e-node-1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for("e2e-node-1's Lease renewed", 20, async || {
        match renew().await? {
            t if t.is_some() && t != first => Ok(()),
            t => Err(format!("renewTime {t:?}")),
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn a_deployment_of_two_becomes_available_on_distinct_loopback_pod_ips() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "deployment").await;
    ns.apply(WEB).await;
    wait_available(&ns, "web", 120).await;
    let ips: Vec<String> = web_pods(&ns)
        .await
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    assert_eq!(ips.len(), 2, "two pods with IPs: {ips:?}");
    assert_ne!(ips[0], ips[1], "pod IPs not distinct");
    for ip in &ips {
        assert!(ip.starts_with("127."), "pod IP {ip} is not loopback");
        // each pod answers on its own address
        let (code, _) = http_get(&format!("{ip}:8080"), "/")
            .await
            .unwrap_or_else(|e| panic!("no answer from the pod at {ip}:8080: {e}"));
        assert_eq!(code, 200);
    }
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn a_killed_pod_process_is_restarted_with_exit_code_137_events_and_logs() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "restart-pod").await;
    ns.apply(WEB).await;
    wait_available(&ns, "web", 120).await;
    let pod = web_pods(&ns).await.remove(0);
    let name = pod.name_any();
    let pid = pod_pid(&pod).expect("the pod's pid");
    assert!(
        process_alive(pid),
        "process {pid} of pod {name} does not exist"
    );
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let pods: Api<Pod> = ns.api();
    let restarted = wait_for("restartCount >= 1 and Ready again", 60, async || {
        let p = get_or_seen(&pods, &name).await?;
        let cs = container_status(&p);
        if cs.restart_count >= 1 && cs.ready {
            Ok(p)
        } else {
            Err(format!("{cs:?}"))
        }
    })
    .await;
    let new_pid = pod_pid(&restarted).expect("the new pid");
    assert!(
        new_pid != pid && process_alive(new_pid),
        "no new process (old {pid}, new {new_pid})"
    );
    let last = container_status(&restarted)
        .last_state
        .and_then(|s| s.terminated);
    assert_eq!(last.map(|t| t.exit_code), Some(137), "lastState: SIGKILL");
    // logs reach the kubelet API through the API server
    let logs = pods
        .logs(
            &name,
            &LogParams {
                tail_lines: Some(50),
                ..Default::default()
            },
        )
        .await
        .expect("the pod's logs");
    assert!(logs.contains("Serving HTTP on"), "logs: {logs}");
    // and it says so in Events, as a kubelet does
    wait_event(&client, &ns.name, &name, "Started").await;
    wait_event(&client, &ns.name, &name, "BackOff").await;
    wait_available(&ns, "web", 60).await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn deleting_a_deployment_kills_its_processes_and_gc_removes_replicasets_and_pods() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "gc").await;
    ns.apply(WEB).await;
    wait_available(&ns, "web", 120).await;
    let pids: Vec<u32> = web_pods(&ns).await.iter().filter_map(pod_pid).collect();
    assert_eq!(pids.len(), 2, "two running processes: {pids:?}");
    let sets: Api<ReplicaSet> = ns.api();
    let by_app = ListParams::default().labels("app=web");
    assert!(
        !sets.list(&by_app).await.unwrap().items.is_empty(),
        "no ReplicaSet"
    );
    let deployments: Api<Deployment> = ns.api();
    deployments
        .delete("web", &DeleteParams::background())
        .await
        .unwrap();
    wait_for(
        "ReplicaSet garbage-collected and Pods removed",
        60,
        async || {
            let rs = sets
                .list(&by_app)
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            let pods = web_pods(&ns).await.len();
            if rs == 0 && pods == 0 {
                Ok(())
            } else {
                Err(format!("{rs} ReplicaSets, {pods} pods"))
            }
        },
    )
    .await;
    for pid in pids {
        assert!(
            !process_alive(pid),
            "process {pid} still runs after its pod was deleted"
        );
    }
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn pods_get_env_configmap_secret_emptydir_downward_volumes_exit_codes_and_onfailure() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "pod-env").await;
    ns.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {greeting: hello}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: sec}\nstringData: {password: s3cret}\n",
    )
    .await;
    ns.apply(&ENVCHECK.replace("NAMESPACE", &ns.name)).await;
    let pods: Api<Pod> = ns.api();
    let envcheck = wait_pod_phase(&pods, "envcheck", &["Succeeded", "Failed"], 60).await;
    assert_eq!(
        envcheck.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded"),
        "envcheck: {:?}; log: {}",
        container_status(&envcheck).state,
        pods.logs("envcheck", &Default::default())
            .await
            .unwrap_or_default()
    );
    let exit3 = wait_pod_phase(&pods, "exit3", &["Failed"], 60).await;
    let terminated = container_status(&exit3).state.and_then(|s| s.terminated);
    assert_eq!(
        terminated.map(|t| t.exit_code),
        Some(3),
        "exit3's exit code"
    );
    let onfailure = wait_pod_phase(&pods, "onfailure", &["Succeeded"], 60).await;
    assert_eq!(
        container_status(&onfailure).restart_count,
        1,
        "onfailure restarted once"
    );
    ns.delete().await;
}

const ENVCHECK: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: envcheck, labels: {tier: e2e}}
spec:
  restartPolicy: Never
  volumes:
  - {name: cfg, configMap: {name: cfg}}
  - {name: sec, secret: {secretName: sec}}
  - {name: scratch, emptyDir: {}}
  - name: info
    downwardAPI:
      items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]
  containers:
  - name: check
    image: e2e/shell
    workingDir: /work
    command: [sh, -c]
    args:
    - |
      set -ex
      test "$GREETING" = hello
      test "$PASSWORD" = s3cret
      test "$POD_NAME" = envcheck
      test "$POD_NS" = NAMESPACE
      case "$NODE" in e2e-node-1|e2e-node-2) ;; *) exit 1 ;; esac
      test -n "$POD_IP"
      test "$(cat "$CONTAINER_ROOT/etc/cfg/greeting")" = hello
      test "$(cat "$SECRET_FILE")" = s3cret
      grep -q 'tier="e2e"' "$CONTAINER_ROOT/etc/info/labels"
      echo data > "$CONTAINER_ROOT/scratch/f" && test -s "$CONTAINER_ROOT/scratch/f"
      test "$(pwd -P)" = "$(cd "$CONTAINER_ROOT/work" && pwd -P)"
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: sec, key: password}}}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: SECRET_FILE, value: /etc/sec/password}
    volumeMounts:
    - {name: cfg, mountPath: /etc/cfg}
    - {name: sec, mountPath: /etc/sec}
    - {name: scratch, mountPath: /scratch}
    - {name: info, mountPath: /etc/info}
---
apiVersion: v1
kind: Pod
metadata: {name: exit3}
spec:
  restartPolicy: Never
  containers:
  - {name: main, image: e2e/shell, command: [sh, -c, "exit 3"]}
---
apiVersion: v1
kind: Pod
metadata: {name: onfailure}
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: e2e/shell
    # fails on its first run, succeeds on the second
    command: [sh, -c, 'if [ -e "$CONTAINER_ROOT/s/ran" ]; then exit 0; fi; touch "$CONTAINER_ROOT/s/ran"; exit 1']
    volumeMounts: [{name: s, mountPath: /s}]
  volumes: [{name: s, emptyDir: {}}]
"#;

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn pod_deletion_waits_the_grace_period_then_sigkills() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "grace").await;
    ns.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: stubborn}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: e2e/shell
    command: [sh, -c, 'trap "echo got TERM" TERM; while true; do sleep 0.2; done']
    readinessProbe:
      exec: {command: [sh, -c, 'test -n "$CONTAINER_ROOT"']}
      periodSeconds: 1
"#,
    )
    .await;
    let pods: Api<Pod> = ns.api();
    let pod = wait_pod_ready(&pods, "stubborn", 60).await;
    let pid = pod_pid(&pod).expect("the pod's pid");
    let start = Instant::now();
    pods.delete("stubborn", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("stubborn deleted", 30, async || {
        match pods.get_opt("stubborn").await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|p| p.map(|p| p.status)))),
        }
    })
    .await;
    let took = start.elapsed();
    assert!(!process_alive(pid), "process {pid} survived");
    assert!(
        took >= Duration::from_secs(2),
        "the pod went away in {took:?}, before its 2s grace period"
    );
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn a_tcp_readiness_probe_is_ready_when_listening_and_not_when_not() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "tcp-probe").await;
    ns.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: tcp-open}
spec:
  containers:
  - name: main
    image: e2e/python
    command: [python3, -m, http.server, --bind, $(POD_IP), "9000"]
    env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
    readinessProbe: {tcpSocket: {port: 9000}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-closed}
spec:
  containers:
  - name: main
    image: e2e/shell
    command: [sh, -c, 'sleep 600']
    readinessProbe: {tcpSocket: {port: 9000}, periodSeconds: 1}
"#,
    )
    .await;
    let pods: Api<Pod> = ns.api();
    wait_pod_ready(&pods, "tcp-open", 60).await;
    wait_pod_phase(&pods, "tcp-closed", &["Running"], 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let closed = pods.get("tcp-closed").await.unwrap();
    assert!(
        !pod_ready(&closed),
        "tcp-closed is Ready although nothing listens on its port"
    );
    assert!(
        !container_status(&closed).ready,
        "tcp-closed's container ready"
    );
    for p in ["tcp-open", "tcp-closed"] {
        pods.delete(
            p,
            &DeleteParams {
                grace_period_seconds: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn a_pod_reaches_the_api_server_as_its_service_account() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "sa").await;
    ns.apply(&format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: default-view}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects: [{{kind: ServiceAccount, name: default, namespace: {}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: sa-allowed}}
spec:
  restartPolicy: Never
  containers: [{{name: main, image: e2e/kubectl, args: [get, pods]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: sa-forbidden}}
spec:
  restartPolicy: Never
  containers: [{{name: main, image: e2e/kubectl, args: [get, nodes]}}]
"#,
        ns.name
    ))
    .await;
    // the pods act as the namespace's default service account, which may list pods in its
    // namespace (view) but not nodes
    let pods: Api<Pod> = ns.api();
    let phase = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default()
    };
    let allowed = wait_pod_phase(&pods, "sa-allowed", &["Succeeded", "Failed"], 60).await;
    let forbidden = wait_pod_phase(&pods, "sa-forbidden", &["Succeeded", "Failed"], 60).await;
    assert_eq!(
        phase(&allowed),
        "Succeeded",
        "listing pods with the pod's token failed"
    );
    assert_eq!(
        phase(&forbidden),
        "Failed",
        "listing nodes with the pod's token succeeded: not the service account?"
    );
    ns.delete().await;
}
