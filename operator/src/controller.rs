//! The JobCluster controller, first part: each JobCluster gets its Secret, headless Service and
//! `spec.nodes.replicas` node pods, and a status that says how many are ready. Level-triggered:
//! every reconcile recomputes from what the API server holds, so a restarted operator picks up
//! where it was. (Connecting to the nodes and running jobs comes next.)

use std::sync::Arc;
use std::time::Duration;

use dispy_core::manifest::{Condition, JobClusterResource, JobClusterStatus};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::build::{self, BuildError, CLUSTER_LABEL, INDEX_LABEL};

const MANAGER: &str = "dispy-operator";

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
}

pub struct Ctx {
    pub client: Client,
    /// Node image used when a JobCluster names none.
    pub image: String,
}

/// Runs the controller until the process ends.
pub async fn run(client: Client, image: String) {
    let clusters = Api::<JobClusterResource>::all(client.clone());
    let pods = Api::<Pod>::all(client.clone());
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=dispy-operator");
    Controller::new(clusters, watcher::Config::default())
        .owns(pods, managed)
        .shutdown_on_signal()
        .run(reconcile, error_policy, Arc::new(Ctx { client, image }))
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!("reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(_jc: Arc<JobClusterResource>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    match error {
        // Fixing the JobCluster triggers a new reconcile.
        Error::Build(_) => Action::await_change(),
        Error::Kube { .. } => Action::requeue(Duration::from_secs(5)),
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

async fn reconcile(jc: Arc<JobClusterResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
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

    if let Some(secret) = build::generated_secret(&jc, &random_secret())? {
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
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

    let service = build::headless_service(&jc)?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch(
            service.metadata.name.as_deref().unwrap_or_default(),
            &apply,
            &Patch::Apply(&service),
        )
        .await
        .map_err(kube_err("apply the Service"))?;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let desired = jc.spec.nodes.replicas.unwrap_or(1);
    let existing = pods
        .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
        .await
        .map_err(kube_err("list the node pods"))?
        .items;
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

    let ready = existing
        .iter()
        .filter(|p| index_of(p).is_some_and(|i| i < desired))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| is_ready(p))
        .count() as u32;
    let status = cluster_status(&jc, ready, desired);
    let patch = serde_json::json!({
        "apiVersion": "dispy.io/v1alpha1",
        "kind": "JobCluster",
        "status": status,
    });
    Api::<JobClusterResource>::namespaced(client.clone(), &ns)
        .patch_status(&name, &apply, &Patch::Apply(&patch))
        .await
        .map_err(kube_err("update its status"))?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status for `ready` of `desired` node pods.
pub fn cluster_status(jc: &JobClusterResource, ready: u32, desired: u32) -> JobClusterStatus {
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
    let ready_status = if phase == "Ready" { "True" } else { "False" };
    let now = dispy_core::manifest::rfc3339(dispy_core::job::now_secs());
    let transition = previous
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == ready_status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    JobClusterStatus {
        phase: phase.into(),
        ready_nodes: ready,
        desired_nodes: desired,
        nodes: format!("{ready}/{desired}"),
        cpus: ready * jc.spec.nodes.cpus.unwrap_or(0),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: ready_status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Some(transition),
            observed_generation: jc.metadata.generation,
        }],
        observed_generation: jc.metadata.generation,
        jobs: previous.jobs,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(extra: &str) -> JobClusterResource {
        serde_yaml::from_str(&format!(
            "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {{name: wc, generation: 3}}\nspec:\n  nodes: {{replicas: 2, cpus: 2}}\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn phase_and_ready_condition_follow_the_pods() {
        let jc = cluster("");
        let s = cluster_status(&jc, 0, 2);
        assert_eq!(
            (s.phase.as_str(), s.nodes.as_str(), s.cpus),
            ("Pending", "0/2", 0)
        );
        let s = cluster_status(&jc, 1, 2);
        assert_eq!(s.phase, "Degraded");
        assert_eq!(s.conditions[0].message, "only 1 of 2 node(s) ready");
        let s = cluster_status(&jc, 2, 2);
        assert_eq!((s.phase.as_str(), s.ready_nodes, s.cpus), ("Ready", 2, 4));
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.observed_generation, Some(3));
        let s = cluster_status(&cluster("  suspend: true\n"), 2, 2);
        assert_eq!(s.phase, "Suspended");
    }

    #[test]
    fn the_transition_time_moves_only_on_a_change() {
        let mut jc = cluster("");
        let first = cluster_status(&jc, 2, 2);
        let mut old = first.clone();
        old.conditions[0].last_transition_time = Some("2020-01-01T00:00:00Z".into());
        jc.status = Some(old);
        let again = cluster_status(&jc, 2, 2);
        assert_eq!(
            again.conditions[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        let changed = cluster_status(&jc, 1, 2);
        assert_ne!(
            changed.conditions[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
    }
}
