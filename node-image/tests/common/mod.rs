//! Test harness: real `dispynode` processes on 127.0.0.1 driven by the core client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispy_core::job::{JobId, JobResult, JobStatus};
use dispy_core::protocol::*;
use dispy_core::{ClientConfig, ClientEvent, NodeClient};
use tokio::sync::mpsc::UnboundedReceiver;

pub struct NodeProc {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub metrics_port: Option<u16>,
}

pub fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What a test may add to how its node is started.
#[derive(Default)]
pub struct Launch<'a> {
    /// Environment variables of the node.
    pub env: &'a [(&'a str, &'a str)],
    /// Runs the node as this uid and gid (the tests run as root, whom no process hides from).
    /// The interpreter must then be one that user can run: see [`PYTHON_FOR_ANY_USER`].
    pub user: Option<u32>,
    /// The node's address-space limit (RLIMIT_AS, inherited by its children), so that a
    /// node that balloons fails the test rather than the machine.
    pub address_space: Option<u64>,
    /// A shell command started in the background by a shell that then becomes the node
    /// (`command & exec dispynode …`), so the node starts with a child of its own.
    pub background: Option<&'a str>,
}

/// The system's interpreter, which any user may run (the one on PATH may be in root's home).
pub const PYTHON_FOR_ANY_USER: &str = "/usr/bin/python3";

/// The uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;

impl NodeProc {
    /// Starts `dispynode -i 127.0.0.1 --port <free>` with extra args and waits until it serves.
    pub async fn start(extra: &[&str]) -> NodeProc {
        Self::start_with(extra, None).await
    }

    pub async fn start_with(extra: &[&str], secret: Option<&str>) -> NodeProc {
        let mut args = extra.to_vec();
        if let Some(s) = secret {
            args.extend(["--secret", s]);
        }
        Self::launch(&args, Launch::default()).await
    }

    /// With `max_address_space` (bytes) as the node's RLIMIT_AS: a test that could make the
    /// node balloon fails instead of taking the machine's memory.
    pub async fn start_within(
        extra: &[&str],
        secret: Option<&str>,
        max_address_space: Option<u64>,
    ) -> NodeProc {
        let mut args = extra.to_vec();
        if let Some(s) = secret {
            args.extend(["--secret", s]);
        }
        let launch = Launch {
            address_space: max_address_space,
            ..Launch::default()
        };
        Self::launch(&args, launch).await
    }

    /// Starts a node as [`NodeProc::start`] does, with what `launch` adds.
    pub async fn launch(extra: &[&str], launch: Launch<'_>) -> NodeProc {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let node = env!("CARGO_BIN_EXE_dispynode");
        let mut cmd = match launch.background {
            None => Command::new(node),
            Some(background) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("{background} & exec \"$0\" \"$@\""))
                    .arg(node);
                sh
            }
        };
        cmd.args(["-i", "127.0.0.1", "--port", &port.to_string(), "--daemon"])
            .arg("--dest-path-prefix")
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(launch.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("node.log")).unwrap(),
            ));
        if let Some(id) = launch.user {
            std::os::unix::fs::chown(dir.path(), Some(id), Some(id)).unwrap();
        }
        let (user, address_space) = (launch.user, launch.address_space);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if let Some(bytes) = address_space {
                    let limit = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(id) = user {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start dispynode");
        let node = NodeProc {
            child,
            port,
            dir,
            metrics_port: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "dispynode did not start: {}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    pub fn prefix(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A line of `/proc/<node>/status`, e.g. `VmRSS`, in bytes.
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/<node>/status:\n{status}"));
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// The node's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS")
    }

    /// File descriptors the node has open (sockets included).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn config(secret: &str) -> ClientConfig {
    ClientConfig {
        secret: secret.into(),
        name: "test".into(),
        pulse_interval: Duration::from_secs(2),
        // One owner for the tests' connections, as a client that reconnects keeps its own.
        owner: "test-owner".into(),
        ..Default::default()
    }
}

pub async fn connect(node: &NodeProc) -> (NodeClient, UnboundedReceiver<ClientEvent>) {
    NodeClient::connect(&node.addr(), &config(""))
        .await
        .expect("connect")
}

pub fn python(source: &str, function: &str) -> PythonComputation {
    PythonComputation {
        source: source.into(),
        function: function.into(),
        ..Default::default()
    }
}

/// Registers a computation, sends files, runs setup.
pub async fn open(client: &NodeClient, name: &str, spec: Computation, files: &[(&str, &[u8])]) {
    client
        .compute(ComputeRequest {
            computation: name.into(),
            spec,
            keep_files: false,
        })
        .await
        .expect("compute");
    for (fname, data) in files {
        client
            .send_file(name, fname, data, 0o644, None)
            .await
            .expect("send file");
    }
    client.setup(name).await.expect("setup");
}

pub fn job(id: JobId, args: serde_json::Value) -> JobRequest {
    JobRequest {
        id,
        args: args.to_string(),
        kwargs: "{}".into(),
        depends: vec![],
    }
}

/// Collects events until `n` jobs are done (or `within` passes).
pub async fn collect(
    events: &mut UnboundedReceiver<ClientEvent>,
    n: usize,
    within: Duration,
) -> HashMap<JobId, JobResult> {
    let mut done = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while done.len() < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ClientEvent::Job(JobEvent {
                job,
                kind: JobEventKind::Done(r),
                ..
            }))) => {
                done.insert(job, r);
            }
            Ok(Some(ClientEvent::Disconnected { reason, .. })) => {
                panic!("disconnected while waiting for results: {reason}")
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("event channel closed"),
            Err(_) => panic!("only {} of {n} jobs done within {within:?}", done.len()),
        }
    }
    done
}

/// The body of an HTTP/1.0 GET (the node's metrics server).
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

pub fn finished(r: &JobResult) -> &str {
    assert_eq!(r.status, JobStatus::Finished, "job not Finished: {:?}", r);
    r.result.as_deref().unwrap_or("null")
}
