//! Command line of `dispynode`, with dispy's option names where they make sense.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dispy_core::protocol::{DEFAULT_CLIENT_PORT, DEFAULT_MAX_FRAME};

#[derive(Debug, Parser)]
#[command(
    name = "dispynode",
    version,
    // dispynode.py's options, in its spellings; ours are aliases. A repeated option takes
    // its last value, so a command line overrides what a --config file gave.
    args_override_self = true,
    about = "dispy node agent: runs computations and jobs sent by dispy clients, the dispy CLI and the dispy operator",
    long_about = "dispy node agent. Runs the computations (Python functions or programs) that clients send, \
                  executes their jobs on up to --cpus processes at a time and sends back each job's result, \
                  stdout, stderr, exception and times. One port (default 9701 = --dispy_port + 1) serves TCP \
                  and UDP: discovery, the native protocol and dispy 4.15's own, so unmodified Python dispy \
                  clients use the node. Options take dispynode.py's spellings (--dest_path_prefix) or ours \
                  (--dest-path-prefix)."
)]
pub struct Args {
    /// Read options from a file written by --save_config (dispynode.py's format: an INI file,
    /// section DEFAULT); options given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Write the options given (with those of --config) to this file, in dispynode.py's
    /// format, and exit.
    #[arg(long = "save_config", visible_alias = "save-config")]
    pub save_config: Option<PathBuf>,

    /// Number of cpus (concurrent jobs) to offer; 0 = all, a negative number leaves that many unused.
    #[arg(short = 'c', long, default_value_t = 0, allow_negative_numbers = true)]
    pub cpus: i32,

    /// Address or host name to bind (repeatable). Default: all IPv4 interfaces.
    #[arg(short = 'i', long = "host")]
    pub hosts: Vec<String>,

    /// Address clients should use to reach this node (behind NAT, or with hostNetwork pods);
    /// repeatable, as in dispy: the first is announced.
    #[arg(long = "ext_host", visible_alias = "ext-host")]
    pub ext_hosts: Vec<String>,

    /// dispy's port: clients listen on it, and the node on the next one (9700: the node on
    /// 9701), as dispynode.py does.
    #[arg(short = 'p', long = "dispy_port", visible_alias = "dispy-port", default_value_t = DEFAULT_CLIENT_PORT)]
    pub dispy_port: u16,

    /// The node's own TCP and UDP port, when not --dispy_port + 1; 0 picks a free one.
    #[arg(long)]
    pub port: Option<u16>,

    /// UDP port of clients, where the node announces itself (default: --dispy_port).
    #[arg(long = "client_port", visible_alias = "client-port")]
    pub client_port: Option<u16>,

    /// Accepted for dispynode.py's command line: discovery here uses IPv4 broadcast, not
    /// multicast (the node says so at start).
    #[arg(long = "ipv4_udp_multicast", visible_alias = "ipv4-udp-multicast")]
    pub ipv4_udp_multicast: bool,

    /// Name reported to clients. Default: the host name.
    #[arg(long)]
    pub name: Option<String>,

    /// Directory under which computations' files and working directories are kept.
    /// Default: $TMPDIR/dispy/node.
    #[arg(long = "dest_path_prefix", visible_alias = "dest-path-prefix")]
    pub dest_path_prefix: Option<PathBuf>,

    /// Accepted for dispynode.py's command line: a Python file whose init() and close() run
    /// in dispynode.py's own process. This node runs no Python of its own, so the file is not
    /// run (the node says so at start); use a computation's setup instead.
    #[arg(long)]
    pub init: Option<PathBuf>,

    /// A dispyscheduler to announce the node to at start (and every --ping_interval), besides
    /// the broadcast announcements.
    #[arg(long = "scheduler_host", visible_alias = "scheduler-host")]
    pub scheduler_host: Option<String>,

    /// Largest file a client may send, e.g. 10m or 1g; 0 = unlimited.
    #[arg(long = "max_file_size", visible_alias = "max-file-size", default_value = "0", value_parser = parse_size)]
    pub max_file_size: u64,

    /// A computation whose client is gone this long is closed and its results dropped.
    /// A plain number is minutes, as in dispy; or use a suffix: 30s, 5m, 1h.
    #[arg(long = "zombie_interval", visible_alias = "zombie-interval", default_value = "60", value_parser = parse_minutes)]
    pub zombie_interval: Duration,

    /// Interval of node pulses to clients and of discovery announcements. A plain number is
    /// seconds; 0 = announce only at start.
    #[arg(long = "ping_interval", visible_alias = "ping-interval", default_value = "0", value_parser = parse_seconds)]
    pub ping_interval: Duration,

    /// Time of day (HH:MM) when the node starts taking jobs, every day.
    #[arg(long = "service_start", visible_alias = "service-start", value_parser = parse_time_of_day)]
    pub service_start: Option<u32>,

    /// Time of day (HH:MM) when the node stops taking new jobs (running ones go on).
    #[arg(long = "service_stop", visible_alias = "service-stop", value_parser = parse_time_of_day)]
    pub service_stop: Option<u32>,

    /// Time of day (HH:MM) when the node ends its service (running jobs are terminated).
    #[arg(long = "service_end", visible_alias = "service-end", value_parser = parse_time_of_day)]
    pub service_end: Option<u32>,

    /// Serve this many computations, then exit; negative = no limit.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub serve: i64,

    /// Accepted for dispynode.py's command line, where it lets a client shut the node down;
    /// no client can here (the node says so at start).
    #[arg(long = "client_shutdown", visible_alias = "client-shutdown")]
    pub client_shutdown: bool,

    /// Remove a computation's files when it closes even when its client asked to keep them.
    #[arg(long = "force_cleanup", visible_alias = "force-cleanup")]
    pub force_cleanup: bool,

    /// Timeout of a message to or from a dispy client, in seconds (dispy's MsgTimeout).
    #[arg(long = "msg_timeout", visible_alias = "msg-timeout", default_value = "10", value_parser = parse_seconds)]
    pub msg_timeout: Duration,

    /// Shared secret clients must prove they know (HMAC challenge-response). Prefer
    /// $DISPYNODE_SECRET: a command line is visible to every local user until the node hides it.
    #[arg(
        short = 's',
        long,
        env = "DISPYNODE_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub secret: String,

    /// Secret of dispy's admin tool (dispyadmin): it authorizes NODE_STATUS.
    #[arg(
        long = "admin_secret",
        visible_alias = "admin-secret",
        env = "DISPYNODE_ADMIN_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_secret: String,

    /// PEM certificate (chain) for TLS; clients then must use TLS.
    #[arg(long)]
    pub certfile: Option<PathBuf>,

    /// The dispy version this node announces to Python dispy clients, which ignore nodes
    /// whose version is not exactly theirs.
    #[arg(
        long = "dispy_version",
        visible_alias = "dispy-version",
        default_value = "4.15.2"
    )]
    pub dispy_version: String,

    /// Serve only the native protocol (the operator, the `dispy` CLI): dispy 4.15's own
    /// protocol, for Python dispy clients, is refused on TCP and its UDP pings ignored.
    #[arg(long = "no_dispy", visible_alias = "no-dispy")]
    pub no_dispy: bool,

    /// PEM private key for --certfile (default: the key is in the certfile).
    #[arg(long)]
    pub keyfile: Option<PathBuf>,

    /// Stop an earlier dispynode on the same port and clear --dest_path_prefix before starting.
    #[arg(long)]
    pub clean: bool,

    /// Accepted for dispynode.py's command line, where setup then runs in the node's own
    /// process: here setup always runs in the computation's Python host, never in the node.
    #[arg(long = "unsafe_setup", visible_alias = "unsafe-setup")]
    pub unsafe_setup: bool,

    /// Run without reading commands from standard input.
    #[arg(long)]
    pub daemon: bool,

    /// Python interpreter for Python computations.
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,

    /// On SIGTERM, running jobs get this long to finish before they are terminated.
    #[arg(long = "shutdown_grace", visible_alias = "shutdown-grace", default_value = "10s", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// A terminated job gets this long between SIGTERM and SIGKILL.
    #[arg(long = "terminate_grace", visible_alias = "terminate-grace", default_value = "5s", value_parser = parse_seconds)]
    pub terminate_grace: Duration,

    /// Largest stdout or stderr kept per job; the rest is dropped and counted.
    #[arg(long = "max_output", visible_alias = "max-output", default_value = "1m", value_parser = parse_size)]
    pub max_output: u64,

    /// Largest protocol frame accepted.
    #[arg(long = "max_frame", visible_alias = "max-frame", default_value_t = DEFAULT_MAX_FRAME as u64, value_parser = parse_size)]
    pub max_frame: u64,

    /// Serve Prometheus metrics (and /healthz) on this address, e.g. 127.0.0.1:9711.
    #[arg(long = "metrics_addr", visible_alias = "metrics-addr")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long = "log_format", visible_alias = "log-format", value_enum, default_value_t = LogFormat::Text)]
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
    /// dispy's `MsgTimeout` (`--msg_timeout`).
    pub msg_timeout: Duration,
    /// `--admin_secret`: what dispy's admin requests prove (empty: the node's secret).
    pub admin_secret: String,
    /// Remove every computation's files at close, whatever its client asked.
    pub force_cleanup: bool,
    /// Announced to at start and every ping interval (`--scheduler_host`).
    pub scheduler_host: Option<IpAddr>,
    /// The daily service window, minutes after local midnight.
    pub service: crate::service::Window,
    /// Options accepted for dispynode.py's command line that do nothing here, with why:
    /// logged at start.
    pub not_applied: Vec<String>,
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
            args.hosts
                .iter()
                .map(|h| resolve(h, "--host"))
                .collect::<Result<Vec<_>, _>>()?
        };
        let port = match args.port {
            Some(p) => p,
            None => args.dispy_port.checked_add(1).ok_or_else(|| {
                format!(
                    "--dispy_port {} leaves no port for the node (it listens on --dispy_port + 1)",
                    args.dispy_port
                )
            })?,
        };
        let scheduler_host = args
            .scheduler_host
            .as_deref()
            .map(|h| resolve(h, "--scheduler_host"))
            .transpose()?;
        let service =
            crate::service::Window::new(args.service_start, args.service_stop, args.service_end)?;
        let mut not_applied = Vec::new();
        if args.ipv4_udp_multicast {
            not_applied
                .push("--ipv4_udp_multicast: discovery uses IPv4 broadcast here".to_string());
        }
        if let Some(init) = &args.init {
            not_applied.push(format!(
                "--init {}: this node runs no Python of its own, so the file's init() and close() are not run; use a computation's setup and cleanup",
                init.display()
            ));
        }
        if args.client_shutdown {
            not_applied.push("--client_shutdown: no client can shut this node down".to_string());
        }
        if args.unsafe_setup {
            not_applied.push(
                "--unsafe_setup: setup always runs in the computation's Python host, never in the node"
                    .to_string(),
            );
        }
        let name = args.name.clone().unwrap_or_else(hostname);
        Ok(NodeConfig {
            name,
            hosts,
            ext_host: args.ext_hosts.first().cloned(),
            port,
            client_port: args.client_port.unwrap_or(args.dispy_port),
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
            msg_timeout: args.msg_timeout,
            admin_secret: args.admin_secret.clone(),
            force_cleanup: args.force_cleanup,
            scheduler_host,
            service,
            not_applied,
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

/// An address, or a host name resolved to its first IPv4 address.
fn resolve(host: &str, option: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    use std::net::ToSocketAddrs;
    let addrs = (host, 0)
        .to_socket_addrs()
        .map_err(|e| format!("{option} {host}: cannot resolve it: {e}"))?;
    addrs
        .map(|a| a.ip())
        .find(IpAddr::is_ipv4)
        .ok_or_else(|| format!("{option} {host}: it has no IPv4 address"))
}

/// `HH:MM` → minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid time of day {s:?}: use HH:MM, e.g. 08:30");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
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
    fn dispynode_py_spellings_and_ours_both_parse_and_dispy_port_is_the_base() {
        let ours = Args::parse_from([
            "dispynode",
            "--dest-path-prefix",
            "/d",
            "--zombie-interval",
            "1",
            "--max-file-size",
            "10M",
        ]);
        let theirs = Args::parse_from([
            "dispynode",
            "--dest_path_prefix",
            "/d",
            "--zombie_interval",
            "1",
            "--max_file_size",
            "10M",
        ]);
        assert_eq!(ours.dest_path_prefix, theirs.dest_path_prefix);
        assert_eq!(ours.zombie_interval, Duration::from_secs(60));
        assert_eq!(theirs.max_file_size, 10 << 20);
        let cfg = |argv: &[&str]| NodeConfig::from_args(&Args::parse_from(argv)).unwrap();
        let base = cfg(&["dispynode", "-p", "9800"]);
        assert_eq!((base.port, base.client_port), (9801, 9800));
        let default = cfg(&["dispynode"]);
        assert_eq!((default.port, default.client_port), (9701, 9700));
        let explicit = cfg(&["dispynode", "-p", "9800", "--port", "0"]);
        assert_eq!((explicit.port, explicit.client_port), (0, 9800));
        // Names resolve; the last of a repeated option wins.
        let named = cfg(&["dispynode", "-i", "localhost", "-c", "1", "-c", "2"]);
        assert_eq!(named.hosts, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(named.cpus, 2);
        let noted = cfg(&[
            "dispynode",
            "--init",
            "i.py",
            "--unsafe_setup",
            "--client_shutdown",
        ]);
        assert_eq!(noted.not_applied.len(), 3, "{:?}", noted.not_applied);
    }

    #[test]
    fn times_of_day_parse_as_minutes() {
        assert_eq!(parse_time_of_day("08:30").unwrap(), 510);
        assert_eq!(parse_time_of_day("0:00").unwrap(), 0);
        assert!(parse_time_of_day("24:00").unwrap_err().contains("HH:MM"));
        assert!(parse_time_of_day("8h").is_err());
    }

    #[test]
    fn a_saved_configuration_reads_back_and_the_command_line_wins() {
        let args = Args::parse_from([
            "dispynode",
            "-c",
            "2",
            "-i",
            "127.0.0.1",
            "--name",
            "n1",
            "--zombie_interval",
            "90",
            "--service_start",
            "08:00",
            "--service_end",
            "18:00",
            "--force_cleanup",
            "-s",
            "s3cret",
        ]);
        let text = file::text(&args);
        let options = file::options(&text, |_| false).unwrap();
        let mut argv = vec!["dispynode".to_string()];
        argv.extend(options);
        let back = Args::parse_from(&argv);
        assert_eq!(back.cpus, 2);
        assert_eq!(back.hosts, vec!["127.0.0.1".to_string()]);
        assert_eq!(back.name.as_deref(), Some("n1"));
        assert_eq!(back.zombie_interval, Duration::from_secs(90 * 60));
        assert_eq!(
            (back.service_start, back.service_end),
            (Some(480), Some(1080))
        );
        assert!(back.force_cleanup && !back.unsafe_setup);
        assert_eq!(back.secret, "s3cret");
        argv.extend(["-c".to_string(), "1".to_string()]);
        assert_eq!(Args::parse_from(&argv).cpus, 1);
        // The command line's hosts replace the file's.
        let opts = file::options(&text, |o| o == "host").unwrap();
        assert!(!opts.contains(&"--host".to_string()));
    }

    #[test]
    fn a_dispynode_py_configuration_file_is_read() {
        // As dispynode.py 4.15 --save_config writes it (configparser, every key in DEFAULT).
        let text = "[DEFAULT]\ncpus = 2\nloglevel = False\nhosts = ['127.0.0.1']\next_hosts = []\ndispy_port = 9800\nipv4_udp_multicast = False\nname = n1\ndest_path_prefix = /var/tmp/d\nnode_init = \nscheduler_host = \nmax_file_size = 10M\nzombie_interval = 1.0\nping_interval = 10\nservice_start = \nservice_stop = \nservice_end = \nserve = 100\nclient_shutdown = True\nforce_cleanup = True\nmsg_timeout = 10.0\nsecret = s3cret\nadmin_secret = adm\ncertfile = None\nkeyfile = None\nclean = True\nsafe_setup = True\ndaemon = True\n";
        let mut argv = vec!["dispynode".to_string()];
        argv.extend(file::options(text, |_| false).unwrap());
        let args = Args::parse_from(&argv);
        assert_eq!((args.cpus, args.dispy_port, args.serve), (2, 9800, 100));
        assert_eq!(args.max_file_size, 10 << 20);
        assert_eq!(args.ping_interval, Duration::from_secs(10));
        assert!(args.client_shutdown && args.force_cleanup && args.clean && args.daemon);
        assert_eq!(
            (args.secret.as_str(), args.admin_secret.as_str()),
            ("s3cret", "adm")
        );
        assert_eq!(args.certfile, None);
        let err = file::options("[DEFAULT]\nbogus = 1\n", |_| false).unwrap_err();
        assert!(err.contains("unknown option \"bogus\""), "{err}");
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

/// dispynode.py's configuration file (`--save_config`, `--config`): Python's configparser
/// format, every option in section `DEFAULT` under its dispy name.
pub mod file {
    use super::Args;
    use std::ffi::OsString;

    /// Options that are flags: `True` in the file gives the flag.
    const FLAGS: &[(&str, &str)] = &[
        ("loglevel", "--debug"),
        ("ipv4_udp_multicast", "--ipv4_udp_multicast"),
        ("client_shutdown", "--client_shutdown"),
        ("force_cleanup", "--force_cleanup"),
        ("clean", "--clean"),
        ("daemon", "--daemon"),
        ("no_dispy", "--no_dispy"),
    ];
    /// Options with a value: the key is the option's name; empty or `None` means not given.
    const VALUES: &[&str] = &[
        "cpus",
        "dispy_port",
        "port",
        "client_port",
        "name",
        "dest_path_prefix",
        "scheduler_host",
        "max_file_size",
        "zombie_interval",
        "ping_interval",
        "service_start",
        "service_stop",
        "service_end",
        "serve",
        "msg_timeout",
        "secret",
        "admin_secret",
        "certfile",
        "keyfile",
        "dispy_version",
        "python",
        "shutdown_grace",
        "terminate_grace",
        "max_output",
        "max_frame",
        "metrics_addr",
    ];

    /// The command line options a configuration file gives, in order; `cli_has` tells
    /// which repeatable options the command line gives itself (they then replace the file's).
    pub fn options(text: &str, cli_has: impl Fn(&str) -> bool) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut section = String::from("DEFAULT");
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .or_else(|| line.split_once(':'))
                .ok_or_else(|| format!("line {}: {raw:?} is not `key = value`", n + 1))?;
            let (key, value) = (key.trim(), value.trim());
            if section != "DEFAULT" {
                continue;
            }
            let given = !value.is_empty() && value != "None";
            if let Some((_, flag)) = FLAGS.iter().find(|(k, _)| *k == key) {
                if value == "True" {
                    out.push(flag.to_string());
                }
            } else if key == "safe_setup" {
                if value == "False" {
                    out.push("--unsafe_setup".into());
                }
            } else if key == "hosts" || key == "ext_hosts" {
                let option = if key == "hosts" { "host" } else { "ext_host" };
                if !cli_has(option) {
                    for h in
                        python_list(value).map_err(|e| format!("line {}: {key}: {e}", n + 1))?
                    {
                        out.extend([format!("--{option}"), h]);
                    }
                }
            } else if key == "node_init" {
                if given {
                    out.extend(["--init".to_string(), value.to_string()]);
                }
            } else if VALUES.contains(&key) {
                if given && !(key == "ping_interval" && value == "0") {
                    out.extend([format!("--{key}"), value.to_string()]);
                }
            } else {
                return Err(format!("line {}: unknown option {key:?}", n + 1));
            }
        }
        Ok(out)
    }

    /// `['a', "b"]` or a bare `a` → the strings.
    fn python_list(value: &str) -> Result<Vec<String>, String> {
        let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) else {
            return Ok(vec![value.to_string()]);
        };
        inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    .map(str::to_string)
                    .ok_or_else(|| format!("{s} is not a quoted string"))
            })
            .collect()
    }

    fn python_bool(b: bool) -> &'static str {
        if b {
            "True"
        } else {
            "False"
        }
    }

    fn python_list_of(items: &[String]) -> String {
        let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// `args` as a configuration file dispynode.py reads too (its keys; ours after them).
    pub fn text(args: &Args) -> String {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let path = |v: &Option<std::path::PathBuf>| {
            v.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let time = |t: Option<u32>| {
            t.map(|m| format!("{:02}:{:02}", m / 60, m % 60))
                .unwrap_or_default()
        };
        let lines: Vec<(&str, String)> = vec![
            ("cpus", args.cpus.to_string()),
            ("loglevel", python_bool(args.debug).into()),
            ("hosts", python_list_of(&args.hosts)),
            ("ext_hosts", python_list_of(&args.ext_hosts)),
            ("dispy_port", args.dispy_port.to_string()),
            (
                "ipv4_udp_multicast",
                python_bool(args.ipv4_udp_multicast).into(),
            ),
            ("name", opt(&args.name)),
            ("dest_path_prefix", path(&args.dest_path_prefix)),
            ("node_init", path(&args.init)),
            ("scheduler_host", opt(&args.scheduler_host)),
            ("max_file_size", args.max_file_size.to_string()),
            (
                "zombie_interval",
                format!("{}", args.zombie_interval.as_secs_f64() / 60.0),
            ),
            ("ping_interval", args.ping_interval.as_secs().to_string()),
            ("service_start", time(args.service_start)),
            ("service_stop", time(args.service_stop)),
            ("service_end", time(args.service_end)),
            ("serve", args.serve.to_string()),
            ("client_shutdown", python_bool(args.client_shutdown).into()),
            ("force_cleanup", python_bool(args.force_cleanup).into()),
            ("msg_timeout", format!("{}", args.msg_timeout.as_secs_f64())),
            ("secret", args.secret.clone()),
            ("admin_secret", args.admin_secret.clone()),
            ("certfile", path(&args.certfile)),
            ("keyfile", path(&args.keyfile)),
            ("clean", python_bool(args.clean).into()),
            ("safe_setup", python_bool(!args.unsafe_setup).into()),
            ("daemon", python_bool(args.daemon).into()),
            ("port", args.port.map(|p| p.to_string()).unwrap_or_default()),
            (
                "client_port",
                args.client_port.map(|p| p.to_string()).unwrap_or_default(),
            ),
            ("no_dispy", python_bool(args.no_dispy).into()),
            ("dispy_version", args.dispy_version.clone()),
            ("python", args.python.display().to_string()),
            (
                "shutdown_grace",
                format!("{}s", args.shutdown_grace.as_secs_f64()),
            ),
            (
                "terminate_grace",
                format!("{}s", args.terminate_grace.as_secs_f64()),
            ),
            ("max_output", args.max_output.to_string()),
            ("max_frame", args.max_frame.to_string()),
            (
                "metrics_addr",
                args.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
            ),
        ];
        let mut out = String::from("[DEFAULT]\n");
        for (k, v) in lines {
            out += &format!("{k} = {v}\n");
        }
        out
    }

    /// The command line with a `--config FILE`'s options put first, so the command line's own
    /// win (a repeated option takes its last value).
    pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
        let strings: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut path = None;
        for (i, a) in strings.iter().enumerate() {
            if a == "--config" {
                path = strings.get(i + 1).cloned();
            } else if let Some(p) = a.strip_prefix("--config=") {
                path = Some(p.to_string());
            }
        }
        let Some(path) = path else { return Ok(argv) };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("--config {path}: cannot read it: {e}"))?;
        let cli_has = |name: &str| {
            let long = format!("--{name}");
            let kebab = format!("--{}", name.replace('_', "-"));
            strings.iter().any(|a| {
                a == &long
                    || a == &kebab
                    || a.starts_with(&format!("{long}="))
                    || a.starts_with(&format!("{kebab}="))
                    || (name == "host" && (a == "-i" || (a.starts_with("-i") && a.len() > 2)))
            })
        };
        let from_file = options(&text, cli_has).map_err(|e| format!("--config {path}: {e}"))?;
        let mut out = vec![argv[0].clone()];
        out.extend(from_file.into_iter().map(OsString::from));
        out.extend(argv.into_iter().skip(1));
        Ok(out)
    }
}
