//! The operator, run here as a local process with the admin kubeconfig, gives a JobCluster
//! its node pods (host network, one per node), headless Service and Secret, keeps its status,
//! follows the scale subresource (Degraded when a pod has no node left) and leaves nothing
//! behind when it is deleted. Runs while no other operator does.

use std::process::{Child, Command, Stdio};

use dispy_e2e::*;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

/// The operator as a child process, stopped (SIGTERM, then waited for) when dropped.
struct LocalOperator {
    child: Child,
    log: std::path::PathBuf,
}

impl LocalOperator {
    fn start() -> Self {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| repo_path("target"));
        let log = env().state_dir.join("operator.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(target.join("debug/dispy-operator"))
            .args([
                "run",
                "--node-image",
                "dispy/node",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "text"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start target/debug/dispy-operator");
        LocalOperator { child, log }
    }
}

impl Drop for LocalOperator {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- operator log\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn node_ips() -> Vec<String> {
    let base: u32 = std::env::var("E2E_NODE_IP_BASE")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(10);
    (1..=2).map(|i| format!("127.0.0.{}", base + i)).collect()
}

async fn wait_pods(pods: &Api<Pod>, what: &str, want: impl Fn(&[Pod]) -> bool) -> Vec<Pod> {
    let by_cluster = ListParams::default().labels("dispy.io/cluster=pool");
    wait_for(what, 60, async || {
        let list = pods
            .list(&by_cluster)
            .await
            .map_err(|e| e.to_string())?
            .items;
        if want(&list) {
            Ok(list)
        } else {
            Err(format!(
                "{:?}",
                list.iter()
                    .map(|p| (p.name_any(), pod_ready(p)))
                    .collect::<Vec<_>>()
            ))
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs the e2e cluster, without the chart's operator: run by e2e/test.sh"]
async fn the_operator_gives_a_jobcluster_node_pods_service_secret_status_and_scale() {
    let client = client().await;
    let crds = std::fs::read_to_string(repo_path("crds/dispy.io.yaml")).unwrap();
    apply(&client, None, &crds).await;
    let ns = TestNamespace::create(&client, "cluster-pods").await;
    let _operator = LocalOperator::start();
    let clusters = ns.clusters();
    let pods: Api<Pod> = ns.api();
    ns.apply(
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: pool}\n\
         spec:\n  nodes: {replicas: 1, cpus: 1, port: 9801}\n",
    )
    .await;
    wait_pods(&pods, "1 node pod Ready", |p| {
        p.len() == 1 && p.iter().all(pod_ready)
    })
    .await;
    let jc = wait_cluster(&clusters, "pool", "1/1", "Ready", 30).await;
    let status = jc.status.unwrap();
    assert_eq!(
        condition(&status.conditions, "Ready").map(|c| c.status.as_str()),
        Some("True"),
        "Ready condition: {:?}",
        status.conditions
    );
    let secrets: Api<Secret> = ns.api();
    secrets
        .get("pool-secret")
        .await
        .expect("the generated Secret");
    let services: Api<Service> = ns.api();
    let svc = services
        .get("pool-nodes")
        .await
        .expect("the nodes' Service");
    assert_eq!(
        svc.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None"),
        "a headless Service"
    );

    ns.kubectl(&["scale", "jc/pool", "--replicas=2"]);
    let two = wait_pods(&pods, "2 node pods Ready", |p| {
        p.len() == 2 && p.iter().all(pod_ready)
    })
    .await;
    wait_cluster(&clusters, "pool", "2/2", "Ready", 30).await;
    // each on its own node's address (host network)
    let mut ips: Vec<String> = two
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    ips.sort();
    assert_eq!(ips, node_ips(), "pods on their nodes' addresses");
    let (_, rows) = table(&ns.kubectl(&["get", "jc", "pool"]));
    assert_eq!(rows[0][..3], ["pool", "2/2", "2"], "printer columns");

    // a third pod has no node left (the harness has two, and the node port is a host port)
    ns.kubectl(&["scale", "jc/pool", "--replicas=3"]);
    wait_cluster(&clusters, "pool", "2/3", "Degraded", 30).await;
    let third = pods.get("pool-node-2").await.expect("a third pod");
    assert_eq!(
        third.status.and_then(|s| s.phase).as_deref(),
        Some("Pending"),
        "the third pod waits for a node"
    );
    ns.kubectl(&["scale", "jc/pool", "--replicas=1"]);
    wait_pods(&pods, "scaled down to pool-node-0", |p| {
        p.len() == 1 && p[0].name_any() == "pool-node-0"
    })
    .await;
    wait_for("status 1/1", 30, async || {
        let jc = get_or_seen(&clusters, "pool").await?;
        match jc.status {
            Some(s) if s.nodes == "1/1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    delete_and_wait(&clusters, "pool", 60).await;
    wait_pods(&pods, "the node pods garbage-collected", |p| p.is_empty()).await;
    ns.delete().await;
}
