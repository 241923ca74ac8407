//! `dispynode`: the dispy node agent.

mod avail;
mod children;
mod config;
mod dispy;
mod hardening;
mod host_output;
mod kept;
mod limits;
mod metrics;
mod native;
mod node;
mod outcome;
mod process;
mod procfs;
mod pyhost;
mod server;
mod service;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};

use config::{Args, LogFormat, NodeConfig};
use node::Node;

fn init_logging(args: &Args) {
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
}

fn main() {
    let argv = match config::file::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("dispynode: {e}");
            std::process::exit(2);
        }
    };
    let args = Args::parse_from(argv);
    if let Some(path) = &args.save_config {
        match std::fs::write(path, config::file::text(&args)) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("dispynode: --save_config {}: {e}", path.display());
                std::process::exit(2);
            }
        }
    }
    // Before any thread exists: the arguments and the environment are changed in place.
    let hidden = hardening::hide_secret_on_command_line(&args.secret);
    let scrubbed = hardening::scrub_environment();
    let env_hidden = hardening::hide_environment_values();
    let non_dumpable = hardening::make_non_dumpable();
    let subreaper = children::become_subreaper();
    let inherited = children::keep_inherited();
    init_logging(&args);
    if inherited > 0 {
        tracing::info!("{inherited} child process(es) from before the start are left alone");
    }
    match hidden {
        Ok(0) => {}
        Ok(_) => tracing::info!("--secret hidden from /proc/<pid>/cmdline; $DISPYNODE_SECRET keeps it out of the command line altogether"),
        Err(e) => tracing::warn!("--secret stays visible in /proc/<pid>/cmdline ({e}); pass it as $DISPYNODE_SECRET instead"),
    }
    if let Err(e) = env_hidden {
        tracing::warn!("the DISPYNODE_* values stay in /proc/<pid>/environ ({e}); only non-dumpable keeps other users from reading them");
    }
    if !scrubbed.is_empty() {
        tracing::debug!(variables = ?scrubbed, "removed from the environment jobs inherit");
    }
    for e in [non_dumpable.err(), subreaper.err()].into_iter().flatten() {
        tracing::warn!("{e}");
    }
    let cfg = match NodeConfig::from_args(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("dispynode: {e}");
            std::process::exit(2);
        }
    };
    for note in &cfg.not_applied {
        tracing::warn!("accepted, not applied: {note}");
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cfg, args.clean, args.daemon)) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("dispynode: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(mut cfg: NodeConfig, clean: bool, daemon: bool) -> Result<(), String> {
    let pid_file = cfg
        .dest_path_prefix
        .join(format!("dispynode-{}.pid", cfg.port));
    if clean {
        clean_previous(&pid_file, &cfg.dest_path_prefix).await;
    }

    // TCP first, so `--port 0` picks a port that UDP then shares.
    let mut listeners = Vec::new();
    for host in cfg.hosts.clone() {
        let addr = SocketAddr::new(host, cfg.port);
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on TCP {addr}: {e}"))?;
        cfg.port = l.local_addr().map_err(|e| e.to_string())?.port();
        listeners.push((host, l));
    }
    let mut sockets = Vec::new();
    for host in cfg.hosts.clone() {
        let addr = SocketAddr::new(host, cfg.port);
        let s = UdpSocket::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on UDP {addr}: {e}"))?;
        sockets.push((host, Arc::new(s)));
    }
    // A socket bound to one address does not get broadcasts; dispy's node binds the
    // interface's broadcast address for them, and so does this one.
    let mut broadcast_sockets = Vec::new();
    for (host, main) in &sockets {
        let specific = matches!(host, IpAddr::V4(v4) if !v4.is_unspecified());
        for (_, bcast) in dispy_core::discovery::interface_broadcasts(*host)
            .into_iter()
            .filter(|_| specific)
        {
            let addr = SocketAddr::new(IpAddr::V4(bcast), cfg.port);
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|e| format!("cannot listen for broadcasts on UDP {addr}: {e}"))?;
            broadcast_sockets.push((*host, Arc::new(s), main.clone()));
        }
    }

    let (node, outcomes) =
        Node::new(cfg).map_err(|e| format!("cannot prepare --dest-path-prefix: {e}"))?;
    let _ = std::fs::write(&pid_file, std::process::id().to_string());
    let cfg = &node.cfg;
    tracing::info!(
        name = %cfg.name,
        cpus = cfg.cpus,
        port = cfg.port,
        hosts = ?cfg.hosts,
        tls = cfg.tls.is_some(),
        dest_path_prefix = %cfg.dest_path_prefix.display(),
        "dispynode {} serving",
        env!("CARGO_PKG_VERSION")
    );

    // Before serving: the first pong already says what the machine has free.
    let mut sampler = avail::Sampler::new(&cfg.dest_path_prefix);
    sampler.sample_into(&node);
    tokio::spawn(avail::keep_sampling(node.clone(), sampler));

    let dispy = dispy::Dispy::new(node.clone())?;
    tokio::spawn(node.clone().run_outcomes(outcomes));
    tokio::spawn(dispy.clone().pulses());
    tokio::spawn(node.clone().reap_zombies());
    tokio::spawn(node.clone().keep_service_window());
    tokio::spawn(children::reap_leftovers());
    if let Some(addr) = cfg.metrics_addr {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, move || node.metrics.render()).await {
                tracing::error!(%addr, "metrics server failed: {e}");
            }
        });
    }
    let mut accept_tasks = Vec::new();
    for (_, l) in listeners {
        accept_tasks.push(tokio::spawn(server::accept_loop(
            node.clone(),
            dispy.clone(),
            l,
        )));
    }
    for (host, s, main) in &broadcast_sockets {
        accept_tasks.push(tokio::spawn(server::udp_loop(
            node.clone(),
            dispy.clone(),
            s.clone(),
            main.clone(),
            *host,
        )));
    }
    for (host, s) in &sockets {
        accept_tasks.push(tokio::spawn(server::udp_loop(
            node.clone(),
            dispy.clone(),
            s.clone(),
            s.clone(),
            *host,
        )));
        tokio::spawn(server::announce(
            node.clone(),
            dispy.clone(),
            s.clone(),
            *host,
        ));
    }
    if !daemon && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        tokio::spawn(console(node.clone(), dispy.clone()));
    }

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut shutdown = node.shutdown.subscribe();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = shutdown.wait_for(|s| *s) => {}
    }
    for t in accept_tasks {
        t.abort();
    }
    let udp: Vec<_> = sockets.iter().map(|(h, s)| (s.clone(), *h)).collect();
    dispy.shut_down(&udp).await;
    node.shut_down().await;
    node.shutdown.send_replace(true);
    // Let sessions send their shutdown notice.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = std::fs::remove_file(&pid_file);
    tracing::info!("dispynode stopped");
    Ok(())
}

/// `--clean`: stop an earlier dispynode recorded in the pid file and clear the prefix.
async fn clean_previous(pid_file: &Path, prefix: &Path) {
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32
            && String::from_utf8_lossy(&cmdline).contains("dispynode")
        {
            tracing::warn!(pid, "--clean: stopping the earlier dispynode");
            // SAFETY: plain kill(2) on a pid checked to be a dispynode.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Ok(entries) = std::fs::read_dir(prefix) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Interactive commands on a terminal, as dispy's node has: status, quit.
/// A line typed on the node's console, as dispynode.py reads them.
#[derive(Debug, PartialEq)]
enum ConsoleCommand {
    Quit,
    /// Offer these cpus (`stop`: 0, `start`: all of `--cpus`, `cpus N`, negative: all but N).
    Cpus(i64),
    /// `cpus` alone: the next line gives the number.
    AskCpus,
    /// Close the computations of the current dispy client that have no jobs left.
    Release,
    Status,
}

fn console_command(line: &str, all: u32) -> Result<ConsoleCommand, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["quit"] | ["exit"] => ConsoleCommand::Quit,
        ["stop"] => ConsoleCommand::Cpus(0),
        ["start"] => ConsoleCommand::Cpus(all as i64),
        ["cpus"] => ConsoleCommand::AskCpus,
        ["cpus", n] => ConsoleCommand::Cpus(n.parse().map_err(|_| {
            format!(
                "cpus {n:?}: give a number from -{} to {all}",
                all.saturating_sub(1)
            )
        })?),
        ["release"] => ConsoleCommand::Release,
        _ => ConsoleCommand::Status,
    })
}

/// `cpus N` as dispy counts it: negative leaves that many unused.
fn offered_cpus(n: i64, all: u32) -> Result<u32, String> {
    let cpus = if n < 0 { all as i64 + n } else { n };
    u32::try_from(cpus)
        .ok()
        .filter(|c| *c <= all)
        .ok_or_else(|| {
            format!(
                "cpus {n}: give a number from -{} to {all}",
                all.saturating_sub(1)
            )
        })
}

async fn console(node: Arc<Node>, dispy: Arc<dispy::Dispy>) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let all = node.cfg.cpus;
    println!("dispynode: commands: status, stop, start, cpus N, release, quit");
    let mut asking = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let command = if std::mem::take(&mut asking) {
            line.trim()
                .parse()
                .map(ConsoleCommand::Cpus)
                .map_err(|_| format!("{:?} is not a number of cpus", line.trim()))
        } else {
            console_command(&line, all)
        };
        let done = match command {
            Ok(ConsoleCommand::Quit) => {
                node.shutdown.send_replace(true);
                return;
            }
            Ok(ConsoleCommand::AskCpus) => {
                asking = true;
                println!(
                    "Enter number of CPUs to use in range -{} to {all}:",
                    all.saturating_sub(1)
                );
                Ok(())
            }
            Ok(ConsoleCommand::Cpus(n)) => offered_cpus(n, all).and_then(|c| node.set_cpus(c)),
            Ok(ConsoleCommand::Release) => {
                let closed = dispy.release().await;
                println!("  released: {closed} idle computation(s) closed");
                Ok(())
            }
            Ok(ConsoleCommand::Status) => {
                let info = node.info(None);
                println!(
                    "  {} ({}:{}): serving {} of {} cpus ({}), {} busy, {} queued, computations: {:?}",
                    info.name,
                    info.addr,
                    info.port,
                    info.cpus,
                    all,
                    node.window().describe(),
                    info.busy,
                    info.queued,
                    info.computations
                );
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            println!("  {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_commands_read_as_dispynode_py_reads_them() {
        assert_eq!(console_command("quit", 4), Ok(ConsoleCommand::Quit));
        assert_eq!(console_command(" stop ", 4), Ok(ConsoleCommand::Cpus(0)));
        assert_eq!(console_command("start", 4), Ok(ConsoleCommand::Cpus(4)));
        assert_eq!(console_command("cpus 2", 4), Ok(ConsoleCommand::Cpus(2)));
        assert_eq!(console_command("cpus", 4), Ok(ConsoleCommand::AskCpus));
        assert_eq!(console_command("release", 4), Ok(ConsoleCommand::Release));
        assert_eq!(console_command("", 4), Ok(ConsoleCommand::Status));
        assert!(console_command("cpus many", 4).is_err());
        assert_eq!(offered_cpus(-1, 4), Ok(3));
        assert_eq!(offered_cpus(4, 4), Ok(4));
        assert!(offered_cpus(5, 4).is_err());
        assert!(offered_cpus(-5, 4).is_err());
    }
}
