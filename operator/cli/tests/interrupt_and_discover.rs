//! Ctrl-C during a run, and `--discover` across private network namespaces.

mod common;
#[path = "../../../node-image/tests/common/netns.rs"]
mod netns;

use common::{dispynode, repo};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ctrl_c_cancels_jobs_runs_cleanup_stops_local_nodes_and_prints_what_finished() {
    dispynode();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("cleanup-ran");
    let mut yaml = format!(
        "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {{name: slow}}\nspec:\n  nodes: {{cpus: 2}}\n  computation:\n    python:\n      function: f\n      cleanup: cleanup\n      source: |\n        import time\n        def f(t):\n            time.sleep(t)\n            return t\n        def cleanup():\n            open({:?}, 'w').write('yes')\n",
        marker.to_str().unwrap()
    );
    for (i, t) in [0.0, 60.0, 60.0, 60.0].iter().enumerate() {
        yaml.push_str(&format!("---\napiVersion: dispy.io/v1alpha1\nkind: DispyJob\nmetadata: {{name: slow-{i}}}\nspec: {{cluster: slow, args: [{t}]}}\n"));
    }
    let f = dir.path().join("slow.yaml");
    std::fs::write(&f, yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dispy"))
        .args(["run", "-f", f.to_str().unwrap(), "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(2000));
    let started = Instant::now();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "Ctrl-C took {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted: cancelling jobs"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let statuses: Vec<_> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses[0], "Finished", "{statuses:?}");
    // Two were running (2 cpus) and are terminated; the last one never started.
    assert_eq!(
        &statuses[1..],
        ["Terminated", "Terminated", "Cancelled"],
        "{statuses:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "yes",
        "cleanup ran"
    );
    // The local node is gone with its directory.
    assert!(!std::env::temp_dir()
        .join(format!("dispy-run-{pid}"))
        .join("node-1")
        .exists());
}

#[test]
fn discover_finds_a_node_in_another_namespace_and_runs_the_jobs_there() {
    let bin = dispynode();
    let mut net = netns::Netns::new("c");
    let a = net.a.clone();
    net.start_node(
        bin,
        &a,
        &["--port", "9701", "--cpus", "2", "--name", "far-node"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let examples = repo().join("docs/examples/checksums.yaml");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.b,
            env!("CARGO_BIN_EXE_dispy"),
            "run",
            "--discover",
            "-q",
            "-o",
            "json",
            "-f",
        ])
        .arg(examples)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for item in v["items"].as_array().unwrap() {
        assert_eq!(item["status"]["status"], "Finished");
        assert_eq!(item["status"]["node"], "far-node");
    }
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.b,
            env!("CARGO_BIN_EXE_dispy"),
            "nodes",
            "--discover",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.231.0.1:9701") && text.contains("far-node"),
        "{text}"
    );
}
