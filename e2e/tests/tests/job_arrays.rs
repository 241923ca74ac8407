//! DispyJobArray end to end: 2,000 jobs from one object, every result read back from the
//! result ConfigMaps; a failing index; `kubectl get dja` and `kubectl wait`; the operator killed
//! mid-array (every index once); a node pod killed mid-array (its jobs run again elsewhere);
//! `ttlSecondsAfterFinished`.

use std::collections::BTreeMap;

use dispy_core::array::read_rows;
use dispy_core::job::JobStatus;
use dispy_core::manifest::{ArrayResult, DispyJobArrayResource, JOB_ARRAY_LABEL, RESULTS_KEY};
use dispy_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};

const CLUSTER: &str = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: sq}\nspec:\n  computation:\n    python:\n      source: |\n        def square(n, delay=0):\n            import time\n            time.sleep(delay)\n            if n == 7:\n                raise ValueError('seven is not squared here')\n            return n * n\n      function: square\n  nodes: {replicas: 2, cpus: 2}\n";

fn args_config_map(name: &str, lines: &[String]) -> String {
    let text = serde_json::to_string(&lines.join("\n")).unwrap();
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata:\n  jobs: {text}\n")
}

fn arrays(ns: &TestNamespace) -> Api<DispyJobArrayResource> {
    ns.api::<DispyJobArrayResource>()
}

async fn stored_rows(ns: &TestNamespace, array: &str) -> BTreeMap<u32, ArrayResult> {
    let cms = ns
        .api::<ConfigMap>()
        .list(&ListParams::default().labels(&format!("{JOB_ARRAY_LABEL}={array}")))
        .await
        .unwrap()
        .items;
    let texts: Vec<String> = cms
        .into_iter()
        .filter_map(|cm| cm.data?.remove(RESULTS_KEY))
        .collect();
    let (rows, bad) = read_rows(texts.iter().map(String::as_str));
    assert_eq!(bad, 0, "every line of the result ConfigMaps is a row");
    rows
}

async fn wait_array_ended(ns: &TestNamespace, name: &str, secs: u64) -> DispyJobArrayResource {
    wait_for(&format!("DispyJobArray {name} ended"), secs, async || {
        let a = get_or_seen(&arrays(ns), name).await?;
        match &a.status {
            Some(s)
                if s.total > 0
                    && s.finished + s.failed == s.total
                    && s.completion_time.is_some() =>
            {
                Ok(a)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn an_array_of_2000_jobs_from_a_configmap_runs_each_once_with_one_failing_index() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "dja").await;
    with_operator_log(&client, async {
        let lines: Vec<String> = (0..2000).map(|i| format!("[{i}]")).collect();
        ns.apply(&format!(
            "{CLUSTER}---\n{}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: squares}}\nspec:\n  cluster: sq\n  argsFrom: {{configMapRef: {{name: args, key: jobs}}}}\n",
            args_config_map("args", &lines)
        ))
        .await;
        let a = wait_array_ended(&ns, "squares", 300).await;
        let s = a.status.unwrap();
        assert_eq!((s.total, s.finished, s.failed, s.running), (2000, 1999, 1, 0));
        assert!(s.start_time.is_some());
        let failed = condition(&s.conditions, "Failed").unwrap();
        assert_eq!((failed.status.as_str(), failed.reason.as_str()), ("True", "JobsFailed"));
        assert_eq!(condition(&s.conditions, "Complete").unwrap().status, "False");
        let rows = stored_rows(&ns, "squares").await;
        assert_eq!(rows.len(), 2000);
        for (i, r) in &rows {
            if *i == 7 {
                assert_eq!(r.status, JobStatus::Terminated);
                let tb = r.exception.as_deref().unwrap_or_default();
                assert!(tb.contains("ValueError: seven is not squared here"), "{tb}");
            } else {
                assert_eq!(r.status, JobStatus::Finished, "{r:?}");
                assert_eq!(r.result, Some(serde_json::json!(i * i)), "{r:?}");
                assert!(r.node.as_deref().is_some_and(|n| n.starts_with("sq-node-")));
            }
        }
        // kubectl get dja: the columns
        let out = ns.kubectl(&["get", "dja", "squares"]);
        let (head, body) = table(&out);
        assert_eq!(head, ["NAME", "CLUSTER", "TOTAL", "RUNNING", "FINISHED", "FAILED", "AGE"]);
        assert_eq!(&body[0][..6], ["squares", "sq", "2000", "0", "1999", "1"]);
        // the owner's garbage collection takes the result ConfigMaps with the array
        delete_and_wait(&arrays(&ns), "squares", 60).await;
        wait_for("the result ConfigMaps gone", 60, async || {
            let left = stored_rows(&ns, "squares").await.len();
            if left == 0 { Ok(()) } else { Err(format!("{left} rows left")) }
        })
        .await;
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn kubectl_wait_sees_complete_and_ttl_deletes_the_finished_array() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "djattl").await;
    with_operator_log(&client, async {
        ns.apply(&format!(
            "{CLUSTER}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: few}}\nspec:\n  cluster: sq\n  args: [[1], [2], [3]]\n  ttlSecondsAfterFinished: 3\n"
        ))
        .await;
        let out = ns.kubectl(&["wait", "--for=condition=Complete", "dja/few", "--timeout=120s"]);
        assert!(out.contains("condition met"), "{out}");
        let rows = stored_rows(&ns, "few").await;
        let results: Vec<_> = rows.values().map(|r| r.result.clone().unwrap()).collect();
        assert_eq!(results, [serde_json::json!(1), serde_json::json!(4), serde_json::json!(9)]);
        wait_for("the array deleted by its TTL", 60, async || {
            match arrays(&ns).get_opt("few").await {
                Ok(None) => Ok(()),
                other => Err(format!("{:?}", other.map(|a| a.map(|a| a.status)))),
            }
        })
        .await;
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn the_operator_killed_mid_array_loses_no_index_and_runs_none_twice() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "djakill").await;
    with_operator_log(&client, async {
        // Each job appends its index to a file: how often it ran, whoever stored it.
        let dir = scratch_dir("dja-kill");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("ran");
        let cluster = format!(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {{name: once}}\nspec:\n  computation:\n    python:\n      source: |\n        def once(n):\n            import time\n            with open({log:?}, 'a') as f:\n                f.write('%d\\n' % n)\n            time.sleep(0.2)\n            return n\n      function: once\n  nodes: {{replicas: 2, cpus: 2}}\n",
            log = log.display().to_string()
        );
        let lines: Vec<String> = (0..200).map(|i| format!("[{i}]")).collect();
        let inline = format!("[{}]", lines.join(", "));
        ns.apply(&format!(
            "{cluster}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: once}}\nspec:\n  cluster: once\n  args: {inline}\n"
        ))
        .await;
        wait_for("some rows stored", 120, async || {
            let a = get_or_seen(&arrays(&ns), "once").await?;
            match a.status.map(|s| s.finished) {
                Some(n) if n >= 20 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // SIGKILL the operator: the Deployment starts another, which must go on from the
        // stored rows and what the nodes hold.
        let pod = operator_pod(&client).await;
        let pid = pod_pid(&pod).expect("the operator's process");
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {pid}");
        let a = wait_array_ended(&ns, "once", 300).await;
        let s = a.status.unwrap();
        assert_eq!((s.total, s.finished, s.failed), (200, 200, 0));
        let rows = stored_rows(&ns, "once").await;
        assert_eq!(rows.len(), 200);
        let mut runs: BTreeMap<u32, u32> = BTreeMap::new();
        for l in std::fs::read_to_string(&log).unwrap().lines() {
            *runs.entry(l.parse().unwrap()).or_default() += 1;
        }
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "indexes not run exactly once: {twice:?}");
        assert_eq!(runs.len(), 200);
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart's operator: run by e2e/test.sh"]
async fn a_node_pod_killed_mid_array_has_its_jobs_run_again_when_the_array_is_reentrant() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "djanode").await;
    with_operator_log(&client, async {
        // Each job appends its index to a file when it starts: an index killed mid-run
        // appears twice.
        let dir = scratch_dir("dja-node");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("started");
        // The cluster is not reentrant: only the array's own `reentrant: true` requeues.
        let cluster = format!(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {{name: nap}}\nspec:\n  computation:\n    python:\n      source: |\n        def nap(n):\n            import time\n            with open({log:?}, 'a') as f:\n                f.write('%d\\n' % n)\n            time.sleep(1.5)\n            return n\n      function: nap\n  nodes: {{replicas: 2, cpus: 1}}\n",
            log = log.display().to_string()
        );
        let inline = format!("[{}]", (0..24).map(|i| format!("[{i}]")).collect::<Vec<_>>().join(", "));
        ns.apply(&format!(
            "{cluster}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: nap}}\nspec:\n  cluster: nap\n  reentrant: true\n  args: {inline}\n"
        ))
        .await;
        wait_for("both nodes busy, some rows stored", 120, async || {
            let a = get_or_seen(&arrays(&ns), "nap").await?;
            match a.status.map(|s| (s.finished, s.running)) {
                Some((f, 2)) if f >= 4 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let pods: Api<k8s_openapi::api::core::v1::Pod> = ns.api();
        let pod = pods
            .list(&ListParams::default().labels("dispy.io/cluster=nap"))
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
            .expect("a node pod");
        let pid = pod_pid(&pod).expect("the node pod's process");
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {pid}");
        let a = wait_array_ended(&ns, "nap", 300).await;
        let s = a.status.unwrap();
        assert_eq!((s.total, s.finished, s.failed), (24, 24, 0), "{s:?}");
        let rows = stored_rows(&ns, "nap").await;
        for i in 0..24u32 {
            let row = &rows[&i];
            assert_eq!(row.status, JobStatus::Finished, "{row:?}");
            assert_eq!(row.result, Some(serde_json::json!(i)), "{row:?}");
        }
        let mut starts: BTreeMap<u32, u32> = BTreeMap::new();
        for l in std::fs::read_to_string(&log).unwrap().lines() {
            *starts.entry(l.parse().unwrap()).or_default() += 1;
        }
        assert_eq!(starts.len(), 24, "every index started: {starts:?}");
        let again: Vec<_> = starts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            !again.is_empty(),
            "the killed node's job ran again elsewhere: {starts:?}"
        );
    })
    .await;
    ns.delete().await;
}
