//! UDP discovery, client side: ping nodes (usually a broadcast address) and collect answers.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
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
        // A target without a route (no interface for it) is not an error for the others.
        if let Err(e) = socket.send_to(&ping, t).await {
            tracing::debug!(%t, "discovery ping not sent: {e}");
        }
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

/// An IPv4 interface of this host (loopback left out).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interface {
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub broadcast: Option<Ipv4Addr>,
}

pub fn interfaces() -> Vec<Interface> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Some(Interface {
                ip: v4.ip,
                netmask: v4.netmask,
                broadcast: v4.broadcast,
            }),
            _ => None,
        })
        .collect()
}

/// The broadcast address of each interface (with the interface's own address), of only the
/// interface with address `bound` unless it is unspecified. Loopback has none.
pub fn interface_broadcasts(bound: std::net::IpAddr) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let std::net::IpAddr::V4(bound) = bound else {
        return vec![];
    };
    if bound.is_loopback() {
        return vec![];
    }
    interfaces()
        .into_iter()
        .filter(|i| bound.is_unspecified() || i.ip == bound)
        .filter_map(|i| i.broadcast.map(|b| (i.ip, b)))
        .collect()
}

/// Where a client pings to find nodes on its networks: each interface's broadcast address
/// and the limited broadcast, at `port`.
pub fn ping_targets(port: u16) -> Vec<SocketAddr> {
    let mut targets: Vec<SocketAddr> = interface_broadcasts(Ipv4Addr::UNSPECIFIED.into())
        .into_iter()
        .map(|(_, b)| b)
        .chain([Ipv4Addr::BROADCAST])
        .map(|b| SocketAddr::V4(SocketAddrV4::new(b, port)))
        .collect();
    targets.dedup();
    targets
}

/// `host` or `host:port`, with dispy's node port when none is given.
pub fn with_port(addr: &str) -> String {
    if addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        addr.to_string()
    } else {
        format!("{addr}:{}", crate::protocol::DEFAULT_NODE_PORT)
    }
}

/// Nodes that answer a discovery ping on this host's networks (their broadcast addresses,
/// dispy's node port), as `host:port`.
pub async fn discover_nodes(timeout: std::time::Duration) -> Result<Vec<String>, String> {
    let targets = ping_targets(crate::protocol::DEFAULT_NODE_PORT);
    let found = discover("0.0.0.0:0".parse().expect("valid"), &targets, timeout)
        .await
        .map_err(|e| format!("UDP discovery failed: {e}"))?;
    Ok(found
        .iter()
        .map(|n| format!("{}:{}", n.addr, n.port))
        .collect())
}
