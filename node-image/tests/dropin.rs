//! dispynode.py's node-side features: the service window and the cpus the node offers.

mod common;

use std::time::Duration;

use common::*;
use dispy_core::protocol::*;
use serde_json::json;

/// Now plus `minutes`, as `HH:MM` of local time.
fn local_time_in(minutes: i64) -> String {
    // SAFETY: time and localtime_r with valid pointers to locals.
    let now = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        (tm.tm_hour * 60 + tm.tm_min) as i64
    };
    let m = (now + minutes).rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[tokio::test]
async fn a_job_submitted_outside_the_service_window_waits() {
    // The window opens in an hour and a half and ends in three: now is outside it.
    let (start, end) = (local_time_in(90), local_time_in(180));
    let node = NodeProc::start(&["--service_start", &start, "--service_end", &end]).await;
    let (client, mut events) = connect(&node).await;
    assert_eq!(
        client.info().cpus,
        0,
        "outside the window the node offers no cpus"
    );
    open(
        &client,
        "w",
        Computation::Python(python("def f(x):\n    return x\n", "f")),
        &[],
    )
    .await;
    client.submit("w", job(1, json!([1]))).await.unwrap();
    let waited = tokio::time::timeout(
        Duration::from_secs(3),
        collect(&mut events, 1, Duration::from_secs(60)),
    );
    assert!(
        waited.await.is_err(),
        "a job ran outside the service window"
    );
    let info = client.node_info().await.unwrap();
    assert_eq!((info.busy, info.queued), (0, 1));
    assert!(node.log().contains("service window"), "{}", node.log());
}

#[tokio::test]
async fn a_node_inside_its_service_window_runs_jobs() {
    let (start, end) = (local_time_in(-60), local_time_in(60));
    let node = NodeProc::start(&[
        "--cpus",
        "2",
        "--service_start",
        &start,
        "--service_end",
        &end,
    ])
    .await;
    let (client, mut events) = connect(&node).await;
    assert_eq!(client.info().cpus, 2);
    open(
        &client,
        "w",
        Computation::Python(python("def f(x):\n    return x\n", "f")),
        &[],
    )
    .await;
    client.submit("w", job(1, json!([7]))).await.unwrap();
    let done = collect(&mut events, 1, Duration::from_secs(30)).await;
    assert_eq!(finished(&done[&1]), "7");
}
