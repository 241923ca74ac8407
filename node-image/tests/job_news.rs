//! What a native Python job sends its client while it runs: provisional results
//! (`dispy_provisional_result`) and files (`dispy_send_file`), on a real dispynode.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use dispy_core::protocol::*;
use dispy_core::ClientEvent;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

const T: Duration = Duration::from_secs(30);

/// Every event of each of `ids` up to and including its `Done`, in the order they came.
async fn jobs_events(
    events: &mut UnboundedReceiver<ClientEvent>,
    ids: &[u64],
) -> HashMap<u64, Vec<JobEventKind>> {
    let mut seen: HashMap<u64, Vec<JobEventKind>> = HashMap::new();
    let mut left = ids.len();
    while left > 0 {
        match tokio::time::timeout(T, events.recv()).await {
            Ok(Some(ClientEvent::Job(ev))) if ids.contains(&ev.job) => {
                left -= usize::from(matches!(ev.kind, JobEventKind::Done(_)));
                seen.entry(ev.job).or_default().push(ev.kind);
            }
            Ok(Some(ClientEvent::Disconnected { reason, .. })) => panic!("disconnected: {reason}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("event channel closed"),
            Err(_) => panic!("jobs {ids:?} not done within {T:?}; saw {seen:?}"),
        }
    }
    seen
}

async fn job_events(events: &mut UnboundedReceiver<ClientEvent>, id: u64) -> Vec<JobEventKind> {
    jobs_events(events, &[id]).await.remove(&id).unwrap()
}

const SOURCE: &str = r#"
def f(n):
    assert dispy_provisional_result({"done": 1, "of": n}) == 0
    assert dispy_provisional_result("x" * 10000) == 0  # over one pipe write
    os.makedirs("out", exist_ok=True)
    with open("out/table.csv", "w") as fh:
        fh.write("a,b\n1,2\n")
    assert dispy_send_file("out/table.csv") == 0
    os.remove("out/table.csv")  # what was sent is what the file held at the call
    with open("/tmp/dispy-job-news-%d.bin" % os.getpid(), "wb") as fh:
        fh.write(bytes(range(256)) * 40)
    assert dispy_send_file(fh.name) == 0  # outside the job's directory: its base name
    os.remove(fh.name)
    with open("big.bin", "wb") as fh:
        fh.write(b"z" * 300000)
    print("big:", dispy_send_file("big.bin"))
    print("missing:", dispy_send_file("no-such-file"))
    return n * 2
"#;

#[tokio::test]
async fn provisional_results_and_sent_files_reach_the_client_before_the_result() {
    let node = NodeProc::start(&["--max_file_size", "200k"]).await;
    let (client, mut events) = connect(&node).await;
    open(
        &client,
        "news",
        Computation::Python(python(SOURCE, "f")),
        &[],
    )
    .await;
    client.submit("news", job(1, json!([21]))).await.unwrap();
    let seen = job_events(&mut events, 1).await;

    let provisional: Vec<&str> = seen
        .iter()
        .filter_map(|k| match k {
            JobEventKind::Provisional { result } => Some(result.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(provisional.len(), 2, "{seen:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(provisional[0]).unwrap(),
        json!({"done": 1, "of": 21})
    );
    assert_eq!(provisional[1].len(), 10002, "a large one arrives whole");

    let files: Vec<&SentFile> = seen
        .iter()
        .filter_map(|k| match k {
            JobEventKind::File(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(
        files.len(),
        2,
        "{:?}",
        files.iter().map(|f| &f.name).collect::<Vec<_>>()
    );
    assert_eq!(files[0].name, "out/table.csv");
    assert_eq!(files[0].data, b"a,b\n1,2\n");
    assert!(
        files[1].name.starts_with("dispy-job-news-"),
        "{}",
        files[1].name
    );
    assert_eq!(files[1].data.len(), 256 * 40);

    let JobEventKind::Done(result) = seen.last().unwrap() else {
        unreachable!()
    };
    assert_eq!(finished(result), "42");
    // Over --max_file_size, or missing: -1 to the job, the reason in its stderr.
    assert!(
        result.stdout.contains("big: -1\nmissing: -1\n"),
        "{}",
        result.stdout
    );
    assert!(
        result.stderr.contains("big.bin is over the 204800 bytes"),
        "{}",
        result.stderr
    );
    assert!(
        result.stderr.contains("no-such-file is not a regular file"),
        "{}",
        result.stderr
    );
    // The node's copies are gone once sent.
    let sent_dir = node.prefix().join("news").join(".dispy-sent");
    let left = std::fs::read_dir(&sent_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "copies left in {}", sent_dir.display());
}

#[tokio::test]
async fn a_job_sends_at_most_the_limit_in_files_all_together() {
    let node = NodeProc::start(&["--max_file_size", "100k"]).await;
    let (client, mut events) = connect(&node).await;
    let src = r#"
def f(name):
    with open(name, "wb") as fh:
        fh.write(b"p" * 40000)
    return [dispy_send_file(name) for _ in range(3)]
"#;
    open(&client, "cap", Computation::Python(python(src, "f")), &[]).await;
    client
        .submit("cap", job(1, json!(["part-1"])))
        .await
        .unwrap();
    client
        .submit("cap", job(2, json!(["part-2"])))
        .await
        .unwrap();
    let mut all = jobs_events(&mut events, &[1, 2]).await;
    for id in [1, 2] {
        let seen = all.remove(&id).unwrap();
        let sent = seen
            .iter()
            .filter(|k| matches!(k, JobEventKind::File(_)))
            .count();
        let JobEventKind::Done(result) = seen.last().unwrap() else {
            unreachable!()
        };
        // Two fit in 100 KiB, the third does not; each job has its own allowance.
        assert_eq!(finished(result), "[0, 0, -1]", "job {id}");
        assert_eq!(sent, 2, "job {id}");
    }
}

#[tokio::test]
async fn provisional_results_go_only_to_a_running_job_s_client_and_setup_has_none() {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    let src = r#"
def setup():
    global at_setup
    at_setup = (dispy_provisional_result(1), dispy_send_file(__file__ if "__file__" in globals() else "x"))
    return 0

def f():
    return list(at_setup)
"#;
    let mut py = python(src, "f");
    py.setup = Some("setup".into());
    open(&client, "setup", Computation::Python(py), &[]).await;
    client.submit("setup", job(1, json!([]))).await.unwrap();
    let seen = job_events(&mut events, 1).await;
    assert_eq!(seen.len(), 2, "Running and Done only: {seen:?}");
    let JobEventKind::Done(result) = &seen[1] else {
        unreachable!()
    };
    assert_eq!(finished(result), "[-1, -1]");
}

#[tokio::test]
async fn a_job_that_plants_a_symlink_or_a_fifo_as_its_sent_copy_gets_nothing_sent_and_the_node_serves_on(
) {
    let node = NodeProc::start(&[]).await;
    let (client, mut events) = connect(&node).await;
    // The job writes the node's pipe frames itself, naming a symlink to a file outside its
    // directory and then a FIFO as the copy to send.
    let src = r#"
import json, struct
def f():
    d = os.path.join(os.getcwd(), ".dispy-sent")
    os.makedirs(d, exist_ok=True)
    link, fifo = os.path.join(d, "9-1"), os.path.join(d, "9-2")
    os.symlink("/etc/hostname", link)
    os.mkfifo(fifo)
    run = dispy_host_current()
    for path in (link, fifo):
        body = struct.pack(">Q", run) + json.dumps({"path": path, "name": "x"}).encode()
        os.write(dispy_host_fd(), struct.pack(">IB", len(body) + 1, ord("S")) + body)
    return "planted"
"#;
    let mut py = python(src, "f");
    // The hooks the job needs to write frames: the host's reply fd and its current run token.
    py.source = format!(
        "import gc\n{}\ndef dispy_host_current():\n    return [o for o in gc.get_objects() if type(o).__name__ == 'Host'][0].current[0]\ndef dispy_host_fd():\n    return [o for o in gc.get_objects() if type(o).__name__ == 'Host'][0].reply_fd\n",
        py.source
    );
    open(&client, "plant", Computation::Python(py), &[]).await;
    client.submit("plant", job(1, json!([]))).await.unwrap();
    let seen = job_events(&mut events, 1).await;
    assert!(
        !seen.iter().any(|k| matches!(k, JobEventKind::File(_))),
        "a planted copy was sent: {seen:?}"
    );
    let JobEventKind::Done(result) = seen.last().unwrap() else {
        unreachable!()
    };
    assert_eq!(finished(result), "\"planted\"");
    // Still serving: the next job runs.
    client.submit("plant", job(2, json!([]))).await.unwrap();
    let next = job_events(&mut events, 2).await;
    assert!(matches!(next.last(), Some(JobEventKind::Done(_))));
    assert!(node.log().contains("a sent file dropped"), "{}", node.log());
}
