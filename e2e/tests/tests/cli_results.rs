//! `dispy results dja/NAME` against the API server: an array's result ConfigMaps, written
//! here by hand as the operator writes them (label `dispy.io/job-array`, key
//! `results.jsonl`, chunks `<name>-results-<n>`), come out as JSON lines in index order, a
//! later chunk's row of an index winning; `--status` filters; a missing array says so. No
//! operator runs here: the array's status is written through the status subresource.

use std::process::{Command, Output};

use dispy_core::array::{chunk_name, line, row};
use dispy_core::job::{JobResult, JobStatus};
use dispy_core::manifest::{ArrayResult, DispyJobArrayResource, JOB_ARRAY_LABEL, RESULTS_KEY};
use dispy_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// `target/debug/dispy ARGS` (built here when missing or out of date).
fn dispy(args: &[&str]) -> Output {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "dispy-cli"])
            .current_dir(repo_path("."))
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p dispy-cli failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_path("target"));
    Command::new(target.join("debug/dispy"))
        .args(args)
        .output()
        .expect("run target/debug/dispy")
}

/// A node's result; `None` as for a job that raised.
fn result(status: JobStatus, value: Option<&str>) -> JobResult {
    JobResult {
        status,
        result: value.map(String::from),
        start_time: Some(1.0),
        end_time: Some(2.0),
        ..Default::default()
    }
}

async fn results_config_map(ns: &TestNamespace, array: &str, n: u32, rows: &[ArrayResult]) {
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": chunk_name(array, n), "labels": {JOB_ARRAY_LABEL: array}},
        "data": {RESULTS_KEY: rows.iter().map(line).collect::<String>()},
    }))
    .unwrap();
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .unwrap_or_else(|e| panic!("create {}: {e}", chunk_name(array, n)));
}

#[tokio::test]
#[ignore = "needs the e2e cluster: run by e2e/test.sh"]
async fn dispy_results_prints_an_array_s_rows_from_its_config_maps_in_index_order() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "cli-results").await;
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let results = |args: &[&str]| {
        let mut all = vec!["results", "--kubeconfig", &kubeconfig, "-n", &ns.name];
        all.extend_from_slice(args);
        dispy(&all)
    };

    // An array of 5 with rows for 4: chunk 0 holds 0, 1 (Abandoned, then rerun) and 3;
    // chunk 1, written later, holds 1 again (Finished) and 2 (Terminated).
    ns.apply(
        "apiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {name: sq}\nspec: {cluster: c, args: [[0], [1], [2], [3], [4]]}\n",
    )
    .await;
    let arrays: Api<DispyJobArrayResource> = ns.api();
    arrays
        .patch_status(
            "sq",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"total": 5, "finished": 3, "failed": 1}})),
        )
        .await
        .unwrap();
    let chunk0 = [
        row(
            3,
            &result(JobStatus::Finished, Some("9")),
            Some("n1".into()),
        ),
        row(
            0,
            &result(JobStatus::Finished, Some("0")),
            Some("n1".into()),
        ),
        row(1, &result(JobStatus::Abandoned, None), None),
    ];
    let mut raised = result(JobStatus::Terminated, None);
    raised.exception = Some("Traceback ...\nZeroDivisionError: division by zero\n".into());
    let chunk1 = [
        row(
            1,
            &result(JobStatus::Finished, Some("1")),
            Some("n2".into()),
        ),
        row(2, &raised, Some("n2".into())),
    ];
    results_config_map(&ns, "sq", 0, &chunk0).await;
    results_config_map(&ns, "sq", 1, &chunk1).await;
    // Another array's rows stay out.
    let other = [row(7, &result(JobStatus::Finished, Some("49")), None)];
    results_config_map(&ns, "sq-other", 0, &other).await;

    let out = results(&["dja/sq"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let expected: String = [&chunk0[1], &chunk1[0], &chunk1[1], &chunk0[0]]
        .into_iter()
        .map(line)
        .collect();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    assert!(
        stderr.contains(&format!(
            "DispyJobArray {}/sq: 4 of 5 indexes have a row; the others have not ended",
            ns.name
        )),
        "{stderr}"
    );

    let out = results(&["dispyjobarray/sq", "--status", "Terminated,Abandoned"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), line(&chunk1[1]));

    // An array with no results yet, and one that is not there.
    ns.apply(
        "apiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {name: later}\nspec: {cluster: c, args: [[0]]}\n",
    )
    .await;
    let out = results(&["dja/later"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "DispyJobArray {}/later has no results yet",
            ns.name
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = results(&["dja/nothing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("DispyJobArray {}/nothing not found", ns.name)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.delete().await;
}
