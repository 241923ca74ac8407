//! The operator's HTTP server: Prometheus metrics that count what it did, `/readyz`, and the
//! Lease it holds.

use dispy_core::job::JobStatus;
use dispy_e2e::*;

/// The value of the first sample whose name and labels start with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn operator_metrics_count_jobs_reconciles_and_status_writes_and_it_is_ready_and_leader() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "metrics").await;
    with_operator_log(&client, async {
        ns.apply(
            r#"
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
"#,
        )
        .await;
        wait_job(&ns.jobs(), "metered-1", JobStatus::Finished, 90).await;
        let pod = operator_pod(&client).await;
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .expect("the operator's pod IP");
        let addr = format!("{ip}:8080");
        let (code, metrics) = http_get(&addr, "/metrics").await.expect("GET /metrics");
        assert_eq!(code, 200);
        let positive = |prefix: &str| sample(&metrics, prefix).is_some_and(|v| v >= 1.0);
        assert!(
            positive("dispy_operator_jobs{status=\"Finished\"} "),
            "jobs gauge: {metrics}"
        );
        assert!(
            sample(&metrics, "dispy_operator_scheduling_latency_seconds_count ").is_some(),
            "latency histogram: {metrics}"
        );
        assert!(
            sample(
                &metrics,
                "dispy_operator_reconciles_total{controller=\"dispyjob\""
            )
            .is_some(),
            "reconciles: {metrics}"
        );
        assert_eq!(
            sample(&metrics, "dispy_operator_leader "),
            Some(1.0),
            "leader gauge"
        );
        assert!(
            positive("dispy_operator_status_writes_total "),
            "status writes counter"
        );
        assert_eq!(
            http_get(&addr, "/readyz").await,
            Ok((200, "ok".to_string()))
        );
        assert!(
            lease_holder(&client).await.is_some_and(|h| !h.is_empty()),
            "no Lease holder"
        );
    })
    .await;
    ns.delete().await;
}
