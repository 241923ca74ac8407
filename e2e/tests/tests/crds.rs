//! dispy's CRDs (`crds/dispy.io.yaml`, generated from the Rust types) on a real API server,
//! and what a kubectl user sees of them: `explain` text, CEL rules and their messages, schema
//! bounds, the scale subresource, the `dispy` category and the printer columns. No operator
//! runs here: statuses are written through the status subresource by the test.

use dispy_core::manifest::{DispyJobResource, JobClusterResource};
use dispy_e2e::*;
use kube::api::{Api, Patch, PatchParams};

async fn patch_refused(
    api_result: Result<impl std::fmt::Debug, kube::Error>,
    what: &str,
) -> String {
    refusal(api_result, what)
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn the_dispy_crds_explain_validate_scale_and_show_printer_columns() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "crds").await;
    let clusters: Api<JobClusterResource> = ns.clusters();
    let jobs: Api<DispyJobResource> = ns.jobs();
    wait_for("jobclusters served", 30, async || {
        clusters
            .list(&Default::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    let explain = kubectl(&["explain", "jobcluster.spec.nodes.replicas"]);
    assert!(
        explain.contains("Node pods to run"),
        "kubectl explain lacks the doc comment: {explain}"
    );
    // the examples that `dispy run` takes are accepted as they are
    ns.apply_file("docs/examples/checksums.yaml").await;

    // CEL: exactly one of python or program
    let both = try_apply(
        &client,
        Some(&ns.name),
        r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: both}
spec:
  computation:
    python: {source: "def f(): pass", function: f}
    program: {command: [ls]}
"#,
    )
    .await;
    let message = refusal(both, "a JobCluster with both python and program");
    assert!(
        message.contains("set exactly one of python or program"),
        "the CEL message: {message}"
    );
    let merge = |v: serde_json::Value| Patch::Merge(v);
    let pp = PatchParams::default();
    // schema bounds
    patch_refused(
        clusters
            .patch(
                "checksums",
                &pp,
                &merge(serde_json::json!({"spec": {"nodes": {"cpus": 5000}}})),
            )
            .await,
        "cpus 5000",
    )
    .await;
    // CEL transition rules: a DispyJob's cluster, a JobCluster's computation and depends
    let message = patch_refused(
        jobs.patch(
            "checksums-md5",
            &pp,
            &merge(serde_json::json!({"spec": {"cluster": "other"}})),
        )
        .await,
        "a DispyJob's cluster changed",
    )
    .await;
    assert!(message.contains("cluster is immutable"), "{message}");
    let message = patch_refused(
        clusters
            .patch(
                "checksums",
                &pp,
                &merge(
                    serde_json::json!({"spec": {"computation": {"python": {"function": "other"}}}}),
                ),
            )
            .await,
        "a JobCluster's computation changed",
    )
    .await;
    assert!(
        message.contains("computation and depends cannot change on an existing JobCluster"),
        "{message}"
    );
    let message = patch_refused(
        clusters
            .patch(
                "checksums",
                &pp,
                &merge(serde_json::json!({"spec": {"depends": [{"configMapRef": {"name": "x"}}]}})),
            )
            .await,
        "a JobCluster's depends changed",
    )
    .await;
    assert!(
        message.contains("computation and depends cannot change"),
        "{message}"
    );
    clusters
        .patch(
            "checksums",
            &pp,
            &merge(serde_json::json!({"spec": {"reentrant": true}})),
        )
        .await
        .expect("a JobCluster's other fields can change");

    // the scale subresource drives spec.nodes.replicas
    ns.kubectl(&["scale", "jc/checksums", "--replicas=5"]);
    let jc = clusters.get("checksums").await.unwrap();
    assert_eq!(
        jc.spec.nodes.replicas,
        Some(5),
        "scale did not set spec.nodes.replicas"
    );

    // the dispy category lists both kinds
    let names = ns.kubectl(&["get", "dispy", "-o", "name"]);
    let names: Vec<&str> = names.lines().collect();
    assert!(
        names.contains(&"jobcluster.dispy.io/checksums"),
        "{names:?}"
    );
    assert!(
        names.contains(&"dispyjob.dispy.io/checksums-md5"),
        "{names:?}"
    );

    // printer columns, with a status written through the status subresource
    jobs.patch_status(
        "checksums-md5",
        &pp,
        &merge(serde_json::json!({"status": {"status": "Finished", "node": "node-1", "resultSummary": "4d19518"}})),
    )
    .await
    .expect("patch the DispyJob's status");
    let (header, _) = table(&ns.kubectl(&["get", "jc", "checksums"]));
    assert_eq!(
        header,
        ["NAME", "NODES", "CPUS", "RUNNING", "FINISHED", "FAILED", "PHASE", "AGE"],
        "JobCluster columns"
    );
    let (header, rows) = table(&ns.kubectl(&["get", "dj", "checksums-md5"]));
    assert_eq!(
        header,
        ["NAME", "CLUSTER", "STATUS", "NODE", "RESULT", "AGE"],
        "DispyJob columns"
    );
    assert_eq!(
        rows[0][..5],
        [
            "checksums-md5",
            "checksums",
            "Finished",
            "node-1",
            "4d19518"
        ],
        "DispyJob column values"
    );
    ns.delete_file("docs/examples/checksums.yaml").await;
    ns.delete().await;
}
