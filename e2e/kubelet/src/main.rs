//! `process-kubelet`: a kubelet for end-to-end tests that runs pods as local
//! processes. It registers Node objects, keeps them Ready with Lease
//! heartbeats, and runs the pods the scheduler binds to them. There are no
//! containers: no image pulls, no isolation, no cgroups. See e2e/README.md.

mod images;
mod logs;
mod node;
mod pod;
mod probe;
mod spec;
mod status;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::{watch, Mutex};

/// Runs Kubernetes pods as local processes on 127.0.0.0/8, one loopback
/// address per node.
#[derive(Parser, Debug, Clone)]
#[command(name = "process-kubelet", version)]
pub struct Args {
    /// A node to register, as NAME=IP with IP in 127.0.0.0/8 (repeatable).
    /// Its pods get addresses from IP's /16 "pod CIDR": node 127.0.0.11 gives
    /// pods 127.11.0.2, 127.11.0.3, ...; hostNetwork pods get the node's IP.
    #[arg(
        long = "node",
        value_name = "NAME=IP",
        default_value = "e2e-node-1=127.0.0.11"
    )]
    pub nodes: Vec<String>,
    /// CPU capacity of each node (Kubernetes quantity).
    #[arg(long, default_value = "4")]
    pub cpu: String,
    /// Memory capacity of each node (Kubernetes quantity).
    #[arg(long, default_value = "8Gi")]
    pub memory: String,
    /// Maximum number of pods per node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// YAML file mapping image names to local executables.
    #[arg(long, value_name = "FILE")]
    pub image_map: PathBuf,
    /// Directory for per-pod directories (volumes, logs, mount points).
    #[arg(long, value_name = "DIR", default_value = "/tmp/process-kubelet")]
    pub root_dir: PathBuf,
    /// Seconds between Lease renewals (the node's heartbeat).
    #[arg(long, default_value_t = 10)]
    pub lease_interval: u64,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 40)]
    pub lease_duration: i32,
    /// First restart delay of a crashed container, in seconds; doubles up to --backoff-max.
    #[arg(long, default_value_t = 1.0)]
    pub backoff_initial: f64,
    /// Longest restart delay, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub backoff_max: f64,
    /// Serving certificate (PEM) for the kubelet API on each node's address,
    /// which serves container logs to `kubectl logs`. Without it there is no
    /// kubelet API.
    #[arg(long, value_name = "FILE", requires = "tls_private_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Key of --tls-cert-file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Port of the kubelet API.
    #[arg(long, default_value_t = 10250)]
    pub port: u16,
}

/// One registered node.
#[derive(Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Pod IPs in use on this node.
    pub used_ips: Mutex<std::collections::HashSet<Ipv4Addr>>,
}

impl NodeInfo {
    /// The /16 the pods of this node take addresses from: 127.<last octet>.0.0/16.
    pub fn pod_cidr(&self) -> String {
        format!("127.{}.0.0/16", self.ip.octets()[3])
    }

    pub async fn allocate_ip(&self, wanted: Option<Ipv4Addr>) -> anyhow::Result<Ipv4Addr> {
        let mut used = self.used_ips.lock().await;
        let octet = self.ip.octets()[3];
        if let Some(ip) = wanted {
            if ip.octets()[0] == 127 && ip.octets()[1] == octet && !used.contains(&ip) {
                used.insert(ip);
                return Ok(ip);
            }
        }
        for n in 2u32..65535 {
            let ip = Ipv4Addr::new(127, octet, (n >> 8) as u8, (n & 0xff) as u8);
            if !used.contains(&ip) {
                used.insert(ip);
                return Ok(ip);
            }
        }
        bail!("node {}: pod CIDR {} is full", self.name, self.pod_cidr())
    }

    pub async fn release_ip(&self, ip: Ipv4Addr) {
        self.used_ips.lock().await.remove(&ip);
    }
}

/// What every pod worker shares.
pub struct Context {
    pub client: Client,
    pub args: Args,
    pub images: images::ImageMap,
    /// Host and port of the API server, given to pods as
    /// KUBERNETES_SERVICE_HOST/PORT and in their kubeconfig.
    pub api_host: String,
    pub api_port: u16,
    /// PEM of the cluster CA, for pods' kubeconfigs.
    pub ca_pem: Option<String>,
}

fn parse_node(s: &str) -> anyhow::Result<(String, Ipv4Addr)> {
    let (name, ip) = s
        .split_once('=')
        .with_context(|| format!("--node {s:?}: expected NAME=IP, e.g. e2e-node-1=127.0.0.11"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("--node {s:?}: {ip:?} is not an IPv4 address"))?;
    if ip.octets()[0] != 127 || ip.octets()[3] == 0 || ip.octets()[3] == 255 {
        bail!("--node {s:?}: the node address must be in 127.0.0.0/8 and not end in .0 or .255");
    }
    Ok((name.to_string(), ip))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let images = images::ImageMap::load(&args.image_map)?;
    let config = kube::Config::infer()
        .await
        .context("no kubeconfig (set KUBECONFIG)")?;
    let api_host = config.cluster_url.host().unwrap_or("127.0.0.1").to_string();
    let api_port = config.cluster_url.port_u16().unwrap_or(443);
    let ca_pem = config.root_cert.as_ref().and_then(|certs| {
        let mut pem = String::new();
        for der in certs {
            pem.push_str(&der_to_pem(der));
        }
        (!pem.is_empty()).then_some(pem)
    });
    let client = Client::try_from(config)?;
    std::fs::create_dir_all(&args.root_dir)
        .with_context(|| format!("creating {}", args.root_dir.display()))?;

    let mut nodes = Vec::new();
    for spec in &args.nodes {
        let (name, ip) = parse_node(spec)?;
        nodes.push(Arc::new(NodeInfo {
            name,
            ip,
            used_ips: Mutex::new(Default::default()),
        }));
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        args: args.clone(),
        images,
        api_host,
        api_port,
        ca_pem,
    });

    let tls = match (&args.tls_cert_file, &args.tls_private_key_file) {
        (Some(c), Some(k)) => Some(logs::tls_config(c, k)?),
        _ => None,
    };
    for n in &nodes {
        if let Some(tls) = &tls {
            tokio::spawn(logs::serve(
                n.clone(),
                args.port,
                args.root_dir.clone(),
                tls.clone(),
            ));
        }
        node::register(&ctx, n).await?;
        tracing::info!(node = %n.name, ip = %n.ip, pod_cidr = %n.pod_cidr(), "registered node");
        tokio::spawn(node::heartbeat(ctx.clone(), n.clone()));
    }

    let workers: Arc<Mutex<HashMap<String, pod::Handle>>> = Default::default();
    for n in &nodes {
        tokio::spawn(watch_pods(ctx.clone(), n.clone(), workers.clone()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: stopping all pod processes");
    let handles: Vec<pod::Handle> = workers.lock().await.drain().map(|(_, h)| h).collect();
    for h in &handles {
        let _ = h.shutdown.send(true);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        for h in handles {
            let _ = h.task.await;
        }
    })
    .await;
    Ok(())
}

fn der_to_pem(der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Watches the pods bound to one node and keeps one worker per pod UID.
async fn watch_pods(
    ctx: Arc<Context>,
    node: Arc<NodeInfo>,
    workers: Arc<Mutex<HashMap<String, pod::Handle>>>,
) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut stream = watcher(api, cfg).boxed();
    let mut seen_in_relist: Option<std::collections::HashSet<String>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(node = %node.name, "pod watch: {e}");
                continue;
            }
        };
        match event {
            watcher::Event::Init => seen_in_relist = Some(Default::default()),
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(seen) = seen_in_relist.as_mut() {
                    seen.insert(uid.clone());
                }
                let mut w = workers.lock().await;
                w.retain(|_, h| !h.task.is_finished());
                match w.get(&uid) {
                    Some(h) => {
                        let _ = h.pod.send(Some(p));
                    }
                    None => {
                        let h = pod::spawn(ctx.clone(), node.clone(), p);
                        w.insert(uid, h);
                    }
                }
            }
            watcher::Event::Delete(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(h) = workers.lock().await.get(&uid) {
                    let _ = h.pod.send(None);
                }
            }
            watcher::Event::InitDone => {
                // pods that vanished while the watch was down
                if let Some(seen) = seen_in_relist.take() {
                    for (uid, h) in workers.lock().await.iter() {
                        if h.node == node.name && !seen.contains(uid) {
                            let _ = h.pod.send(None);
                        }
                    }
                }
            }
        }
    }
}

pub type PodSender = watch::Sender<Option<Pod>>;
