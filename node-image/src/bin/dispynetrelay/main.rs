//! `dispynetrelay`: relays dispy discovery between subnets, as dispy's own `dispynetrelay`,
//! in dispy 4.15's format and the native one. The decisions are in `relay.rs`; this file
//! binds the sockets, moves datagrams and makes the `RELAY_INFO` exchange with dispy clients.

// dispy's `auth_code`, shared with dispynode (one definition of dispy's scheme).
#[allow(dead_code)]
#[path = "../../dispy/auth.rs"]
mod auth;
mod relay;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dispy_core::discovery::{interfaces, Interface};
use dispy_core::frame::{frame, read_frame};
use dispy_core::protocol::DEFAULT_CLIENT_PORT;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Semaphore};

use relay::dispy::{self as dispy_msg, ClientPing, Message};
use relay::{Action, Format, Relay, Seen};

/// dispy's `MsgTimeout`: how long one TCP exchange may take.
const MSG_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest TCP message read from a client (a ping is a few hundred bytes).
const MAX_TCP_MSG: usize = 64 * 1024;
/// dispy's clients send 40 bytes of auth before a TCP ping (`'x' * 40` to a relay).
const AUTH_LEN: usize = 40;
/// Bounds on the work strangers can cause: TCP pings being read, and `RELAY_INFO` exchanges.
const TCP_PINGS_IN_FLIGHT: usize = 64;
const RELAY_INFOS_IN_FLIGHT: usize = 16;

/// Relays dispy discovery across subnets. Run it on a host with an interface on each subnet:
/// a client's discovery ping heard on one subnet (broadcast, or sent to this host, e.g. dispy's
/// `nodes=['relay-host', ...]`) is sent on the others, and the nodes there reach the client;
/// with --scheduler_node, nodes that start later are announced to that client or scheduler
/// too. Clients still need a route to the nodes they find. Speaks dispy 4.15's discovery and
/// the native one.
#[derive(Parser, Debug)]
#[command(name = "dispynetrelay", version)]
struct Args {
    /// Address of an interface to relay between (repeatable). Default: every IPv4 interface
    /// with a broadcast address.
    #[arg(short = 'i', long = "ip_addr", alias = "ip-addr", value_name = "ADDR")]
    ip_addrs: Vec<Ipv4Addr>,

    /// dispy's base port: nodes take pings on dispy_port + 1, clients on dispy_port. The
    /// defaults of --relay_port, --node-port and --scheduler_port follow it.
    #[arg(short = 'p', long = "dispy_port", alias = "dispy-port", default_value_t = DEFAULT_CLIENT_PORT)]
    dispy_port: u16,

    /// Port (UDP, and TCP for dispy clients that name this host) where clients' discovery
    /// pings are heard. Default: the node port.
    #[arg(long = "relay_port", alias = "relay-port")]
    relay_port: Option<u16>,

    /// UDP port of the nodes, where relayed pings are sent. Default: dispy_port + 1.
    #[arg(long = "node-port", alias = "node_port")]
    node_port: Option<u16>,

    /// A client or scheduler (host or host:port) to tell about nodes on the other subnets,
    /// repeatable: the relay pings for it at start and forwards later node announcements.
    #[arg(
        long = "scheduler_node",
        alias = "scheduler-node",
        value_name = "HOST[:PORT]"
    )]
    scheduler_nodes: Vec<String>,

    /// Client port of the scheduler nodes; node announcements are heard on it here (UDP).
    /// Default: dispy_port.
    #[arg(long = "scheduler_port", alias = "scheduler-port")]
    scheduler_port: Option<u16>,

    /// The dispy clients' secret. A dispy client has its ping relayed only by a relay that
    /// proves it (`RELAY_INFO`); the native format carries none (nodes prove the secret when
    /// a client connects).
    #[arg(
        short = 's',
        long,
        env = "DISPYNETRELAY_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    secret: String,

    /// PEM certificate of dispy's TLS mode (the one the clients and nodes share): the relay's
    /// TCP connections to dispy clients and its TCP relay port use TLS with it.
    #[arg(long)]
    certfile: Option<PathBuf>,

    /// PEM private key for --certfile (default: the key is in the certfile).
    #[arg(long)]
    keyfile: Option<PathBuf>,

    /// Accepted for dispy's command line, not applied: this relay broadcasts on each subnet,
    /// so clients and nodes started with --ipv4_udp_multicast do not hear it.
    #[arg(long = "ipv4_udp_multicast", alias = "ipv4-udp-multicast")]
    ipv4_udp_multicast: bool,

    /// The dispy version of the relay's own pings (for --scheduler_node); a client's ping is
    /// relayed with the version it names. dispy ignores messages of any other version.
    #[arg(
        long = "dispy_version",
        alias = "dispy-version",
        default_value = "4.15.2"
    )]
    dispy_version: String,

    /// Run without reading commands from standard input.
    #[arg(long)]
    daemon: bool,

    /// More logging (same as RUST_LOG=debug).
    #[arg(short = 'd', long)]
    debug: bool,
}

/// The ports in use, the unset ones derived from `--dispy_port` as dispy does.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ports {
    relay: u16,
    node: u16,
    scheduler: u16,
}

impl Args {
    fn ports(&self) -> Result<Ports, String> {
        let node = match self.node_port {
            Some(p) => p,
            None => self.dispy_port.checked_add(1).ok_or_else(|| {
                format!(
                    "--dispy_port {}: the node port (dispy_port + 1) is past 65535",
                    self.dispy_port
                )
            })?,
        };
        Ok(Ports {
            relay: self.relay_port.unwrap_or(node),
            node,
            scheduler: self.scheduler_port.unwrap_or(self.dispy_port),
        })
    }
}

fn fail(msg: String) -> ! {
    eprintln!("dispynetrelay: {msg}");
    std::process::exit(2);
}

/// The interfaces to relay between: those named by -i, else all with a broadcast address.
fn select_interfaces(all: Vec<Interface>, wanted: &[Ipv4Addr]) -> Result<Vec<Interface>, String> {
    if wanted.is_empty() {
        return Ok(all.into_iter().filter(|i| i.broadcast.is_some()).collect());
    }
    wanted
        .iter()
        .map(|w| match all.iter().find(|i| i.ip == *w) {
            Some(i) if i.broadcast.is_some() => Ok(*i),
            Some(_) => Err(format!("-i {w}: that interface has no broadcast address")),
            None => Err(format!(
                "-i {w}: no interface of this host has that address"
            )),
        })
        .collect()
}

async fn resolve_schedulers(names: &[String], port: u16) -> Result<Vec<SocketAddrV4>, String> {
    let mut out = vec![];
    for n in names {
        let with_port = if n
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            n.clone()
        } else {
            format!("{n}:{port}")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("--scheduler-node {n}: {e}"))?
            .find_map(|a| match a {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            })
            .ok_or_else(|| format!("--scheduler-node {n}: no IPv4 address"))?;
        out.push(addr);
    }
    Ok(out)
}

async fn try_bind(addr: SocketAddr, what: &str) -> Result<Arc<UdpSocket>, String> {
    let s = UdpSocket::bind(addr).await.map_err(|e| {
        format!(
            "cannot bind {what} on {addr}: {e} (a dispynode on this host uses the node port, \
             a dispy client the client port: give the relay other ports, or bind them to \
             their own addresses)"
        )
    })?;
    s.set_broadcast(true)
        .map_err(|e| format!("cannot enable broadcast on {addr}: {e}"))?;
    Ok(Arc::new(s))
}

async fn bind(addr: SocketAddr, what: &str) -> Arc<UdpSocket> {
    try_bind(addr, what).await.unwrap_or_else(|e| fail(e))
}

/// A datagram and the socket it came on.
enum Heard {
    /// On the relay port: clients' pings.
    Relay,
    /// A message on a TCP connection to the relay port: a dispy client's ping to this host.
    RelayTcp,
    /// On the relay's socket of the interface with this address: answers to its pings.
    Iface(Ipv4Addr),
    /// On the scheduler (client) port: node announcements.
    Scheduler,
}

fn spawn_reader(
    socket: Arc<UdpSocket>,
    heard: fn(&UdpSocket) -> Heard,
    tx: mpsc::Sender<(Heard, SocketAddr, Vec<u8>)>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            match socket.recv_from(&mut buf).await {
                Ok((n, from)) => {
                    if tx
                        .send((heard(&socket), from, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!("UDP receive: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}

fn iface_of(socket: &UdpSocket) -> Heard {
    match socket.local_addr() {
        Ok(SocketAddr::V4(a)) => Heard::Iface(*a.ip()),
        _ => Heard::Iface(Ipv4Addr::UNSPECIFIED),
    }
}

struct Sockets {
    relay: Arc<UdpSocket>,
    ifaces: Vec<(Interface, Arc<UdpSocket>)>,
    node_port: u16,
}

/// What the `RELAY_INFO` exchanges with dispy clients need.
struct DispyClients {
    secret: String,
    /// dispy's TLS mode (--certfile): the client's certificate must be the shared one.
    tls: Option<tokio_rustls::TlsConnector>,
    in_flight: Arc<Semaphore>,
}

/// Writes `msg` as one frame and reads one frame back.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    stream
        .write_all(&frame(msg))
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let reply = read_frame(&mut stream, MAX_TCP_MSG)
        .await
        .map_err(|e| format!("no answer: {e}"))?
        .ok_or("the connection closed without an answer")?;
    let _ = stream.shutdown().await;
    Ok(reply)
}

impl DispyClients {
    /// Hands a node's announcement to a dispy client over TCP, as a node's own announcement
    /// to a relayed ping goes: a client's UDP socket is bound to its subnet's broadcast
    /// address (dispy on Linux), so a unicast datagram would not reach it.
    async fn announce(&self, to: SocketAddrV4, announcement: &[u8]) -> Result<(), String> {
        let work = async {
            let tcp = TcpStream::connect(to)
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let framed = frame(announcement);
            match &self.tls {
                None => {
                    let mut tcp = tcp;
                    tcp.write_all(&framed).await.map_err(|e| e.to_string())?;
                    let _ = tcp.shutdown().await;
                }
                Some(tls) => {
                    let name = dispy_core::tls::server_name(&to.ip().to_string())?;
                    let mut s = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS failed: {e}"))?;
                    s.write_all(&framed).await.map_err(|e| e.to_string())?;
                    let _ = s.shutdown().await;
                }
            }
            Ok(())
        };
        tokio::time::timeout(MSG_TIMEOUT, work)
            .await
            .map_err(|_| format!("not sent within {MSG_TIMEOUT:?}"))?
    }

    async fn ask(&self, to: SocketAddrV4, msg: &[u8]) -> Result<Vec<u8>, String> {
        let work = async {
            let tcp = TcpStream::connect(to)
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            match &self.tls {
                None => exchange(tcp, msg).await,
                Some(tls) => {
                    let name = dispy_core::tls::server_name(&to.ip().to_string())?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS failed: {e}"))?;
                    exchange(stream, msg).await
                }
            }
        };
        tokio::time::timeout(MSG_TIMEOUT, work)
            .await
            .map_err(|_| format!("no answer within {MSG_TIMEOUT:?}"))?
    }

    /// Sends the client `RELAY_INFO` at each of its addresses in turn; when one confirms,
    /// broadcasts the relayed ping on `ifaces` and returns where the client is.
    async fn confirm_and_relay(
        &self,
        sockets: &Sockets,
        ping: ClientPing,
        ifaces: Vec<Ipv4Addr>,
    ) -> Option<SocketAddrV4> {
        for ip in ping.ip_addrs.iter().take(dispy_msg::MAX_CLIENT_ADDRS) {
            let Ok(addr) = ip.parse::<Ipv4Addr>() else {
                tracing::debug!(client = %ip, "not an IPv4 address; no RELAY_INFO to it");
                continue;
            };
            let to = SocketAddrV4::new(addr, ping.port);
            let reply = match self
                .ask(to, &dispy_msg::relay_info(&ping, ip, &self.secret))
                .await
            {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::debug!(client = %to, "RELAY_INFO: {e}");
                    continue;
                }
            };
            return match dispy_msg::relay_info_reply(&reply) {
                Ok(port) => {
                    let datagram = dispy_msg::relayed_ping(&ping.version, ip, port);
                    tracing::info!(client = %to, subnets = ?ifaces, "relaying a dispy client's ping");
                    sockets
                        .perform(
                            ifaces
                                .into_iter()
                                .map(|iface| Action::FanOut {
                                    iface,
                                    datagram: datagram.clone(),
                                })
                                .collect(),
                        )
                        .await;
                    Some(SocketAddrV4::new(addr, port))
                }
                Err(e) => {
                    tracing::warn!(client = %to, "{e}; its ping is not relayed (is --secret the clients' secret?)");
                    None
                }
            };
        }
        tracing::warn!(
            clients = ?ping.ip_addrs,
            port = ping.port,
            "a dispy ping not relayed: RELAY_INFO reached none of the addresses it names"
        );
        None
    }
}

/// Reads dispy clients' TCP pings on the relay port: 40 bytes of auth (which a relay cannot
/// check: it has no sign of its own), then one frame.
fn spawn_tcp_pings(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<(Heard, SocketAddr, Vec<u8>)>,
) {
    async fn read_ping<S: AsyncRead + Unpin>(mut s: S) -> Result<Vec<u8>, String> {
        let mut auth = [0u8; AUTH_LEN];
        s.read_exact(&mut auth)
            .await
            .map_err(|e| format!("no auth prefix: {e}"))?;
        read_frame(&mut s, MAX_TCP_MSG)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "closed before a message".into())
    }
    let in_flight = Arc::new(Semaphore::new(TCP_PINGS_IN_FLIGHT));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many TCP pings at once; connection dropped");
                continue;
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let work = async {
                    match tls {
                        None => read_ping(tcp).await,
                        Some(tls) => {
                            let s = tls
                                .accept(tcp)
                                .await
                                .map_err(|e| format!("TLS failed: {e}"))?;
                            read_ping(s).await
                        }
                    }
                };
                match tokio::time::timeout(MSG_TIMEOUT, work).await {
                    Ok(Ok(msg)) => {
                        let _ = tx.send((Heard::RelayTcp, peer, msg)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TCP ping: {e}"),
                    Err(_) => tracing::debug!(%peer, "TCP ping: nothing within {MSG_TIMEOUT:?}"),
                }
                drop(permit);
            });
        }
    });
}

impl Sockets {
    async fn perform(&self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::FanOut { iface, datagram } => {
                    let Some((i, s)) = self.ifaces.iter().find(|(i, _)| i.ip == iface) else {
                        continue;
                    };
                    let Some(bcast) = i.broadcast else { continue };
                    let to = SocketAddr::from((bcast, self.node_port));
                    match s.send_to(&datagram, to).await {
                        Ok(_) => tracing::debug!(%to, "relayed a discovery ping"),
                        Err(e) => tracing::warn!(%to, "cannot relay a discovery ping: {e}"),
                    }
                }
                Action::Forward { to, datagram } => {
                    if let Err(e) = self.relay.send_to(&datagram, to).await {
                        tracing::warn!(%to, "cannot forward a node's answer: {e}");
                    }
                }
            }
        }
    }
}

fn recognise<'a>(
    formats: &'a [Box<dyn Format>],
    datagram: &[u8],
) -> Option<(&'a dyn Format, Seen)> {
    formats
        .iter()
        .find_map(|f| f.recognise(datagram).map(|s| (f.as_ref(), s)))
}

async fn run(args: Args) -> i32 {
    let ports = args.ports().unwrap_or_else(|e| fail(e));
    let ifaces = select_interfaces(interfaces(), &args.ip_addrs).unwrap_or_else(|e| fail(e));
    if ifaces.len() < 2 && args.scheduler_nodes.is_empty() {
        tracing::warn!(
            "relaying between {} interface(s): a relay joins two or more subnets",
            ifaces.len()
        );
    }
    if args.ipv4_udp_multicast {
        tracing::warn!(
            "--ipv4_udp_multicast is not applied: this relay broadcasts on each subnet, which \
             clients and nodes started with --ipv4_udp_multicast do not hear"
        );
    }
    let (tls_connector, tls_acceptor) = match &args.certfile {
        None if args.keyfile.is_some() => fail("--keyfile needs --certfile".into()),
        None => (None, None),
        Some(cert) => {
            let trust = dispy_core::tls::Trust::PinnedCert(cert.clone());
            let client = dispy_core::tls::client_config(&trust)
                .unwrap_or_else(|e| fail(format!("--certfile {}: {e}", cert.display())));
            let server = dispy_core::tls::server_config(cert, args.keyfile.as_deref())
                .unwrap_or_else(|e| fail(format!("--certfile/--keyfile: {e}")));
            (
                Some(tokio_rustls::TlsConnector::from(client)),
                Some(tokio_rustls::TlsAcceptor::from(server)),
            )
        }
    };
    let schedulers = resolve_schedulers(&args.scheduler_nodes, ports.scheduler)
        .await
        .unwrap_or_else(|e| fail(e));
    let mut relay = Relay::new(ifaces.clone(), schedulers.clone());
    let formats = relay::formats();

    let (tx, mut rx) = mpsc::channel(1024);
    let relay_sock = bind(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports.relay)),
        "the relay port",
    )
    .await;
    spawn_reader(relay_sock.clone(), |_| Heard::Relay, tx.clone());
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports.relay));
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
        fail(format!(
            "cannot listen on TCP {listen} (dispy clients that name this host ping it there): {e}"
        ))
    });
    spawn_tcp_pings(listener, tls_acceptor, tx.clone());
    let mut iface_socks = vec![];
    for i in &ifaces {
        let s = bind(SocketAddr::from((i.ip, 0)), "an interface's relay socket").await;
        spawn_reader(s.clone(), iface_of, tx.clone());
        iface_socks.push((*i, s));
    }
    // Node announcements: for the scheduler nodes, and for dispy clients whose pings were
    // relayed (they hear of nodes that start later, as with dispy's relay). Without
    // --scheduler_node that is a nicety, not worth failing for (a client on this host may
    // have the port).
    let scheduler_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports.scheduler));
    match try_bind(scheduler_addr, "the scheduler port").await {
        Ok(s) => spawn_reader(s, |_| Heard::Scheduler, tx.clone()),
        Err(e) if schedulers.is_empty() => {
            tracing::warn!("{e}; nodes that start later are not announced to dispy clients")
        }
        Err(e) => fail(e),
    }
    let sockets = Arc::new(Sockets {
        relay: relay_sock,
        ifaces: iface_socks,
        node_port: ports.node,
    });
    let clients = Arc::new(DispyClients {
        secret: args.secret.clone(),
        tls: tls_connector,
        in_flight: Arc::new(Semaphore::new(RELAY_INFOS_IN_FLIGHT)),
    });
    let (confirmed_tx, mut confirmed_rx) = mpsc::channel::<SocketAddrV4>(64);
    let relay_dispy_ping = |ping: ClientPing, ifaces: Vec<Ipv4Addr>| {
        let Ok(permit) = clients.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(clients = ?ping.ip_addrs, "too many RELAY_INFO exchanges at once; a dispy ping not relayed");
            return;
        };
        let (clients, sockets, confirmed) =
            (clients.clone(), sockets.clone(), confirmed_tx.clone());
        tokio::spawn(async move {
            if let Some(c) = clients.confirm_and_relay(&sockets, ping, ifaces).await {
                let _ = confirmed.send(c).await;
            }
            drop(permit);
        });
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        interfaces = ?ifaces.iter().map(|i| i.ip).collect::<Vec<_>>(),
        relay_port = ports.relay,
        node_port = ports.node,
        scheduler_port = ports.scheduler,
        schedulers = ?schedulers,
        formats = ?["dispy", "native"],
        secret = !args.secret.is_empty(),
        tls = args.certfile.is_some(),
        "dispynetrelay relaying"
    );
    for f in &formats {
        let actions = relay.ping_for_schedulers(Instant::now(), &f.own_ping());
        sockets.perform(actions).await;
    }
    // dispy's relay at start: RELAY_INFO to each scheduler node (unsigned), then a ping
    // naming it on the other subnets, so the nodes already up announce themselves to it.
    for s in &schedulers {
        let ping = ClientPing {
            version: args.dispy_version.clone(),
            ip_addrs: vec![s.ip().to_string()],
            port: s.port(),
            sign: None,
            relayed: false,
        };
        let ifaces = relay.on_dispy_ping(Instant::now(), SocketAddrV4::new(*s.ip(), 0), &ping);
        if !ifaces.is_empty() {
            relay_dispy_ping(ping, ifaces);
        }
    }

    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let (quit_tx, mut quit_rx) = mpsc::channel::<()>(1);
    // SAFETY: isatty has no preconditions.
    if !args.daemon && unsafe { libc::isatty(0) } == 1 {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            eprintln!("Enter \"quit\" or \"exit\" to terminate dispynetrelay");
            while let Ok(Some(l)) = lines.next_line().await {
                if matches!(l.trim(), "quit" | "exit") {
                    let _ = quit_tx.send(()).await;
                    return;
                }
            }
        });
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = quit_rx.recv() => break,
            Some(client) = confirmed_rx.recv() => relay.dispy_client_confirmed(client),
            Some((heard, from, datagram)) = rx.recv() => {
                let SocketAddr::V4(from) = from else { continue };
                let now = Instant::now();
                if datagram.starts_with(dispy_msg::PING) {
                    let actions = match (heard, dispy_msg::parse(&datagram)) {
                        (Heard::Relay | Heard::RelayTcp, Ok(Message::ClientPing(ping))) => {
                            let ifaces = relay.on_dispy_ping(now, from, &ping);
                            if !ifaces.is_empty() {
                                relay_dispy_ping(ping, ifaces);
                            }
                            vec![]
                        }
                        (Heard::Scheduler, Ok(Message::Node(n))) => {
                            let node = format!("{}:{}", n.ip_addr, n.port);
                            for a in relay.on_dispy_announcement(from, &datagram) {
                                let Action::Forward { to: SocketAddr::V4(to), datagram } = a else { continue };
                                tracing::info!(%node, client = %to, "forwarding a dispy node's announcement");
                                let clients = clients.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = clients.announce(to, &datagram).await {
                                        tracing::warn!(client = %to, "cannot forward a node's announcement: {e}");
                                    }
                                });
                            }
                            vec![]
                        }
                        (_, Err(e)) => {
                            tracing::debug!(%from, "{e}");
                            vec![]
                        }
                        _ => vec![],
                    };
                    sockets.perform(actions).await;
                    continue;
                }
                let Some((format, seen)) = recognise(&formats, &datagram) else {
                    tracing::debug!(%from, "ignoring a {}-byte datagram of no known format", datagram.len());
                    continue;
                };
                let actions = match (heard, seen) {
                    (Heard::Relay, Seen::Ping) => {
                        let a = relay.on_ping(now, from, SocketAddr::V4(from), &format.relayed_ping(&datagram));
                        if !a.is_empty() {
                            tracing::info!(client = %from, format = format.name(), "relaying a discovery ping");
                        }
                        a
                    }
                    (Heard::Iface(ip), Seen::Answer { node }) => {
                        let a = relay.on_answer(now, ip, &datagram);
                        tracing::info!(%node, recipients = a.len(), "forwarding a node's answer");
                        a
                    }
                    (Heard::Scheduler, Seen::Answer { node }) => {
                        let a = relay.on_announcement(from, &datagram);
                        if !a.is_empty() {
                            tracing::info!(%node, "forwarding a node's announcement to the schedulers");
                        }
                        a
                    }
                    _ => vec![],
                };
                sockets.perform(actions).await;
            }
        }
    }
    tracing::info!("dispynetrelay stopped");
    0
}

fn main() {
    let args = Args::parse();
    let default = if args.debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    std::process::exit(rt.block_on(run(args)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(ip: [u8; 4], bcast: Option<[u8; 4]>) -> Interface {
        Interface {
            ip: Ipv4Addr::from(ip),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            broadcast: bcast.map(Ipv4Addr::from),
        }
    }

    #[test]
    fn interfaces_are_selected_by_address() {
        let all = vec![
            iface([10, 0, 1, 1], Some([10, 0, 1, 255])),
            iface([10, 0, 2, 1], Some([10, 0, 2, 255])),
            iface([10, 0, 3, 1], None),
        ];
        assert_eq!(select_interfaces(all.clone(), &[]).unwrap().len(), 2);
        let one = select_interfaces(all.clone(), &[Ipv4Addr::new(10, 0, 2, 1)]).unwrap();
        assert_eq!(one, [all[1]]);
        let e = select_interfaces(all.clone(), &[Ipv4Addr::new(10, 9, 9, 9)]).unwrap_err();
        assert!(
            e.contains("no interface of this host has that address"),
            "{e}"
        );
        let e = select_interfaces(all, &[Ipv4Addr::new(10, 0, 3, 1)]).unwrap_err();
        assert!(e.contains("no broadcast address"), "{e}");
    }

    #[test]
    fn dispys_option_spellings_are_accepted() {
        let a = Args::try_parse_from([
            "dispynetrelay",
            "-i",
            "10.0.0.1",
            "--ip_addr",
            "10.0.1.1",
            "--relay_port",
            "9801",
            "--scheduler_node",
            "sched",
            "--scheduler_port",
            "9800",
            "-s",
            "x",
            "--certfile",
            "c.pem",
            "--keyfile",
            "k.pem",
            "--ipv4_udp_multicast",
            "--daemon",
        ])
        .unwrap();
        assert_eq!(a.ip_addrs.len(), 2);
        assert_eq!(
            a.ports().unwrap(),
            Ports {
                relay: 9801,
                node: 9701,
                scheduler: 9800
            }
        );
        assert_eq!(a.scheduler_nodes, ["sched"]);
        assert_eq!(a.secret, "x");
        assert!(a.ipv4_udp_multicast && a.certfile.is_some() && a.keyfile.is_some());
        // The native spellings still work.
        let a = Args::try_parse_from([
            "dispynetrelay",
            "--ip-addr",
            "10.0.0.1",
            "--scheduler-node",
            "sched",
            "--relay-port",
            "9801",
            "--node-port",
            "9802",
        ])
        .unwrap();
        assert_eq!((a.ip_addrs.len(), a.scheduler_nodes.len()), (1, 1));
        assert_eq!(
            a.ports().unwrap(),
            Ports {
                relay: 9801,
                node: 9802,
                scheduler: 9700
            }
        );
    }

    #[test]
    fn the_ports_follow_dispy_port_unless_given() {
        let a = Args::try_parse_from(["dispynetrelay", "-p", "51000"]).unwrap();
        assert_eq!(
            a.ports().unwrap(),
            Ports {
                relay: 51001,
                node: 51001,
                scheduler: 51000
            }
        );
        let a = Args::try_parse_from(["dispynetrelay", "--dispy_port", "65535"]).unwrap();
        let e = a.ports().unwrap_err();
        assert!(e.contains("past 65535"), "{e}");
    }

    #[tokio::test]
    async fn scheduler_nodes_get_the_scheduler_port_unless_they_name_one() {
        let s = resolve_schedulers(&["127.0.0.1".into(), "127.0.0.2:9900".into()], 9700)
            .await
            .unwrap();
        assert_eq!(
            s,
            [
                "127.0.0.1:9700".parse::<SocketAddrV4>().unwrap(),
                "127.0.0.2:9900".parse().unwrap()
            ]
        );
    }
}
