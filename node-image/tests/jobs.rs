//! Program and Python computations on a real dispynode.

mod common;

use std::time::Duration;

use common::*;
use dispy_core::job::JobStatus;
use dispy_core::protocol::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn program_jobs_return_exit_code_and_output() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    let script = b"#!/bin/sh\necho \"args: $*\"\necho oops >&2\nexit \"$2\"\n";
    client
        .compute(ComputeRequest {
            computation: "prog".into(),
            spec: Computation::Program(ProgramComputation {
                command: vec!["prog.sh".into(), "fixed".into()],
                env: vec![],
            }),
            keep_files: false,
        })
        .await
        .unwrap();
    client
        .send_file("prog", "prog.sh", script, 0o755, None)
        .await
        .unwrap();
    assert_eq!(client.setup("prog").await.unwrap(), 2);
    client
        .submit("prog", job(1, json!(["0", "x y"])))
        .await
        .unwrap();
    client.submit("prog", job(2, json!([3]))).await.unwrap();
    let done = collect(&mut events, 2, T).await;
    assert_eq!(finished(&done[&1]), "0");
    assert_eq!(done[&1].stdout, "args: fixed 0 x y\n");
    assert_eq!(done[&1].stderr, "oops\n");
    // dispy's rule: a non-zero exit is still Finished, the code is the result.
    assert_eq!(finished(&done[&2]), "3");
    let (t0, t1) = (done[&2].start_time.unwrap(), done[&2].end_time.unwrap());
    assert!(t0 <= t1 && t1 - t0 < 10.0);
    client.close("prog", false).await.unwrap();
    assert!(
        !node.prefix().join("prog").exists(),
        "files removed at close"
    );
}

#[tokio::test]
async fn program_output_is_bounded_and_the_cut_counted() {
    let node = NodeProc::start(&["--max-output", "1k"]).await;
    let (client, mut events) = connect(&node).await;
    let spec = Computation::Program(ProgramComputation {
        command: vec!["head".into(), "-c".into()],
        env: vec![],
    });
    open(&client, "big", spec, &[]).await;
    // `head -c N /dev/zero` writes N bytes.
    client
        .submit("big", job(1, json!(["5000", "/dev/zero"])))
        .await
        .unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&1]), "0");
    assert_eq!(done[&1].stdout.len(), 1024);
    assert_eq!(done[&1].stdout_dropped, 5000 - 1024);
}

#[tokio::test]
async fn python_output_is_bounded_and_a_result_larger_than_a_pipe_write_arrives_whole() {
    let node = NodeProc::start(&["--max-output", "1k"]).await;
    let (client, mut events) = connect(&node).await;
    let src = r#"
def f(n):
    print('é' * n, end='')
    sys.stderr.write('x' * 10)
    return '☃' * n
"#;
    for reuse in [false, true] {
        let name = format!("out-{reuse}");
        let spec = PythonComputation {
            reuse_workers: reuse,
            ..python(src, "f")
        };
        open(&client, &name, Computation::Python(spec), &[]).await;
        client.submit(&name, job(1, json!([5000]))).await.unwrap();
        client.submit(&name, job(2, json!([3]))).await.unwrap();
        let done = collect(&mut events, 2, T).await;
        // Cut at 1 KiB of text, the rest counted; stderr untouched.
        assert_eq!(done[&1].stdout, "é".repeat(1024), "reuse {reuse}");
        assert_eq!(done[&1].stdout_dropped, 5000 - 1024);
        assert_eq!(done[&1].stderr, "x".repeat(10));
        assert_eq!(done[&1].stderr_dropped, 0);
        // 5,000 snowmen are 30 KB of JSON escapes, far more than one atomic pipe write.
        let big: String = serde_json::from_str(finished(&done[&1])).unwrap();
        assert_eq!(big, "☃".repeat(5000));
        assert_eq!(finished(&done[&2]), "\"\\u2603\\u2603\\u2603\"");
        assert_eq!(
            (done[&2].stdout.as_str(), done[&2].stdout_dropped),
            ("ééé", 0)
        );
        client.close(&name, false).await.unwrap();
    }
}

const SETUP_SOURCE: &str = r#"
def setup(path, scale):
    global text, factor, counter
    text = open(path).read()
    factor = scale
    counter = 0
    return 0

def count(word):
    global counter
    counter += 1
    print("counting", word)
    return {"word": word, "n": text.count(word) * factor, "counter": counter, "pid": os.getpid()}

def cleanup(path, scale):
    open("/tmp/never-used", "w") if False else None
"#;

fn setup_spec(reuse: bool) -> Computation {
    Computation::Python(PythonComputation {
        setup: Some("setup".into()),
        setup_args: Some(json!(["words.txt", 10]).to_string()),
        cleanup: Some("cleanup".into()),
        reuse_workers: reuse,
        ..python(SETUP_SOURCE, "count")
    })
}

#[tokio::test]
async fn setup_globals_are_seen_by_jobs_and_job_changes_do_not_leak() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    open(
        &client,
        "wc",
        setup_spec(false),
        &[("words.txt", b"alpha beta beta gamma\n")],
    )
    .await;
    for (i, w) in ["alpha", "beta", "delta", "beta"].iter().enumerate() {
        client
            .submit("wc", job(i as u64, json!([w])))
            .await
            .unwrap();
    }
    let done = collect(&mut events, 4, T).await;
    let v = |i: u64| -> serde_json::Value { serde_json::from_str(finished(&done[&i])).unwrap() };
    assert_eq!(v(0)["n"], 10);
    assert_eq!(v(1)["n"], 20);
    assert_eq!(v(2)["n"], 0);
    for i in 0..4 {
        // Each job starts from setup's state: its own increment is the only one it sees.
        assert_eq!(v(i)["counter"], 1, "job {i} saw another job's change");
        assert_eq!(
            done[&i].stdout,
            format!("counting {}\n", v(i)["word"].as_str().unwrap())
        );
    }
    client.close("wc", false).await.unwrap();
}

#[tokio::test]
async fn reuse_workers_keep_state_between_jobs() {
    let node = NodeProc::start(&["--cpus", "1"]).await;
    let (client, mut events) = connect(&node).await;
    open(
        &client,
        "wc",
        setup_spec(true),
        &[("words.txt", b"beta beta\n")],
    )
    .await;
    for i in 0..5 {
        client.submit("wc", job(i, json!(["beta"]))).await.unwrap();
    }
    let done = collect(&mut events, 5, T).await;
    let mut counters: Vec<i64> = (0..5)
        .map(|i| {
            serde_json::from_str::<serde_json::Value>(finished(&done[&i])).unwrap()["counter"]
                .as_i64()
                .unwrap()
        })
        .collect();
    counters.sort();
    // One worker (one cpu) ran all five, one after another, keeping its globals.
    assert_eq!(counters, vec![1, 2, 3, 4, 5]);
    let pids: std::collections::HashSet<_> = (0..5)
        .map(|i| {
            serde_json::from_str::<serde_json::Value>(done[&i].result.as_deref().unwrap()).unwrap()
                ["pid"]
                .clone()
        })
        .collect();
    assert_eq!(pids.len(), 1);
}

#[tokio::test]
async fn an_exception_gives_terminated_with_the_traceback() {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    let src = "def f(x):\n    print('before')\n    raise ValueError('bad value %s' % x)\n";
    open(&client, "raise", Computation::Python(python(src, "f")), &[]).await;
    client.submit("raise", job(1, json!([7]))).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    let r = &done[&1];
    assert_eq!(r.status, JobStatus::Terminated);
    let exc = r.exception.as_deref().unwrap();
    assert!(exc.contains("ValueError: bad value 7"), "{exc}");
    assert!(exc.contains("Traceback"), "{exc}");
    assert_eq!(r.stdout, "before\n");
    assert!(r.result.is_none());
}

#[tokio::test]
async fn arguments_and_results_cross_as_json_and_a_result_json_cannot_carry_is_named() {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    let src = r#"
def f(x, scale=1, **kw):
    if x == 'set':
        return {1, 2}
    if x == 7:
        return {'scale': scale, 'kw': kw, 'inf': float('inf'), 'big': 10**30}
    return {'x': x, 'scale': scale}
"#;
    open(&client, "json", Computation::Python(python(src, "f")), &[]).await;
    let text = json!(["é ☃ \"quoted\"\n", [1.5, null, true, {"nested": {}}]]);
    client.submit("json", job(1, json!([text]))).await.unwrap();
    let mut kw = job(2, json!([7]));
    kw.kwargs = json!({"scale": 3, "extra": "y"}).to_string();
    client.submit("json", kw).await.unwrap();
    client.submit("json", job(3, json!(["set"]))).await.unwrap();
    let done = collect(&mut events, 3, T).await;
    let one: serde_json::Value = serde_json::from_str(finished(&done[&1])).unwrap();
    assert_eq!(one["x"], text);
    assert_eq!(one["scale"], 1);
    // Python's JSON writes infinity as Infinity, which serde_json does not read: the text says it.
    assert!(
        finished(&done[&2]).contains("\"inf\": Infinity"),
        "{:?}",
        done[&2]
    );
    assert!(finished(&done[&2]).contains("\"big\": 1000000000000000000000000000000"));
    assert!(finished(&done[&2]).contains("\"kw\": {\"extra\": \"y\"}"));
    assert!(finished(&done[&2]).contains("\"scale\": 3"));
    assert_eq!(done[&3].status, JobStatus::Terminated);
    let exc = done[&3].exception.as_deref().unwrap();
    assert!(
        exc.contains("the result of type set cannot be sent as JSON"),
        "{exc}"
    );
}

#[tokio::test]
async fn a_job_killed_by_a_signal_is_terminated_and_the_node_survives() {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    let src = "import signal\ndef f(sig):\n    if sig:\n        os.kill(os.getpid(), sig)\n    return 'alive'\n";
    open(&client, "sig", Computation::Python(python(src, "f")), &[]).await;
    client.submit("sig", job(1, json!([9]))).await.unwrap();
    client.submit("sig", job(2, json!([11]))).await.unwrap();
    let done = collect(&mut events, 2, T).await;
    assert_eq!(done[&1].status, JobStatus::Terminated);
    assert!(
        done[&1]
            .exception
            .as_deref()
            .unwrap()
            .contains("killed by signal 9"),
        "{:?}",
        done[&1]
    );
    assert!(
        done[&2].exception.as_deref().unwrap().contains("signal 11"),
        "{:?}",
        done[&2]
    );
    client.submit("sig", job(3, json!([0]))).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(finished(&done[&3]), "\"alive\"");
}

#[tokio::test]
async fn cpus_limit_holds_under_100_jobs_and_jobs_start_in_order() {
    let node = NodeProc::start(&["--cpus", "3"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "import time\ndef f(i):\n    time.sleep(0.02)\n    return i\n";
    open(&client, "many", Computation::Python(python(src, "f")), &[]).await;
    for i in 0..100 {
        client.submit("many", job(i, json!([i]))).await.unwrap();
    }
    let done = collect(&mut events, 100, Duration::from_secs(60)).await;
    let mut edges = Vec::new();
    for (i, r) in &done {
        assert_eq!(finished(r), i.to_string());
        edges.push((r.start_time.unwrap(), 1));
        edges.push((r.end_time.unwrap(), -1));
    }
    edges.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut now, mut peak) = (0, 0);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    assert!(peak <= 3, "{peak} jobs ran at once on 3 cpus");
    assert!(peak >= 2, "jobs should overlap on 3 cpus (peak {peak})");
    // FIFO: job 0 started before job 99.
    assert!(done[&0].start_time < done[&99].start_time);
}

#[tokio::test]
async fn cancel_a_queued_and_a_running_job() {
    let node = NodeProc::start(&["--cpus", "1", "--terminate-grace", "1s"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "import time\ndef f(t):\n    time.sleep(t)\n    return t\n";
    open(&client, "slow", Computation::Python(python(src, "f")), &[]).await;
    client.submit("slow", job(1, json!([30]))).await.unwrap();
    client.submit("slow", job(2, json!([0]))).await.unwrap();
    // Wait for job 1 to be Running before cancelling it.
    loop {
        match tokio::time::timeout(T, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            dispy_core::ClientEvent::Job(JobEvent {
                job: 1,
                kind: JobEventKind::Running { .. },
                ..
            }) => break,
            _ => continue,
        }
    }
    client.cancel("slow", 2).await.unwrap();
    client.cancel("slow", 1).await.unwrap();
    let done = collect(&mut events, 2, T).await;
    assert_eq!(done[&2].status, JobStatus::Cancelled);
    assert_eq!(done[&1].status, JobStatus::Terminated);
    assert!(done[&1].end_time.unwrap() - done[&1].start_time.unwrap() < 10.0);
    let err = client.cancel("slow", 99).await.unwrap_err();
    assert_eq!(err.node_code(), Some(ErrorCode::UnknownJob));
}

#[tokio::test]
async fn a_program_that_ignores_sigterm_is_killed_after_the_grace() {
    let node = NodeProc::start(&["--cpus", "1", "--terminate-grace", "300ms"]).await;
    let (client, mut events) = connect(&node).await;
    let spec = Computation::Program(ProgramComputation {
        command: vec![
            "sh".into(),
            "-c".into(),
            "trap '' TERM; echo started; sleep 30 & wait; sleep 30".into(),
        ],
        env: vec![],
    });
    open(&client, "stubborn", spec, &[]).await;
    client.submit("stubborn", job(1, json!([]))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.cancel("stubborn", 1).await.unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(done[&1].status, JobStatus::Terminated);
    assert!(
        done[&1].exception.as_deref().unwrap().contains("SIGKILL"),
        "{:?}",
        done[&1]
    );
}

#[tokio::test]
async fn cluster_and_per_job_depends() {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    let src = "def f(name):\n    return open(name).read()\n";
    open(
        &client,
        "deps",
        Computation::Python(python(src, "f")),
        &[("data/shared.txt", b"shared")],
    )
    .await;
    // Sending the same file again is skipped.
    assert!(!client
        .send_file("deps", "data/shared.txt", b"shared", 0o644, None)
        .await
        .unwrap());
    assert!(client
        .send_file("deps", "job1.txt", b"only for job 1", 0o644, Some(1))
        .await
        .unwrap());
    let mut j1 = job(1, json!(["job1.txt"]));
    j1.depends = vec!["job1.txt".into()];
    client.submit("deps", j1).await.unwrap();
    client
        .submit("deps", job(2, json!(["data/shared.txt"])))
        .await
        .unwrap();
    let done = collect(&mut events, 2, T).await;
    assert_eq!(finished(&done[&1]), "\"only for job 1\"");
    assert_eq!(finished(&done[&2]), "\"shared\"");
    let dir = node.prefix().join("deps");
    assert!(dir.join("data/shared.txt").exists());
    assert!(
        !dir.join("job1.txt").exists(),
        "per-job file removed after its job"
    );
    // A per-job file that was never sent is refused by name.
    let mut j3 = job(3, json!(["nope.txt"]));
    j3.depends = vec!["nope.txt".into()];
    let err = client.submit("deps", j3).await.unwrap_err();
    assert!(
        err.to_string().contains("\"nope.txt\" was not sent"),
        "{err}"
    );
}

#[tokio::test]
async fn large_files_travel_in_chunks_with_checksums() {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
    let src = "import hashlib\ndef f(name):\n    return hashlib.sha256(open(name,'rb').read()).hexdigest()\n";
    open(
        &client,
        "big",
        Computation::Python(python(src, "f")),
        &[("blob.bin", &data)],
    )
    .await;
    client
        .submit("big", job(1, json!(["blob.bin"])))
        .await
        .unwrap();
    let done = collect(&mut events, 1, T).await;
    assert_eq!(
        finished(&done[&1]),
        format!("\"{}\"", dispy_core::auth::sha256_hex(&data))
    );
}

/// Processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After "(comm)": state, ppid, pgrp.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            rest.split_whitespace().nth(2) == Some(pgid.to_string().as_str())
        })
        .collect()
}

#[tokio::test]
async fn nothing_the_python_host_forked_outlives_it_when_it_is_killed() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "def f(x):\n    return os.getppid()\n";
    open(
        &client,
        "orphans",
        Computation::Python(python(src, "f")),
        &[],
    )
    .await;
    for id in 1..=4 {
        client
            .submit("orphans", job(id, json!([id])))
            .await
            .unwrap();
    }
    let done = collect(&mut events, 4, T).await;
    let host: i32 = finished(&done[&1]).parse().unwrap();
    // The host leads its process group; its idle job processes (spares) are in it.
    assert!(group_members(host).len() > 1, "spares are forked ahead");
    unsafe { libc::kill(host, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = group_members(host);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes of the killed host's group still alive: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_reused_worker_killed_mid_job_is_replaced_by_a_fresh_fork() {
    let node = NodeProc::start(&["--cpus", "1", "--terminate-grace", "1s"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "import time\nstate = []\ndef f(t):\n    state.append(t)\n    time.sleep(t)\n    return [len(state), os.getpid()]\n";
    let spec = Computation::Python(PythonComputation {
        reuse_workers: true,
        ..python(src, "f")
    });
    open(&client, "w", spec, &[]).await;
    client.submit("w", job(1, json!([0]))).await.unwrap();
    client.submit("w", job(2, json!([30]))).await.unwrap();
    let first = collect(&mut events, 1, T).await;
    let v1: serde_json::Value = serde_json::from_str(finished(&first[&1])).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.cancel("w", 2).await.unwrap();
    let second = collect(&mut events, 1, T).await;
    assert_eq!(second[&2].status, JobStatus::Terminated);
    assert!(
        second[&2]
            .exception
            .as_deref()
            .unwrap()
            .contains("worker process"),
        "{:?}",
        second[&2]
    );
    client.submit("w", job(3, json!([0]))).await.unwrap();
    let third = collect(&mut events, 1, T).await;
    let v3: serde_json::Value = serde_json::from_str(finished(&third[&3])).unwrap();
    // A fresh fork from the post-setup state: its own pid, and the killed worker's globals gone.
    assert_ne!(v1[1], v3[1]);
    assert_eq!(v3[0], 1);
}

/// The host runs its module compiled by the interpreter probe (a host compiling its own
/// source would keep the compiler's memory, which every fork copies), and still works,
/// compiling it itself, where that cache cannot be written.
#[tokio::test]
async fn the_python_host_runs_compiled_and_without_the_cache_too() {
    let square = || Computation::Python(python("def sq(n):\n    return n * n\n", "sq"));
    let cache_of = |node: &NodeProc| node.prefix().join(".dispy-host").join("__pycache__");

    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    open(&client, "sq", square(), &[]).await;
    client.submit("sq", job(1, json!([7]))).await.unwrap();
    assert_eq!(finished(&collect(&mut events, 1, T).await[&1]), "49");
    let cached: Vec<String> = std::fs::read_dir(cache_of(&node))
        .expect("the probe made the cache")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cached
            .iter()
            .any(|name| name.starts_with("dispy_host.") && name.ends_with(".pyc")),
        "compiled host module in {cached:?}"
    );

    // A file where the cache directory would go: py_compile cannot write there.
    let node = NodeProc::start(&["--cpus", "2"]).await;
    std::fs::write(cache_of(&node), b"not a directory").unwrap();
    let (client, mut events) = connect(&node).await;
    open(&client, "sq", square(), &[]).await;
    client.submit("sq", job(1, json!([8]))).await.unwrap();
    client.submit("sq", job(2, json!([9]))).await.unwrap();
    let done = collect(&mut events, 2, T).await;
    assert_eq!(finished(&done[&1]), "64");
    assert_eq!(finished(&done[&2]), "81");
    assert!(
        node.log().contains("cannot cache the compiled Python host"),
        "the node says why: {}",
        node.log()
    );
}

/// The host rehearses the job path before forking (see `Host.rehearse`) and starts with
/// LD_BIND_NOW: neither may show in a job. The user's function never runs in the rehearsal,
/// its output buffers are the job's own, and the environment is the node's.
#[tokio::test]
async fn the_host_rehearsal_and_bind_now_leave_no_trace_in_jobs() {
    let node = NodeProc::start(&["--cpus", "2"]).await;
    let (client, mut events) = connect(&node).await;
    let src = "calls = 0\n\
        def f(n):\n    global calls\n    calls += 1\n    print('job', n)\n    \
        return [calls, os.environ.get('LD_BIND_NOW')]\n";
    open(&client, "quiet", Computation::Python(python(src, "f")), &[]).await;
    for id in 1..=3 {
        client.submit("quiet", job(id, json!([id]))).await.unwrap();
    }
    let done = collect(&mut events, 3, T).await;
    for id in 1..=3 {
        assert_eq!(
            finished(&done[&id]),
            "[1, null]",
            "job {id}: {:?}",
            done[&id]
        );
        assert_eq!(done[&id].stdout, format!("job {id}\n"));
        assert_eq!(done[&id].stderr, "");
    }
}
