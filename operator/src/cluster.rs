//! The JobCluster controller: each JobCluster gets its Secret, headless Service and
//! `spec.nodes.replicas` node pods; the engine gets the cluster's computation, secret and node
//! addresses (ready pods, `spec.nodes.external`, and with `discover` nodes found by UDP); the
//! status says how many nodes are ready, their cpus, the job counts and the conditions.
//! Level-triggered: every reconcile recomputes from what the API server holds, so a restarted
//! operator picks up where it was. Deleting a JobCluster first closes its computation on every
//! node (cleanup runs there), then its pods go with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dispy_core::manifest::{JobClusterResource, JobClusterStatus, NodeSummary, SchedulerStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;

use crate::build::{self, BuildError, CLUSTER_LABEL, SECRET_KEY};
use crate::engine::{ClusterInfo, ClusterStats, File, Request};
use crate::{scheduler, Ctx, MANAGER};

/// Held until the computation is closed on every node.
pub const FINALIZER: &str = "dispy.io/close-computation";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("JobCluster {cluster}: {action}: {source}")]
    Kube {
        cluster: String,
        action: &'static str,
        source: kube::Error,
    },
    #[error("JobCluster {cluster}: {message}")]
    Invalid { cluster: String, message: String },
    #[error("JobCluster {cluster}: {error}")]
    Ref { cluster: String, error: RefError },
    #[error("JobCluster {0}: closing the computation on its nodes did not finish in time")]
    CloseTimeout(String),
    #[error("JobCluster finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// The `error` label of the reconcile error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Build(_) => "build",
            Error::Kube { .. }
            | Error::Ref {
                error: RefError::Read { .. },
                ..
            } => "api",
            Error::Invalid { .. } => "invalid",
            Error::Ref { .. } => "reference",
            Error::CloseTimeout(_) => "close_timeout",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

pub fn error_policy(_jc: Arc<JobClusterResource>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!("{error}");
    match error.kind() {
        // Fixing the JobCluster (or creating what it names) triggers a new reconcile; retry
        // slowly meanwhile.
        "build" | "invalid" | "reference" => Action::requeue(Duration::from_secs(30)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

fn random_secret() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The computation's name on the nodes: a re-created JobCluster of the same name is another.
pub fn computation_id(jc: &JobClusterResource) -> String {
    let uid = jc.metadata.uid.as_deref().unwrap_or("");
    dispy_core::driver::computation_id(
        &jc.namespace().unwrap_or_else(|| "default".into()),
        &jc.name_any(),
        &uid[..uid.len().min(8)],
    )
}

pub async fn reconcile(jc: Arc<JobClusterResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = jc.namespace().unwrap_or_else(|| "default".into());
    let api = Api::<JobClusterResource>::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, jc, |event| async {
        match event {
            Finalizer::Apply(jc) => apply(jc, ctx.clone()).await,
            Finalizer::Cleanup(jc) => cleanup(jc, ctx.clone()).await,
        }
    })
    .await;
    let result = result.map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconciled("jobcluster", result.as_ref().err().map(Error::kind));
    result
}

async fn cleanup(jc: Arc<JobClusterResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let id = computation_id(&jc);
    let closed = ctx
        .engine
        .ask(
            |reply| Request::ClusterGone {
                id: id.clone(),
                reply,
            },
            Duration::from_secs(60),
        )
        .await;
    if !closed {
        return Err(Error::CloseTimeout(id));
    }
    tracing::info!(cluster = %id, "computation closed on its nodes");
    Ok(Action::await_change())
}

/// One reconcile, as a pipeline: follow the JobCluster's references, build what it owns
/// (pure), apply that, hand the cluster to the engine, write the status.
async fn apply(jc: Arc<JobClusterResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = jc.namespace().unwrap_or_else(|| "default".into());
    let full = format!("{ns}/{}", jc.name_any());
    ensure_secret(&ctx, &jc, &ns, &full).await?;
    let refs = dereference(&ctx, &jc, &ns)
        .await
        .map_err(|error| Error::Ref {
            cluster: full.clone(),
            error,
        })?;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", jc.name_any())))
        .await
        .map_err(kube_err(&full, "list the node pods"))?
        .items;
    // The JobCluster with its port recorded, for the pods and the Service.
    let port = node_port(&jc, &pods, &ctx);
    let jc = {
        let mut with_port = (*jc).clone();
        with_port
            .status
            .get_or_insert_with(Default::default)
            .node_port = Some(port);
        Arc::new(with_port)
    };
    let plan = build::node_plan(&jc, &pods, &ctx.image)?;
    apply_plan(&ctx, &ns, &full, &plan).await?;
    let nodes = node_addresses(&jc, &plan.live, port, &ctx.discovered.lock().unwrap());
    let info = cluster_info(&jc, &ns, refs, nodes).map_err(|message| Error::Invalid {
        cluster: full.clone(),
        message,
    })?;
    ctx.engine.send(Request::Cluster(Box::new(info.clone())));
    let scheduler = apply_scheduler(&ctx, &jc, &ns, &full, &info).await?;
    let waiting = scheduler.as_ref().is_some_and(|s| !s.ready);
    write_status(&ctx, &jc, &ns, &full, &info, &plan, scheduler).await?;
    // Pods change through the watch; nodes and jobs through the engine's notices; discovered
    // nodes through the discovery task; external nodes need a look now and then. The
    // scheduler's Deployment is not watched (that would need list and watch on every
    // Deployment): a look every 2 s until its pod is ready.
    let every = if waiting { 2 } else { 30 };
    Ok(Action::requeue(Duration::from_secs(every)))
}

/// Applies the scheduler's node list, Service and Deployment when `spec.scheduler` asks for
/// one, or deletes them when it no longer does (the status says one was running). Returns the
/// scheduler's status.
async fn apply_scheduler(
    ctx: &Ctx,
    jc: &JobClusterResource,
    ns: &str,
    full: &str,
    info: &ClusterInfo,
) -> Result<Option<SchedulerStatus>, Error> {
    let name = scheduler::name(jc);
    let Some(spec) = scheduler::wanted(jc) else {
        if jc.status.as_ref().is_some_and(|s| s.scheduler.is_some()) {
            let dp = DeleteParams::background();
            let c = &ctx.client;
            let r = Api::<Deployment>::namespaced(c.clone(), ns)
                .delete(&name, &dp)
                .await;
            gone(r.map(|_| ())).map_err(kube_err(full, "delete the scheduler's Deployment"))?;
            let r = Api::<Service>::namespaced(c.clone(), ns)
                .delete(&name, &dp)
                .await;
            gone(r.map(|_| ())).map_err(kube_err(full, "delete the scheduler's Service"))?;
            let r = Api::<ConfigMap>::namespaced(c.clone(), ns)
                .delete(&name, &dp)
                .await;
            gone(r.map(|_| ())).map_err(kube_err(full, "delete the scheduler's node list"))?;
            tracing::info!(cluster = %full, "scheduler removed (spec.scheduler not enabled)");
        }
        return Ok(None);
    };
    let nodes: Vec<String> = info.nodes.keys().cloned().collect();
    let plan = scheduler::plan(jc, spec, &ctx.image, &nodes)?;
    let apply = PatchParams::apply(MANAGER).force();
    Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &apply, &Patch::Apply(&plan.nodes))
        .await
        .map_err(kube_err(full, "apply the scheduler's node list"))?;
    Api::<Service>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &apply, &Patch::Apply(&plan.service))
        .await
        .map_err(kube_err(full, "apply the scheduler's Service"))?;
    let deployment = Api::<Deployment>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &apply, &Patch::Apply(&plan.deployment))
        .await
        .map_err(kube_err(full, "apply the scheduler's Deployment"))?;
    Ok(Some(scheduler::status(
        jc,
        spec,
        scheduler::is_ready(&deployment),
        nodes.len(),
    )))
}

/// A delete of something already gone succeeded.
fn gone(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        r => r,
    }
}

fn kube_err(cluster: &str, action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    let cluster = cluster.to_string();
    move |source| Error::Kube {
        cluster,
        action,
        source,
    }
}

/// What a JobCluster names in other objects, read from the API server.
pub struct Refs {
    /// The nodes' shared secret (the generated Secret is created first when missing).
    pub secret: String,
    /// `spec.tls.secretRef`'s `tls.crt`.
    pub tls_cert: Option<Vec<u8>>,
    /// `python.configMapRef`'s source.
    pub source: Option<String>,
    /// Every key of every `depends` ConfigMap, as files.
    pub files: Vec<File>,
}

/// A reference a JobCluster makes that cannot be followed: what is missing, and which field
/// names it.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error("{kind} {namespace}/{name} ({field}) does not exist")]
    Missing {
        kind: &'static str,
        namespace: String,
        name: String,
        field: &'static str,
    },
    #[error("{kind} {namespace}/{name} ({field}) has no key {key:?}")]
    NoKey {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        field: &'static str,
    },
    #[error("{kind} {namespace}/{name} ({field}): key {key:?} is not UTF-8")]
    NotUtf8 {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        field: &'static str,
    },
    #[error("cannot read {kind} {namespace}/{name}: {source}")]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

async fn get<K>(
    api: &Api<K>,
    kind: &'static str,
    ns: &str,
    name: &str,
    field: &'static str,
) -> Result<K, RefError>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let (namespace, name_s) = (ns.to_string(), name.to_string());
    api.get_opt(name)
        .await
        .map_err(|source| RefError::Read {
            kind,
            namespace: namespace.clone(),
            name: name_s.clone(),
            source,
        })?
        .ok_or(RefError::Missing {
            kind,
            namespace,
            name: name_s,
            field,
        })
}

/// Creates the generated node Secret when the JobCluster names none and it is missing.
async fn ensure_secret(
    ctx: &Ctx,
    jc: &JobClusterResource,
    ns: &str,
    full: &str,
) -> Result<(), Error> {
    let Some(generated) = build::generated_secret(jc, &random_secret())? else {
        return Ok(());
    };
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let name = build::secret_name(jc);
    if secrets
        .get_opt(&name)
        .await
        .map_err(kube_err(full, "read the Secret"))?
        .is_none()
    {
        match secrets.create(&PostParams::default(), &generated).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube_err(full, "create the Secret")(e)),
        }
    }
    Ok(())
}

/// Follows every reference of the JobCluster: its node Secret, the TLS Secret, the source
/// and depends ConfigMaps.
async fn dereference(ctx: &Ctx, jc: &JobClusterResource, ns: &str) -> Result<Refs, RefError> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    let secret_name = build::secret_name(jc);
    let node_secret = get(&secrets, "Secret", ns, &secret_name, "spec.secretRef").await?;
    let secret = secret_value(&node_secret, SECRET_KEY).map_err(|missing| {
        RefError::NoKey {
            kind: "Secret",
            namespace: ns.to_string(),
            name: secret_name.clone(),
            key: SECRET_KEY.into(),
            field: "spec.secretRef",
        }
        .or_not_utf8(missing)
    })?;
    let tls_cert = match &jc.spec.tls {
        None => None,
        Some(tls) => {
            let name = &tls.secret_ref.name;
            let s = get(&secrets, "Secret", ns, name, "spec.tls.secretRef").await?;
            let cert = s.data.and_then(|d| d.get("tls.crt").map(|v| v.0.clone()));
            Some(cert.ok_or_else(|| RefError::NoKey {
                kind: "Secret",
                namespace: ns.to_string(),
                name: name.clone(),
                key: "tls.crt".into(),
                field: "spec.tls.secretRef",
            })?)
        }
    };
    let source_ref = jc
        .spec
        .computation
        .as_ref()
        .and_then(|c| c.python.as_ref())
        .and_then(|p| p.config_map_ref.as_ref());
    let source = match source_ref {
        None => None,
        Some(r) => {
            let field = "spec.computation.python.configMapRef";
            let cm = get(&config_maps, "ConfigMap", ns, &r.name, field).await?;
            Some(
                cm.data
                    .and_then(|d| d.get(&r.key).cloned())
                    .ok_or_else(|| RefError::NoKey {
                        kind: "ConfigMap",
                        namespace: ns.to_string(),
                        name: r.name.clone(),
                        key: r.key.clone(),
                        field,
                    })?,
            )
        }
    };
    let files = depends_files(&config_maps, ns, &jc.spec.depends).await?;
    Ok(Refs {
        secret,
        tls_cert,
        source,
        files,
    })
}

/// Whether a missing secret value is absent or not UTF-8.
enum SecretValue {
    Absent,
    NotUtf8,
}

impl RefError {
    fn or_not_utf8(self, missing: SecretValue) -> RefError {
        match (self, missing) {
            (
                RefError::NoKey {
                    kind,
                    namespace,
                    name,
                    key,
                    field,
                },
                SecretValue::NotUtf8,
            ) => RefError::NotUtf8 {
                kind,
                namespace,
                name,
                key,
                field,
            },
            (e, _) => e,
        }
    }
}

fn secret_value(secret: &Secret, key: &str) -> Result<String, SecretValue> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).map_err(|_| SecretValue::NotUtf8);
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key).cloned())
        .ok_or(SecretValue::Absent)
}

/// Every key of every depends ConfigMap, as files.
pub async fn depends_files(
    api: &Api<ConfigMap>,
    ns: &str,
    depends: &[dispy_core::manifest::DependsSource],
) -> Result<Vec<File>, RefError> {
    let mut files = Vec::new();
    for d in depends {
        let cm = get(api, "ConfigMap", ns, &d.config_map_ref.name, "spec.depends").await?;
        for (k, v) in cm.data.unwrap_or_default() {
            files.push((k, v.into_bytes()));
        }
        for (k, v) in cm.binary_data.unwrap_or_default() {
            files.push((k, v.0));
        }
    }
    Ok(files)
}

/// Creates the node pods the plan lacks, deletes those it no longer wants, applies the Service.
async fn apply_plan(ctx: &Ctx, ns: &str, full: &str, plan: &build::NodePlan) -> Result<(), Error> {
    let apply = PatchParams::apply(MANAGER).force();
    Api::<Service>::namespaced(ctx.client.clone(), ns)
        .patch(
            plan.service.metadata.name.as_deref().unwrap_or_default(),
            &apply,
            &Patch::Apply(&plan.service),
        )
        .await
        .map_err(kube_err(full, "apply the Service"))?;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    for pod in &plan.create {
        match pods.create(&PostParams::default(), pod).await {
            Ok(_) => tracing::info!(cluster = %full, pod = %pod.name_any(), "node pod created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube_err(full, "create a node pod")(e)),
        }
    }
    for name in &plan.delete {
        pods.delete(name, &DeleteParams::default())
            .await
            .map_err(kube_err(full, "delete a node pod"))?;
        tracing::info!(cluster = %full, pod = %name, "node pod removed (scaled down)");
    }
    Ok(())
}

/// The cluster's nodes for the engine: its ready pods, `spec.nodes.external`, and with
/// `discover` what the discovery task last found.
fn node_addresses(
    jc: &JobClusterResource,
    live: &[Pod],
    port: u16,
    discovered: &[String],
) -> BTreeMap<String, Option<String>> {
    let mut nodes: BTreeMap<String, Option<String>> = live
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_ref()?;
            Some((format!("{ip}:{port}"), Some(p.name_any())))
        })
        .collect();
    for addr in &jc.spec.nodes.external {
        nodes.insert(crate::with_port(addr), None);
    }
    if jc.spec.nodes.discover {
        for addr in discovered {
            nodes.entry(addr.clone()).or_insert(None);
        }
    }
    nodes
}

/// The cluster as the engine takes it; fails when the computation is not valid.
fn cluster_info(
    jc: &JobClusterResource,
    ns: &str,
    refs: Refs,
    nodes: BTreeMap<String, Option<String>>,
) -> Result<ClusterInfo, String> {
    let computation = match &jc.spec.computation {
        None => None,
        Some(spec) => {
            let source = refs.source;
            Some(spec.to_protocol(|_| source.ok_or_else(|| "no source".to_string()))?)
        }
    };
    Ok(ClusterInfo {
        id: computation_id(jc),
        namespace: ns.to_string(),
        name: jc.name_any(),
        uid: jc.metadata.uid.clone().unwrap_or_default(),
        computation,
        files: refs.files,
        policy: dispy_core::driver::policy(&jc.spec),
        suspended: jc.spec.suspend,
        secret: refs.secret,
        tls_cert: refs.tls_cert,
        pulse_interval: Duration::from_secs(jc.spec.pulse_interval.unwrap_or(10).max(1) as u64),
        nodes,
    })
}

async fn write_status(
    ctx: &Ctx,
    jc: &JobClusterResource,
    ns: &str,
    full: &str,
    info: &ClusterInfo,
    plan: &build::NodePlan,
    scheduler: Option<SchedulerStatus>,
) -> Result<(), Error> {
    let desired = jc.spec.nodes.replicas.unwrap_or(1) + jc.spec.nodes.external.len() as u32;
    let live: Vec<&Pod> = plan.live.iter().collect();
    let stats = if info.computation.is_none() {
        pool_stats(jc, info, &live)
    } else {
        ctx.engine.stats(full)
    };
    // A pool's node is ready with its pod; otherwise once the computation is set up on it.
    let ready = stats.nodes.iter().filter(|n| n.ready).count() as u32;
    let mut status = cluster_status(jc, ready, desired, &stats);
    status.scheduler = scheduler;
    let patch = serde_json::json!({
        "apiVersion": "dispy.io/v1alpha1",
        "kind": "JobCluster",
        "status": status,
    });
    Api::<JobClusterResource>::namespaced(ctx.client.clone(), ns)
        .patch_status(
            &jc.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_err(full, "update its status"))?;
    Ok(())
}

/// The cluster's node port: `spec.nodes.port`; else the port its pods already use, the one
/// recorded in its status or assigned earlier by this instance; else a new one no other
/// JobCluster uses.
fn node_port(jc: &JobClusterResource, pods: &[Pod], ctx: &Ctx) -> u16 {
    if let Some(p) = jc.spec.nodes.port {
        return p;
    }
    let uid = jc.metadata.uid.clone().unwrap_or_default();
    let mut book = ctx.ports.lock().unwrap();
    let from_pods = pods.iter().find_map(|p| {
        p.spec
            .as_ref()?
            .containers
            .first()?
            .ports
            .as_ref()?
            .first()
            .map(|p| p.container_port as u16)
    });
    let known = from_pods
        .or_else(|| book.get(&uid).copied())
        .or_else(|| jc.status.as_ref().and_then(|s| s.node_port));
    let port = known.unwrap_or_else(|| {
        let mut taken: std::collections::BTreeSet<u16> = book
            .iter()
            .filter(|(u, _)| **u != uid)
            .map(|(_, p)| *p)
            .collect();
        for c in ctx.clusters.state() {
            if c.metadata.uid.as_deref() != Some(uid.as_str()) {
                taken.extend(
                    c.spec
                        .nodes
                        .port
                        .or(c.status.as_ref().and_then(|s| s.node_port)),
                );
            }
        }
        build::assign_port(&taken)
    });
    book.insert(uid, port);
    port
}

/// A node pool's nodes are its pods (and external nodes), listed for Python dispy clients.
fn pool_stats(jc: &JobClusterResource, info: &ClusterInfo, live: &[&Pod]) -> ClusterStats {
    let cpus = jc.spec.nodes.cpus.unwrap_or(0);
    let port = build::node_port(jc);
    let mut nodes: Vec<NodeSummary> = live
        .iter()
        .map(|p| {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
            NodeSummary {
                name: p.name_any(),
                address: ip.map(|ip| format!("{ip}:{port}")).unwrap_or_default(),
                pod: Some(p.name_any()),
                cpus,
                busy: 0,
                ready: is_ready(p),
            }
        })
        .collect();
    for (addr, pod) in &info.nodes {
        if pod.is_none() {
            nodes.push(NodeSummary {
                name: addr.clone(),
                address: addr.clone(),
                pod: None,
                cpus: 0,
                busy: 0,
                ready: true,
            });
        }
    }
    ClusterStats {
        cpus: nodes.iter().filter(|n| n.ready).map(|n| n.cpus).sum(),
        nodes,
        ..Default::default()
    }
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status for `ready` of `desired` nodes, with the engine's figures.
pub fn cluster_status(
    jc: &JobClusterResource,
    ready: u32,
    desired: u32,
    stats: &ClusterStats,
) -> JobClusterStatus {
    let previous = jc.status.clone().unwrap_or_default();
    let (phase, reason, message) = if jc.spec.suspend {
        (
            "Suspended",
            "Suspended",
            "spec.suspend is true: no new jobs are dispatched".to_string(),
        )
    } else if ready >= desired {
        (
            "Ready",
            "NodesReady",
            format!("{ready} of {desired} node(s) ready"),
        )
    } else if ready > 0 {
        (
            "Degraded",
            "NodesNotReady",
            format!("only {ready} of {desired} node(s) ready"),
        )
    } else {
        (
            "Pending",
            "NodesNotReady",
            format!("0 of {desired} node(s) ready"),
        )
    };
    let now = dispy_core::manifest::rfc3339(dispy_core::job::now_secs());
    let condition = |type_: &str, on: bool, reason: &str, message: String| {
        let generation = jc.metadata.generation;
        crate::status::condition(
            &previous.conditions,
            &now,
            generation,
            type_,
            on,
            reason,
            message,
        )
    };
    let degraded = phase == "Degraded" || phase == "Pending" && desired > 0;
    let conditions = vec![
        condition("Ready", phase == "Ready", reason, message.clone()),
        condition(
            "Degraded",
            degraded,
            if degraded { reason } else { "NodesReady" },
            if degraded { message } else { String::new() },
        ),
    ];
    JobClusterStatus {
        phase: phase.into(),
        ready_nodes: ready,
        desired_nodes: desired,
        nodes: format!("{ready}/{desired}"),
        cpus: stats.cpus,
        busy_cpus: stats.busy,
        node_summary: stats.nodes.clone(),
        jobs: stats.counts.clone(),
        node_port: Some(build::node_port(jc)),
        conditions,
        observed_generation: jc.metadata.generation,
        scheduler: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(cpus: u32) -> ClusterStats {
        ClusterStats {
            cpus,
            ..Default::default()
        }
    }

    fn cluster(extra: &str) -> JobClusterResource {
        serde_yaml::from_str(&format!(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {{name: wc, generation: 3}}\nspec:\n  nodes: {{replicas: 2, cpus: 2}}\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn phase_and_ready_condition_follow_the_pods() {
        let jc = cluster("");
        let s = cluster_status(&jc, 0, 2, &stats(0));
        assert_eq!(
            (s.phase.as_str(), s.nodes.as_str(), s.cpus),
            ("Pending", "0/2", 0)
        );
        let s = cluster_status(&jc, 1, 2, &stats(2));
        assert_eq!(s.phase, "Degraded");
        assert_eq!(s.conditions[0].message, "only 1 of 2 node(s) ready");
        let s = cluster_status(&jc, 2, 2, &stats(4));
        assert_eq!((s.phase.as_str(), s.ready_nodes, s.cpus), ("Ready", 2, 4));
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.observed_generation, Some(3));
        let s = cluster_status(&cluster("  suspend: true\n"), 2, 2, &stats(4));
        assert_eq!(s.phase, "Suspended");
    }

    #[test]
    fn the_transition_time_moves_only_on_a_change() {
        let mut jc = cluster("");
        let first = cluster_status(&jc, 2, 2, &stats(4));
        let mut old = first.clone();
        old.conditions[0].last_transition_time = Some("2020-01-01T00:00:00Z".into());
        jc.status = Some(old);
        let again = cluster_status(&jc, 2, 2, &stats(4));
        assert_eq!(
            again.conditions[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        let changed = cluster_status(&jc, 1, 2, &stats(2));
        assert_ne!(
            changed.conditions[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
    }
}
