//! The operator's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz` endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dispy_core::job::JobStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub controller: String,
    /// What failed: `api`, `invalid`, `reference`, `build`, a timeout, `finalizer`.
    pub error: String,
}

pub struct Metrics {
    registry: Registry,
    pub jobs: Family<StatusLabel, Gauge>,
    pub scheduling_latency: Histogram,
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    pub reconciles: Family<ControllerLabel, Counter>,
    pub nodes_up: Gauge,
    pub status_writes: Counter,
    pub events_dropped: Counter,
    pub events_skipped: Counter,
    pub leader: Gauge,
    pub api_requests: Counter,
    /// Set once the controllers run (as leader) or wait for the lease (as a standby).
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dispy_operator");
        let jobs = Family::<StatusLabel, Gauge>::default();
        registry.register("jobs", "DispyJobs known, by dispy status", jobs.clone());
        for s in [
            JobStatus::Created,
            JobStatus::Running,
            JobStatus::Finished,
            JobStatus::Terminated,
            JobStatus::Cancelled,
            JobStatus::Abandoned,
        ] {
            jobs.get_or_create(&label(s)).set(0);
        }
        let scheduling_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "scheduling_latency_seconds",
            "Time from a DispyJob entering the queue to its dispatch to a node",
            scheduling_latency.clone(),
        );
        let reconcile_errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and what failed",
            reconcile_errors.clone(),
        );
        let reconciles = Family::<ControllerLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        let nodes_up = Gauge::default();
        registry.register("nodes", "Nodes connected", nodes_up.clone());
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "DispyJob status writes sent to the API server",
            status_writes.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Kubernetes Events dropped because their queue was full",
            events_dropped.clone(),
        );
        let events_skipped = Counter::default();
        registry.register(
            "events_skipped",
            "routine (Normal) DispyJob Events not sent because they were over --event-qps",
            events_skipped.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this instance leads", leader.clone());
        let api_requests = Counter::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API server (watches count once)",
            api_requests.clone(),
        );
        Metrics {
            api_requests,
            registry,
            jobs,
            scheduling_latency,
            reconcile_errors,
            reconciles,
            nodes_up,
            status_writes,
            events_dropped,
            events_skipped,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// A known job's status moved from `old` to `new` (`None`: not known).
    pub fn job_status(&self, old: Option<JobStatus>, new: Option<JobStatus>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.jobs.get_or_create(&label(old)).dec();
        }
        if let Some(new) = new {
            self.jobs.get_or_create(&label(new)).inc();
        }
    }

    /// One reconcile ended, with the kind of its error if it failed. Recorded once per
    /// reconcile, by the reconcile function (not by the error policy too).
    pub fn reconciled(&self, controller: &str, error: Option<&str>) {
        let label = ControllerLabel {
            controller: controller.into(),
        };
        self.reconciles.get_or_create(&label).inc();
        if let Some(error) = error {
            let label = ErrorLabel {
                controller: controller.into(),
                error: error.into(),
            };
            self.reconcile_errors.get_or_create(&label).inc();
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

fn label(status: JobStatus) -> StatusLabel {
    StatusLabel {
        status: status.as_str().to_string(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics`, `/healthz` (the process runs) and `/readyz` (it leads or stands by).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let m = metrics.clone();
                async move {
                    if m.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}
