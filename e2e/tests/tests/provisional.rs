//! What a running job sends before its result: its provisional result in status (the status
//! reads ProvisionalResult while it runs on), and the files it sends kept in a ConfigMap it
//! owns (docs/examples/progress.yaml).

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_running_job_shows_its_provisional_result_and_its_sent_files_are_kept() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "provisional").await;
    let jobs = ns.jobs();
    with_operator_log(&client, async {
        ns.apply_file("docs/examples/progress.yaml").await;
        ns.apply(
            r#"
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
"#,
        )
        .await;
        let job = wait_job(&jobs, "halfway-1", JobStatus::ProvisionalResult, 90).await;
        assert_eq!(
            job.status.unwrap().provisional_result,
            Some(serde_json::json!({"stage": "halfway"}))
        );
        wait_job(&jobs, "halfway-1", JobStatus::Finished, 60).await;

        let job = wait_job(&jobs, "progress-primes", JobStatus::Finished, 90).await;
        let status = job.status.unwrap();
        assert_eq!(status.result, Some(serde_json::json!(1229)));
        assert_eq!(
            status.provisional_result.as_ref().map(|p| &p["checked"]),
            Some(&serde_json::json!(7500)),
            "provisionalResult: {:?}",
            status.provisional_result
        );
        let sent = &status.sent_files[0];
        assert_eq!(
            (sent.name.as_str(), sent.saved_as.as_deref()),
            ("primes.txt", Some("primes.txt")),
            "sentFiles: {:?}",
            status.sent_files
        );
        assert_eq!(
            status.files_config_map.as_deref(),
            Some("progress-primes-files")
        );
        let cms: Api<ConfigMap> = ns.api();
        let cm = cms.get("progress-primes-files").await.unwrap();
        let primes = cm
            .binary_data
            .as_ref()
            .and_then(|d| d.get("primes.txt"))
            .expect("primes.txt in binaryData");
        let lines = String::from_utf8_lossy(&primes.0).lines().count();
        assert_eq!(lines, 1229, "the files ConfigMap's primes.txt");
        assert_eq!(
            cm.metadata.owner_references.unwrap_or_default()[0].name,
            "progress-primes",
            "the files ConfigMap is owned by its job"
        );
        ns.delete_file("docs/examples/progress.yaml").await;
        wait_for("the files ConfigMap goes with its job", 60, async || {
            let left = cms
                .list(&ListParams::default().labels("dispy.io/job=progress-primes"))
                .await
                .map_err(|e| e.to_string())?;
            if left.items.is_empty() {
                Ok(())
            } else {
                Err(format!("{} left", left.items.len()))
            }
        })
        .await;
    })
    .await;
    ns.delete().await;
}
