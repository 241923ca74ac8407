//! UDP discovery between two private network namespaces joined by a veth pair. Nothing here
//! touches the machine's real interfaces. Needs root (to create namespaces); it fails, rather
//! than skips, without it.

mod common;

#[path = "common/netns.rs"]
mod netns;

use std::net::SocketAddr;
use std::time::Duration;

use dispy_core::discovery::discover;
use dispy_core::protocol::*;
use dispy_core::NodeClient;
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_node_is_announced_and_found_by_broadcast_in_a_private_namespace() {
    let mut net = netns::Netns::new("d");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_dispynode"));
    // A client in B listens on the client port for announcements before the nodes start.
    let listener = net.run_in(&net.b.clone(), || {
        std::net::UdpSocket::bind("0.0.0.0:9700").unwrap()
    });
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let a = net.a.clone();
    // One node bound to all interfaces, one bound to loopback only (it must not announce).
    net.start_node(
        bin,
        &a,
        &["--port", "9701", "--cpus", "2", "--name", "node-a"],
    );
    net.start_node(
        bin,
        &a,
        &[
            "-i",
            "127.0.0.1",
            "--port",
            "9801",
            "--name",
            "loopback-only",
        ],
    );

    let mut buf = [0u8; 2048];
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("the node's announcement");
    let Some(Ok(Discovery::Pong(ann))) = decode_datagram(&buf[..n]) else {
        panic!("not an announcement")
    };
    assert_eq!(from.ip().to_string(), "10.231.0.1");
    assert_eq!(
        (ann.name.as_str(), ann.addr.as_str(), ann.port, ann.cpus),
        ("node-a", "10.231.0.1", 9701, 2)
    );
    listener
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    while let Ok((n, from)) = listener.recv_from(&mut buf) {
        if buf[..n].starts_with(b"PING:") && from.ip().to_string() == "10.231.0.1" {
            continue; // node-a's announcement to Python dispy clients
        }
        let extra = decode_datagram(&buf[..n]);
        panic!(
            "a second announcement arrived (the loopback-only node must stay silent): {extra:?}"
        );
    }

    // Broadcast discovery from B finds exactly node-a, then B runs a job on it over TCP.
    let found = net.run_in(&net.b.clone(), || {
        rt().block_on(async {
            let target: SocketAddr = "10.231.0.255:9701".parse().unwrap();
            let nodes = discover(
                "0.0.0.0:0".parse().unwrap(),
                &[target],
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            let node = nodes.first().cloned().expect("a node answered");
            let (client, mut events) =
                NodeClient::connect(&format!("{}:{}", node.addr, node.port), &common::config(""))
                    .await
                    .unwrap();
            common::open(
                &client,
                "far",
                Computation::Python(common::python(
                    "def f():\n    return dispy_node_name\n",
                    "f",
                )),
                &[],
            )
            .await;
            client
                .submit("far", common::job(1, json!([])))
                .await
                .unwrap();
            let done = common::collect(&mut events, 1, Duration::from_secs(30)).await;
            (nodes, common::finished(&done[&1]).to_string())
        })
    });
    let (nodes, result) = found;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].addr, "10.231.0.1");
    assert_eq!(result, "\"node-a\"");
}

#[test]
fn a_node_bound_to_one_address_with_dash_i_still_answers_broadcast_pings_on_its_subnet() {
    let mut net = netns::Netns::new("i");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_dispynode"));
    let a = net.a.clone();
    // dispynode.py's way: bound to one address, found by the subnet's broadcast.
    net.start_node(
        bin,
        &a,
        &["-i", "10.231.0.1", "--port", "9701", "--name", "bound"],
    );
    let nodes = net.run_in(&net.b.clone(), || {
        rt().block_on(async {
            let target: SocketAddr = "10.231.0.255:9701".parse().unwrap();
            let mut nodes = Vec::new();
            // The node may still be starting: ask a few times.
            for _ in 0..10 {
                nodes = discover(
                    "0.0.0.0:0".parse().unwrap(),
                    &[target],
                    Duration::from_millis(500),
                )
                .await
                .unwrap();
                if !nodes.is_empty() {
                    break;
                }
            }
            nodes
        })
    });
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(
        (nodes[0].name.as_str(), nodes[0].addr.as_str()),
        ("bound", "10.231.0.1")
    );
}
