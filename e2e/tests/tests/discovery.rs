//! `spec.nodes.discover`: the operator finds a bare-metal dispynode by UDP broadcast and runs
//! a job there. Broadcasts must stay off the machine's real interfaces, so the operator runs
//! in a private network namespace A joined by a veth pair to namespace B, where the node runs;
//! socat in A forwards A's 127.0.0.1:<API port> to the API server in the test's namespace.
//! The operator watches only the test's namespace and runs while the chart's does not (two
//! operators must not share a JobCluster). Needs root, `ip`, `socat` and `nsenter`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use dispy_core::job::JobStatus;
use dispy_e2e::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};

/// The network namespaces and the processes in them; removed when dropped: the test's
/// namespace first (while the operator runs, so its finalizers go), then the processes by
/// PID, then the network namespaces.
struct PrivateNetwork {
    netns: [String; 2],
    children: Vec<Child>,
    k8s_namespace: String,
    dir: PathBuf,
}

impl PrivateNetwork {
    fn spawn(&mut self, args: &[&str], log: &str) {
        let out = std::fs::File::create(self.dir.join(log)).unwrap();
        let child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", args.join(" ")));
        self.children.push(child);
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for PrivateNetwork {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log("operator.log");
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- operator log\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = kubectl_output(&[
            "delete",
            "namespace",
            &self.k8s_namespace,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
        ]);
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(status.success(), "{} failed", args.join(" "));
}

/// The API server's port, from the kubeconfig's `server: https://127.0.0.1:PORT`.
fn api_port() -> String {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: https://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no API server on 127.0.0.1 in {path}"))
        .to_string()
}

#[tokio::test]
#[ignore = "needs the e2e cluster, root, and no other operator: run by e2e/test.sh"]
async fn the_operator_discovers_a_bare_metal_node_by_udp_broadcast_and_runs_a_job_there() {
    let client = client().await;
    let tag = std::process::id();
    let (a, b) = (format!("dspyopa{tag}"), format!("dspyopb{tag}"));
    let (va, vb) = (format!("vopa{tag}"), format!("vopb{tag}"));
    let ns = TestNamespace::create(&client, "discover").await;
    let mut net = PrivateNetwork {
        netns: [a.clone(), b.clone()],
        children: Vec::new(),
        k8s_namespace: ns.name.clone(),
        dir: scratch_dir("discover"),
    };
    run(&["ip", "netns", "add", &a]);
    run(&["ip", "netns", "add", &b]);
    run(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ]);
    run(&["ip", "link", "set", &va, "netns", &a]);
    run(&["ip", "link", "set", &vb, "netns", &b]);
    run(&[
        "ip",
        "-n",
        &a,
        "addr",
        "add",
        "10.232.0.1/24",
        "brd",
        "+",
        "dev",
        &va,
    ]);
    run(&[
        "ip",
        "-n",
        &b,
        "addr",
        "add",
        "10.232.0.2/24",
        "brd",
        "+",
        "dev",
        &vb,
    ]);
    for (ns, dev) in [(&a, &va), (&b, &vb)] {
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let port = api_port();
    let root_net = format!("/proc/{}/ns/net", std::process::id());
    net.spawn(
        &[
            "ip",
            "netns",
            "exec",
            &a,
            "socat",
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
            &format!("EXEC:nsenter --net={root_net} socat STDIO TCP\\:127.0.0.1\\:{port}"),
        ],
        "socat.log",
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target"))
        .join("debug");
    let node_dir = net.dir.join("node");
    // on every address of B: a node bound to one address does not hear broadcasts
    net.spawn(
        &[
            "ip",
            "netns",
            "exec",
            &b,
            &target.join("dispynode").to_string_lossy(),
            "--secret",
            "disc-secret",
            "--cpus",
            "1",
            "--name",
            "far-node",
            "--daemon",
            "--dest-path-prefix",
            &node_dir.to_string_lossy(),
        ],
        "node.log",
    );
    let kubeconfig = std::env::var("KUBECONFIG").unwrap();
    net.spawn(
        &[
            "ip",
            "netns",
            "exec",
            &a,
            "env",
            &format!("KUBECONFIG={kubeconfig}"),
            "RUST_LOG=info",
            &target.join("dispy-operator").to_string_lossy(),
            "run",
            "--namespaces",
            &ns.name,
            "--metrics-addr",
            "127.0.0.1:18091",
            "--log-format",
            "text",
        ],
        "operator.log",
    );

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "disc"}, "stringData": {"secret": "disc-secret"}
    }))
    .unwrap();
    let secrets: Api<Secret> = ns.api();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    ns.apply(
        r#"
apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {name: found}
spec:
  secretRef: {name: disc}
  nodes: {replicas: 0, discover: true}
  computation:
    python:
      function: where
      source: |
        def where(n):
            return [n * n, os.getcwd()]
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {name: found-1}
spec: {cluster: found, args: [7]}
"#,
    )
    .await;
    let job = wait_job(&ns.jobs(), "found-1", JobStatus::Finished, 60).await;
    let status = job.status.unwrap();
    assert_eq!(
        status.node.as_deref(),
        Some("far-node"),
        "ran on the discovered node"
    );
    // it ran in the node's own directory for the computation, in namespace B
    let result = status.result.unwrap_or_default();
    assert_eq!(result[0], 49, "result {result}");
    assert!(
        result[1]
            .as_str()
            .is_some_and(|cwd| cwd.starts_with(&format!("{}/", node_dir.display()))),
        "the job's directory: {result}"
    );
    let clusters = ns.clusters();
    wait_for(
        "the discovered node in the JobCluster's status",
        30,
        async || {
            let jc = get_or_seen(&clusters, "found").await?;
            let nodes = jc.status.map(|s| s.node_summary).unwrap_or_default();
            match nodes.first() {
                Some(n) if n.address == "10.232.0.2:9701" && n.name == "far-node" => Ok(()),
                _ => Err(format!("{nodes:?}")),
            }
        },
    )
    .await;
    ns.delete().await;
    drop(net);
}
