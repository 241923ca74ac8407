//! Prometheus metrics of the scheduler, served with `/healthz` at `--metrics-addr`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::sched::{status, Scheduler};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    /// "new", or "kept" (a connection kept open after the previous job or reply).
    pub connection: &'static str,
}

impl ConnectionLabel {
    fn of(kept: bool) -> ConnectionLabel {
        let connection = if kept { "kept" } else { "new" };
        ConnectionLabel { connection }
    }
}

pub struct Metrics {
    registry: Registry,
    pub jobs_sent: Family<ConnectionLabel, Counter>,
    pub replies_received: Family<ConnectionLabel, Counter>,
    pub jobs_submitted: Counter<u64, AtomicU64>,
    pub results: Family<StatusLabel, Counter>,
    pub results_delivered: Counter<u64, AtomicU64>,
    pub computations: Gauge,
    pub nodes: Gauge,
    pub queued: Gauge,
    pub running: Gauge,
    pub auth_failures: Counter<u64, AtomicU64>,
    pub bad_requests: Counter<u64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dispyscheduler");
        let m = Metrics {
            registry: Registry::default(),
            jobs_sent: Family::default(),
            replies_received: Family::default(),
            jobs_submitted: Counter::default(),
            results: Family::default(),
            results_delivered: Counter::default(),
            computations: Gauge::default(),
            nodes: Gauge::default(),
            queued: Gauge::default(),
            running: Gauge::default(),
            auth_failures: Counter::default(),
            bad_requests: Counter::default(),
        };
        registry.register(
            "jobs_submitted",
            "Jobs submitted by clients",
            m.jobs_submitted.clone(),
        );
        registry.register(
            "jobs_sent",
            "Jobs nodes took, by the connection they came on (new, or kept from an earlier job)",
            m.jobs_sent.clone(),
        );
        registry.register(
            "job_replies_received",
            "Job replies from nodes taken, by the connection they came on (new, or kept from an earlier reply)",
            m.replies_received.clone(),
        );
        registry.register(
            "job_results",
            "Job results from nodes (and made here), by dispy status",
            m.results.clone(),
        );
        registry.register(
            "results_delivered",
            "Job results acknowledged by their clients",
            m.results_delivered.clone(),
        );
        registry.register(
            "computations",
            "Computations of clients",
            m.computations.clone(),
        );
        registry.register("nodes", "Nodes in use", m.nodes.clone());
        registry.register("jobs_queued", "Jobs waiting for a cpu", m.queued.clone());
        registry.register(
            "jobs_running",
            "Jobs sent to nodes and not finished",
            m.running.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests without the cluster secret, PONGs without the node secret",
            m.auth_failures.clone(),
        );
        registry.register(
            "bad_requests",
            "Unreadable or refused requests",
            m.bad_requests.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn result(&self, dispy_status: i64) {
        let name = match dispy_status {
            11 => "Finished",
            status::TERMINATED => "Terminated",
            status::CANCELLED => "Cancelled",
            status::ABANDONED => "Abandoned",
            status::PROVISIONAL => "ProvisionalResult",
            _ => "other",
        };
        self.results
            .get_or_create(&StatusLabel {
                status: name.into(),
            })
            .inc();
    }

    pub fn job_sent(&self, kept: bool) {
        self.jobs_sent
            .get_or_create(&ConnectionLabel::of(kept))
            .inc();
    }

    pub fn reply_received(&self, kept: bool) {
        self.replies_received
            .get_or_create(&ConnectionLabel::of(kept))
            .inc();
    }

    pub fn observe(&self, s: &Scheduler) {
        self.computations.set(s.clusters.len() as i64);
        self.nodes.set(s.nodes.len() as i64);
        // Per node, not per job: this runs after every event.
        let running: usize = s.nodes.values().map(|n| n.busy as usize).sum();
        self.running.set(running as i64);
        self.queued.set(s.jobs.len().saturating_sub(running) as i64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

pub async fn serve(
    addr: std::net::SocketAddr,
    rt: Arc<crate::server::Runtime>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let rt = rt.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        rt.metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    axum::serve(listener, app).await
}
