//! `dispynetrelay` between two subnets that meet only at the relay: private network
//! namespaces C (clients, 10.231.0.0/25), R (the relay, on both) and N (nodes,
//! 10.231.0.128/25). Broadcasts stay inside the namespaces; nothing here touches the machine's
//! real interfaces. Needs root (namespaces): without it each test says so and returns.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cli::{dispy_cli, repo};
use dispy_core::protocol::{decode_datagram, Discovery, NodeAnnouncement};

const CLIENT: &str = "10.231.0.2";
const NODE: &str = "10.231.0.130";

fn is_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root (network namespaces); CI runs as root");
    }
    root
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three namespaces: C and N each joined to R by a veth pair, R forwarding between them.
struct Subnets {
    c: String,
    r: String,
    n: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Subnets {
    fn new(tag: &str) -> Subnets {
        let id = std::process::id() % 100_000;
        let ns = |x: &str| format!("dspy{tag}{x}{id}");
        let s = Subnets {
            c: ns("c"),
            r: ns("r"),
            n: ns("n"),
            children: vec![],
            dir: tempfile::tempdir().unwrap(),
        };
        for n in [&s.c, &s.r, &s.n] {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        // (namespace, device, address) at each end of the two links.
        let links = [
            (
                (&s.c, format!("v{tag}c{id}"), "10.231.0.2/25"),
                (&s.r, format!("v{tag}rc{id}"), "10.231.0.1/25"),
            ),
            (
                (&s.n, format!("v{tag}n{id}"), "10.231.0.130/25"),
                (&s.r, format!("v{tag}rn{id}"), "10.231.0.129/25"),
            ),
        ];
        for ((ns1, d1, a1), (ns2, d2, a2)) in &links {
            ip(&["link", "add", d1, "type", "veth", "peer", "name", d2]);
            for (ns, d, a) in [(ns1, d1, a1), (ns2, d2, a2)] {
                ip(&["link", "set", d, "netns", ns]);
                ip(&["-n", ns, "addr", "add", a, "brd", "+", "dev", d]);
                ip(&["-n", ns, "link", "set", d, "up"]);
            }
        }
        // Unicast crosses R (clients must reach the nodes they find); broadcast does not.
        ip(&[
            "-n",
            &s.c,
            "route",
            "add",
            "10.231.0.128/25",
            "via",
            "10.231.0.1",
        ]);
        ip(&[
            "-n",
            &s.n,
            "route",
            "add",
            "10.231.0.0/25",
            "via",
            "10.231.0.129",
        ]);
        let fwd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &s.r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .unwrap();
        assert!(fwd.success());
        s
    }

    fn spawn(&mut self, ns: &str, bin: &Path, args: &[&str], log: &str) -> PathBuf {
        let log = self.dir.path().join(log);
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
        log
    }

    fn start_node(&mut self, name: &str, port: u16) -> PathBuf {
        let prefix = self.dir.path().join(name);
        let n = self.n.clone();
        self.spawn(
            &n,
            Path::new(env!("CARGO_BIN_EXE_dispynode")),
            &[
                "--daemon",
                "--port",
                &port.to_string(),
                "--cpus",
                "2",
                "--name",
                name,
                "--dest-path-prefix",
                prefix.to_str().unwrap(),
            ],
            &format!("{name}.log"),
        )
    }

    fn start_relay(&mut self, args: &[&str]) -> PathBuf {
        let r = self.r.clone();
        let mut all = vec!["--daemon"];
        all.extend_from_slice(args);
        let log = self.spawn(
            &r,
            Path::new(env!("CARGO_BIN_EXE_dispynetrelay")),
            &all,
            "relay.log",
        );
        wait_for(&log, "dispynetrelay relaying");
        log
    }

    fn dispy(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.c])
            .arg(dispy_cli())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `f` on a thread inside namespace `ns`.
    fn run_in<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::run_in(ns, f)
    }
}

impl Drop for Subnets {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in [&self.c, &self.r, &self.n] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_for(log: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log_of(log).contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log:\n{}",
            log_of(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_finds_a_node_on_another_subnet_through_the_relay_and_runs_jobs_on_it() {
    if !is_root("a_client_finds_a_node_on_another_subnet_through_the_relay_and_runs_jobs_on_it") {
        return;
    }
    let mut net = Subnets::new("ra");
    let node_log = net.start_node("far-node", 9701);
    wait_for(&node_log, "serving");

    // Without the relay, the client's broadcast does not reach the node's subnet.
    let out = net.dispy(&["nodes", "--discover"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("far-node"), "found without a relay:\n{text}");

    let relay_log = net.start_relay(&[]);
    let started = Instant::now();
    let out = net.dispy(&["nodes", "--discover"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("{NODE}:9701")) && text.contains("far-node"),
        "{text}\n{}\nrelay log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_of(&relay_log)
    );
    eprintln!(
        "discovery through the relay: {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert!(log_of(&relay_log).contains("relaying a discovery ping"));

    // The address it found is one the client can use (routed through R).
    let examples = repo().join("docs/examples/checksums.yaml");
    let out = net.dispy(&[
        "run",
        "--discover",
        "-q",
        "-o",
        "json",
        "-f",
        examples.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nrelay log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_of(&relay_log)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    for item in items {
        assert_eq!(item["status"]["status"], "Finished", "{item}");
        assert_eq!(item["status"]["node"], "far-node", "{item}");
    }
}

fn announcement(sock: &std::net::UdpSocket) -> (std::net::SocketAddr, NodeAnnouncement) {
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("a node announcement through the relay");
    match decode_datagram(&buf[..n]) {
        Some(Ok(Discovery::Pong(a))) => (from, a),
        other => panic!("not an announcement: {other:?}"),
    }
}

#[test]
fn the_relay_tells_its_scheduler_node_of_nodes_up_before_it_and_of_nodes_that_start_later() {
    if !is_root(
        "the_relay_tells_its_scheduler_node_of_nodes_up_before_it_and_of_nodes_that_start_later",
    ) {
        return;
    }
    let mut net = Subnets::new("rb");
    let early = net.start_node("early-node", 9701);
    wait_for(&early, "serving");
    // The scheduler listens on the client port in C.
    let sock = net.run_in(&net.c.clone(), || {
        std::net::UdpSocket::bind("0.0.0.0:9700").unwrap()
    });
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let relay_log = net.start_relay(&["--scheduler-node", CLIENT]);
    // The relay's own ping at start: early-node's answer, forwarded by the relay.
    let (from, a) = announcement(&sock);
    assert_eq!(
        from.ip().to_string(),
        "10.231.0.1",
        "forwarded by the relay"
    );
    assert_eq!(
        (a.name.as_str(), a.addr.as_str(), a.port),
        ("early-node", NODE, 9701)
    );

    // A node that starts later announces itself on its subnet; the relay passes it on.
    net.start_node("late-node", 9702);
    let (_, a) = announcement(&sock);
    assert_eq!(
        (a.name.as_str(), a.addr.as_str(), a.port),
        ("late-node", NODE, 9702),
        "relay log:\n{}",
        log_of(&relay_log)
    );
    assert!(log_of(&relay_log).contains("forwarding a node's announcement"));
}
