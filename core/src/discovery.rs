//! UDP discovery, client side: ping nodes (usually a broadcast address) and collect answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::protocol::{
    decode_datagram, encode_datagram, Discovery, NodeAnnouncement, PROTOCOL_VERSION,
};

/// Sends a discovery ping to each target and returns the nodes that answered within `wait`,
/// keyed by their `addr:port` (a node answering on several interfaces is listed once).
pub async fn discover(
    bind: SocketAddr,
    targets: &[SocketAddr],
    wait: Duration,
) -> std::io::Result<Vec<NodeAnnouncement>> {
    let socket = UdpSocket::bind(bind).await?;
    socket.set_broadcast(true)?;
    let ping = encode_datagram(&Discovery::Ping {
        protocol: PROTOCOL_VERSION,
    });
    for t in targets {
        socket.send_to(&ping, t).await?;
    }
    let mut found = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 2048];
    loop {
        let recv = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await;
        let Ok(Ok((n, from))) = recv else { break };
        match decode_datagram(&buf[..n]) {
            Some(Ok(Discovery::Pong(node))) => {
                found.insert(format!("{}:{}", node.addr, node.port), node);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!(%from, "ignoring discovery answer: {e}"),
            None => {
                tracing::debug!(%from, "ignoring a datagram that is not a native discovery answer")
            }
        }
    }
    Ok(found.into_values().collect())
}
