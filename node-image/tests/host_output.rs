//! What user code writes to the Python host's fd 1 or 2 reaches the node's log in bounded
//! pieces: however much a job writes, the node's memory stays where it was.

mod common;

use std::time::Duration;

use common::*;
use dispy_core::protocol::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_job_writing_300_mb_to_stderr_without_a_newline_finishes_and_the_node_stays_small() {
    // The node balloons into this limit, and fails the test, rather than into the machine.
    let launch = Launch {
        address_space: Some(512 * MIB),
        ..Default::default()
    };
    let node = NodeProc::launch(&["--cpus", "1"], launch).await;
    let (client, mut events) = connect(&node).await;
    let src = "def flood(n):\n    chunk = b'x' * (1 << 20)\n    for _ in range(n):\n        \
        os.write(2, chunk)\n    return 42\n";
    open(
        &client,
        "flood",
        Computation::Python(python(src, "flood")),
        &[],
    )
    .await;
    let idle = node.status_bytes("VmRSS");
    client.submit("flood", job(1, json!([300]))).await.unwrap();
    let done = collect(&mut events, 1, Duration::from_secs(120)).await;
    assert_eq!(finished(&done[&1]), "42");
    let peak = node.status_bytes("VmHWM");
    assert!(
        peak < idle + 100 * MIB,
        "the node's memory grew from {} MiB to a peak of {} MiB",
        idle / MIB,
        peak / MIB
    );
    // The host's stderr ends when the computation closes: the line is logged, cut.
    client.close("flood", false).await.unwrap();
    let cut = 300 * MIB - 4096;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.log().contains(&format!("… ({cut} bytes cut)")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the cut line is logged with its count: {}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
