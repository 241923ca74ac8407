//! `dispynode`: the dispy node agent.

mod avail;
mod children;
mod config;
mod dispy;
mod hardening;
mod host_output;
mod limits;
mod metrics;
mod node;
mod process;
mod procfs;
mod pyhost;
mod server;
mod session;

use std::net::SocketAddr;
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
    let args = Args::parse();
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
    tokio::spawn(children::reap_leftovers());
    if let Some(addr) = cfg.metrics_addr {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, node).await {
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
    for (host, s) in &sockets {
        accept_tasks.push(tokio::spawn(server::udp_loop(
            node.clone(),
            dispy.clone(),
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
        tokio::spawn(console(node.clone()));
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
async fn console(node: Arc<Node>) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    println!("dispynode: enter \"quit\" to stop, anything else for the status");
    while let Ok(Some(line)) = lines.next_line().await {
        match line.trim() {
            "quit" | "exit" => {
                node.shutdown.send_replace(true);
                return;
            }
            _ => {
                let info = node.info(None);
                println!(
                    "{} ({}:{}): {} cpus, {} busy, {} queued, computations: {:?}",
                    info.name,
                    info.addr,
                    info.port,
                    info.cpus,
                    info.busy,
                    info.queued,
                    info.computations
                );
            }
        }
    }
}
