//! Program jobs: run without a shell, output captured as bytes up to a bound, result = exit
//! code (a non-zero exit is still Finished, as in dispy). Each job gets its own process group
//! so terminating it reaches whatever it started. A job is over when its program exits: a
//! process it left running may hold its output pipes open, and is not waited for.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dispy_core::job::{now_secs, JobResult, JobStatus};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::children;
use crate::outcome::Outcome;

/// How long after a program's exit its output may still take to end. What the program wrote
/// is in the pipes when it exits, so this only bounds a process it left running that holds
/// them (the reaper kills such processes, which also ends the output).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Finds the program: a path (relative to the computation's directory), else a file among
/// the computation's files, else on `PATH`.
pub fn resolve_program(name: &str, dir: &Path) -> Result<PathBuf, String> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.is_empty() {
        return Err("the program computation has an empty command".into());
    }
    if name.contains('/') {
        let p = dir.join(name);
        return if is_exec(&p) {
            Ok(p)
        } else if p.exists() {
            Err(format!("program {name:?} is not executable"))
        } else {
            Err(format!("program {name:?} does not exist"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(dir.to_path_buf())
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| is_exec(p))
        .ok_or_else(|| {
            format!("program {name:?} not found among the computation's files or on PATH")
        })
}

pub struct ProgramJob<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub dir: &'a Path,
    pub env: &'a [(String, String)],
    pub max_output: usize,
    pub run: u64,
}

/// Starts the program and returns its pid; the outcome arrives on `outcomes`.
pub fn spawn_program(
    job: ProgramJob<'_>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) -> Result<i32, String> {
    let start = now_secs();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![job.dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(job.program);
    cmd.args(&job.args)
        .current_dir(job.dir)
        .envs(job.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("PATH", std::env::join_paths(dirs).unwrap_or(path))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: prctl is async-signal-safe; it only makes the job die with the node.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = children::spawn(&mut cmd)
        .map_err(|e| format!("cannot start {}: {e}", job.program.display()))?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (max, run) = (job.max_output, job.run);
    tokio::spawn(async move {
        let (status, out, err) = capture(stdout, stderr, max, child.wait(), DRAIN_AFTER_EXIT).await;
        let end = now_secs();
        let mut result = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => JobResult {
                    status: JobStatus::Finished,
                    result: Some(code.to_string()),
                    ..Default::default()
                },
                (None, Some(sig)) => JobResult {
                    status: JobStatus::Terminated,
                    exception: Some(format!(
                        "the program was killed by signal {sig} ({})",
                        signal_name(sig)
                    )),
                    ..Default::default()
                },
                _ => {
                    JobResult::failed(JobStatus::Terminated, "the program ended in an unknown way")
                }
            },
            Err(e) => JobResult::failed(
                JobStatus::Terminated,
                format!("waiting for the program failed: {e}"),
            ),
        };
        (result.stdout, result.stdout_dropped) = out.into_text();
        (result.stderr, result.stderr_dropped) = err.into_text();
        result.start_time = Some(start);
        result.end_time = Some(end);
        let _ = outcomes.send(Outcome::Job { run, result });
    });
    Ok(pid)
}

/// One output stream of a program: its first `max` bytes, and how many more came.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    dropped: u64,
}

impl Captured {
    /// Reads `r` to its end. Cancel-safe: what was read so far stays in `self`.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, mut r: R, max: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let take = max.saturating_sub(self.kept.len()).min(n);
                    self.kept.extend_from_slice(&buf[..take]);
                    self.dropped += (n - take) as u64;
                }
            }
        }
    }

    fn into_text(self) -> (String, u64) {
        (
            String::from_utf8_lossy(&self.kept).into_owned(),
            self.dropped,
        )
    }
}

/// Reads a program's stdout and stderr until `exited` (its exit status) and both streams
/// ended, or until `drain` after `exited`, whichever is first.
async fn capture<T>(
    stdout: impl AsyncRead + Unpin,
    stderr: impl AsyncRead + Unpin,
    max: usize,
    exited: impl Future<Output = T>,
    drain: Duration,
) -> (T, Captured, Captured) {
    let (mut out, mut err) = (Captured::default(), Captured::default());
    let status = {
        let reads = async { tokio::join!(out.read_from(stdout, max), err.read_from(stderr, max)) };
        tokio::pin!(reads);
        tokio::pin!(exited);
        tokio::select! {
            _ = &mut reads => exited.await,
            status = &mut exited => {
                let _ = tokio::time::timeout(drain, &mut reads).await;
                status
            }
        }
    };
    (status, out, err)
}

/// Sends a signal to a job's process group.
pub fn signal_group(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: plain syscall; a group that is already gone gives ESRCH, which is fine.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

/// Words for a `waitpid` status of a job process that sent no result.
pub fn describe_wait_status(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!("was killed by signal {sig} ({})", signal_name(sig))
    } else if libc::WIFEXITED(status) {
        format!(
            "exited with code {} without a result",
            libc::WEXITSTATUS(status)
        )
    } else {
        format!("ended with wait status {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn output_held_open_after_the_exit_is_read_for_the_drain_only() {
        // The writers stay open, as when the program left a process holding its pipes.
        let (mut out_w, out_r) = tokio::io::duplex(1024);
        let (_err_w, err_r) = tokio::io::duplex(1024);
        out_w.write_all(b"hi\n").await.unwrap();
        let exited = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            0
        };
        let t0 = Instant::now();
        let (status, out, err) =
            capture(out_r, err_r, 100, exited, Duration::from_millis(200)).await;
        let took = t0.elapsed();
        assert_eq!(status, 0);
        assert_eq!(out.into_text(), ("hi\n".to_string(), 0));
        assert_eq!(err.into_text(), (String::new(), 0));
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn output_that_ends_after_the_exit_is_read_whole_without_waiting_the_drain() {
        let (mut out_w, out_r) = tokio::io::duplex(4096);
        let (err_w, err_r) = tokio::io::duplex(4096);
        drop(err_w);
        tokio::spawn(async move {
            for _ in 0..100 {
                out_w.write_all(&[b'a'; 1000]).await.unwrap();
            }
        });
        let t0 = Instant::now();
        let (_, out, _) = capture(out_r, err_r, 60_000, async {}, Duration::from_secs(20)).await;
        assert!(t0.elapsed() < Duration::from_secs(10));
        let (text, dropped) = out.into_text();
        assert_eq!((text.len(), dropped), (60_000, 40_000));
    }
}
