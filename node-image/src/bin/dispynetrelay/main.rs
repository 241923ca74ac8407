//! `dispynetrelay`: relays dispy discovery between subnets, as dispy's own `dispynetrelay`.
//! The decisions are in `relay.rs`; this file binds the sockets and moves datagrams.

mod relay;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use dispy_core::discovery::{interfaces, Interface};
use dispy_core::protocol::{DEFAULT_CLIENT_PORT, DEFAULT_NODE_PORT};
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use relay::{Action, Format, Relay, Seen};

/// Relays dispy discovery across subnets. Run it on a host with an interface on each subnet:
/// a client's discovery ping heard on one subnet is sent on the others, and the nodes' answers
/// go back to the client; with --scheduler-node, nodes that start later are announced to that
/// client or scheduler too. Clients still need a route to the nodes they find.
#[derive(Parser, Debug)]
#[command(name = "dispynetrelay", version)]
struct Args {
    /// Address of an interface to relay between (repeatable). Default: every IPv4 interface
    /// with a broadcast address.
    #[arg(short = 'i', long = "ip-addr", alias = "ip_addr", value_name = "ADDR")]
    ip_addrs: Vec<Ipv4Addr>,

    /// UDP port where clients' discovery pings are heard (dispy's default: the node port).
    #[arg(long, alias = "relay_port", default_value_t = DEFAULT_NODE_PORT)]
    relay_port: u16,

    /// UDP port of the nodes, where relayed pings are sent.
    #[arg(long, alias = "node_port", default_value_t = DEFAULT_NODE_PORT)]
    node_port: u16,

    /// A client or scheduler (host or host:port) to tell about nodes on the other subnets,
    /// repeatable: the relay pings for it at start and forwards later node announcements.
    #[arg(
        long = "scheduler-node",
        alias = "scheduler_node",
        value_name = "HOST[:PORT]"
    )]
    scheduler_nodes: Vec<String>,

    /// UDP client port of the scheduler nodes; node announcements are heard on it here.
    #[arg(long, alias = "scheduler_port", default_value_t = DEFAULT_CLIENT_PORT)]
    scheduler_port: u16,

    /// Shared secret. dispy's own discovery format signs relayed messages with it; the native
    /// format carries none (nodes prove the secret when a client connects).
    #[arg(
        short = 's',
        long,
        env = "DISPYNETRELAY_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    secret: String,

    /// Run without reading commands from standard input.
    #[arg(long)]
    daemon: bool,

    /// More logging (same as RUST_LOG=debug).
    #[arg(short = 'd', long)]
    debug: bool,
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

async fn bind(addr: SocketAddr, what: &str) -> Arc<UdpSocket> {
    let s = UdpSocket::bind(addr).await.unwrap_or_else(|e| {
        fail(format!(
            "cannot bind {what} on {addr}: {e} (a dispynode on this host uses the node port: \
             give the relay another --relay-port, or bind that node to its own address)"
        ))
    });
    if let Err(e) = s.set_broadcast(true) {
        fail(format!("cannot enable broadcast on {addr}: {e}"));
    }
    Arc::new(s)
}

/// A datagram and the socket it came on.
enum Heard {
    /// On the relay port: clients' pings.
    Relay,
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
    let ifaces = select_interfaces(interfaces(), &args.ip_addrs).unwrap_or_else(|e| fail(e));
    if ifaces.len() < 2 && args.scheduler_nodes.is_empty() {
        tracing::warn!(
            "relaying between {} interface(s): a relay joins two or more subnets",
            ifaces.len()
        );
    }
    let schedulers = resolve_schedulers(&args.scheduler_nodes, args.scheduler_port)
        .await
        .unwrap_or_else(|e| fail(e));
    let mut relay = Relay::new(ifaces.clone(), schedulers.clone());
    let formats = relay::formats();

    let (tx, mut rx) = mpsc::channel(1024);
    let relay_sock = bind(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.relay_port)),
        "the relay port",
    )
    .await;
    spawn_reader(relay_sock.clone(), |_| Heard::Relay, tx.clone());
    let mut iface_socks = vec![];
    for i in &ifaces {
        let s = bind(SocketAddr::from((i.ip, 0)), "an interface's relay socket").await;
        spawn_reader(s.clone(), iface_of, tx.clone());
        iface_socks.push((*i, s));
    }
    if !schedulers.is_empty() {
        let s = bind(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.scheduler_port)),
            "the scheduler port",
        )
        .await;
        spawn_reader(s, |_| Heard::Scheduler, tx.clone());
    }
    let sockets = Sockets {
        relay: relay_sock,
        ifaces: iface_socks,
        node_port: args.node_port,
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        interfaces = ?ifaces.iter().map(|i| i.ip).collect::<Vec<_>>(),
        relay_port = args.relay_port,
        node_port = args.node_port,
        schedulers = ?schedulers,
        formats = ?formats.iter().map(|f| f.name()).collect::<Vec<_>>(),
        secret = !args.secret.is_empty(),
        "dispynetrelay relaying"
    );
    for f in &formats {
        let actions = relay.ping_for_schedulers(Instant::now(), &f.own_ping());
        sockets.perform(actions).await;
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
            Some((heard, from, datagram)) = rx.recv() => {
                let SocketAddr::V4(from) = from else { continue };
                let Some((format, seen)) = recognise(&formats, &datagram) else {
                    tracing::debug!(%from, "ignoring a {}-byte datagram of no known format", datagram.len());
                    continue;
                };
                let now = Instant::now();
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
            "--scheduler-port",
            "9800",
            "-s",
            "x",
            "--daemon",
        ])
        .unwrap();
        assert_eq!(a.ip_addrs.len(), 2);
        assert_eq!(
            (a.relay_port, a.node_port, a.scheduler_port),
            (9801, 9701, 9800)
        );
        assert_eq!(a.scheduler_nodes, ["sched"]);
        assert_eq!(a.secret, "x");
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
