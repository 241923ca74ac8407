//! `dispy-operator`: the Kubernetes operator for JobCluster and DispyJob.
//!
//! `dispy-operator crd` prints the CustomResourceDefinitions generated from the Rust types in
//! `dispy-core`; `crds/dispy.io.yaml` is its output, checked in (CI fails when they differ).

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dispy_operator::{crds_yaml, metrics::Metrics, Options};

#[derive(Parser)]
#[command(
    name = "dispy-operator",
    version,
    about = "Kubernetes operator for dispy JobClusters and DispyJobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CustomResourceDefinitions (JobCluster, DispyJob) as YAML.
    Crd,
    /// Run the controllers (uses the in-cluster config or $KUBECONFIG). Log level from
    /// RUST_LOG (default info).
    Run {
        /// Node image for JobClusters that name none.
        #[arg(long, env = "DISPY_NODE_IMAGE", default_value = concat!("dispy/node:", env!("CARGO_PKG_VERSION")))]
        node_image: String,
        /// Run the controllers only while holding a Lease (for more than one replica).
        #[arg(long, env = "DISPY_LEADER_ELECT")]
        leader_elect: bool,
        #[arg(long, default_value = "dispy-operator")]
        lease_name: String,
        /// Namespace of the Lease (default: the pod's own namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
        /// Namespaces to watch, comma separated; empty: all.
        #[arg(
            long,
            env = "DISPY_WATCH_NAMESPACES",
            value_delimiter = ',',
            default_value = ""
        )]
        namespaces: Vec<String>,
        #[arg(long, value_enum, default_value = "json")]
        log_format: LogFormat,
        /// Most requests per second to the API server (client-side limit).
        #[arg(long, default_value_t = 200)]
        kube_qps: u64,
        /// DispyJob reconciles run at once.
        #[arg(long, default_value_t = 16)]
        concurrency: u16,
        /// DispyJob status writes in flight at once.
        #[arg(long, default_value_t = 16)]
        write_concurrency: usize,
        /// Routine Events (a job Started or Finished) a second at most; each is a write to the
        /// API server. Warnings (Terminated, Abandoned, Requeued, NodeLost...) always go.
        #[arg(long, default_value_t = 5.0)]
        event_qps: f64,
        /// Routine Events that may go at once after a quiet time.
        #[arg(long, default_value_t = 25)]
        event_burst: u32,
        /// Delete a DispyJob or a DispyJobArray this many seconds after it ended, unless its
        /// spec.ttlSecondsAfterFinished says otherwise. Default: keep it.
        #[arg(
            long,
            env = "DISPY_JOB_TTL_SECONDS_AFTER_FINISHED",
            value_name = "SECONDS"
        )]
        job_ttl_seconds_after_finished: Option<u64>,
    },
}

fn main() {
    match Cli::parse().command {
        Cmd::Crd => print!("{}", crds_yaml()),
        Cmd::Run {
            node_image,
            leader_elect,
            lease_name,
            lease_namespace,
            metrics_addr,
            namespaces,
            log_format,
            kube_qps,
            concurrency,
            write_concurrency,
            event_qps,
            event_burst,
            job_ttl_seconds_after_finished,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into());
            match log_format {
                LogFormat::Json => tracing_subscriber::fmt()
                    .json()
                    .with_env_filter(filter)
                    .init(),
                LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
            }
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let options = Options {
                image: node_image,
                namespaces: namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                concurrency,
                write_concurrency,
                event_qps,
                event_burst,
                job_ttl: job_ttl_seconds_after_finished,
            };
            let code = runtime.block_on(async move {
                let metrics = Arc::new(Metrics::new());
                let client = match client(kube_qps, metrics.clone()).await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("dispy-operator: cannot reach the Kubernetes API: {e}");
                        return 2;
                    }
                };
                let listener = match tokio::net::TcpListener::bind(metrics_addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("dispy-operator: cannot listen on {metrics_addr}: {e}");
                        return 2;
                    }
                };
                tokio::spawn(dispy_operator::metrics::serve(listener, metrics.clone()));
                let shutdown = shutdown_signal();
                if leader_elect {
                    lead(
                        client,
                        options,
                        metrics,
                        &lease_name,
                        &lease_namespace,
                        shutdown,
                    )
                    .await
                } else {
                    tracing::info!(node_image = %options.image, "dispy-operator running");
                    dispy_operator::run(client, options, metrics, shutdown).await;
                    0
                }
            });
            tracing::info!("dispy-operator stopped");
            std::process::exit(code);
        }
    }
}

/// A client whose requests pass a client-side rate limit, and are counted.
async fn client(qps: u64, metrics: Arc<Metrics>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    let count = tower::util::MapRequestLayer::new(move |req| {
        metrics.api_requests.inc();
        req
    });
    Ok(builder
        .with_layer(&tower::limit::RateLimitLayer::new(
            qps.max(1),
            Duration::from_secs(1),
        ))
        .with_layer(&count)
        .build())
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> futures::future::Shared<futures::future::BoxFuture<'static, ()>> {
    use futures::FutureExt;
    async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down: finishing reconciles and status writes");
    }
    .boxed()
    .shared()
}

/// Waits for the Lease, runs the controllers while holding it; exits (to be restarted as a
/// standby) when it is lost.
async fn lead(
    client: kube::Client,
    options: Options,
    metrics: Arc<Metrics>,
    lease_name: &str,
    lease_namespace: &str,
    shutdown: futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) -> i32 {
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("{}-{}", hostname(), std::process::id()));
    let manager = match kube_lease_manager::LeaseManagerBuilder::new(client.clone(), lease_name)
        .with_namespace(lease_namespace)
        .with_identity(identity.clone())
        .with_duration(15)
        .with_grace(5)
        .with_field_manager(dispy_operator::MANAGER)
        .build()
        .await
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "dispy-operator: leader election on Lease {lease_namespace}/{lease_name}: {e}"
            );
            return 2;
        }
    };
    let (mut leading, task) = manager.watch().await;
    // A standby is ready: it serves as soon as it gets the lease.
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%identity, lease = %format!("{lease_namespace}/{lease_name}"), "waiting for the lease");
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { return 1 },
            _ = shutdown.clone() => { drop(leading); let _ = task.await; return 0 },
        }
    }
    tracing::info!(%identity, "leading: controllers start");
    metrics.leader.set(1);
    let lost = {
        let mut leading = leading.clone();
        async move {
            while leading.changed().await.is_ok() {
                if !*leading.borrow() {
                    return;
                }
            }
        }
    };
    let code = tokio::select! {
        _ = dispy_operator::run(client, options, metrics.clone(), shutdown) => 0,
        _ = lost => {
            tracing::error!("lost the lease: stopping so that only one instance acts");
            1
        }
    };
    metrics.leader.set(0);
    drop(leading);
    // Dropping the receiver makes the manager release the lease.
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    code
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "dispy-operator".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::manifest::{DispyJobResource, JobClusterResource};
    use kube::CustomResourceExt;

    #[test]
    fn crds_carry_names_columns_subresources_and_rules() {
        let jc = JobClusterResource::crd();
        assert_eq!(jc.metadata.name.as_deref(), Some("jobclusters.dispy.io"));
        let names = &jc.spec.names;
        assert_eq!(names.short_names.as_deref(), Some(&["jc".to_string()][..]));
        assert_eq!(
            names.categories.as_deref(),
            Some(&["dispy".to_string()][..])
        );
        let v = &jc.spec.versions[0];
        let columns: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Nodes",
                "Cpus",
                "Running",
                "Finished",
                "Failed",
                "Phase",
                "Age",
                "Scheduler"
            ]
        );
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        assert_eq!(
            sub.scale.as_ref().unwrap().spec_replicas_path,
            ".spec.nodes.replicas"
        );
        let yaml = crds_yaml();
        assert!(yaml.contains("has(self.python) != has(self.program)"));
        assert!(yaml.contains("cluster is immutable"));
        assert!(
            yaml.contains("Requeue the jobs of a lost node"),
            "doc comments become descriptions"
        );
        let dj = DispyJobResource::crd();
        let columns: Vec<_> = dj.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Cluster", "Status", "Node", "Result", "Age"]);
        // only formats the API server knows (it warns about others on every apply)
        assert!(!yaml.contains("format: uint"), "unsigned formats left");
        assert!(yaml.contains("format: int32") && yaml.contains("format: int64"));
    }

    #[test]
    fn checked_in_crds_match_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/dispy.io.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == crds_yaml(),
            "crds/dispy.io.yaml is out of date: run `bash crds/generate.sh`"
        );
    }
}
