//! `dispy run` of DispyJobArray manifests against real local `dispynode` processes: every
//! index's row, failures, kwargs, errors in `argsFrom`, and the array's own policy.

mod common;

use common::{dispy, run_killing_b_mid_run, start_node};

use std::path::Path;
use std::process::Output;

use serde_json::Value;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// JSON lines, each a row.
fn parse_rows(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

const SQUARE: &str = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: sq}\nspec:\n  computation:\n    python:\n      source: |\n        def sq(n, times=1):\n            print('squaring', n)\n            return n * n * times\n      function: sq\n";

/// A ConfigMap `inputs` with `lines`, and an array `name` of cluster `sq` reading them.
fn array_from_lines(name: &str, lines: &[String]) -> String {
    let data: String = lines.iter().map(|l| format!("    {l}\n")).collect();
    format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: inputs}}\ndata:\n  lines: |\n{data}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: {name}}}\nspec:\n  cluster: sq\n  argsFrom: {{configMapRef: {{name: inputs, key: lines}}}}\n")
}

fn write(dir: &Path, name: &str, yaml: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, yaml).unwrap();
    f.display().to_string()
}

#[test]
fn two_hundred_indexes_from_a_config_map_each_get_their_row_in_index_order() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..200).map(|i| format!("[{i}]")).collect();
    let f = write(
        dir.path(),
        "squares.yaml",
        &format!("{SQUARE}{}", array_from_lines("squares", &lines)),
    );
    let results = dir.path().join("results");
    let out = dispy(&[
        "run",
        "-f",
        &f,
        "--nodes",
        "2",
        "-q",
        "--results-dir",
        results.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(results.join("squares.results.jsonl")).unwrap();
    let rows = parse_rows(&text);
    assert_eq!(rows.len(), 200);
    let mut nodes = std::collections::BTreeSet::new();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["index"], i, "{r}");
        assert_eq!(r["status"], "Finished", "{r}");
        assert_eq!(r["result"], i * i, "{r}");
        assert_eq!(r["stdout"], format!("squaring {i}\n"), "{r}");
        assert!(
            r["startTime"].is_string() && r["endTime"].is_string(),
            "{r}"
        );
        nodes.insert(r["node"].as_str().unwrap().to_string());
    }
    assert_eq!(nodes.len(), 2, "both local nodes ran indexes: {nodes:?}");
    assert_eq!(
        std::fs::read_dir(&results).unwrap().count(),
        1,
        "no spool left"
    );
    // The summary is `kubectl get dja`'s.
    let table = String::from_utf8(out.stdout).unwrap();
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "CLUSTER", "TOTAL", "RUNNING", "FINISHED", "FAILED", "AGE"]
    );
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..6], ["squares", "sq", "200", "0", "200", "0"]);
}

#[test]
fn an_index_that_raises_fails_the_run_with_its_traceback_in_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "divide.yaml",
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: div}\nspec:\n  computation:\n    python:\n      source: |\n        def div(n):\n            return 1 / n\n      function: div\n---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {name: inverses}\nspec: {cluster: div, args: [[1], [0], [4]], ttlSecondsAfterFinished: 10}\n",
    );
    let out = dispy(&["run", "-f", &f, "-o", "jsonl", "-q"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows = parse_rows(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (&rows[0]["status"], &rows[0]["result"]),
        (&"Finished".into(), &1.0.into())
    );
    assert_eq!(
        (&rows[2]["status"], &rows[2]["result"]),
        (&"Finished".into(), &0.25.into())
    );
    let bad = &rows[1];
    assert_eq!(bad["index"], 1);
    assert_eq!(bad["status"], "Terminated", "{bad}");
    let traceback = bad["exception"].as_str().unwrap();
    assert!(traceback.starts_with("Traceback"), "{traceback}");
    assert!(
        traceback.contains("ZeroDivisionError: division by zero"),
        "{traceback}"
    );
    assert!(bad.get("result").is_none(), "{bad}");
}

#[test]
fn kwargs_lines_inline_args_and_a_dispyjob_run_together_and_jsonl_keeps_arrays_apart() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        "[2]".to_string(),
        String::new(),
        r#"{"args": [3], "kwargs": {"times": 10}}"#.to_string(),
        r#"{"kwargs": {"n": 5}}"#.to_string(),
    ];
    let yaml = format!(
        "{SQUARE}{}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: inline}}\nspec: {{cluster: sq, args: [[7], [8, 2]]}}\n---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {{name: alone}}\nspec: {{cluster: sq, args: [9]}}\n",
        array_from_lines("from-lines", &lines)
    );
    let f = write(dir.path(), "mixed.yaml", &yaml);
    let out = dispy(&["run", "-f", &f, "-o", "jsonl", "-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = parse_rows(&String::from_utf8(out.stdout).unwrap());
    // One array after another, in the manifests' order; the blank line is no index.
    let got: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["result"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, [(0, 4), (1, 90), (2, 25), (0, 49), (1, 128)]);
    assert!(rows.iter().all(|r| r["status"] == "Finished"));

    // The same manifests with tables; the array in another namespace writes its results
    // under it, as sent files are.
    let yaml = yaml.replace(
        "kind: DispyJobArray\nmetadata: {name: inline}",
        "kind: DispyJobArray\nmetadata: {name: inline, namespace: team}",
    ) + "---\napiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: sq, namespace: team}\nspec:\n  computation:\n    python: {source: 'def sq(n, m=1): return n * m', function: sq}\n";
    let f = write(dir.path(), "team.yaml", &yaml);
    let results = dir.path().join("r");
    let out = dispy(&[
        "run",
        "-f",
        &f,
        "-q",
        "--results-dir",
        results.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let team = std::fs::read_to_string(results.join("team/inline.results.jsonl")).unwrap();
    assert_eq!(parse_rows(&team)[1]["result"], 16);
    assert_eq!(
        parse_rows(&std::fs::read_to_string(results.join("from-lines.results.jsonl")).unwrap())
            .len(),
        3
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "CLUSTER", "STATUS", "NODE", "RESULT", "AGE"]
    );
    let arrays: Vec<Vec<&str>> = table
        .lines()
        .skip_while(|l| !l.starts_with("NAME") || !l.contains("TOTAL"))
        .map(|l| l.split_whitespace().take(6).collect())
        .collect();
    assert_eq!(
        arrays,
        [
            vec!["NAME", "CLUSTER", "TOTAL", "RUNNING", "FINISHED", "FAILED"],
            vec!["from-lines", "sq", "3", "0", "3", "0"],
            vec!["inline", "sq", "2", "0", "2", "0"],
        ],
        "{table}"
    );
}

#[test]
fn bad_argsfrom_lines_and_missing_keys_are_refused_naming_the_array_config_map_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = ["[1]".to_string(), "[2]".to_string()];
    let bad_line = ["[1]".to_string(), "{\"args\": 3}".to_string()];
    let cases = [
        (
            array_from_lines("a", &bad_line),
            "DispyJobArray default/a: ConfigMap default/inputs key \"lines\": line 2: args is not a list",
        ),
        (
            array_from_lines("a", &["[1".to_string()]),
            "ConfigMap default/inputs key \"lines\": line 1: not JSON",
        ),
        (
            array_from_lines("a", &good).replace("key: lines", "key: rows"),
            "DispyJobArray default/a: ConfigMap default/inputs has no key \"rows\" (spec.argsFrom.configMapRef.key)",
        ),
        (
            array_from_lines("a", &good).replace("name: inputs, key", "name: elsewhere, key"),
            "DispyJobArray default/a: ConfigMap default/elsewhere (spec.argsFrom.configMapRef) is not in the manifests",
        ),
        (
            array_from_lines("a", &good).replace("  argsFrom:", "  args: [[1]]\n  argsFrom:"),
            "(DispyJobArray/a): field spec: set exactly one of args or argsFrom",
        ),
        (
            array_from_lines("a", &good).replace("cluster: sq", "cluster: cube"),
            "DispyJobArray default/a: cluster \"cube\" not found in the manifests",
        ),
    ];
    for (i, (array, expected)) in cases.iter().enumerate() {
        let f = write(
            dir.path(),
            &format!("bad{i}.yaml"),
            &format!("{SQUARE}{array}"),
        );
        let out = dispy(&["run", "-f", &f]);
        assert_eq!(out.status.code(), Some(2), "case {i}");
        assert!(
            stderr(&out).contains(expected),
            "case {i}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn an_array_s_reentrant_overrides_its_cluster_s_when_a_node_is_lost_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b) = (start_node("a", dir.path()), start_node("b", dir.path()));
    // The cluster is not reentrant; the array is.
    let f = write(
        dir.path(),
        "naps.yaml",
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: nap}\nspec:\n  reentrant: false\n  computation:\n    python:\n      source: |\n        import time\n        def nap(n):\n            time.sleep(1)\n            return n\n      function: nap\n---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {name: naps}\nspec: {cluster: nap, reentrant: true, args: [[0], [1], [2], [3], [4], [5]]}\n",
    );
    let out = run_killing_b_mid_run(&f, "jsonl", &a, &mut b);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = parse_rows(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(rows.len(), 6);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(
            (&r["index"], &r["status"], &r["result"]),
            (&i.into(), &"Finished".into(), &i.into()),
            "{r}"
        );
    }
    // The index that was running on b ran again on a.
    assert!(
        rows.iter().filter(|r| r["node"] == "b").count() <= 1,
        "{rows:?}"
    );
    assert!(
        rows.iter().filter(|r| r["node"] == "a").count() >= 5,
        "{rows:?}"
    );
}
