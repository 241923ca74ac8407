//! `dispyscheduler`: lets many `dispy.SharedJobCluster` clients share nodes at once, as
//! dispy 4.15's own `dispyscheduler.py`, on the same wire. Toward clients it is the shared
//! scheduler; toward nodes (ours or dispy's `dispynode.py`) it is one dispy client with many
//! computations. The decisions are in `sched.rs` (no IO); `server.rs` moves the messages.

// dispy's records and auth as the node reads them, and the node's pre-auth gate.
#[allow(dead_code)]
#[path = "../../dispy/auth.rs"]
mod auth;
mod files;
#[path = "../../kept.rs"]
mod kept;
#[allow(dead_code)]
#[path = "../../limits.rs"]
mod limits;
#[allow(dead_code)]
#[path = "../../dispy/messages.rs"]
mod messages;
mod metrics;
mod net;
mod sched;
mod server;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use tokio::net::{TcpListener, UdpSocket};

use sched::{Config, NodeAlloc, Policy, Scheduler};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Schedules the jobs of many dispy SharedJobCluster clients onto shared dispy nodes, as
/// dispy's dispyscheduler.py. Clients use `dispy.SharedJobCluster(compute,
/// scheduler_host=THIS_HOST, secret=CLUSTER_SECRET)`; nodes are dispynode (ours or dispy's)
/// started with --secret NODE_SECRET.
#[derive(Parser, Debug)]
#[command(name = "dispyscheduler", version)]
struct Args {
    /// A node to use: address, host name, `host:port` or a pattern with `*` (repeatable).
    /// Without it, nodes are found by broadcast on this host's networks and any is used;
    /// with it, only nodes matching the list are used.
    #[arg(short = 'n', long = "node", value_name = "HOST")]
    nodes: Vec<String>,

    /// A file listing the nodes to use, one per line in the forms of --node (`#` comments),
    /// read again every 2 s: nodes added are pinged, nodes removed are closed and dropped.
    /// Only the nodes listed (here and by --node) are used, none while it lists none, and
    /// the scheduler never broadcasts. For a node list kept by someone else (on Kubernetes,
    /// the operator's ConfigMap).
    #[arg(long = "nodes_file", alias = "nodes-file", value_name = "FILE")]
    nodes_file: Option<PathBuf>,

    /// Address to serve on (repeatable). Default: this host's first IPv4 interface.
    #[arg(short = 'i', long = "host", value_name = "ADDR")]
    hosts: Vec<String>,

    /// Address announced to nodes instead of --host (NAT), one per --host.
    #[arg(long = "ext_host", alias = "ext-host", value_name = "ADDR")]
    ext_hosts: Vec<String>,

    /// dispy's base port: nodes reach the scheduler on it, nodes listen on it + 1, clients
    /// reach the scheduler on it + 2 (dispy's SharedSchedulerPort).
    #[arg(
        short = 'p',
        long = "dispy_port",
        alias = "dispy-port",
        visible_alias = "port",
        default_value_t = 9700
    )]
    dispy_port: u16,

    /// The nodes' port (default: --dispy_port + 1).
    #[arg(long = "node_port", alias = "node-port")]
    node_port: Option<u16>,

    /// The port clients reach the scheduler on (default: --dispy_port + 2).
    #[arg(long = "scheduler_port", alias = "scheduler-port")]
    scheduler_port: Option<u16>,

    /// The nodes' secret (dispynode --secret). Prefer $DISPYSCHEDULER_NODE_SECRET.
    #[arg(
        long = "node_secret",
        alias = "node-secret",
        env = "DISPYSCHEDULER_NODE_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    node_secret: String,

    /// PEM key for --node_certfile (default: in the certfile).
    #[arg(long = "node_keyfile", alias = "node-keyfile")]
    node_keyfile: Option<PathBuf>,

    /// PEM certificate of the nodes' TLS (dispynode --certfile): connections with nodes use
    /// TLS, and a node must present this certificate.
    #[arg(long = "node_certfile", alias = "node-certfile")]
    node_certfile: Option<PathBuf>,

    /// The clients' secret (SharedJobCluster secret=). Prefer $DISPYSCHEDULER_CLUSTER_SECRET.
    #[arg(
        long = "cluster_secret",
        alias = "cluster-secret",
        env = "DISPYSCHEDULER_CLUSTER_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    cluster_secret: String,

    /// PEM key for --cluster_certfile (default: in the certfile).
    #[arg(long = "cluster_keyfile", alias = "cluster-keyfile")]
    cluster_keyfile: Option<PathBuf>,

    /// PEM certificate of the clients' TLS (SharedJobCluster certfile=): connections with
    /// clients use TLS, and a client must present this certificate on its result port.
    #[arg(long = "cluster_certfile", alias = "cluster-certfile")]
    cluster_certfile: Option<PathBuf>,

    /// Seconds between node pulses (0.1 to 1000); a busy node silent for 5 of them is lost
    /// and its reentrant jobs run elsewhere. Default: zombie_interval / 5.
    #[arg(
        long = "pulse_interval",
        alias = "pulse-interval",
        default_value_t = 0.0
    )]
    pulse_interval: f64,

    /// Seconds between discovery rounds (1 to 1000); 0: discover at start only.
    #[arg(long = "ping_interval", alias = "ping-interval", default_value_t = 0.0)]
    ping_interval: f64,

    /// Minutes a client may be silent before its computation is closed (0: never).
    #[arg(
        long = "zombie_interval",
        alias = "zombie-interval",
        default_value_t = 60.0
    )]
    zombie_interval: f64,

    /// Seconds one message exchange may take.
    #[arg(long = "msg_timeout", alias = "msg-timeout", default_value_t = 10.0)]
    msg_timeout: f64,

    /// Directory of the scheduler's files (default: $TMPDIR/dispy/scheduler).
    #[arg(long = "dest_path_prefix", alias = "dest-path-prefix")]
    dest_path_prefix: Option<PathBuf>,

    /// Largest file a client may send (`10m`, `1g`; 0: no limit).
    #[arg(long = "max_file_size", alias = "max-file-size", default_value = "0")]
    max_file_size: String,

    /// Largest message accepted from an authenticated client or a node in use (job
    /// submissions, results), and the bound on the pickles in it.
    #[arg(long = "max_frame", alias = "max-frame", default_value = "16m")]
    max_frame: String,

    /// Remove --dest_path_prefix's contents at start.
    #[arg(long)]
    clean: bool,

    /// Give a free cpu to the computation that got one longest ago (default: to the job
    /// submitted first).
    #[arg(
        long = "fair_cluster_scheduler",
        alias = "fair-cluster-scheduler",
        conflicts_with = "early_cluster_scheduler"
    )]
    fair_cluster_scheduler: bool,

    /// Give a free cpu to the computation created first.
    #[arg(long = "early_cluster_scheduler", alias = "early-cluster-scheduler")]
    early_cluster_scheduler: bool,

    /// Clients' NodeAllocate cpus (and set_node_cpus) limit what a node runs for all.
    #[arg(long)]
    cooperative: bool,

    /// Remove computations' files from nodes at close even when clients ask to keep them.
    #[arg(long = "cleanup_nodes", alias = "cleanup-nodes")]
    cleanup_nodes: bool,

    /// Never read commands from standard input (the scheduler reads none; accepted for
    /// dispy's command line).
    #[arg(long)]
    daemon: bool,

    /// Accepted for dispy's command line, not applied: no HTTP monitor (use --metrics-addr).
    #[arg(long)]
    httpd: bool,

    /// Accepted for dispy's command line, not applied: discovery uses broadcast.
    #[arg(long = "ipv4_udp_multicast", alias = "ipv4-udp-multicast")]
    ipv4_udp_multicast: bool,

    /// dispy version announced; clients and nodes require an exact match.
    #[arg(
        long = "dispy_version",
        alias = "dispy-version",
        default_value = "4.15.2"
    )]
    dispy_version: String,

    /// Serve Prometheus /metrics and /healthz there.
    #[arg(long = "metrics-addr", alias = "metrics_addr", value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,

    /// Logs go to stderr; RUST_LOG filters them.
    #[arg(long = "log_format", alias = "log-format", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Debug logging.
    #[arg(short = 'd', long, action = ArgAction::SetTrue)]
    debug: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("invalid size {s:?}: use a number with an optional k, m or g suffix"))
}

/// `host`, `host:port` or a pattern → a [`NodeAlloc`] (host names resolved).
fn node_alloc(spec: &str) -> Result<NodeAlloc, String> {
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            Some(
                p.parse::<u16>()
                    .map_err(|_| format!("{spec:?}: {p:?} is not a port"))?,
            ),
        ),
        _ => (spec, None),
    };
    let host = if host.contains('*') || host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        use std::net::ToSocketAddrs;
        (host, 0)
            .to_socket_addrs()
            .map_err(|e| format!("{spec:?}: cannot resolve {host:?}: {e}"))?
            .find(|a| a.is_ipv4())
            .map(|a| a.ip().to_string())
            .ok_or_else(|| format!("{spec:?}: {host:?} has no IPv4 address"))?
    };
    Ok(NodeAlloc {
        host,
        port,
        cpus: 0,
        setup_args: dispy_core::pickle::Value::Tuple(vec![]),
    })
}

/// The largest `--nodes_file` read.
const NODES_FILE_MAX: u64 = 1 << 20;

fn read_nodes_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(NODES_FILE_MAX).read_to_string(&mut text))
        .map_err(|e| format!("--nodes_file {}: {e}", path.display()))?;
    Ok(text)
}

/// The lines of a nodes file that name a node: blank lines and `#` comments are skipped.
fn nodes_file_entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
}

/// The nodes a nodes file lists; a line that is not a node is logged and skipped, so one
/// bad line does not take the others away.
fn nodes_file_allocs(path: &Path, text: &str) -> Vec<NodeAlloc> {
    nodes_file_entries(text)
        .filter_map(|(line, spec)| match node_alloc(spec) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("--nodes_file {} line {line}: {e}; skipped", path.display());
                None
            }
        })
        .collect()
}

/// Reads the nodes file again every 2 s and gives the scheduler the new list when it changed
/// (`fixed`: the --node list, always kept).
async fn follow_nodes_file(runtime: Arc<server::Runtime>, path: PathBuf, fixed: Vec<NodeAlloc>) {
    let mut last = read_nodes_file(&path).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let text = read_nodes_file(&p)?;
            let allocs = nodes_file_allocs(&p, &text);
            Ok::<_, String>((text, allocs))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok((text, allocs)) if last.as_ref() != Some(&text) => {
                let mut nodes = fixed.clone();
                nodes.extend(allocs);
                tracing::info!(
                    nodes = ?nodes.iter().map(|a| a.host.as_str()).collect::<Vec<_>>(),
                    "node list changed ({})",
                    path.display()
                );
                runtime.with(|s| s.set_nodes(server::now(), nodes));
                last = Some(text);
            }
            Ok(_) => {}
            // Kept as it was: a file being replaced may be missing for a moment.
            Err(e) => tracing::debug!("{e}; the node list is kept"),
        }
    }
}

fn tls_pair(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    what: &str,
) -> Result<
    (
        Option<tokio_rustls::TlsConnector>,
        Option<tokio_rustls::TlsAcceptor>,
    ),
    String,
> {
    let Some(cert) = cert else {
        return Ok((None, None));
    };
    let trust = dispy_core::tls::Trust::PinnedCert(cert.clone());
    let client =
        dispy_core::tls::client_config(&trust).map_err(|e| format!("--{what}_certfile: {e}"))?;
    let server = dispy_core::tls::server_config(cert, key.map(|k| k.as_path()))
        .map_err(|e| format!("--{what}_certfile: {e}"))?;
    Ok((
        Some(tokio_rustls::TlsConnector::from(client)),
        Some(tokio_rustls::TlsAcceptor::from(server)),
    ))
}

fn main() {
    let args = Args::parse();
    let default = if args.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    // The secrets are not for the processes we might start, nor for /proc/self/environ readers.
    std::env::remove_var("DISPYSCHEDULER_NODE_SECRET");
    std::env::remove_var("DISPYSCHEDULER_CLUSTER_SECRET");
    // One thread: a job costs the scheduler mostly system calls (four connections per job,
    // as dispy's protocol has it), and a multi-thread runtime adds cross-thread wake-ups to
    // each, about a fifth more cpu per job than one core gives back (docs/scheduler.md,
    // Performance). Nothing here blocks the thread for long: file writes go to the page cache.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        tracing::error!("{e}");
        eprintln!("dispyscheduler: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.pulse_interval != 0.0 && !(0.1..=1000.0).contains(&args.pulse_interval) {
        return Err(format!(
            "--pulse_interval {}: must be between 0.1 and 1000 seconds",
            args.pulse_interval
        ));
    }
    if args.ping_interval != 0.0 && !(1.0..=1000.0).contains(&args.ping_interval) {
        return Err(format!(
            "--ping_interval {}: must be between 1 and 1000 seconds",
            args.ping_interval
        ));
    }
    let zombie = (args.zombie_interval > 0.0).then_some(args.zombie_interval * 60.0);
    let pulse_interval = match (args.pulse_interval, zombie) {
        (p, Some(z)) if p > 0.0 => p.min(z / 5.0),
        (p, None) if p > 0.0 => p,
        (_, Some(z)) => z / 5.0,
        _ => 60.0,
    }
    .max(0.1);
    let max_frame = parse_size(&args.max_frame)? as usize;
    let max_file_size = parse_size(&args.max_file_size)?;
    let policy = if args.fair_cluster_scheduler {
        Policy::FairCluster
    } else if args.early_cluster_scheduler {
        Policy::EarliestCluster
    } else {
        Policy::EarliestJob
    };
    for (flag, on, why) in [
        (
            "--httpd",
            args.httpd,
            "no HTTP monitor here; --metrics-addr serves Prometheus metrics",
        ),
        (
            "--ipv4_udp_multicast",
            args.ipv4_udp_multicast,
            "discovery uses broadcast",
        ),
    ] {
        if on {
            tracing::warn!("{flag} accepted, not applied: {why}");
        }
    }
    let nodes = args
        .nodes
        .iter()
        .map(|n| node_alloc(n).map_err(|e| format!("--node {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut nodes_now = nodes.clone();
    if let Some(path) = &args.nodes_file {
        let text = read_nodes_file(path)?;
        nodes_now.extend(nodes_file_allocs(path, &text));
    }

    let dest = args
        .dest_path_prefix
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("dispy").join("scheduler"));
    if args.clean {
        let _ = std::fs::remove_dir_all(&dest);
    }
    std::fs::create_dir_all(&dest)
        .map_err(|e| format!("--dest_path_prefix {}: {e}", dest.display()))?;

    let node_port = args.node_port.unwrap_or(args.dispy_port.wrapping_add(1));
    let scheduler_port = args
        .scheduler_port
        .unwrap_or(args.dispy_port.wrapping_add(2));
    let port = args.dispy_port;

    let hosts: Vec<IpAddr> = if args.hosts.is_empty() {
        vec![dispy_core::discovery::interfaces()
            .first()
            .map(|i| IpAddr::V4(i.ip))
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))]
    } else {
        args.hosts
            .iter()
            .map(|h| {
                h.parse::<IpAddr>().or_else(|_| {
                    use std::net::ToSocketAddrs;
                    (h.as_str(), 0)
                        .to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.find(|a| a.is_ipv4()))
                        .map(|a| a.ip())
                        .ok_or_else(|| format!("--host {h:?}: not an address of this host"))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let ip_addrs: Vec<String> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            args.ext_hosts
                .get(i)
                .cloned()
                .unwrap_or_else(|| h.to_string())
        })
        .collect();

    let (node_tls, node_acceptor) = tls_pair(
        args.node_certfile.as_ref(),
        args.node_keyfile.as_ref(),
        "node",
    )?;
    let (client_tls, client_acceptor) = tls_pair(
        args.cluster_certfile.as_ref(),
        args.cluster_keyfile.as_ref(),
        "cluster",
    )?;

    let cfg = Config {
        policy,
        pulse_interval,
        ping_interval: (args.ping_interval > 0.0).then_some(args.ping_interval),
        zombie_interval: zombie,
        cooperative: args.cooperative,
        nodes: nodes_now,
        listed_only: args.nodes_file.is_some(),
    };
    let sign = auth::new_sign();
    let runtime = server::Runtime::new(
        server::Settings {
            version: args.dispy_version.clone(),
            sign,
            cluster_secret: args.cluster_secret.clone(),
            node_secret: args.node_secret.clone(),
            port,
            node_port,
            scheduler_port,
            ip_addrs: ip_addrs.clone(),
            node_tls,
            client_tls,
            msg_timeout: Duration::from_secs_f64(args.msg_timeout.max(0.1)),
            max_frame,
            cleanup_nodes: args.cleanup_nodes,
            dest: dest.clone(),
            max_file_size,
        },
        Scheduler::new(cfg, server::now()),
    );

    for host in &hosts {
        let nodes_side = TcpListener::bind((*host, port))
            .await
            .map_err(|e| format!("cannot listen for nodes on {host}:{port}: {e}"))?;
        let clients_side = TcpListener::bind((*host, scheduler_port))
            .await
            .map_err(|e| format!("cannot listen for clients on {host}:{scheduler_port}: {e}"))?;
        tokio::spawn(
            runtime
                .clone()
                .serve_nodes(nodes_side, node_acceptor.clone()),
        );
        tokio::spawn(
            runtime
                .clone()
                .serve_clients(clients_side, client_acceptor.clone()),
        );
        tracing::info!(%host, nodes_port = port, clients_port = scheduler_port, "dispyscheduler serving");
    }
    // Nodes announce themselves (start-up, TERMINATED) by UDP to the client port.
    match UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), port)).await {
        Ok(sock) => {
            tokio::spawn(runtime.clone().serve_udp(sock));
        }
        Err(e) => tracing::warn!(
            "node announcements by UDP not heard (port {port}: {e}); listed nodes are pinged"
        ),
    }
    if let Some(addr) = args.metrics_addr {
        let rt = runtime.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, rt).await {
                tracing::error!(%addr, "metrics not served: {e}");
            }
        });
    }
    tracing::info!(
        policy = ?policy,
        pulse_interval,
        zombie_interval = ?zombie,
        node_tls = args.node_certfile.is_some(),
        cluster_tls = args.cluster_certfile.is_some(),
        "dispyscheduler {} (dispy {}) started",
        env!("CARGO_PKG_VERSION"),
        args.dispy_version
    );
    runtime.with(|s| s.start());
    tokio::spawn(runtime.clone().clock());
    if let Some(path) = args.nodes_file.clone() {
        tokio::spawn(follow_nodes_file(runtime.clone(), path, nodes));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: closing computations on nodes");
    runtime.with(|s| s.shutdown());
    // Computations closed on their nodes (cleanup run there), for a while at most.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while runtime.closing.load(std::sync::atomic::Ordering::SeqCst) > 0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("dispyscheduler stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_file_names_one_node_per_line_and_a_bad_line_loses_only_itself() {
        let text =
            "# the operator's list\n127.0.0.11:9701\n\n  127.0.0.12:9701  # second\nnode:x\n";
        let entries: Vec<(usize, &str)> = nodes_file_entries(text).collect();
        assert_eq!(
            entries,
            vec![
                (2, "127.0.0.11:9701"),
                (4, "127.0.0.12:9701"),
                (5, "node:x")
            ]
        );
        let allocs = nodes_file_allocs(Path::new("nodes"), text);
        let hosts: Vec<(&str, Option<u16>)> =
            allocs.iter().map(|a| (a.host.as_str(), a.port)).collect();
        assert_eq!(
            hosts,
            vec![("127.0.0.11", Some(9701)), ("127.0.0.12", Some(9701))]
        );
    }
}
