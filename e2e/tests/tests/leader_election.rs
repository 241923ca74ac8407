//! Two operator replicas (a chart upgrade): when the leader's pod is deleted, the standby
//! takes the Lease and runs the next job. The chart goes back to one replica after.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use kube::api::DeleteParams;

fn set_replicas(n: u32) {
    let chart = repo_path("charts/dispy-operator");
    helm(&[
        "upgrade",
        "dispy",
        &chart.to_string_lossy(),
        "-n",
        &env().operator_namespace,
        "--reuse-values",
        "--set",
        &format!("replicaCount={n}"),
        "--wait",
        "--timeout",
        "120s",
    ]);
}

fn one_job(name: &str) -> String {
    format!(
        "apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {{name: {name}}}\n\
         spec: {{cluster: elected, args: [3]}}\n"
    )
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn when_the_leaders_pod_is_deleted_the_standby_takes_the_lease_and_runs_jobs() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "leader").await;
    let jobs = ns.jobs();
    set_replicas(2);
    with_operator_log(&client, async {
        wait_for("two operator pods Ready", 60, async || {
            let pods = list_operator_pods(&client).await;
            let ready = pods.iter().filter(|p| pod_ready(p)).count();
            if pods.len() == 2 && ready == 2 {
                Ok(())
            } else {
                Err(format!("{} pods, {ready} Ready", pods.len()))
            }
        })
        .await;
        ns.apply(
            r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: elected}
spec:
  computation:
    python: {source: "def sq(x):\n    return x * x\n", function: sq}
  nodes: {replicas: 1, cpus: 1}
"#,
        )
        .await;
        ns.apply(&one_job("elected-1")).await;
        wait_job(&jobs, "elected-1", JobStatus::Finished, 60).await;
        let old = lease_holder(&client).await.expect("a Lease holder");
        eprintln!("leader: {old}; deleting its pod (SIGTERM: it releases the Lease)");
        let start = std::time::Instant::now();
        operator_pods(&client)
            .delete(&old, &DeleteParams::default())
            .await
            .expect("delete the leader's pod");
        let pods = operator_pods(&client);
        let new = wait_for("another pod holds the Lease", 40, async || {
            let holder = lease_holder(&client).await;
            match &holder {
                Some(h) if *h != old && pods.get_opt(h).await.ok().flatten().is_some() => {
                    Ok(h.clone())
                }
                _ => Err(format!("holder {holder:?}")),
            }
        })
        .await;
        eprintln!("new leader {new} after {}s", start.elapsed().as_secs());
        ns.apply(&one_job("elected-2")).await;
        let job = wait_job(&jobs, "elected-2", JobStatus::Finished, 60).await;
        assert_eq!(job.status.unwrap().result, Some(serde_json::json!(9)));
    })
    .await;
    ns.delete().await;
    set_replicas(1);
}
