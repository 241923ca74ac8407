//! What the machine has free, as a real `dispynode` on 127.0.0.1 tells native clients (in its
//! `NodeInfo`) and Prometheus (its gauges). The dispy side (PONG, PULSE, NODE_STATUS) is
//! checked with the real client in `compat/test_avail.py`.

mod common;

use std::time::Duration;

use common::*;
use dispy_core::protocol::AvailInfo;

fn assert_plausible(avail: &AvailInfo) {
    assert!(avail.memory > 0, "no memory available: {avail:?}");
    assert!(avail.disk > 0, "no free disk under the prefix: {avail:?}");
    assert!((0.0..=100.0).contains(&avail.cpu), "cpu idle: {avail:?}");
    assert!((0.0..=100.0).contains(&avail.swap), "swap free: {avail:?}");
}

#[tokio::test]
async fn node_info_says_what_the_machine_has_free_from_the_start_and_later() {
    let node = NodeProc::start(&[]).await;
    let (client, _events) = connect(&node).await;
    // The welcome's info: sampled before the node served anyone.
    let first = client
        .info()
        .avail
        .expect("avail in the welcome's NodeInfo");
    assert_plausible(&first);

    // After a sampling period, a fresh NodeInfo carries a later sample.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = client.node_info().await.unwrap().avail.expect("avail");
    assert_plausible(&later);
}

/// The value of an unlabelled metric in a Prometheus text body.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a number ({e}) in:\n{body}"))
}

#[tokio::test]
async fn metrics_show_cpu_memory_disk_and_swap_free() {
    let maddr = format!("127.0.0.1:{}", free_port());
    let node = NodeProc::start(&["--metrics-addr", &maddr]).await;
    let (client, _events) = connect(&node).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        match tokio::net::TcpStream::connect(&maddr).await {
            Ok(_) => break http_get(&maddr, "/metrics").await,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no metrics server at {maddr}: {e}"),
        }
    };
    let gauges = AvailInfo {
        cpu: metric(&body, "dispynode_cpu_idle_percent"),
        memory: metric(&body, "dispynode_memory_available_bytes") as u64,
        disk: metric(&body, "dispynode_disk_free_bytes") as u64,
        swap: metric(&body, "dispynode_swap_free_percent"),
    };
    assert_plausible(&gauges);
    // The gauges and the node info are the same samples, a second apart at most: the disk
    // under the test's prefix does not change by a gigabyte in that time.
    let info = client.node_info().await.unwrap().avail.expect("avail");
    assert!(
        info.disk.abs_diff(gauges.disk) < 1 << 30,
        "{info:?} vs {gauges:?}"
    );
}
