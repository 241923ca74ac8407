//! Program jobs: run without a shell, output captured as bytes up to a bound, result = exit
//! code (a non-zero exit is still Finished, as in dispy). Each job gets its own process group
//! so terminating it reaches whatever it started.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use dispy_core::job::{now_secs, JobResult, JobStatus};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::node::Outcome;

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
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", job.program.display()))?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (max, run) = (job.max_output, job.run);
    tokio::spawn(async move {
        let (out, err, status) = tokio::join!(
            read_bounded(stdout, max),
            read_bounded(stderr, max),
            child.wait()
        );
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
        (result.stdout, result.stdout_dropped) = out;
        (result.stderr, result.stderr_dropped) = err;
        result.start_time = Some(start);
        result.end_time = Some(end);
        let _ = outcomes.send(Outcome::Job { run, result });
    });
    Ok(pid)
}

/// Reads everything, keeps the first `max` bytes (as text, lossily) and counts the rest.
async fn read_bounded<R: AsyncRead + Unpin>(mut r: R, max: usize) -> (String, u64) {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                let take = room.min(n);
                kept.extend_from_slice(&buf[..take]);
                dropped += (n - take) as u64;
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), dropped)
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
