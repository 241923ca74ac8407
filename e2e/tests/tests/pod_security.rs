//! Node pods meet Kubernetes' restricted Pod Security Standard: in a namespace that enforces
//! it, the API server's PodSecurity admission lets the operator create a JobCluster's node
//! pods (with `hostNetwork: false`; host networking is outside even the baseline profile),
//! and a job runs on them. The pods carry the security context and the work volume's size
//! limit the operator gives them. (The process kubelet does not apply either: it runs the
//! pod as a process of its own user, see e2e/README.md.)

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn node_pods_are_admitted_where_the_restricted_pod_security_standard_is_enforced() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "restricted").await;
    ns.kubectl(&[
        "label",
        "namespace",
        &ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ]);
    with_operator_log(&client, async {
        ns.apply(
            r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: strict}
spec:
  computation:
    python:
      source: |
        import os, tempfile
        def where(n):
            with tempfile.NamedTemporaryFile() as f:
                return [n + 1, os.path.dirname(f.name) == os.environ["TMPDIR"]]
      function: where
  nodes: {replicas: 1, cpus: 1, hostNetwork: false, maxFileSize: 64Mi}
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: strict-1}
spec: {cluster: strict, args: [41]}
"#,
        )
        .await;
        let job = wait_job(&ns.jobs(), "strict-1", JobStatus::Finished, 120).await;
        assert_eq!(
            job.status.unwrap().result,
            Some(serde_json::json!([42, true])),
            "the job's temporary files are on the work volume"
        );
        let pods: Api<Pod> = ns.api();
        let pod = pods
            .list(&ListParams::default().labels("dispy.io/cluster=strict"))
            .await
            .unwrap()
            .items
            .remove(0);
        let spec = pod.spec.unwrap();
        let psc = spec.security_context.unwrap();
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user),
            (Some(true), Some(10001))
        );
        let sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let work = spec.volumes.unwrap().into_iter().find(|v| v.name == "work");
        assert_eq!(
            work.unwrap().empty_dir.unwrap().size_limit.unwrap().0,
            "2Gi",
            "32 files of 64Mi"
        );
    })
    .await;
    ns.delete().await;
}
