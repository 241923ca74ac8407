//! The examples of docs/examples run on Kubernetes as written, under the operator the chart
//! installed: each job reaches its status with its result, stdout or traceback; `kubectl get`
//! and `kubectl wait` show it; the API server filters on the selectable fields; Events are
//! recorded; each JobCluster has its own node port.

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use kube::api::ListParams;
use kube::ResourceExt;

const EXAMPLES: [&str; 4] = ["checksums", "program", "raises", "pinned"];

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn the_examples_reach_their_statuses_and_kubectl_shows_them() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "examples").await;
    with_operator_log(&client, async {
        for f in EXAMPLES {
            ns.apply_file(&format!("docs/examples/{f}.yaml")).await;
        }
        let jobs = ns.jobs();
        for j in [
            "checksums-md5",
            "checksums-sha1",
            "checksums-sha256",
            "checksums-sha512",
            "divide-ok",
            "sha1sum-a",
            "sha1sum-both",
            "where-free",
        ] {
            wait_job(&jobs, j, JobStatus::Finished, 90).await;
        }
        let divide_by_zero = wait_job(&jobs, "divide-by-zero", JobStatus::Terminated, 30).await;
        let status = |name: &str| {
            let jobs = jobs.clone();
            let name = name.to_string();
            async move { jobs.get(&name).await.unwrap().status.unwrap() }
        };
        let md5 = status("checksums-md5").await;
        assert_eq!(
            md5.result,
            Some(serde_json::json!("4d1951894d6260f544437f811c7384a4"))
        );
        assert!(
            md5.stdout
                .as_deref()
                .unwrap_or("")
                .starts_with("md5 103 bytes"),
            "md5 stdout: {:?}",
            md5.stdout
        );
        assert_eq!(
            status("divide-ok").await.result,
            Some(serde_json::json!(0.25))
        );
        let exception = divide_by_zero.status.unwrap().exception.unwrap_or_default();
        assert!(
            exception.contains("ZeroDivisionError"),
            "status.exception: {exception}"
        );
        let sha1sum = status("sha1sum-a").await;
        assert_eq!(
            sha1sum.result,
            Some(serde_json::json!(0)),
            "the program's exit code"
        );
        assert!(
            sha1sum.stdout.unwrap_or_default().contains("a.txt"),
            "program stdout"
        );
        let where_free = status("where-free")
            .await
            .result
            .unwrap_or_default()
            .to_string();
        assert!(
            where_free.contains("where-node-0"),
            "node name in result: {where_free}"
        );

        // a job pinned to a node the cluster does not have waits and says why
        wait_waiting(&jobs, "where-pinned", "NodeNotFound", 30).await;

        // kubectl wait on the conditions
        ns.kubectl(&[
            "wait",
            "--for=condition=Complete",
            "dj/checksums-md5",
            "dj/sha1sum-both",
            "--timeout=10s",
        ]);
        ns.kubectl(&[
            "wait",
            "--for=condition=Failed",
            "dj/divide-by-zero",
            "--timeout=10s",
        ]);

        // selectable fields: the API server filters by status and cluster
        let names = |lp: ListParams| {
            let jobs = jobs.clone();
            async move {
                let mut n: Vec<String> = jobs
                    .list(&lp)
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .map(|j| j.name_any())
                    .collect();
                n.sort();
                n
            }
        };
        assert_eq!(
            names(ListParams::default().fields("status.status=Terminated")).await,
            ["divide-by-zero"]
        );
        assert_eq!(
            names(ListParams::default().fields("spec.cluster=checksums")).await,
            [
                "checksums-md5",
                "checksums-sha1",
                "checksums-sha256",
                "checksums-sha512"
            ]
        );

        let (header, rows) = table(&ns.kubectl(&["get", "dispyjobs"]));
        assert_eq!(
            header,
            ["NAME", "CLUSTER", "STATUS", "NODE", "RESULT", "AGE"]
        );
        let md5_row = rows
            .iter()
            .find(|r| r[0] == "checksums-md5")
            .expect("a checksums-md5 row");
        assert_eq!(md5_row[1..3], ["checksums", "Finished"]);
        assert!(
            md5_row[3] == "checksums-node-0" || md5_row[3] == "checksums-node-1",
            "NODE column: {md5_row:?}"
        );
        assert_eq!(md5_row[4], "4d1951894d6260f544437f811c7384a4");

        // The jobs may all have run on the first node pod before the second is Ready.
        let clusters = ns.clusters();
        wait_for(
            "checksums 2/2 Ready with its 4 jobs counted",
            60,
            async || {
                let jc = get_or_seen(&clusters, "checksums").await?;
                match &jc.status {
                    Some(s)
                        if s.nodes == "2/2"
                            && s.cpus == 4
                            && s.jobs.running == 0
                            && s.jobs.finished == 4
                            && s.jobs.failed == 0
                            && s.phase == "Ready" =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        let (_, rows) = table(&ns.kubectl(&["get", "jc", "checksums"]));
        assert_eq!(
            rows[0][..7],
            ["checksums", "2/2", "4", "0", "4", "0", "Ready"]
        );

        let names = ns.kubectl(&["get", "dispy", "-o", "name"]);
        let names: Vec<&str> = names.lines().collect();
        assert!(
            names.contains(&"jobcluster.dispy.io/divide")
                && names.contains(&"dispyjob.dispy.io/divide-ok"),
            "kubectl get dispy lists both kinds: {names:?}"
        );
        assert!(
            !events(&client, &ns.name, "checksums-md5", "Finished")
                .await
                .is_empty(),
            "no Finished Event on the job"
        );

        // each JobCluster got its own node port (host network: no two clusters on one port)
        let mut ports: Vec<u16> = clusters
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter_map(|c| c.status.as_ref()?.node_port)
            .collect();
        assert_eq!(
            ports.len(),
            EXAMPLES.len(),
            "a node port per JobCluster: {ports:?}"
        );
        ports.sort();
        ports.dedup();
        assert_eq!(
            ports.len(),
            EXAMPLES.len(),
            "two JobClusters share a node port"
        );

        for f in EXAMPLES {
            ns.delete_file(&format!("docs/examples/{f}.yaml")).await;
        }
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = ns.api();
        wait_for("the examples' node pods gone", 60, async || {
            let left = pods
                .list(&ListParams::default().labels("app.kubernetes.io/managed-by=dispy-operator"))
                .await
                .map_err(|e| e.to_string())?;
            if left.items.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    left.items.iter().map(|p| p.name_any()).collect::<Vec<_>>()
                ))
            }
        })
        .await;
    })
    .await;
    ns.delete().await;
}
