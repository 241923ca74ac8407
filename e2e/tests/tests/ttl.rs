//! `spec.ttlSecondsAfterFinished` under the chart's operator: a DispyJob that sets it is
//! deleted that long after it ended, with what it owns (its output ConfigMap); one that does
//! not stays; the cluster goes on running jobs.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_job_with_ttl_seconds_after_finished_is_deleted_after_it_ends_and_one_without_stays() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "ttl").await;
    let jobs = ns.jobs();
    let config_maps: Api<ConfigMap> = ns.api();
    with_operator_log(&client, async {
        ns.apply(
            r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: squares}
spec:
  computation:
    python:
      source: |
        def square(n, loud=False):
            if loud:
                print("x" * 50000)
            return n * n
      function: square
  nodes: {replicas: 1, cpus: 2}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: brief}
spec: {cluster: squares, args: [6], kwargs: {loud: true}, ttlSecondsAfterFinished: 2}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: kept}
spec: {cluster: squares, args: [7]}
"#,
        )
        .await;
        let brief = wait_job(&jobs, "brief", JobStatus::Finished, 90).await;
        let status = brief.status.unwrap();
        assert_eq!(status.result, Some(serde_json::json!(36)));
        let output = status
            .output_config_map
            .expect("50 KB of stdout: an output ConfigMap");
        let ended: Timestamp = status.end_time.expect("endTime").parse().unwrap();
        wait_job(&jobs, "kept", JobStatus::Finished, 90).await;
        wait_for("brief deleted", 30, async || {
            match jobs.get_opt("brief").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(j) => Err(describe_job(&j)),
            }
        })
        .await;
        let after = Timestamp::now().duration_since(ended).as_secs_f64();
        println!("brief gone {after:.1} s after its endTime (ttl 2 s)");
        // endTime is in whole seconds: the deletion is due 1.5 s after it at the earliest
        assert!(after >= 1.5, "deleted {after:.1} s after it ended, ttl 2 s");
        wait_for(
            "brief's output ConfigMap collected",
            60,
            async || match config_maps
                .get_opt(&output)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(_) => Err(format!("{output} still there")),
            },
        )
        .await;
        // the one without a ttl stays, and the cluster runs the next job
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(
            jobs.get_opt("kept").await.unwrap().is_some(),
            "kept (no ttlSecondsAfterFinished) was deleted"
        );
        ns.apply(
            "apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: next}\n\
             spec: {cluster: squares, args: [8]}\n",
        )
        .await;
        let next = wait_job(&jobs, "next", JobStatus::Finished, 60).await;
        assert_eq!(next.status.unwrap().result, Some(serde_json::json!(64)));
    })
    .await;
    ns.delete().await;
}
