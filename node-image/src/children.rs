//! The node's child processes. The node starts Python hosts, program jobs and the interpreter
//! probe itself, through [`spawn`], which records each one. It is also the child subreaper
//! (and PID 1 in the node image), so a process whose parent exits while it runs on is adopted
//! by the node. Such a process is a job's leftover — a `Popen` never waited for, a daemon, a
//! background `&` — that nothing waits for and that may hold a job's pipes open: the reaper
//! kills and reaps it. Children the node already had when it started (a script that ran
//! `helper & exec dispynode`) are its parent's business: left alone, reaped when they exit.
//!
//! What must stay true:
//! - a spawned child is recorded before the reaper can see it: [`spawn`] holds the registry
//!   lock across the fork, and the reaper lists the node's children under the same lock;
//! - the reaper only waits for children it did not spawn: tokio waits for its own by pid,
//!   and a `waitpid(-1)` would take their exit status from it;
//! - a leftover is killed alone, not with its process group: that group may be a live reuse
//!   worker's (what a worker's job starts is in the worker's group).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::procfs;

/// The node's children that are not leftovers, perhaps not yet reaped.
struct Known {
    /// Started by the node; tokio waits for them.
    spawned: BTreeSet<i32>,
    /// The node's children from before it started; nothing else waits for them.
    inherited: BTreeSet<i32>,
}

static KNOWN: Mutex<Known> = Mutex::new(Known {
    spawned: BTreeSet::new(),
    inherited: BTreeSet::new(),
});

/// Reparenting sends no signal: the reaper also looks this often.
const PERIOD: Duration = Duration::from_millis(250);
/// Many children ending at once (program jobs) cost one sweep, not one each.
const MIN_GAP: Duration = Duration::from_millis(10);

fn known() -> MutexGuard<'static, Known> {
    KNOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts `cmd`; the caller waits for the child (tokio reaps it).
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let mut known = known();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        known.spawned.insert(pid as i32);
    }
    Ok(child)
}

/// Records the children the node has before it starts anything; returns how many.
pub fn keep_inherited() -> usize {
    let mut known = known();
    known.inherited = list_children(std::process::id() as i32);
    known.inherited.len()
}

pub fn become_subreaper() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot become the child subreaper (what jobs leave running is not killed): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// What one look at the node's children decides.
#[derive(Debug, PartialEq)]
pub struct Sweep {
    /// Children the node neither spawned nor had from the start: leftovers, to kill and reap.
    pub leftovers: Vec<i32>,
    /// Known pids that are no longer the node's children (reaped): to forget, so that a
    /// later leftover with a reused pid is not taken for one of them.
    pub reaped: Vec<i32>,
}

/// Decides from the node's `children` (a listing that may miss a child created or reaped
/// meanwhile) and its `known` children (spawned or inherited); `is_child` asks again about a
/// known pid the listing missed.
pub fn sweep(
    children: &BTreeSet<i32>,
    known: &BTreeSet<i32>,
    is_child: impl Fn(i32) -> bool,
) -> Sweep {
    Sweep {
        leftovers: children.difference(known).copied().collect(),
        reaped: known
            .difference(children)
            .copied()
            .filter(|&pid| !is_child(pid))
            .collect(),
    }
}

/// The node's children, from each thread's `children` file (each thread has its own), or
/// from every process's parent where the kernel has no such file.
fn list_children(me: i32) -> BTreeSet<i32> {
    let mut children = BTreeSet::new();
    let mut have_files = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                have_files = true;
                children.extend(procfs::parse_pids(&text));
            }
        }
    }
    if !have_files {
        if let Ok(procs) = std::fs::read_dir("/proc") {
            let pids = procs
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok());
            children.extend(pids.filter(|&pid| is_child_of(pid, me)));
        }
    }
    children
}

fn is_child_of(pid: i32, parent: i32) -> bool {
    procfs::read_stat(pid).and_then(|s| procfs::stat_ppid(&s)) == Some(parent)
}

/// Kills the leftovers among the node's children and reaps those that have exited; returns
/// the names of those killed now.
fn sweep_once(me: i32, killed: &mut BTreeSet<i32>) -> Vec<String> {
    let leftovers = {
        let mut known = known();
        let children = list_children(me);
        let all: BTreeSet<i32> = known.spawned.union(&known.inherited).copied().collect();
        let decided = sweep(&children, &all, |pid| is_child_of(pid, me));
        for pid in decided.reaped {
            known.spawned.remove(&pid);
            known.inherited.remove(&pid);
        }
        known.inherited.retain(|&pid| {
            let mut status = 0;
            // SAFETY: a child of ours that nothing else waits for; WNOHANG leaves a live one be.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) != pid }
        });
        decided.leftovers
    };
    let mut names = Vec::new();
    for pid in leftovers {
        let stat = procfs::read_stat(pid).unwrap_or_default();
        let exited = procfs::stat_field(&stat, 3) == Some("Z");
        if !exited && killed.insert(pid) {
            let name = procfs::stat_field(&stat, 2).unwrap_or("?");
            names.push(format!("{name} ({pid})"));
        }
        // SAFETY: plain syscalls on a child of ours that only this reaper waits for, so the
        // pid cannot have been reused. It may take a moment to die: without WNOHANG a process
        // stuck in the kernel would stall this thread; the next sweep reaps it.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            if libc::waitpid(pid, &mut status, libc::WNOHANG) == pid {
                killed.remove(&pid);
            }
        }
    }
    names
}

/// Kills and reaps, for the node's lifetime, every process it adopts.
pub async fn reap_leftovers() {
    let me = std::process::id() as i32;
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "cannot watch SIGCHLD ({e}); leftover processes are looked for every {PERIOD:?}"
            );
            None
        }
    };
    let mut killed = BTreeSet::new();
    loop {
        let names = sweep_once(me, &mut killed);
        if !names.is_empty() {
            tracing::info!(
                "killed {} process(es) that jobs left running (adopted by the node when their parent exited): {}",
                names.len(),
                names.join(", ")
            );
        }
        let period = tokio::time::sleep(PERIOD);
        match &mut sigchld {
            Some(sigchld) => {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = period => {}
                }
            }
            None => period.await,
        }
        tokio::time::sleep(MIN_GAP).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pids: &[i32]) -> BTreeSet<i32> {
        pids.iter().copied().collect()
    }

    #[test]
    fn adopted_children_are_leftovers_and_spawned_ones_never_are() {
        // 10 and 11 spawned (11 perhaps an unreaped zombie: still listed), 20 and 21 adopted.
        let decided = sweep(&set(&[10, 11, 20, 21]), &set(&[10, 11]), |_| true);
        assert_eq!(decided.leftovers, vec![20, 21]);
        assert!(decided.reaped.is_empty());
    }

    #[test]
    fn a_spawned_pid_is_forgotten_only_once_it_is_no_longer_a_child() {
        // 12 was reaped by its waiter; 13 is still a child that the listing missed.
        let decided = sweep(&set(&[10]), &set(&[10, 12, 13]), |pid| pid == 13);
        assert_eq!(decided.reaped, vec![12]);
        assert!(decided.leftovers.is_empty());
    }

    #[test]
    fn no_children_decide_nothing() {
        let decided = sweep(&set(&[]), &set(&[]), |_| true);
        assert_eq!(
            decided,
            Sweep {
                leftovers: vec![],
                reaped: vec![]
            }
        );
    }
}
