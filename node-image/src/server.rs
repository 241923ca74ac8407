//! The node's one port, TCP and UDP. The first bytes of a TCP connection tell the protocol:
//! TLS (0x16, when the node has a certificate), the native magic, or dispy's 40-character
//! auth prefix (served by [`crate::dispy`]). UDP carries discovery: native pings get a pong,
//! dispy's `PING:` a dispy `PONG:`; the node announces itself, in both protocols, at start on
//! the broadcast addresses of the interfaces it is bound to.
//!
//! Before a peer has authenticated it holds a place in the pre-auth [`Gate`] (few per source
//! address) and has [`SNIFF_TIMEOUT`] to show its protocol; each protocol then bounds its own
//! handshake. Once authenticated, work has no deadline: a setup may take minutes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dispy_core::client::Stream;
use dispy_core::discovery::{interface_broadcasts, interfaces};
use dispy_core::frame::frame;
use dispy_core::protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::dispy::Dispy;
use crate::limits::{Gate, RateLimiter, Throttled};
use crate::node::Node;

/// How long a new connection has to show its protocol (TLS handshake included).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE: u8 = 0x16;
/// Connections waiting to authenticate, from one address and in all.
const PREAUTH_PER_SOURCE: usize = 8;
const PREAUTH_TOTAL: usize = 256;

static GATE_FULL: Throttled = Throttled::new(Duration::from_secs(10));

/// Where a connection goes once its first bytes are read.
enum Opened {
    Native(Box<dyn Stream>),
    /// dispy's protocol, with the first 4 bytes of its auth prefix already read.
    Dispy(Box<dyn Stream>, [u8; 4], IpAddr),
    /// Closed before sending anything (a port probe).
    Empty,
}

pub async fn accept_loop(node: Arc<Node>, dispy: Arc<Dispy>, listener: TcpListener) {
    let tls = node.cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let gate = Gate::new(PREAUTH_PER_SOURCE, PREAUTH_TOTAL);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match gate.enter(peer.ip()) {
            Ok(p) => p,
            Err(full) => {
                node.metrics.bad_requests.inc();
                if let Some(suppressed) = GATE_FULL.check(std::time::Instant::now()) {
                    tracing::warn!(%peer, suppressed, "connection refused: {full}");
                }
                continue;
            }
        };
        tcp.set_nodelay(true).ok();
        let (node, dispy, tls) = (node.clone(), dispy.clone(), tls.clone());
        tokio::spawn(async move {
            let opened = tokio::time::timeout(SNIFF_TIMEOUT, sniff(&node, tcp, tls)).await;
            match opened {
                Ok(Ok(Opened::Native(stream))) => {
                    crate::native::serve(node, stream, peer, permit).await
                }
                Ok(Ok(Opened::Dispy(stream, first, local))) => {
                    let _ = crate::dispy::serve(dispy, stream, peer, local, first, permit).await;
                }
                Ok(Ok(Opened::Empty)) => {}
                Ok(Err(e)) => tracing::warn!(%peer, "{e}"),
                Err(_) => {
                    tracing::warn!(%peer, "no protocol prefix within {SNIFF_TIMEOUT:?}; closing")
                }
            }
        });
    }
}

/// Reads the first bytes (after TLS, when the node has a certificate) and tells which protocol
/// they announce; refuses what this node does not serve.
async fn sniff(
    node: &Node,
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<Opened, String> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(Opened::Empty);
    }
    let local = tcp.local_addr().map_err(|e| e.to_string())?.ip();
    let mut stream: Box<dyn Stream> = match (first[0] == TLS_HANDSHAKE, &tls) {
        (true, Some(acceptor)) => Box::new(
            acceptor
                .accept(tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?,
        ),
        (true, None) => {
            return Err("a TLS client connected, but this node has no --certfile; closing".into());
        }
        (false, _) => Box::new(tcp),
    };
    let mut prefix = [0u8; 4];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|e| format!("connection closed before a protocol prefix: {e}"))?;
    if prefix == MAGIC {
        if tls.is_some() && first[0] != TLS_HANDSHAKE {
            let reason = "this node requires TLS: connect with TLS (the node has --certfile)";
            // Read the client's hello first, so the client is not cut off mid-write.
            let _ = dispy_core::frame::read_frame(&mut stream, crate::limits::PREAUTH_MAX).await;
            let _ = stream
                .write_all(&frame(&encode(&ServerHello::Rejected(reason.into()))))
                .await;
            let _ = stream.shutdown().await;
            return Err(format!("plain-text client refused: {reason}"));
        }
        return Ok(Opened::Native(stream));
    }
    if prefix.iter().all(|b| b.is_ascii_hexdigit() || *b == b'x') {
        if !node.cfg.dispy {
            node.metrics.bad_requests.inc();
            return Err(
                "dispy client refused: this node serves only the native protocol (--no-dispy)"
                    .into(),
            );
        }
        if tls.is_some() && first[0] != TLS_HANDSHAKE {
            node.metrics.bad_requests.inc();
            return Err("plain-text dispy client refused: this node requires TLS (the client needs certfile=)".into());
        }
        return Ok(Opened::Dispy(stream, prefix, local));
    }
    node.metrics.bad_requests.inc();
    Err(format!("unknown protocol prefix {prefix:02x?}; closing"))
}

/// The node's discovery answer, naming the address the asker can reach.
fn announcement(node: &Node, addr: IpAddr) -> NodeAnnouncement {
    let (_, cpus, _) = node.load();
    NodeAnnouncement {
        name: node.cfg.name.clone(),
        addr: node
            .cfg
            .ext_host
            .clone()
            .unwrap_or_else(|| addr.to_string()),
        port: node.cfg.port,
        cpus,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        tls: node.cfg.tls.is_some(),
    }
}

/// The local address on the subnet of `peer` (for a node bound to all interfaces).
fn local_addr_for(bound: IpAddr, peer: IpAddr) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    let IpAddr::V4(peer) = peer else { return bound };
    if peer.is_loopback() {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    let mask = |a: Ipv4Addr, m: Ipv4Addr| u32::from(a) & u32::from(m);
    interfaces()
        .into_iter()
        .find(|i| mask(i.ip, i.netmask) == mask(peer, i.netmask))
        .map(|i| IpAddr::V4(i.ip))
        .unwrap_or(bound)
}

/// Serves discovery datagrams that arrive on `socket`; native pongs go out from `reply` (the
/// same socket, or for a socket bound to a broadcast address the node's own).
pub async fn udp_loop(
    node: Arc<Node>,
    dispy: Arc<Dispy>,
    socket: Arc<UdpSocket>,
    reply: Arc<UdpSocket>,
    bound: IpAddr,
) {
    // A datagram over this is cut, and then fails to decode.
    let mut buf = vec![0u8; crate::limits::PREAUTH_MAX];
    // A pong goes to the ping's source address, which a datagram can forge: bounded per
    // address, so the node cannot be made to flood a third host.
    let mut pongs = RateLimiter::new(5, 2.0, 4096);
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("UDP receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match decode_datagram(&buf[..n]) {
            Some(Ok(Discovery::Ping { .. })) => {
                if !pongs.allow(peer.ip(), std::time::Instant::now()) {
                    tracing::debug!(%peer, "discovery ping over the rate limit; not answered");
                    continue;
                }
                let pong = Discovery::Pong(announcement(&node, local_addr_for(bound, peer.ip())));
                if let Err(e) = reply.send_to(&encode_datagram(&pong), peer).await {
                    tracing::warn!(%peer, "cannot answer discovery ping: {e}");
                }
            }
            Some(Ok(Discovery::Pong(_))) => {}
            Some(Err(e)) => {
                node.metrics.bad_requests.inc();
                tracing::warn!(%peer, "{e}");
            }
            None if buf[..n].starts_with(b"PING:") && node.cfg.dispy => {
                dispy.udp_ping(&buf[5..n], peer, local_addr_for(bound, peer.ip()));
            }
            None => tracing::debug!(%peer, "ignoring an unknown {n}-byte datagram"),
        }
    }
}

/// Announces the node once, then every `--ping-interval` when set.
pub async fn announce(node: Arc<Node>, dispy: Arc<Dispy>, socket: Arc<UdpSocket>, bound: IpAddr) {
    if let Err(e) = socket.set_broadcast(true) {
        tracing::warn!("cannot enable UDP broadcast: {e}");
        return;
    }
    loop {
        // Where a node bound to `bound` announces itself: the broadcast address of each interface
        // it is bound to (bound to loopback: nowhere).
        let mut targets: Vec<(IpAddr, IpAddr)> = interface_broadcasts(bound)
            .into_iter()
            .map(|(ip, bcast)| (IpAddr::V4(ip), IpAddr::V4(bcast)))
            .collect();
        // `--scheduler_host`: told directly, wherever it is.
        if let Some(scheduler) = node.cfg.scheduler_host {
            targets.push((local_addr_for(bound, scheduler), scheduler));
        }
        for (ip, dest) in targets {
            let msg = encode_datagram(&Discovery::Pong(announcement(&node, ip)));
            let to = SocketAddr::from((dest, node.cfg.client_port));
            match socket.send_to(&msg, to).await {
                Ok(_) => tracing::info!(%to, "announced the node"),
                Err(e) => tracing::warn!(%to, "cannot announce the node: {e}"),
            }
            if !node.cfg.dispy {
                continue;
            }
            if let Err(e) = socket.send_to(&dispy.announcement(ip), to).await {
                tracing::warn!(%to, "cannot announce the node to dispy clients: {e}");
            }
        }
        if node.cfg.ping_interval.is_zero() {
            return;
        }
        tokio::time::sleep(node.cfg.ping_interval).await;
    }
}
