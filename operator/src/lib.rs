//! The dispy operator: what JobClusters own in Kubernetes (`build`), the JobCluster and
//! DispyJob controllers, the engine that runs jobs on the nodes through core's scheduler, and
//! the CRDs.

pub mod build;
pub mod cluster;
pub mod engine;
pub mod job_arrays;
pub mod jobs;
pub mod metrics;
pub mod scheduler;
pub mod status;
pub mod ttl;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use dispy_core::manifest::{DispyJobArrayResource, DispyJobResource, JobClusterResource};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, CustomResourceExt, ResourceExt};

/// When a failed reconcile runs again: an object that is invalid as it stands waits longer
/// (its change, or what it names appearing, triggers it sooner) than one the API refused.
pub fn requeue_after_error(invalid: bool) -> kube::runtime::controller::Action {
    let secs = if invalid { 30 } else { 5 };
    kube::runtime::controller::Action::requeue(Duration::from_secs(secs))
}

/// Field manager and event reporter name.
pub const MANAGER: &str = "dispy-operator";

/// The CRDs as one multi-document YAML text (`dispy-operator crd`).
pub fn crds_yaml() -> String {
    let docs = [
        JobClusterResource::crd(),
        DispyJobResource::crd(),
        DispyJobArrayResource::crd(),
    ];
    docs.iter()
        .map(|crd| {
            let mut value = serde_json::to_value(crd).expect("a CRD serializes");
            kubernetes_formats(&mut value);
            serde_yaml::to_string(&value).expect("a CRD serializes")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// schemars names Rust's unsigned integers `uint16`, `uint32`...; the API server knows only
/// `int32` and `int64` and warns about the rest on every apply. The minimum of 0 stays.
fn kubernetes_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(format)) = map.get_mut("format") {
                match format.as_str() {
                    "uint8" | "uint16" => *format = "int32".into(),
                    "uint32" | "uint64" | "uint" => *format = "int64".into(),
                    _ => {}
                }
            }
            map.values_mut().for_each(kubernetes_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}

/// What both controllers share.
pub struct Ctx {
    pub client: Client,
    /// Node image used when a JobCluster names none.
    pub image: String,
    pub engine: engine::Handle,
    pub metrics: Arc<metrics::Metrics>,
    pub writer: writer::Writer,
    /// JobClusters as the JobCluster controller last saw them.
    pub clusters: Store<JobClusterResource>,
    /// Node ports assigned to JobClusters (by uid), shared by every watched namespace.
    pub ports: Arc<std::sync::Mutex<std::collections::HashMap<String, u16>>>,
    /// Nodes the discovery task last found (for `spec.nodes.discover`), shared likewise.
    pub discovered: Arc<std::sync::Mutex<Vec<String>>>,
    /// `ttlSecondsAfterFinished` of DispyJobs that set none; `None`: they are kept.
    pub job_ttl: Option<u64>,
}

pub struct Options {
    pub image: String,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// DispyJob reconciles run at once.
    pub concurrency: u16,
    /// Status writes in flight at once.
    pub write_concurrency: usize,
    /// Routine Events a second (and how many may be saved up); warnings are not limited.
    pub event_qps: f64,
    pub event_burst: u32,
    /// `ttlSecondsAfterFinished` of DispyJobs that set none.
    pub job_ttl: Option<u64>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers (one set per watched namespace) until `shutdown` resolves.
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let writer = writer::Writer::new(
        client.clone(),
        options.write_concurrency,
        options.event_qps,
        options.event_burst,
        metrics.clone(),
    );
    let (changed_tx, changed_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let changed_for_discovery = changed_tx.clone();
    let engine = engine::start(writer.clone(), metrics.clone(), changed_tx);
    let scopes: Vec<Option<String>> = if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    // The engine's notices (node up/lost, job counts) re-run the cluster's reconcile.
    let (notice_txs, notice_rxs): (Vec<_>, Vec<_>) = scopes
        .iter()
        .map(|_| tokio::sync::mpsc::unbounded_channel::<ObjectRef<JobClusterResource>>())
        .unzip();
    {
        let scopes = scopes.clone();
        let mut changed_rx = changed_rx;
        tokio::spawn(async move {
            while let Some((ns, name)) = changed_rx.recv().await {
                for (scope, tx) in scopes.iter().zip(&notice_txs) {
                    if scope.as_ref().is_none_or(|s| *s == ns) {
                        let _ = tx.send(ObjectRef::new(&name).within(&ns));
                    }
                }
            }
        });
    }
    let mut tasks = Vec::new();
    let ports = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let discovered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut stores = Vec::new();
    for (scope, notices) in scopes.into_iter().zip(notice_rxs) {
        let ns = scope.as_deref();
        let managed =
            watcher::Config::default().labels("app.kubernetes.io/managed-by=dispy-operator");
        // `listed` turns true once the JobClusters are in the cache: DispyJobs are read after
        // that (a job is keyed by its cluster's uid). Not the store's own wait_until_ready:
        // it wakes only the last of several waiters, and the controller waits on it too.
        let (listed_tx, listed) = tokio::sync::watch::channel(false);
        let (cluster_store, cluster_cache) = kube::runtime::reflector::store();
        let cluster_stream =
            watcher::watcher(api::<JobClusterResource>(&client, ns), Default::default())
                .default_backoff()
                .reflect(cluster_cache)
                .inspect_ok(move |event| {
                    if matches!(event, watcher::Event::InitDone) {
                        let _ = listed_tx.send(true);
                    }
                })
                .applied_objects();
        let clusters = Controller::for_stream(cluster_stream, cluster_store)
            .owns(api::<Pod>(&client, ns), managed)
            .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)))
            .reconcile_on(tokio_stream_from(notices))
            .graceful_shutdown_on(shutdown.clone());
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            image: options.image.clone(),
            engine: engine.clone(),
            metrics: metrics.clone(),
            writer: writer.clone(),
            clusters: clusters.store(),
            ports: ports.clone(),
            discovered: discovered.clone(),
            job_ttl: options.job_ttl,
        });
        stores.push(clusters.store());
        // The DispyJob cache: a deletion is told to the engine (`jobs::deleted`), a job that
        // has ended stays out of it (`jobs::cache_event`), what goes in is slimmed.
        let (job_store, job_cache) = kube::runtime::reflector::store();
        let (c, c2) = (ctx.clone(), ctx.clone());
        let job_api = api::<DispyJobResource>(&client, ns);
        let job_stream = futures::stream::once(async move {
            let _ = { listed }.wait_for(|listed| *listed).await;
        })
        .flat_map(move |()| watcher::watcher(job_api.clone(), Default::default()))
        .default_backoff()
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(job) = event {
                jobs::deleted(&c, job);
            }
        })
        .try_filter_map(move |event| std::future::ready(Ok(jobs::cache_event(&c2, event))))
        .map_ok(|event| event.modify(jobs::slim))
        .reflect(job_cache)
        .applied_objects();
        let jobs = Controller::for_stream(job_stream, job_store)
            .with_config(ControllerConfig::default().concurrency(options.concurrency))
            .graceful_shutdown_on(shutdown.clone());
        let arrays = Controller::new(
            api::<DispyJobArrayResource>(&client, ns),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(shutdown.clone());
        let c = ctx.clone();
        tasks.push(tokio::spawn(
            arrays
                .run(job_arrays::reconcile, job_arrays::error_policy, c)
                .for_each(|_| async {}),
        ));
        let c = ctx.clone();
        tasks.push(tokio::spawn(
            clusters
                .run(cluster::reconcile, cluster::error_policy, c)
                .for_each(|_| async {}),
        ));
        tasks.push(tokio::spawn(
            jobs.run(jobs::reconcile, jobs::error_policy, ctx)
                .for_each(|_| async {}),
        ));
    }
    tokio::spawn(discover_now_and_then(
        stores,
        discovered,
        changed_for_discovery,
    ));
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    futures::future::join_all(tasks).await;
    // Stopped: store the statuses already known. Nodes keep running jobs and their results
    // until the next instance attaches.
    let drained = engine
        .ask(
            |reply| engine::Request::Drain { reply },
            Duration::from_secs(10),
        )
        .await;
    if !drained {
        tracing::warn!("some job statuses were not stored; the next instance recovers them");
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `host` or `host:port`, with dispy's node port when none is given.
pub fn with_port(addr: &str) -> String {
    dispy_core::discovery::with_port(addr)
}

/// How often the discovery task pings, while some JobCluster has `spec.nodes.discover`.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);

/// While some JobCluster has `spec.nodes.discover`, pings for nodes every
/// [`DISCOVERY_INTERVAL`]; when what answers changes, those JobClusters are reconciled (their
/// reconcile reads the list, and never waits for a discovery itself).
async fn discover_now_and_then(
    stores: Vec<Store<JobClusterResource>>,
    found: Arc<std::sync::Mutex<Vec<String>>>,
    changed: tokio::sync::mpsc::UnboundedSender<(String, String)>,
) {
    loop {
        let wanting: Vec<(String, String)> = stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|jc| jc.spec.nodes.discover)
            .map(|jc| {
                (
                    jc.namespace().unwrap_or_else(|| "default".into()),
                    jc.name_any(),
                )
            })
            .collect();
        if !wanting.is_empty() {
            let mut nodes = discovered_nodes().await;
            nodes.sort();
            let new = {
                let mut known = found.lock().unwrap();
                let new = *known != nodes;
                *known = nodes;
                new
            };
            if new {
                for cluster in wanting {
                    let _ = changed.send(cluster);
                }
            }
        }
        tokio::time::sleep(DISCOVERY_INTERVAL).await;
    }
}

/// Nodes that answer a discovery ping on the operator's networks (`spec.nodes.discover`).
pub async fn discovered_nodes() -> Vec<String> {
    dispy_core::discovery::discover_nodes(Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!("{e}");
            Vec::new()
        })
}
