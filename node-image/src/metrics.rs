//! Prometheus metrics of the node, served with /healthz on `--metrics-addr`.

use std::sync::atomic::AtomicU64;

use dispy_core::job::JobStatus;
use dispy_core::protocol::AvailInfo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub jobs: Family<StatusLabel, Counter>,
    pub busy: Gauge,
    pub queued: Gauge,
    pub computations: Gauge,
    pub bytes_received: Counter<u64, AtomicU64>,
    pub bytes_sent: Counter<u64, AtomicU64>,
    pub auth_failures: Counter,
    pub bad_requests: Counter,
    cpu_idle: Gauge<f64, AtomicU64>,
    memory_available: Gauge,
    disk_free: Gauge,
    swap_free: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new(cpus: u32) -> Metrics {
        let mut registry = Registry::with_prefix("dispynode");
        let jobs = Family::<StatusLabel, Counter>::default();
        registry.register("jobs", "Jobs that ended, by dispy status", jobs.clone());
        let cpus_gauge = Gauge::<i64>::default();
        cpus_gauge.set(cpus as i64);
        registry.register("cpus", "Cpus offered for jobs", cpus_gauge);
        let busy = Gauge::default();
        registry.register("busy_cpus", "Cpus running a job now", busy.clone());
        let queued = Gauge::default();
        registry.register("queued_jobs", "Jobs waiting for a free cpu", queued.clone());
        let computations = Gauge::default();
        registry.register(
            "computations",
            "Computations open on the node",
            computations.clone(),
        );
        let bytes_received = Counter::<u64, AtomicU64>::default();
        registry.register(
            "received_bytes",
            "Bytes received from clients",
            bytes_received.clone(),
        );
        let bytes_sent = Counter::<u64, AtomicU64>::default();
        registry.register("sent_bytes", "Bytes sent to clients", bytes_sent.clone());
        let auth_failures = Counter::default();
        registry.register(
            "auth_failures",
            "Connections rejected for a wrong secret",
            auth_failures.clone(),
        );
        let bad_requests = Counter::default();
        registry.register(
            "bad_requests",
            "Malformed frames or messages received",
            bad_requests.clone(),
        );
        let cpu_idle = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cpu_idle_percent",
            "Idle cpu time over the last second, in percent of all cpus",
            cpu_idle.clone(),
        );
        let memory_available = Gauge::default();
        registry.register(
            "memory_available_bytes",
            "Memory available to new processes without swapping (MemAvailable)",
            memory_available.clone(),
        );
        let disk_free = Gauge::default();
        registry.register(
            "disk_free_bytes",
            "Free space under --dest-path-prefix for unprivileged users",
            disk_free.clone(),
        );
        let swap_free = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "swap_free_percent",
            "Free swap in percent (100 without swap)",
            swap_free.clone(),
        );
        Metrics {
            registry,
            jobs,
            busy,
            queued,
            computations,
            bytes_received,
            bytes_sent,
            auth_failures,
            bad_requests,
            cpu_idle,
            memory_available,
            disk_free,
            swap_free,
        }
    }

    /// What the machine has free, as the node last sampled it.
    pub fn set_avail(&self, avail: &AvailInfo) {
        let bytes = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.cpu_idle.set(avail.cpu);
        self.memory_available.set(bytes(avail.memory));
        self.disk_free.set(bytes(avail.disk));
        self.swap_free.set(avail.swap);
    }

    pub fn job_done(&self, status: JobStatus) {
        self.jobs
            .get_or_create(&StatusLabel {
                status: status.as_str().to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// Serves `/metrics` and `/healthz` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    axum::serve(listener, app).await
}
