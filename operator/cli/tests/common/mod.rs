//! Shared by the CLI's integration tests.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The dispynode binary beside `dispy` (built here when `cargo test -p dispy-cli` ran alone).
pub fn dispynode() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(env!("CARGO_BIN_EXE_dispy")).with_file_name("dispynode");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "dispynode"])
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(
            status.success() && bin.exists(),
            "building dispynode failed"
        );
        bin
    })
}

/// `dispy ARGS` from the repository, dispynode built.
pub fn dispy(args: &[&str]) -> Output {
    dispynode();
    Command::new(env!("CARGO_BIN_EXE_dispy"))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A dispynode with one cpu on 127.0.0.1, killed when dropped.
pub struct Node(pub Child, pub String);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_node(name: &str, dir: &Path) -> Node {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(dispynode())
        .args([
            "-i",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--daemon",
            "--cpus",
            "1",
            "--name",
            name,
        ])
        .arg("--dest-path-prefix")
        .arg(dir.join(name))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "node {name} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Node(child, addr)
}

/// `dispy run -f MANIFEST -o OUTPUT -q` on nodes `a` and `b`, `b` killed (SIGKILL) 1.5 s in.
pub fn run_killing_b_mid_run(manifest: &str, output: &str, a: &Node, b: &mut Node) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_dispy"))
        .args(["run", "-f", manifest, "-o", output, "-q"])
        .args(["--node", &a.1, "--node", &b.1])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    b.0.kill().unwrap();
    run.wait_with_output().unwrap()
}
