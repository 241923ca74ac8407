//! The Python host of one computation: a `python3` process running `dispy_host.py`, which
//! runs setup once and then forks a process per job (or feeds long-lived workers). See the
//! script's docstring for the pipe protocol.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dispy_core::job::{JobResult, JobStatus};
use dispy_core::protocol::{JobEventKind, PythonComputation, SentFile};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};

use crate::children;
use crate::host_output::{self, Entry, HostOutput};
use crate::outcome::Outcome;
use crate::process::describe_wait_status;

/// The host script, shipped inside the binary.
pub const HOST_SCRIPT: &str = include_str!("../python/dispy_host.py");

pub struct PyHost {
    computation: String,
    input: mpsc::UnboundedSender<Vec<u8>>,
    /// Reuse mode: each worker's own pipe; jobs go straight to it, not through the host.
    workers: Vec<mpsc::UnboundedSender<Vec<u8>>>,
    /// Reuse mode: indices of idle workers.
    idle_workers: Option<Mutex<Vec<u32>>>,
    runs: Arc<Mutex<Runs>>,
    closed: Mutex<Option<oneshot::Receiver<Control>>>,
    child: tokio::sync::Mutex<Child>,
    pid: Option<u32>,
}

/// Reuse mode: which worker runs which run.
#[derive(Default)]
struct Runs {
    by_run: HashMap<u64, u32>,
    by_worker: HashMap<u32, u64>,
    /// Every run this host has started and not finished. A job process can write any frame
    /// to the host's pipe, so a frame naming another run (another computation's job) is
    /// dropped.
    active: std::collections::HashSet<u64>,
}

#[derive(Debug, Deserialize)]
struct Control {
    ok: bool,
    error: Option<String>,
}

/// A job's reply as the host writes it: short keys on the pipe (`REPLY` in the script, which
/// writes it by hand on every job's path), full names here.
#[derive(Debug, Deserialize)]
struct HostReply {
    /// "Finished" or "Terminated".
    #[serde(rename = "s")]
    status: String,
    /// JSON text (or, for dispy's clients, the hex of a pickle) of the return value.
    #[serde(rename = "r")]
    result: Option<String>,
    #[serde(rename = "o")]
    stdout: String,
    #[serde(rename = "e")]
    stderr: String,
    /// The traceback, when the job raised.
    #[serde(rename = "x")]
    exception: Option<String>,
    #[serde(rename = "t0")]
    start_time: f64,
    #[serde(rename = "t1")]
    end_time: f64,
    /// Bytes of stdout and stderr cut at `max_output`.
    #[serde(rename = "od")]
    stdout_dropped: u64,
    #[serde(rename = "ed")]
    stderr_dropped: u64,
}

impl HostReply {
    fn into_result(self) -> JobResult {
        JobResult {
            status: if self.status == "Finished" {
                JobStatus::Finished
            } else {
                JobStatus::Terminated
            },
            result: self.result,
            stdout: self.stdout,
            stderr: self.stderr,
            exception: self.exception,
            start_time: Some(self.start_time),
            end_time: Some(self.end_time),
            stdout_dropped: self.stdout_dropped,
            stderr_dropped: self.stderr_dropped,
        }
    }
}

pub struct HostSettings<'a> {
    pub python: &'a Path,
    /// The interpreter's usual `sys.path` as a JSON list (the host runs without `site`).
    pub sys_path: &'a str,
    /// Where `HOST_MODULE_FILE` is.
    pub host_dir: &'a Path,
    pub dir: &'a Path,
    pub workers: u32,
    pub max_output: usize,
    /// The largest job reply the node reads from the host; a larger one is refused unread.
    pub max_reply: usize,
    /// The most bytes a job may send in files (`dispy_send_file`), all its files together.
    pub max_sent_file: usize,
    /// The host's codec for calls and results (`CODECS` in the script).
    pub codec: &'static str,
    pub env: serde_json::Value,
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// A pipe for one reuse-mode worker: (read end for the host to pass on, non-blocking write end).
fn worker_pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot create a worker pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(write.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(write.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((read, write))
}

/// The file `HOST_SCRIPT` is written to in the host dir: the module `dispy_host`.
pub const HOST_MODULE_FILE: &str = "dispy_host.py";

/// What a host runs: its module, compiled (see `probe_interpreter`), then `Host().serve()`.
const HOST_LOADER: &str =
    "import sys; sys.path.insert(0, sys.argv[1]); import dispy_host; dispy_host.Host().serve()";

/// Asks `python` once for the `sys.path` it has with `site` (a JSON list), and has it compile
/// the host module in `host_dir` into `__pycache__`, where every host then loads it from: a
/// host that compiled its own source would keep the compiler's memory, which every fork per
/// job copies and every job process tears down. A module that cannot be
/// cached there is compiled by each host instead, which works, only slower.
pub async fn probe_interpreter(python: &Path, host_dir: &Path) -> Result<String, String> {
    const PROBE: &str = "import json, sys\n\
        error = None\n\
        try:\n    import py_compile; py_compile.compile(sys.argv[1], doraise=True)\n\
        except Exception as e:\n    error = str(e)\n\
        print(json.dumps({'path': sys.path[1:], 'cache_error': error}))";
    let cannot_start = |e: std::io::Error| {
        format!(
            "cannot start the Python interpreter {}: {e} (set --python)",
            python.display()
        )
    };
    let probe = children::spawn(
        Command::new(python)
            .args(["-c", PROBE])
            .arg(host_dir.join(HOST_MODULE_FILE))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .map_err(cannot_start)?;
    let out = probe.wait_with_output().await.map_err(cannot_start)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: serde_json::Value = match serde_json::from_str(stdout.trim()) {
        Ok(answer) if out.status.success() => answer,
        _ => {
            return Err(format!(
                "the Python interpreter {} failed: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    if let Some(error) = answer["cache_error"].as_str() {
        tracing::warn!(
            "cannot cache the compiled Python host (each computation compiles it): {error}"
        );
    }
    Ok(answer["path"].to_string())
}

impl PyHost {
    /// The host process's pid, which names it in [`Outcome::HostExited`].
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Starts the host, runs the computation's source and setup; fails with what went wrong.
    pub async fn start(
        computation: &str,
        py: &PythonComputation,
        settings: HostSettings<'_>,
        outcomes: mpsc::UnboundedSender<Outcome>,
    ) -> Result<Arc<PyHost>, String> {
        let setup_args: serde_json::Value = match &py.setup_args {
            None => serde_json::Value::Array(vec![]),
            Some(text) => serde_json::from_str(text)
                .map_err(|e| format!("setup args are not a JSON list: {e}"))?,
        };
        let sys_path: serde_json::Value =
            serde_json::from_str(settings.sys_path).unwrap_or_default();
        let worker_count = settings.workers.max(1);
        let pipes = if py.reuse_workers {
            (0..worker_count)
                .map(|_| worker_pipe())
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let worker_fds: Vec<i32> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
        let inherited = worker_fds.clone();
        let mut command = Command::new(settings.python);
        // SAFETY: fcntl is async-signal-safe; it lets the host inherit the workers' read ends.
        unsafe {
            command.pre_exec(move || {
                for fd in &inherited {
                    libc::fcntl(*fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        // Libraries bound when loaded, not at their first call: a first call in a job process
        // would write the binding into a page the fork shares, which costs a copy per job.
        let bind_now_set = std::env::var_os("LD_BIND_NOW").is_none();
        if bind_now_set {
            command.env("LD_BIND_NOW", "1");
        }
        command
            .arg("-S")
            .args(["-c", HOST_LOADER])
            .arg(settings.host_dir)
            .current_dir(settings.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its idle job processes stay in its group, so the group can be killed at the end.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = children::spawn(&mut command).map_err(|e| {
            format!(
                "cannot start the Python interpreter {}: {e} (set --python)",
                settings.python.display()
            )
        })?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        tokio::spawn(log_host_output(computation.to_string(), stderr));

        let init = serde_json::json!({
            "source": py.source,
            "function": py.function,
            "setup": py.setup,
            "setup_args": setup_args,
            "cleanup": py.cleanup,
            "reuse_workers": py.reuse_workers,
            "workers": settings.workers,
            "max_output": settings.max_output,
            "max_sent_file": settings.max_sent_file,
            "codec": settings.codec,
            "sys_path": sys_path,
            "worker_fds": worker_fds,
            "env": settings.env,
            "bind_now_set": bind_now_set,
        });
        let (input_tx, mut input_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        input_tx
            .send(frame(b'I', init.to_string().as_bytes()))
            .expect("receiver alive");
        tokio::spawn(async move {
            while let Some(mut bytes) = input_rx.recv().await {
                while let Ok(more) = input_rx.try_recv() {
                    bytes.extend(more);
                }
                if stdin.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });

        let mut workers = Vec::new();
        for (read, write) in pipes {
            drop(read);
            let mut sender = tokio::net::unix::pipe::Sender::from_owned_fd(write)
                .map_err(|e| format!("cannot use a worker pipe: {e}"))?;
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
            tokio::spawn(async move {
                while let Some(mut bytes) = rx.recv().await {
                    while let Ok(more) = rx.try_recv() {
                        bytes.extend(more);
                    }
                    if sender.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
            workers.push(tx);
        }
        let runs = Arc::new(Mutex::new(Runs::default()));
        let (init_tx, init_rx) = oneshot::channel();
        let (closed_tx, closed_rx) = oneshot::channel();
        let reuse = py.reuse_workers;
        tokio::spawn(read_replies(
            computation.to_string(),
            child.id(),
            // As the host names it: from its working directory, which has no symlinks.
            HostFiles::in_dir(
                &std::fs::canonicalize(settings.dir).unwrap_or_else(|_| settings.dir.to_path_buf()),
                settings.max_reply,
                settings.max_sent_file,
            ),
            stdout,
            runs.clone(),
            init_tx,
            closed_tx,
            outcomes,
        ));

        let init: Control = match init_rx.await {
            Ok(c) => c,
            Err(_) => {
                let status = child.wait().await.ok();
                return Err(format!(
                    "the Python host exited before setup finished ({})",
                    status.map(|s| s.to_string()).unwrap_or_default()
                ));
            }
        };
        if !init.ok {
            let _ = child.wait().await;
            return Err(init.error.unwrap_or_else(|| "setup failed".into()));
        }
        let idle_workers = reuse.then(|| Mutex::new((0..settings.workers.max(1)).rev().collect()));
        Ok(Arc::new(PyHost {
            computation: computation.to_string(),
            input: input_tx,
            workers,
            idle_workers,
            runs,
            closed: Mutex::new(Some(closed_rx)),
            pid: child.id(),
            child: tokio::sync::Mutex::new(child),
        }))
    }

    /// Starts a job; `call` is the codec-encoded call (JSON `[args, kwargs]`).
    pub fn start_job(&self, run: u64, call: &[u8]) -> Result<(), String> {
        self.runs.lock().unwrap().active.insert(run);
        let worker = match &self.idle_workers {
            None => None,
            Some(idle) => {
                let w = idle
                    .lock()
                    .unwrap()
                    .pop()
                    .ok_or("no idle worker (more jobs than cpus)")?;
                let mut runs = self.runs.lock().unwrap();
                runs.by_run.insert(run, w);
                runs.by_worker.insert(w, run);
                Some(w)
            }
        };
        let mut body = Vec::with_capacity(12 + call.len());
        body.extend_from_slice(&run.to_be_bytes());
        body.extend_from_slice(&worker.unwrap_or(0).to_be_bytes());
        body.extend_from_slice(call);
        let sent = match worker {
            Some(w) => self.workers[w as usize].send(frame(b'J', &body)),
            None => self.input.send(frame(b'J', &body)),
        };
        sent.map_err(|_| format!("the Python host of {} is gone", self.computation))
    }

    /// Returns a reuse-mode worker to the idle list once its job is over.
    pub fn job_over(&self, run: u64) {
        self.runs.lock().unwrap().active.remove(&run);
        if let Some(idle) = &self.idle_workers {
            let mut runs = self.runs.lock().unwrap();
            if let Some(w) = runs.by_run.remove(&run) {
                runs.by_worker.remove(&w);
                idle.lock().unwrap().push(w);
            }
        }
    }

    pub fn kill(&self, run: u64, signal: i32) {
        let worker = self.runs.lock().unwrap().by_run.get(&run).copied();
        let mut body = run.to_be_bytes().to_vec();
        body.extend_from_slice(&signal.to_be_bytes());
        body.extend_from_slice(&worker.unwrap_or(u32::MAX).to_be_bytes());
        let _ = self.input.send(frame(b'K', &body));
    }

    /// Stops every job, runs cleanup (when asked) and waits for the host to exit.
    pub async fn close(&self, cleanup: bool) -> Result<(), String> {
        let body = serde_json::json!({ "cleanup": cleanup }).to_string();
        let _ = self.input.send(frame(b'C', body.as_bytes()));
        let rx = self.closed.lock().unwrap().take();
        let result = match rx {
            Some(rx) => match rx.await {
                Ok(c) if c.ok => Ok(()),
                Ok(c) => Err(c.error.unwrap_or_else(|| "cleanup failed".into())),
                Err(_) => Ok(()),
            },
            None => Ok(()),
        };
        let mut child = self.child.lock().await;
        let _ = child.wait().await;
        self.kill_group(&child);
        result
    }

    /// Kills whatever is left in the host's process group (idle job processes of a host
    /// that died without closing them).
    fn kill_group(&self, child: &Child) {
        if let Some(pid) = child.id().or(self.pid) {
            crate::process::signal_group(pid as i32, libc::SIGKILL);
        }
    }

    /// After the host died on its own: clears its process group.
    pub async fn reap(&self) {
        let mut child = self.child.lock().await;
        let _ = child.wait().await;
        self.kill_group(&child);
    }
}

/// A job's reply the node did not take: the job is Terminated with why.
fn unread(reason: String) -> JobResult {
    JobResult::failed(JobStatus::Terminated, reason)
}

fn too_large(len: usize, max: usize) -> JobResult {
    unread(format!("the job's reply is {len} bytes, over the {max} bytes the node reads of one reply (--max-frame and --max-output set it): return less, or write large data to a file"))
}

/// Where the host passes what does not fit one pipe write, and how much the node reads of it.
struct HostFiles {
    /// Replies and provisional results too large for one write.
    spill_dir: PathBuf,
    /// Copies of the files jobs send (`dispy_send_file`).
    sent_dir: PathBuf,
    max_reply: usize,
    max_sent_file: usize,
}

impl HostFiles {
    fn in_dir(dir: &Path, max_reply: usize, max_sent_file: usize) -> HostFiles {
        HostFiles {
            spill_dir: dir.join(".dispy-replies"),
            sent_dir: dir.join(".dispy-sent"),
            max_reply,
            max_sent_file,
        }
    }

    /// A reply the host wrote to a file (too large for one pipe write): read from the spill
    /// directory only, and only up to `max_reply`; the file is removed either way.
    async fn spilled(&self, name: &[u8]) -> Result<Vec<u8>, JobResult> {
        let path = PathBuf::from(String::from_utf8_lossy(name).into_owned());
        read_within(&self.spill_dir, &path, self.max_reply)
            .await
            .map_err(|e| match e {
                Unread::TooLarge(size) => too_large(size, self.max_reply),
                Unread::Outside => unread(format!(
                    "a spilled reply outside the host's spill directory: {}",
                    path.display()
                )),
                Unread::Io(e) => unread(format!("unreadable job reply from the Python host: {e}")),
            })
    }

    /// A file a job sent (`S`: JSON `{path, name}`), read from the sent directory only and
    /// only up to `max_sent_file`; the copy is removed either way.
    async fn sent(&self, body: &[u8]) -> Result<SentFile, String> {
        #[derive(Deserialize)]
        struct Sent {
            path: PathBuf,
            name: String,
        }
        let sent: Sent = serde_json::from_slice(body)
            .map_err(|e| format!("an unreadable sent-file frame from the Python host: {e}"))?;
        let data = read_within(&self.sent_dir, &sent.path, self.max_sent_file)
            .await
            .map_err(|e| match e {
                Unread::TooLarge(size) => format!(
                    "{} is {size} bytes, over the {} bytes a job may send",
                    sent.name, self.max_sent_file
                ),
                Unread::Outside => format!(
                    "a sent file outside the host's sent directory: {}",
                    sent.path.display()
                ),
                Unread::Io(e) => format!("cannot read the sent file {}: {e}", sent.name),
            })?;
        if dispy_core::protocol::relative_path(&sent.name).is_none() {
            return Err(format!(
                "a sent file named {:?}, not a relative path inside the job's directory",
                sent.name
            ));
        }
        Ok(SentFile {
            name: sent.name,
            data,
        })
    }
}

enum Unread {
    Outside,
    TooLarge(usize),
    Io(std::io::Error),
}

/// Reads a file the host wrote into `dir` (and nowhere else), at most `max` bytes of it, and
/// removes it.
/// The file must be a regular file the host wrote there: a symlink is not followed and a FIFO
/// is not waited on (a job could put either at the path it names), and no more than `max`
/// bytes are read even if it grows meanwhile.
async fn read_within(dir: &Path, path: &Path, max: usize) -> Result<Vec<u8>, Unread> {
    if path.parent() != Some(dir) {
        return Err(Unread::Outside);
    }
    let owned = path.to_path_buf();
    let data = tokio::task::spawn_blocking(move || read_regular(&owned, max))
        .await
        .unwrap_or_else(|e| Err(Unread::Io(std::io::Error::other(e))));
    let _ = tokio::fs::remove_file(path).await;
    data
}

fn read_regular(path: &Path, max: usize) -> Result<Vec<u8>, Unread> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(Unread::Io)?;
    let meta = file.metadata().map_err(Unread::Io)?;
    if !meta.is_file() {
        return Err(Unread::Io(std::io::Error::other("not a regular file")));
    }
    if meta.len() as usize > max {
        return Err(Unread::TooLarge(meta.len() as usize));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(max as u64 + 1)
        .read_to_end(&mut data)
        .map_err(Unread::Io)?;
    if data.len() > max {
        return Err(Unread::TooLarge(data.len()));
    }
    Ok(data)
}

/// Logs what the host writes to its stderr, within the bounds of [`HostOutput`].
async fn log_host_output(computation: String, mut stderr: ChildStderr) {
    let mut output = HostOutput::new(Instant::now());
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(host_output::WINDOW, stderr.read(&mut buf)).await;
        let now = Instant::now();
        let ended = match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                output.finish(now, &mut entries);
                true
            }
            Ok(Ok(n)) => {
                output.feed(now, &buf[..n], &mut entries);
                false
            }
            Err(_) => {
                output.tick(now, &mut entries);
                false
            }
        };
        for entry in entries.drain(..) {
            match entry {
                Entry::Line { text, cut: 0 } => {
                    tracing::warn!(%computation, "python: {text}")
                }
                Entry::Line { text, cut } => {
                    tracing::warn!(%computation, "python: {text}… ({cut} bytes cut)")
                }
                Entry::Dropped { lines, bytes } => tracing::warn!(
                    %computation,
                    "python: {lines} more line(s), {bytes} bytes, not logged (over {} lines per second)",
                    host_output::LINES_PER_WINDOW
                ),
            }
        }
        if ended {
            return;
        }
    }
}

/// A reply over `max_reply` is dropped without being held in memory, and its job is Terminated
/// with the size; a spilled reply is read only from the host's spill directory. A job's news
/// (provisional results, sent files) goes out in the order the host wrote it, so before the
/// job's reply.
#[allow(clippy::too_many_arguments)]
async fn read_replies(
    computation: String,
    host: Option<u32>,
    files: HostFiles,
    stdout: ChildStdout,
    runs: Arc<Mutex<Runs>>,
    init_tx: oneshot::Sender<Control>,
    closed_tx: oneshot::Sender<Control>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let mut r = BufReader::with_capacity(64 * 1024, stdout);
    let mut init_tx = Some(init_tx);
    let mut closed_tx = Some(closed_tx);
    let reason = loop {
        let mut header = [0u8; 4];
        if r.read_exact(&mut header).await.is_err() {
            break "the Python host exited".to_string();
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > files.max_reply {
            let mut head = [0u8; 9];
            let skipped = async {
                r.read_exact(&mut head).await?;
                let rest = (len - head.len()) as u64;
                tokio::io::copy(&mut (&mut r).take(rest), &mut tokio::io::sink()).await
            };
            if skipped.await.is_err() {
                break "the Python host sent a truncated frame".to_string();
            }
            let run = u64::from_be_bytes(head[1..9].try_into().unwrap());
            if matches!(head[0], b'R' | b'F') && runs.lock().unwrap().active.contains(&run) {
                let _ = outcomes.send(Outcome::Job {
                    run,
                    result: too_large(len, files.max_reply),
                });
            } else {
                tracing::warn!(%computation, "a {len}-byte frame from the Python host dropped unread (over {} bytes)", files.max_reply);
            }
            continue;
        }
        let mut body = vec![0u8; len];
        if len == 0 || r.read_exact(&mut body).await.is_err() {
            break "the Python host sent a truncated frame".to_string();
        }
        let kind = body[0];
        let body = &body[1..];
        let run = || u64::from_be_bytes(body[..8].try_into().unwrap());
        let about_a_job = matches!(kind, b'R' | b'F' | b'P' | b'Q' | b'S' | b'X');
        if about_a_job && (body.len() < 8 || !runs.lock().unwrap().active.contains(&run())) {
            // A process's exit after its reply is the usual case; anything else is forged.
            if kind != b'X' {
                tracing::warn!(%computation, "a frame from the Python host about a run it does not have dropped");
            }
            continue;
        }
        match kind {
            b'I' | b'C' => {
                let control: Control = serde_json::from_slice(body).unwrap_or(Control {
                    ok: false,
                    error: Some("unreadable answer from the Python host".into()),
                });
                let tx = if kind == b'I' {
                    init_tx.take()
                } else {
                    closed_tx.take()
                };
                if let Some(tx) = tx {
                    let _ = tx.send(control);
                }
            }
            b'R' | b'F' if body.len() >= 8 => {
                let run = run();
                let json = if kind == b'R' {
                    Ok(body[8..].to_vec())
                } else {
                    files.spilled(&body[8..]).await
                };
                let result = match json.map(|j| serde_json::from_slice::<HostReply>(&j)) {
                    Ok(Ok(reply)) => reply.into_result(),
                    Ok(Err(e)) => unread(format!("unreadable job reply from the Python host: {e}")),
                    Err(refused) => refused,
                };
                let _ = outcomes.send(Outcome::Job { run, result });
            }
            b'P' | b'Q' if body.len() >= 8 => {
                let run = run();
                let json = if kind == b'P' {
                    Ok(body[8..].to_vec())
                } else {
                    files.spilled(&body[8..]).await
                };
                match json.map(String::from_utf8) {
                    Ok(Ok(result)) => {
                        let news = JobEventKind::Provisional { result };
                        let _ = outcomes.send(Outcome::News { run, news });
                    }
                    Ok(Err(_)) => {
                        tracing::warn!(%computation, "a provisional result that is not UTF-8 dropped")
                    }
                    Err(refused) => tracing::warn!(
                        %computation,
                        "a provisional result dropped: {}",
                        refused.exception.unwrap_or_default()
                    ),
                }
            }
            b'S' if body.len() >= 8 => {
                let run = run();
                match files.sent(&body[8..]).await {
                    Ok(file) => {
                        let news = JobEventKind::File(file);
                        let _ = outcomes.send(Outcome::News { run, news });
                    }
                    Err(why) => tracing::warn!(%computation, "a sent file dropped: {why}"),
                }
            }
            b'X' if body.len() >= 12 => {
                let run = run();
                let status = i32::from_be_bytes(body[8..12].try_into().unwrap());
                // After the job's reply this run is over and the node ignores it.
                let result = JobResult::failed(
                    JobStatus::Terminated,
                    format!("the job's process {}", describe_wait_status(status)),
                );
                let _ = outcomes.send(Outcome::Job { run, result });
            }
            b'W' if body.len() >= 8 => {
                let worker = u32::from_be_bytes(body[..4].try_into().unwrap());
                let status = i32::from_be_bytes(body[4..8].try_into().unwrap());
                let run = runs.lock().unwrap().by_worker.get(&worker).copied();
                if let Some(run) = run {
                    let result = JobResult::failed(
                        JobStatus::Terminated,
                        format!("the job's worker process {}", describe_wait_status(status)),
                    );
                    let _ = outcomes.send(Outcome::Job { run, result });
                }
            }
            other => {
                tracing::error!(%computation, "unknown frame kind {other} from the Python host");
            }
        }
    };
    let _ = outcomes.send(Outcome::HostExited {
        computation,
        host,
        reason,
    });
}
