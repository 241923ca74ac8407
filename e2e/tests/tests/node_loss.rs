//! A node pod's process killed mid-run (the process kubelet restarts it, as a runtime would):
//! a reentrant cluster runs the lost job again on a node, a cluster that is not reentrant
//! marks it Abandoned, as dispy does.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

fn cluster_with_two_naps(name: &str, reentrant: bool) -> String {
    format!(
        r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {{name: {name}}}
spec:
  computation:
    python: {{source: "import time\ndef nap(i):\n    time.sleep(4)\n    return i\n", function: nap}}
  nodes: {{replicas: 2, cpus: 1}}
  reentrant: {reentrant}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {{name: {name}-a, labels: {{test: {name}}}}}
spec: {{cluster: {name}, args: [1]}}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {{name: {name}-b, labels: {{test: {name}}}}}
spec: {{cluster: {name}, args: [2]}}
"#
    )
}

/// SIGKILLs the dispynode process of the pod the job runs on.
async fn kill_node_of(ns: &TestNamespace, job: &str) {
    let jobs = ns.jobs();
    let status = jobs.get(job).await.unwrap().status.unwrap();
    let pod = status.pod.unwrap_or_else(|| panic!("job {job} has no pod"));
    let pods: Api<Pod> = ns.api();
    let pid = pod_pid(&pods.get(&pod).await.unwrap()).expect("the node pod's pid");
    eprintln!("killing node pod {pod} (pid {pid}), which runs {job}");
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {pid}");
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn reentrant_cluster_reruns_the_job_of_a_killed_node() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "reentrant").await;
    let jobs = ns.jobs();
    with_operator_log(&client, async {
        ns.apply(&cluster_with_two_naps("re", true)).await;
        wait_job(&jobs, "re-a", JobStatus::Running, 90).await;
        kill_node_of(&ns, "re-a").await;
        let all = wait_jobs_terminal(&jobs, "test=re", 90).await;
        for j in &all {
            assert_eq!(job_status(j), JobStatus::Finished, "{}", describe_job(j));
        }
        let re_a = jobs.get("re-a").await.unwrap();
        assert_eq!(re_a.status.unwrap().attempts, 2, "re-a ran twice");
        wait_event(&client, &ns.name, "re-a", "Requeued").await;
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_cluster_that_is_not_reentrant_abandons_the_job_of_a_killed_node() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "not-reentrant").await;
    let jobs = ns.jobs();
    with_operator_log(&client, async {
        ns.apply(&cluster_with_two_naps("nre", false)).await;
        wait_job(&jobs, "nre-a", JobStatus::Running, 90).await;
        kill_node_of(&ns, "nre-a").await;
        let job = wait_job(&jobs, "nre-a", JobStatus::Abandoned, 60).await;
        let status = job.status.unwrap();
        let message = status.message.clone().unwrap_or_default();
        assert!(message.contains("not reentrant"), "message: {message}");
        let failed = condition(&status.conditions, "Failed");
        assert_eq!(
            failed.map(|c| c.status.as_str()),
            Some("True"),
            "Failed condition: {:?}",
            status.conditions
        );
    })
    .await;
    ns.delete().await;
}
