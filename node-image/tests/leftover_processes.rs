//! What jobs leave running is killed: the node is the child subreaper, so a process whose
//! parent exits is adopted by the node, which kills and reaps it. Each test's processes are
//! told apart by a `sleep` duration no other test uses.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dispy_core::protocol::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);
/// How soon a leftover must be gone: the reaper looks every 250 ms.
const SOON: Duration = Duration::from_secs(5);

/// Live processes whose command line is exactly `argv` (a zombie has none).
fn running(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// The children of `parent`, zombies included: (pid, state, command name).
fn children_of(parent: i32) -> Vec<(i32, String, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.to_string();
            let ppid: i32 = fields.next()?.parse().ok()?;
            (ppid == parent).then_some((pid, state, name))
        })
        .collect()
}

async fn wait_until<T: std::fmt::Debug>(what: &str, mut left: impl FnMut() -> Vec<T>) {
    let deadline = Instant::now() + SOON;
    loop {
        let now = left();
        if now.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const POPEN: &str = r#"
import subprocess
def start(seconds):
    p = subprocess.Popen(['sleep', seconds])
    return p.poll() is None
"#;

#[tokio::test]
async fn what_a_python_job_starts_is_killed_once_its_process_ends_or_its_computation_closes() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    for (reuse, seconds) in [(false, "300.101"), (true, "300.202")] {
        let name = format!("popen-{reuse}");
        let spec = PythonComputation {
            reuse_workers: reuse,
            ..python(POPEN, "start")
        };
        open(&client, &name, Computation::Python(spec), &[]).await;
        client
            .submit(&name, job(1, json!([seconds])))
            .await
            .unwrap();
        let done = collect(&mut events, 1, T).await;
        assert_eq!(finished(&done[&1]), "true", "the sleep was started");
        let sleep = ["sleep", seconds];
        if reuse {
            // A reuse worker lives on, and so does what its jobs started (later jobs may use it).
            assert_eq!(
                running(&sleep).len(),
                1,
                "reuse: the worker's child runs on"
            );
        } else {
            wait_until("a fork-per-job job's sleep outlived it", || running(&sleep)).await;
        }
        client.close(&name, false).await.unwrap();
        wait_until("a job's sleep outlived its computation", || running(&sleep)).await;
    }
    // Killed and reaped: the node has no child left, not even a zombie.
    wait_until("children of the node after every close", || {
        children_of(node.pid())
    })
    .await;
    assert!(
        node.log().contains("that jobs left running"),
        "{}",
        node.log()
    );
}

#[tokio::test]
async fn a_program_whose_background_child_keeps_its_pipes_finishes_when_it_exits() {
    let node = NodeProc::start(&["--cpus", "1"]).await;
    let (client, mut events) = connect(&node).await;
    let spec = Computation::Program(ProgramComputation {
        command: vec!["sh".into(), "-c".into(), "sleep 301.5 & echo hi".into()],
        env: vec![],
    });
    open(&client, "background", spec, &[]).await;
    let t0 = Instant::now();
    client
        .submit("background", job(1, json!([])))
        .await
        .unwrap();
    let done = collect(&mut events, 1, T).await;
    assert!(t0.elapsed() < SOON, "took {:?}", t0.elapsed());
    assert_eq!(finished(&done[&1]), "0");
    assert_eq!(done[&1].stdout, "hi\n");
    wait_until("the program's background sleep outlived it", || {
        running(&["sleep", "301.5"])
    })
    .await;
    wait_until("children of the node", || children_of(node.pid())).await;
}

/// Returns [the job's pid, the daemon's]. The daemon may not have reached its `exec` yet.
const DAEMON: &str = r#"
def detach(seconds):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            os.execvp('sleep', ['sleep', seconds])
        os.write(w, b'%d' % daemon)
        os._exit(0)
    os.waitpid(child, 0)
    os.close(w)
    return [os.getpid(), int(os.read(r, 32))]
"#;

#[tokio::test]
async fn a_daemon_a_job_detaches_with_setsid_and_a_double_fork_is_killed() {
    let node = NodeProc::start(&["--cpus", "1"]).await;
    let (client, mut events) = connect(&node).await;
    for (reuse, seconds) in [(false, "302.101"), (true, "302.202")] {
        let name = format!("daemon-{reuse}");
        let spec = PythonComputation {
            reuse_workers: reuse,
            ..python(DAEMON, "detach")
        };
        open(&client, &name, Computation::Python(spec), &[]).await;
        client
            .submit(&name, job(1, json!([seconds])))
            .await
            .unwrap();
        let done = collect(&mut events, 1, T).await;
        let (job_pid, daemon): (i32, i32) = serde_json::from_str(finished(&done[&1])).unwrap();
        // Killed and reaped while the computation goes on (and, with reuse, its worker lives).
        wait_until("a job's detached daemon outlived its parent", || {
            let alive = std::path::Path::new(&format!("/proc/{daemon}")).exists();
            if alive {
                vec![daemon]
            } else {
                vec![]
            }
        })
        .await;
        if reuse {
            assert!(
                std::path::Path::new(&format!("/proc/{job_pid}")).exists(),
                "the reuse worker itself is left alone"
            );
        }
        client.submit(&name, job(2, json!(["0"]))).await.unwrap();
        let done = collect(&mut events, 1, T).await;
        finished(&done[&2]);
        client.close(&name, false).await.unwrap();
        assert!(running(&["sleep", seconds]).is_empty());
    }
}

#[tokio::test]
async fn a_child_the_node_had_before_it_started_is_left_alone_and_reaped_when_it_exits() {
    let launch = Launch {
        background: Some("sleep 304.5 & sleep 1.5"),
        ..Default::default()
    };
    let node = NodeProc::launch(&[], launch).await;
    let (client, mut events) = connect(&node).await;
    // The reaper runs, and kills what a job leaves ...
    let spec = Computation::Program(ProgramComputation {
        command: vec!["sh".into(), "-c".into(), "sleep 304.7 &".into()],
        env: vec![],
    });
    open(&client, "bg", spec, &[]).await;
    client.submit("bg", job(1, json!([]))).await.unwrap();
    finished(&collect(&mut events, 1, T).await[&1]);
    wait_until("a job's sleep", || running(&["sleep", "304.7"])).await;
    // ... but not the children of the shell that became the node.
    let inherited = running(&["sleep", "304.5"]);
    assert_eq!(inherited.len(), 1, "{}", node.log());
    assert!(children_of(node.pid())
        .iter()
        .any(|(pid, _, _)| *pid == inherited[0]));
    // The one that exits on its own is reaped, not left a zombie.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_until("zombies among the node's children", || {
        children_of(node.pid())
            .into_iter()
            .filter(|(_, state, _)| state == "Z")
            .collect()
    })
    .await;
    unsafe { libc::kill(inherited[0], libc::SIGKILL) };
}
