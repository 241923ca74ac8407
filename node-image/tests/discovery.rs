//! UDP discovery between two private network namespaces joined by a veth pair. Nothing here
//! touches the machine's real interfaces. Needs root (to create namespaces); it fails, rather
//! than skips, without it.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispy_core::discovery::discover;
use dispy_core::protocol::*;
use dispy_core::NodeClient;
use serde_json::json;

struct Netns {
    a: String,
    b: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (these tests need root to create network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Namespaces A (10.231.0.1) and B (10.231.0.2) on one /24 through a veth pair.
    fn new(tag: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("dspy{tag}a{id}"), format!("dspy{tag}b{id}"));
        let (va, vb) = (format!("v{tag}a{id}"), format!("v{tag}b{id}"));
        ip(&["netns", "add", &a]);
        let ns = Netns {
            a: a.clone(),
            b: b.clone(),
            children: vec![],
            dir: tempfile::tempdir().unwrap(),
        };
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        for (ns, dev, addr) in [(&a, &va, "10.231.0.1/24"), (&b, &vb, "10.231.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "brd", "+", "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ns
    }

    fn start_node(&mut self, ns: &str, args: &[&str]) {
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("node{}.log", self.children.len())),
        )
        .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_dispynode"),
                "--daemon",
                "--dest-path-prefix",
            ])
            .arg(
                self.dir
                    .path()
                    .join(format!("prefix{}", self.children.len())),
            )
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Runs `f` on a thread that has entered namespace `ns`, with its own tokio runtime.
    fn run_in<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only; network namespaces may be entered per thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_node_is_announced_and_found_by_broadcast_in_a_private_namespace() {
    let mut net = Netns::new("d");
    // A client in B listens on the client port for announcements before the nodes start.
    let listener = net.run_in(&net.b.clone(), || {
        std::net::UdpSocket::bind("0.0.0.0:9700").unwrap()
    });
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let a = net.a.clone();
    // One node bound to all interfaces, one bound to loopback only (it must not announce).
    net.start_node(&a, &["--port", "9701", "--cpus", "2", "--name", "node-a"]);
    net.start_node(
        &a,
        &[
            "-i",
            "127.0.0.1",
            "--port",
            "9801",
            "--name",
            "loopback-only",
        ],
    );

    let mut buf = [0u8; 2048];
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("the node's announcement");
    let Some(Ok(Discovery::Pong(ann))) = decode_datagram(&buf[..n]) else {
        panic!("not an announcement")
    };
    assert_eq!(from.ip().to_string(), "10.231.0.1");
    assert_eq!(
        (ann.name.as_str(), ann.addr.as_str(), ann.port, ann.cpus),
        ("node-a", "10.231.0.1", 9701, 2)
    );
    listener
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    if let Ok((n, _)) = listener.recv_from(&mut buf) {
        let extra = decode_datagram(&buf[..n]);
        panic!(
            "a second announcement arrived (the loopback-only node must stay silent): {extra:?}"
        );
    }

    // Broadcast discovery from B finds exactly node-a, then B runs a job on it over TCP.
    let found = net.run_in(&net.b.clone(), || {
        rt().block_on(async {
            let target: SocketAddr = "10.231.0.255:9701".parse().unwrap();
            let nodes = discover(
                "0.0.0.0:0".parse().unwrap(),
                &[target],
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            let node = nodes.first().cloned().expect("a node answered");
            let (client, mut events) =
                NodeClient::connect(&format!("{}:{}", node.addr, node.port), &common::config(""))
                    .await
                    .unwrap();
            common::open(
                &client,
                "far",
                Computation::Python(common::python(
                    "def f():\n    return dispy_node_name\n",
                    "f",
                )),
                &[],
            )
            .await;
            client
                .submit("far", common::job(1, json!([])))
                .await
                .unwrap();
            let done = common::collect(&mut events, 1, Duration::from_secs(30)).await;
            (nodes, common::finished(&done[&1]).to_string())
        })
    });
    let (nodes, result) = found;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].addr, "10.231.0.1");
    assert_eq!(result, "\"node-a\"");
}
