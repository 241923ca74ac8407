//! Command line of `dispynode`, with dispy's option names where they make sense.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dispy_core::protocol::{DEFAULT_CLIENT_PORT, DEFAULT_MAX_FRAME, DEFAULT_NODE_PORT};

#[derive(Debug, Parser)]
#[command(
    name = "dispynode",
    version,
    about = "dispy node agent: runs computations and jobs sent by dispy clients, the dispy CLI and the dispy operator",
    long_about = "dispy node agent. Runs the computations (Python functions or programs) that clients send, \
                  executes their jobs on up to --cpus processes at a time and sends back each job's result, \
                  stdout, stderr, exception and times. One port (default 9701) serves TCP and UDP: discovery, \
                  the native protocol and dispy 4.15's own, so unmodified Python dispy clients use the node."
)]
pub struct Args {
    /// Number of cpus (concurrent jobs) to offer; 0 = all, a negative number leaves that many unused.
    #[arg(short = 'c', long, default_value_t = 0, allow_negative_numbers = true)]
    pub cpus: i32,

    /// Address to bind (repeatable). Default: all IPv4 interfaces.
    #[arg(short = 'i', long = "host")]
    pub hosts: Vec<IpAddr>,

    /// Address clients should use to reach this node (behind NAT, or with hostNetwork pods).
    #[arg(long)]
    pub ext_host: Option<String>,

    /// TCP and UDP port.
    #[arg(short = 'p', long, default_value_t = DEFAULT_NODE_PORT)]
    pub port: u16,

    /// UDP port of clients, where the node announces itself at start.
    #[arg(long, default_value_t = DEFAULT_CLIENT_PORT)]
    pub client_port: u16,

    /// Name reported to clients. Default: the host name.
    #[arg(long)]
    pub name: Option<String>,

    /// Directory under which computations' files and working directories are kept.
    /// Default: $TMPDIR/dispy/node.
    #[arg(long)]
    pub dest_path_prefix: Option<PathBuf>,

    /// Largest file a client may send, e.g. 10m or 1g; 0 = unlimited.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub max_file_size: u64,

    /// A computation whose client is gone this long is closed and its results dropped.
    /// A plain number is minutes, as in dispy; or use a suffix: 30s, 5m, 1h.
    #[arg(long, default_value = "60", value_parser = parse_minutes)]
    pub zombie_interval: Duration,

    /// Interval of node pulses to clients and of discovery announcements. A plain number is
    /// seconds; 0 = announce only at start.
    #[arg(long, default_value = "0", value_parser = parse_seconds)]
    pub ping_interval: Duration,

    /// Shared secret clients must prove they know (HMAC challenge-response).
    #[arg(
        short = 's',
        long,
        env = "DISPYNODE_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub secret: String,

    /// PEM certificate (chain) for TLS; clients then must use TLS.
    #[arg(long)]
    pub certfile: Option<PathBuf>,

    /// The dispy version this node announces to Python dispy clients, which ignore nodes
    /// whose version is not exactly theirs.
    #[arg(long, default_value = "4.15.2")]
    pub dispy_version: String,

    /// Serve only the native protocol (the operator, the `dispy` CLI): dispy 4.15's own
    /// protocol, for Python dispy clients, is refused on TCP and its UDP pings ignored.
    #[arg(long)]
    pub no_dispy: bool,

    /// PEM private key for --certfile (default: the key is in the certfile).
    #[arg(long)]
    pub keyfile: Option<PathBuf>,

    /// Stop an earlier dispynode on the same port and clear --dest-path-prefix before starting.
    #[arg(long)]
    pub clean: bool,

    /// Run without reading commands from standard input.
    #[arg(long)]
    pub daemon: bool,

    /// Serve this many computations, then exit; negative = no limit.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub serve: i64,

    /// Python interpreter for Python computations.
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,

    /// On SIGTERM, running jobs get this long to finish before they are terminated.
    #[arg(long, default_value = "10s", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// A terminated job gets this long between SIGTERM and SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_seconds)]
    pub terminate_grace: Duration,

    /// Largest stdout or stderr kept per job; the rest is dropped and counted.
    #[arg(long, default_value = "1m", value_parser = parse_size)]
    pub max_output: u64,

    /// Largest protocol frame accepted.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME as u64, value_parser = parse_size)]
    pub max_frame: u64,

    /// Serve Prometheus metrics (and /healthz) on this address, e.g. 127.0.0.1:9711.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More logging (same as RUST_LOG=debug).
    #[arg(short = 'd', long)]
    pub debug: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings the node runs with, resolved from [`Args`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub hosts: Vec<IpAddr>,
    pub ext_host: Option<String>,
    pub port: u16,
    pub client_port: u16,
    pub cpus: u32,
    pub dest_path_prefix: PathBuf,
    pub max_file_size: u64,
    pub zombie_interval: Duration,
    pub ping_interval: Duration,
    pub secret: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The certificate file itself: dispy clients' TLS trusts exactly that certificate.
    pub certfile: Option<PathBuf>,
    pub dispy_version: String,
    /// Whether dispy 4.15's own protocol is served (`--no-dispy` turns it off).
    pub dispy: bool,
    pub serve: Option<u64>,
    pub python: PathBuf,
    pub shutdown_grace: Duration,
    pub terminate_grace: Duration,
    pub max_output: usize,
    pub max_frame: usize,
    pub metrics_addr: Option<SocketAddr>,
}

impl NodeConfig {
    pub fn from_args(args: &Args) -> Result<NodeConfig, String> {
        let all = std::thread::available_parallelism()
            .map(|n| n.get() as i64)
            .unwrap_or(1);
        let cpus = match args.cpus as i64 {
            0 => all,
            n if n < 0 => all + n,
            n => n,
        };
        if cpus < 1 {
            return Err(format!(
                "--cpus {} leaves no cpu to run jobs on ({all} available)",
                args.cpus
            ));
        }
        let tls = match &args.certfile {
            None if args.keyfile.is_some() => {
                return Err("--keyfile needs --certfile".into());
            }
            None => None,
            Some(cert) => Some(
                dispy_core::tls::server_config(cert, args.keyfile.as_deref())
                    .map_err(|e| e.to_string())?,
            ),
        };
        let hosts = if args.hosts.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            args.hosts.clone()
        };
        let name = args.name.clone().unwrap_or_else(hostname);
        Ok(NodeConfig {
            name,
            hosts,
            ext_host: args.ext_host.clone(),
            port: args.port,
            client_port: args.client_port,
            cpus: cpus as u32,
            dest_path_prefix: args
                .dest_path_prefix
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("dispy").join("node")),
            max_file_size: args.max_file_size,
            zombie_interval: args.zombie_interval,
            ping_interval: args.ping_interval,
            secret: args.secret.clone(),
            tls,
            certfile: args.certfile.clone(),
            dispy_version: args.dispy_version.clone(),
            dispy: !args.no_dispy,
            serve: u64::try_from(args.serve).ok(),
            python: args.python.clone(),
            shutdown_grace: args.shutdown_grace,
            terminate_grace: args.terminate_grace,
            max_output: args.max_output as usize,
            max_frame: args.max_frame as usize,
            metrics_addr: args.metrics_addr,
        })
    }

    /// The address announced to clients.
    pub fn public_addr(&self) -> String {
        if let Some(ext) = &self.ext_host {
            return ext.clone();
        }
        match self.hosts.iter().find(|h| !h.is_unspecified()) {
            Some(h) => h.to_string(),
            None => first_interface_addr().unwrap_or_else(|| "127.0.0.1".into()),
        }
    }
}

fn first_interface_addr() -> Option<String> {
    dispy_core::discovery::interfaces()
        .first()
        .map(|i| i.ip.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dispynode".into())
}

/// `1024`, `10k`, `5m`, `1g`, `2t` (powers of 1024, as dispy).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        Some('t') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().map(|n| n * mult).map_err(|_| {
        format!("invalid size {s:?}: use a number with an optional k, m, g or t suffix")
    })
}

fn parse_duration(s: &str, plain_unit: u64) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, plain_unit as f64)
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n >= 0.0 && n.is_finite() => Ok(Duration::from_secs_f64(n * mult)),
        _ => Err(format!(
            "invalid duration {s:?}: use a number with an optional ms, s, m or h suffix"
        )),
    }
}

pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    parse_duration(s, 1)
}

pub fn parse_minutes(s: &str) -> Result<Duration, String> {
    parse_duration(s, 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("10k").unwrap(), 10240);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert!(parse_size("ten").unwrap_err().contains("invalid size"));
        assert_eq!(parse_minutes("60").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_minutes("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_seconds("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_seconds("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_seconds("-1").is_err());
    }

    #[test]
    fn cpus_zero_negative_and_too_few() {
        let all = std::thread::available_parallelism().unwrap().get() as u32;
        let args = |c: &str| Args::parse_from(["dispynode", "--cpus", c]);
        assert_eq!(NodeConfig::from_args(&args("0")).unwrap().cpus, all);
        assert_eq!(NodeConfig::from_args(&args("3")).unwrap().cpus, 3);
        if all > 1 {
            assert_eq!(NodeConfig::from_args(&args("-1")).unwrap().cpus, all - 1);
        }
        let err = NodeConfig::from_args(&args(&format!("-{all}"))).unwrap_err();
        assert!(err.contains("leaves no cpu"), "{err}");
    }
}
