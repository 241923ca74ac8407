//! `dispy run` against real local `dispynode` processes.

mod common;

use common::{dispy, dispynode, repo, run_killing_b_mid_run, start_node};

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn json_items(out: &Output) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["items"].as_array().unwrap().clone()
}

fn status_of<'a>(items: &'a [Value], name: &str) -> &'a Value {
    &items
        .iter()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no job {name}"))["status"]
}

fn python_hash(algorithm: &str, data: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", &format!("import hashlib,sys; print(hashlib.new('{algorithm}', sys.stdin.buffer.read()).hexdigest())")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn checksums_example_gives_each_algorithms_digest() {
    let out = dispy(&[
        "run",
        "-f",
        "docs/examples/checksums.yaml",
        "-o",
        "json",
        "-q",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items = json_items(&out);
    let data = "The quick brown fox jumps over the lazy dog.\ndispy ships a computation to nodes and runs jobs on them.\n";
    for alg in ["md5", "sha1", "sha256", "sha512"] {
        let s = status_of(&items, &format!("checksums-{alg}"));
        assert_eq!(s["status"], "Finished");
        assert_eq!(s["result"], python_hash(alg, data), "{alg}");
        assert_eq!(s["stdout"], format!("{alg} {} bytes\n", data.len()));
        assert_eq!(s["node"], "local-1");
    }
}

#[test]
fn program_example_returns_exit_codes_and_output() {
    let out = dispy(&[
        "run",
        "-f",
        "docs/examples/program.yaml",
        "-o",
        "json",
        "-q",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items = json_items(&out);
    let a = status_of(&items, "sha1sum-a");
    assert_eq!(a["result"], 0);
    assert_eq!(
        a["stdout"],
        format!("{}  a.txt\n", python_hash("sha1", "alpha\n"))
    );
    let both = status_of(&items, "sha1sum-both");
    assert_eq!(both["stdout"].as_str().unwrap().lines().count(), 2);
}

#[test]
fn a_raising_job_is_terminated_with_its_traceback_and_the_exit_status_is_1() {
    let out = dispy(&["run", "-f", "docs/examples/raises.yaml", "-o", "json", "-q"]);
    assert_eq!(out.status.code(), Some(1));
    let items = json_items(&out);
    assert_eq!(status_of(&items, "divide-ok")["result"], 0.25);
    let bad = status_of(&items, "divide-by-zero");
    assert_eq!(bad["status"], "Terminated");
    assert!(bad["exception"]
        .as_str()
        .unwrap()
        .contains("ZeroDivisionError: division by zero"));
}

#[test]
fn a_pinned_job_runs_on_its_node_and_the_table_is_printed() {
    let out = dispy(&[
        "run",
        "-f",
        "docs/examples/pinned.yaml",
        "--nodes",
        "2",
        "-q",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "CLUSTER", "STATUS", "NODE", "RESULT", "AGE"]
    );
    let pinned: Vec<_> = lines
        .find(|l| l.starts_with("where-pinned"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &pinned[..4],
        ["where-pinned", "where", "Finished", "local-2"]
    );
    assert!(pinned[4].contains("local-2"), "{text}");
    // Pinned to a node that is not there: Abandoned, with the reason.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("nowhere.yaml");
    std::fs::write(
        &f,
        std::fs::read_to_string(repo().join("docs/examples/pinned.yaml"))
            .unwrap()
            .replace("node: local-2", "node: elsewhere"),
    )
    .unwrap();
    let out = dispy(&["run", "-f", f.to_str().unwrap(), "-o", "json", "-q"]);
    assert_eq!(out.status.code(), Some(1));
    let items = json_items(&out);
    let s = status_of(&items, "where-pinned");
    assert_eq!(s["status"], "Abandoned");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("\"elsewhere\" is not one of the nodes"),
        "{s}"
    );
    assert_eq!(status_of(&items, "where-free")["status"], "Finished");
}

fn many_jobs_manifest(n: usize, reentrant: bool, sleep: f64) -> String {
    let mut y = format!(
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {{name: sq}}\nspec:\n  reentrant: {reentrant}\n  computation:\n    python:\n      source: |\n        import time\n        def sq(n):\n            time.sleep({sleep})\n            return n * n\n      function: sq\n"
    );
    for i in 0..n {
        y.push_str(&format!("---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {{name: sq-{i}}}\nspec: {{cluster: sq, args: [{i}]}}\n"));
    }
    y
}

#[test]
fn five_hundred_jobs_over_two_local_nodes_all_finish_with_correct_results() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("many.yaml");
    std::fs::write(&f, many_jobs_manifest(500, false, 0.0)).unwrap();
    let out = dispy(&[
        "run",
        "-f",
        f.to_str().unwrap(),
        "--nodes",
        "2",
        "-o",
        "json",
        "-q",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items = json_items(&out);
    assert_eq!(items.len(), 500);
    let mut per_node = std::collections::BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["metadata"]["name"], format!("sq-{i}"));
        assert_eq!(item["status"]["status"], "Finished");
        assert_eq!(item["status"]["result"], (i * i) as u64);
        *per_node
            .entry(item["status"]["node"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(per_node.len(), 2, "both nodes ran jobs: {per_node:?}");
}

/// Six 1-second jobs on nodes a and b (one cpu each); b is killed with SIGKILL mid-run.
fn run_and_kill_b(reentrant: bool) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b) = (start_node("a", dir.path()), start_node("b", dir.path()));
    let f = dir.path().join("jobs.yaml");
    std::fs::write(&f, many_jobs_manifest(6, reentrant, 1.0)).unwrap();
    let out = run_killing_b_mid_run(f.to_str().unwrap(), "json", &a, &mut b);
    assert_eq!(
        out.status.code(),
        Some(if reentrant { 0 } else { 1 }),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_items(&out)
}

#[test]
fn a_node_killed_mid_run_with_reentrant_jobs_requeues_them_on_the_other_node() {
    let items = run_and_kill_b(true);
    let mut requeued = 0;
    for (i, item) in items.iter().enumerate() {
        let s = &item["status"];
        assert_eq!(s["status"], "Finished", "{item}");
        assert_eq!(s["result"], (i * i) as u64);
        if s["attempts"] == 2 {
            requeued += 1;
            assert_eq!(
                s["node"], "a",
                "a requeued job finished on the remaining node"
            );
        }
    }
    assert_eq!(
        requeued, 1,
        "the one job running on b when it died ran again on a"
    );
}

#[test]
fn a_node_killed_mid_run_without_reentrant_abandons_its_running_job() {
    let items = run_and_kill_b(false);
    let abandoned: Vec<_> = items
        .iter()
        .filter(|i| i["status"]["status"] == "Abandoned")
        .collect();
    assert_eq!(abandoned.len(), 1, "{items:?}");
    assert!(
        abandoned[0]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not reentrant"),
        "{:?}",
        abandoned[0]
    );
    let finished = items
        .iter()
        .filter(|i| i["status"]["status"] == "Finished")
        .count();
    assert_eq!(finished, 5);
}

#[test]
fn invalid_manifests_are_rejected_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: c}\nspec: {nodes: {cpu: 2}}\n", "document 1 (JobCluster/c): field spec.nodes.cpu: unknown field `cpu`"),
        ("apiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: j}\nspec: {cluster: missing}\n", "DispyJob default/j: cluster \"missing\" not found in the manifests"),
        ("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: c}\nspec: {computation: {python: {function: f}}}\n", "field spec.computation.python: set exactly one of source or configMapRef"),
        ("apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: c}\nspec:\n  computation: {program: {command: [ls]}}\n  depends: [{configMapRef: {name: gone}}]\n", "JobCluster default/c: ConfigMap default/gone (in depends) is not in the manifests"),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let out = dispy(&["run", "-f", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "case {i}: {err}");
    }
    let out = dispy(&["run", "-f", "/no/such/file.yaml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /no/such/file.yaml"));
}

#[test]
fn nodes_lists_cpus_busy_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node("lister", dir.path());
    let out = dispy(&["nodes", "--node", &a.1]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let row: Vec<_> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], [a.1.as_str(), "lister", "1", "0", "0"]);
    let out = dispy(&["nodes", "--node", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to node 127.0.0.1:1"));
}

#[test]
fn provisional_results_and_sent_files_of_the_progress_example_reach_the_status_and_files_dir() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let out = dispy(&[
        "run",
        "-f",
        "docs/examples/progress.yaml",
        "-o",
        "json",
        "-q",
        "--files-dir",
        files.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items = json_items(&out);
    let s = status_of(&items, "progress-primes");
    assert_eq!(s["status"], "Finished", "{s}");
    assert_eq!(s["result"], 1229, "primes below 10000");
    // The last of the four provisional results: 9999 is not a multiple of 2500.
    assert_eq!(
        s["provisionalResult"],
        serde_json::json!({"checked": 7500, "primes": 950}),
        "{s}"
    );
    let saved = files.join("progress-primes").join("primes.txt");
    assert_eq!(s["sentFiles"][0]["name"], "primes.txt", "{s}");
    assert_eq!(
        s["sentFiles"][0]["savedAs"],
        saved.display().to_string(),
        "{s}"
    );
    let text = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(text.lines().count(), 1229);
    assert_eq!(s["sentFiles"][0]["size"], text.len());
    assert!(text.ends_with("9973\n"), "{}", &text[text.len() - 20..]);
}

#[test]
fn active_deadline_seconds_terminates_a_job_that_runs_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("deadline.yaml");
    std::fs::write(
        &f,
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: nap}\nspec:\n  computation:\n    program: {command: [sleep]}\n---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: nap-long}\nspec: {cluster: nap, args: [\"30\"], activeDeadlineSeconds: 1}\n---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {name: nap-short}\nspec: {cluster: nap, args: [\"0\"], activeDeadlineSeconds: 20}\n",
    )
    .unwrap();
    dispynode();
    let started = Instant::now();
    let out = dispy(&["run", "-f", f.to_str().unwrap(), "-o", "json", "-q"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let items = json_items(&out);
    let long = status_of(&items, "nap-long");
    assert_eq!(long["status"], "Terminated", "{long}");
    assert!(
        long["message"]
            .as_str()
            .unwrap()
            .contains("activeDeadlineSeconds"),
        "{long}"
    );
    assert_eq!(status_of(&items, "nap-short")["status"], "Finished");
}
