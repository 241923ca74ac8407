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

use dispy_core::manifest::{JobClusterResource, JobClusterStatus, NodeSummary};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Client, ResourceExt};

use crate::build::{self, BuildError, CLUSTER_LABEL, INDEX_LABEL, SECRET_KEY};
use crate::engine::{ClusterInfo, ClusterStats, File, Request};
use crate::{Ctx, MANAGER};

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
    #[error("JobCluster {0}: closing the computation on its nodes did not finish in time")]
    CloseTimeout(String),
    #[error("JobCluster finalizer: {0}")]
    Finalizer(String),
}

pub fn error_policy(_jc: Arc<JobClusterResource>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconciled("jobcluster", false);
    tracing::warn!("{error}");
    match error {
        // Fixing the JobCluster triggers a new reconcile; retry slowly meanwhile (a missing
        // ConfigMap may appear).
        Error::Build(_) | Error::Invalid { .. } => Action::requeue(Duration::from_secs(30)),
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
    ctx.metrics.reconciled("jobcluster", result.is_ok());
    result.map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
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

async fn apply(jc: Arc<JobClusterResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = jc.namespace().unwrap_or_else(|| "default".into());
    let name = jc.name_any();
    let full = format!("{ns}/{name}");
    let kube_err = |action: &'static str| {
        let cluster = full.clone();
        move |source| Error::Kube {
            cluster,
            action,
            source,
        }
    };
    let client = &ctx.client;
    let apply = PatchParams::apply(MANAGER).force();

    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    if let Some(secret) = build::generated_secret(&jc, &random_secret())? {
        if secrets
            .get_opt(&build::secret_name(&jc))
            .await
            .map_err(kube_err("read the Secret"))?
            .is_none()
        {
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .map_err(kube_err("create the Secret"))?;
        }
    }
    let secret = read_secret(&secrets, &build::secret_name(&jc))
        .await
        .map_err(|message| Error::Invalid {
            cluster: full.clone(),
            message,
        })?;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let existing = pods
        .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
        .await
        .map_err(kube_err("list the node pods"))?
        .items;
    let port = node_port(&jc, &existing, &ctx);
    // The JobCluster with its port recorded, for the pods and the Service.
    let jc = {
        let mut with_port = (*jc).clone();
        with_port
            .status
            .get_or_insert_with(Default::default)
            .node_port = Some(port);
        Arc::new(with_port)
    };
    let service = build::headless_service(&jc)?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch(
            service.metadata.name.as_deref().unwrap_or_default(),
            &apply,
            &Patch::Apply(&service),
        )
        .await
        .map_err(kube_err("apply the Service"))?;

    let desired = jc.spec.nodes.replicas.unwrap_or(1);
    let index_of = |p: &Pod| {
        p.labels()
            .get(INDEX_LABEL)
            .and_then(|i| i.parse::<u32>().ok())
    };
    for i in 0..desired {
        if !existing.iter().any(|p| index_of(p) == Some(i)) {
            let pod = build::node_pod(&jc, i, &ctx.image)?;
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => tracing::info!(cluster = %full, pod = %pod.name_any(), "node pod created"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kube_err("create a node pod")(e)),
            }
        }
    }
    for p in &existing {
        if index_of(p).is_none_or(|i| i >= desired) && p.metadata.deletion_timestamp.is_none() {
            pods.delete(&p.name_any(), &DeleteParams::default())
                .await
                .map_err(kube_err("delete a node pod"))?;
            tracing::info!(cluster = %full, pod = %p.name_any(), "node pod removed (scaled down)");
        }
    }

    let live: Vec<&Pod> = existing
        .iter()
        .filter(|p| index_of(p).is_some_and(|i| i < desired))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let ready_pods: Vec<&Pod> = live.iter().copied().filter(|p| is_ready(p)).collect();
    let mut nodes: BTreeMap<String, Option<String>> = ready_pods
        .iter()
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_ref()?;
            Some((format!("{ip}:{port}"), Some(p.name_any())))
        })
        .collect();
    for addr in &jc.spec.nodes.external {
        nodes.insert(crate::with_port(addr), None);
    }
    if jc.spec.nodes.discover {
        for addr in crate::discovered_nodes().await {
            nodes.entry(addr).or_insert(None);
        }
    }

    let invalid = |message: String| Error::Invalid {
        cluster: full.clone(),
        message,
    };
    let computation = match &jc.spec.computation {
        None => None,
        Some(spec) => {
            let source = match spec.python.as_ref().and_then(|p| p.config_map_ref.as_ref()) {
                Some(r) => Some(
                    config_map_key(client, &ns, &r.name, &r.key)
                        .await
                        .map_err(&invalid)?,
                ),
                None => None,
            };
            Some(
                spec.to_protocol(|_| source.ok_or_else(|| "no source".to_string()))
                    .map_err(&invalid)?,
            )
        }
    };
    let tls_cert = match &jc.spec.tls {
        None => None,
        Some(tls) => Some(
            tls_certificate(&secrets, &tls.secret_ref.name)
                .await
                .map_err(&invalid)?,
        ),
    };
    let files = depends_files(client, &ns, &jc.spec.depends)
        .await
        .map_err(&invalid)?;
    let info = ClusterInfo {
        id: computation_id(&jc),
        namespace: ns.clone(),
        name: name.clone(),
        uid: jc.metadata.uid.clone().unwrap_or_default(),
        computation,
        files,
        policy: dispy_core::driver::policy(&jc.spec),
        suspended: jc.spec.suspend,
        secret,
        tls_cert,
        pulse_interval: Duration::from_secs(jc.spec.pulse_interval.unwrap_or(10).max(1) as u64),
        nodes,
    };
    let pool = info.computation.is_none();
    ctx.engine.send(Request::Cluster(Box::new(info.clone())));

    let desired_nodes = desired + jc.spec.nodes.external.len() as u32;
    let stats = if pool {
        pool_stats(&jc, &info, &live)
    } else {
        ctx.engine.stats(&full)
    };
    // A pool's node is ready with its pod; otherwise once the computation is set up on it.
    let ready = stats.nodes.iter().filter(|n| n.ready).count() as u32;
    let status = cluster_status(&jc, ready, desired_nodes, &stats);
    let patch = serde_json::json!({
        "apiVersion": "dispy.io/v1alpha1",
        "kind": "JobCluster",
        "status": status,
    });
    Api::<JobClusterResource>::namespaced(client.clone(), &ns)
        .patch_status(&name, &apply, &Patch::Apply(&patch))
        .await
        .map_err(kube_err("update its status"))?;
    ctx.metrics.reconciled("jobcluster", true);
    // Pods change through the watch; nodes and jobs through the engine's notices; external
    // and discovered nodes need a look now and then.
    Ok(Action::requeue(Duration::from_secs(30)))
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

async fn read_secret(secrets: &Api<Secret>, name: &str) -> Result<String, String> {
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read Secret {name}: {e}"))?
        .ok_or_else(|| format!("Secret {name} (the node secret) does not exist"))?;
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(SECRET_KEY)) {
        return String::from_utf8(v.0.clone())
            .map_err(|_| format!("Secret {name}: key {SECRET_KEY:?} is not UTF-8"));
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(SECRET_KEY).cloned())
        .ok_or_else(|| format!("Secret {name} has no key {SECRET_KEY:?}"))
}

/// `tls.crt` of the nodes' TLS Secret (`spec.tls.secretRef`).
async fn tls_certificate(secrets: &Api<Secret>, name: &str) -> Result<Vec<u8>, String> {
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read Secret {name}: {e}"))?
        .ok_or_else(|| format!("Secret {name} (spec.tls.secretRef) does not exist"))?;
    secret
        .data
        .and_then(|d| d.get("tls.crt").map(|v| v.0.clone()))
        .ok_or_else(|| format!("Secret {name} (spec.tls.secretRef) has no key \"tls.crt\""))
}

async fn config_map_key(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<String, String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read ConfigMap {name}: {e}"))?
        .ok_or_else(|| format!("ConfigMap {ns}/{name} (python.configMapRef) does not exist"))?;
    cm.data.and_then(|d| d.get(key).cloned()).ok_or_else(|| {
        format!("ConfigMap {ns}/{name} has no key {key:?} (python.configMapRef.key)")
    })
}

/// Every key of every depends ConfigMap, as files.
pub async fn depends_files(
    client: &Client,
    ns: &str,
    depends: &[dispy_core::manifest::DependsSource],
) -> Result<Vec<File>, String> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let mut files = Vec::new();
    for d in depends {
        let name = &d.config_map_ref.name;
        let cm = api
            .get_opt(name)
            .await
            .map_err(|e| format!("cannot read ConfigMap {name}: {e}"))?
            .ok_or_else(|| format!("ConfigMap {ns}/{name} (in depends) does not exist"))?;
        for (k, v) in cm.data.unwrap_or_default() {
            files.push((k, v.into_bytes()));
        }
        for (k, v) in cm.binary_data.unwrap_or_default() {
            files.push((k, v.0));
        }
    }
    Ok(files)
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
