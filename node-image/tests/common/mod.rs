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

impl NodeProc {
    /// Starts `dispynode -i 127.0.0.1 --port <free>` with extra args and waits until it serves.
    pub async fn start(extra: &[&str]) -> NodeProc {
        Self::start_with(extra, None).await
    }

    pub async fn start_with(extra: &[&str], secret: Option<&str>) -> NodeProc {
        Self::start_within(extra, secret, None).await
    }

    /// With `max_address_space` (bytes) as the node's RLIMIT_AS: a test that could make the
    /// node balloon fails instead of taking the machine's memory.
    pub async fn start_within(
        extra: &[&str],
        secret: Option<&str>,
        max_address_space: Option<u64>,
    ) -> NodeProc {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispynode"));
        cmd.args(["-i", "127.0.0.1", "--port", &port.to_string(), "--daemon"])
            .arg("--dest-path-prefix")
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("node.log")).unwrap(),
            ));
        if let Some(s) = secret {
            cmd.args(["--secret", s]);
        }
        if let Some(limit) = max_address_space {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
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

    /// The node's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// File descriptors the node has open (sockets included).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
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

pub fn finished(r: &JobResult) -> &str {
    assert_eq!(r.status, JobStatus::Finished, "job not Finished: {:?}", r);
    r.result.as_deref().unwrap_or("null")
}
