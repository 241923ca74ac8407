//! `spec.tls`: node pods serve TLS with the Secret's certificate, the operator pins it, and a
//! job runs over it.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PostParams};

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_tls_cluster_serves_tls_on_its_nodes_and_runs_a_job() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "tls").await;
    let dir = scratch_dir("op-tls");
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=dispy-nodes", "-keyout"])
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "node-tls"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": k8s_openapi::ByteString(read("tls.crt")),
            "tls.key": k8s_openapi::ByteString(read("tls.key")),
        }
    }))
    .unwrap();
    let secrets: Api<Secret> = ns.api();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret node-tls");
    with_operator_log(&client, async {
        ns.apply(
            r#"
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
"#,
        )
        .await;
        let job = wait_job(&ns.jobs(), "private-1", JobStatus::Finished, 90).await;
        assert_eq!(
            job.status.unwrap().result,
            Some(serde_json::json!("hello tls"))
        );
        // the node serves TLS only (it refuses plain-text clients), so the job went over TLS
        let pods: Api<Pod> = ns.api();
        let pod = pods.get("private-node-0").await.unwrap();
        let args = pod.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap_or_default();
        assert!(
            args.iter().any(|a| a.starts_with("--certfile"))
                && args.iter().any(|a| a.starts_with("--keyfile")),
            "node pod args: {args:?}"
        );
    })
    .await;
    ns.delete().await;
}
