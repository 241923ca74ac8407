//! A DispyJob's life under the chart's operator: it waits for a cluster that does not exist
//! yet, it is terminated on its node when deleted while running, it waits while its cluster
//! is suspended, its big output is bounded in status and kept whole in a ConfigMap it owns,
//! `activeDeadlineSeconds` terminates it, deleting its JobCluster runs cleanup on the node, and
//! a job pinned to a node pod that does not exist yet runs on it once the cluster grows.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_job_naming_a_missing_cluster_waits_and_runs_once_the_cluster_exists() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "later").await;
    let jobs = ns.jobs();
    with_operator_log(&client, async {
        ns.apply(
            "apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: early}\n\
             spec: {cluster: later, args: [6, 7]}\n",
        )
        .await;
        let job = wait_waiting(&jobs, "early", "ClusterNotFound", 30).await;
        let message = job.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains(&format!("JobCluster {}/later does not exist", ns.name)),
            "message: {message}"
        );
        wait_event(&client, &ns.name, "early", "ClusterNotFound").await;
        ns.apply(
            r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: later}
spec:
  computation:
    python: {source: "def mul(a, b):\n    return a * b\n", function: mul}
  nodes: {replicas: 1, cpus: 1}
"#,
        )
        .await;
        let job = wait_job(&jobs, "early", JobStatus::Finished, 90).await;
        let status = job.status.unwrap();
        assert_eq!(status.result, Some(serde_json::json!(42)));
        assert!(
            condition(&status.conditions, "Waiting").is_none(),
            "Waiting condition left: {:?}",
            status.conditions
        );
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn deleting_a_running_job_terminates_its_process_on_the_node() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "delete-running").await;
    let jobs = ns.jobs();
    let dir = scratch_dir("op-delete");
    let pid_file = dir.join("pid");
    with_operator_log(&client, async {
        ns.apply(&format!(
            r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {{name: sleeper}}
spec:
  computation:
    program: {{command: ["sh", "-c", "echo $$ > \"$0\"; exec sleep 300"]}}
  nodes: {{replicas: 1, cpus: 1}}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {{name: long-sleep}}
spec: {{cluster: sleeper, args: ["{}"]}}
"#,
            pid_file.display()
        ))
        .await;
        wait_job(&jobs, "long-sleep", JobStatus::Running, 90).await;
        let pid: u32 = wait_for("the job wrote its pid", 10, async || {
            std::fs::read_to_string(&pid_file)
                .map_err(|e| e.to_string())?
                .trim()
                .parse()
                .map_err(|e| format!("{e}"))
        })
        .await;
        assert!(process_alive(pid), "job process {pid} not running");
        delete_and_wait(&jobs, "long-sleep", 60).await;
        wait_process_gone(pid, 10).await;
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn suspend_holds_jobs_output_is_bounded_deadlines_terminate_and_delete_runs_cleanup() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "suspend").await;
    let jobs = ns.jobs();
    let clusters = ns.clusters();
    let dir = scratch_dir("op-cleanup");
    let marker = dir.join("cleanup");
    with_operator_log(&client, async {
        ns.apply(&format!(
            r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {{name: chatty}}
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
      setup: {{function: setup, args: ["{}"]}}
      cleanup: cleanup
  nodes: {{replicas: 1, cpus: 1}}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {{name: chatty-1}}
spec: {{cluster: chatty, args: [50000]}}
"#,
            marker.display()
        ))
        .await;
        wait_cluster(&clusters, "chatty", "1/1", "Suspended", 90).await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let held = jobs.get("chatty-1").await.unwrap();
        assert_eq!(
            job_status(&held),
            JobStatus::Created,
            "a job of a suspended cluster ran: {}",
            describe_job(&held)
        );
        clusters
            .patch(
                "chatty",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"suspend": false}})),
            )
            .await
            .unwrap();
        let job = wait_job(&jobs, "chatty-1", JobStatus::Finished, 60).await;
        let status = job.status.unwrap();
        let shown = status.stdout.unwrap_or_default();
        assert!(
            shown.len() < 9000,
            "status.stdout holds {} bytes",
            shown.len()
        );
        assert!(
            shown.contains("bytes cut") && shown.contains("END"),
            "status.stdout is not the marked tail"
        );
        assert_eq!(status.output_config_map.as_deref(), Some("chatty-1-output"));
        let cms: Api<ConfigMap> = ns.api();
        let cm = cms.get("chatty-1-output").await.unwrap();
        let whole = cm
            .data
            .as_ref()
            .and_then(|d| d.get("stdout"))
            .cloned()
            .unwrap_or_default();
        assert!(
            whole.len() >= 50003,
            "the ConfigMap holds {} bytes of stdout, not all 50003",
            whole.len()
        );
        assert_eq!(
            cm.metadata.owner_references.unwrap_or_default()[0].name,
            "chatty-1",
            "the output ConfigMap is owned by its job"
        );

        // activeDeadlineSeconds: a job running too long is Terminated
        ns.apply(
            r#"
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
"#,
        )
        .await;
        let job = wait_job(&jobs, "too-slow", JobStatus::Terminated, 60).await;
        let message = job.status.unwrap().message.unwrap_or_default();
        assert!(
            message.contains("activeDeadlineSeconds"),
            "message: {message}"
        );
        delete_and_wait(&clusters, "slow", 60).await;

        // deleting the JobCluster runs cleanup on its node before the pods go
        delete_and_wait(&clusters, "chatty", 60).await;
        assert_eq!(
            std::fs::read_to_string(&marker).ok().as_deref(),
            Some("cleaned up"),
            "cleanup did not run on the node"
        );
        let _ = jobs.delete("chatty-1", &DeleteParams::default()).await;
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_job_pinned_to_a_node_pod_not_there_yet_runs_on_it_once_the_cluster_is_scaled_up() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "pinlater").await;
    let jobs = ns.jobs();
    with_operator_log(&client, async {
        ns.apply(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: pin}\nspec:\n  \
             computation:\n    python: {source: \"def where():\\n    return dispy_node_name\\n\", \
             function: where}\n  nodes: {replicas: 1, cpus: 1}\n---\n\
             apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: pinned}\n\
             spec: {cluster: pin, node: pin-node-1}\n",
        )
        .await;
        let waiting = wait_waiting(&jobs, "pinned", "NodeNotFound", 60).await;
        let conditions = waiting.status.map(|s| s.conditions).unwrap_or_default();
        assert_eq!(condition(&conditions, "Waiting").unwrap().status, "True");
        ns.kubectl(&["scale", "jc/pin", "--replicas=2"]);
        let job = wait_job(&jobs, "pinned", JobStatus::Finished, 120).await;
        let status = job.status.unwrap();
        assert_eq!(status.pod.as_deref(), Some("pin-node-1"));
        assert_eq!(status.result, Some(serde_json::json!("pin-node-1")));
        assert!(
            condition(&status.conditions, "Waiting").is_none_or(|c| c.status != "True"),
            "{:?}",
            status.conditions
        );
    })
    .await;
    ns.delete().await;
}
