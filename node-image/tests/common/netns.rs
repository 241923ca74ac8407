//! Private network namespaces joined by a veth pair, for discovery tests. Nothing here touches
//! the machine's real interfaces. Creating namespaces needs root: without it the tests fail
//! with a message saying so (they are not skipped).
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Netns {
    pub a: String,
    pub b: String,
    pub children: Vec<Child>,
    pub dir: tempfile::TempDir,
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
    pub fn new(tag: &str) -> Netns {
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

    /// Starts `dispynode` (the binary at `bin`) inside namespace `ns`.
    pub fn start_node(&mut self, bin: &Path, ns: &str, args: &[&str]) {
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("node{}.log", self.children.len())),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(["--daemon", "--dest-path-prefix"])
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

    /// Runs `f` on a thread that has entered namespace `ns`.
    pub fn run_in<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(ns, f)
    }
}

/// Runs `f` on a thread that has entered the named network namespace `ns`.
pub fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
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
