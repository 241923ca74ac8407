//! The DispyJob controller: hands each DispyJob of an existing JobCluster to the engine, which
//! schedules it and writes its status. A job naming a cluster that does not exist waits, with a
//! `Waiting` condition and an Event that say so, and runs once the cluster appears. Deleting a
//! job that runs terminates it on its node first (finalizer). A job that has ended is deleted
//! once its `ttlSecondsAfterFinished` (or the operator's default) has passed.

use std::sync::Arc;
use std::time::Duration;

use dispy_core::job::JobStatus;
use dispy_core::manifest::{DispyJobResource, DispyJobStatus, JobClusterResource};
use dispy_core::protocol::JobRequest;
use dispy_core::scheduler::JobKey;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;

use crate::cluster::{computation_id, depends_files};
use crate::engine::{JobInfo, Request};
use crate::status::{conditions, job_id};
use crate::{ttl, Ctx};

/// Held until the job is no longer on a node.
pub const FINALIZER: &str = "dispy.io/terminate";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DispyJob {job}: {action}: {source}")]
    Kube {
        job: String,
        action: &'static str,
        source: kube::Error,
    },
    #[error("DispyJob {job}: {message}")]
    Invalid { job: String, message: String },
    #[error("DispyJob {0}: its node did not confirm the termination in time")]
    TerminateTimeout(String),
    #[error("DispyJob finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// The `error` label of the reconcile error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "api",
            Error::Invalid { .. } => "invalid",
            Error::TerminateTimeout(_) => "terminate_timeout",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

pub fn error_policy(_job: Arc<DispyJobResource>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!("{error}");
    match error {
        Error::Invalid { .. } => Action::requeue(Duration::from_secs(30)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

pub async fn reconcile(job: Arc<DispyJobResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let terminal = job.status.as_ref().is_some_and(|s| s.status.is_terminal());
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let api = Api::<DispyJobResource>::namespaced(ctx.client.clone(), &ns);
    let expiry = match job.metadata.deletion_timestamp {
        Some(_) => None,
        None => ttl::expiry(
            job.status.as_ref().and_then(ttl::job_ended),
            job.spec.ttl_seconds_after_finished.or(ctx.job_ttl),
            dispy_core::job::now_secs(),
        ),
    };
    let (name, uid) = (job.name_any(), job.metadata.uid.clone());
    let result =
        if terminal && job.finalizers().is_empty() && job.metadata.deletion_timestamp.is_none() {
            // Done before its finalizer was ever needed: only counted.
            apply(job, ctx.clone()).await
        } else {
            finalizer(&api, FINALIZER, job, |event| async {
                match event {
                    Finalizer::Apply(job) => apply(job, ctx.clone()).await,
                    Finalizer::Cleanup(job) => cleanup(job, ctx.clone()).await,
                }
            })
            .await
            .map_err(|e| match e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
                other => Error::Finalizer(other.to_string()),
            })
        };
    let result = match (result, expiry) {
        // an ended job goes when due, even one the engine cannot take (say, invalid kwargs)
        (_, Some(ttl::Expiry::Now)) => delete_expired(&api, &ns, &name, uid).await,
        (Ok(_), Some(ttl::Expiry::In(left))) => Ok(Action::requeue(left)),
        (result, _) => result,
    };
    ctx.metrics
        .reconciled("dispyjob", result.as_ref().err().map(Error::kind));
    result
}

/// Deletes a job past its `ttlSecondsAfterFinished` (only this very object: a job created
/// again under its name has another uid). It has ended, so its finalizer lets it go at once;
/// what it owns (output and files ConfigMaps) goes with it in the background.
async fn delete_expired(
    api: &Api<DispyJobResource>,
    ns: &str,
    name: &str,
    uid: Option<String>,
) -> Result<Action, Error> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &params).await {
        Ok(_) => tracing::info!(job = %format!("{ns}/{name}"), "deleted: ttlSecondsAfterFinished"),
        // gone already, or another object by now
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(source) => {
            return Err(Error::Kube {
                job: format!("{ns}/{name}"),
                action: "delete it (ttlSecondsAfterFinished)",
                source,
            })
        }
    }
    Ok(Action::await_change())
}

fn cluster_of(job: &DispyJobResource, ctx: &Ctx) -> Option<Arc<JobClusterResource>> {
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    live_cluster(ctx, &ns, &job.spec.cluster)
}

/// The JobCluster `namespace/name` from the controller's cache, unless it is being deleted.
pub fn live_cluster(ctx: &Ctx, namespace: &str, name: &str) -> Option<Arc<JobClusterResource>> {
    ctx.clusters
        .state()
        .into_iter()
        .find(|c| c.name_any() == name && c.namespace().as_deref() == Some(namespace))
        .filter(|c| c.metadata.deletion_timestamp.is_none())
}

async fn cleanup(job: Arc<DispyJobResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(cluster) = cluster_of(&job, &ctx) else {
        return Ok(Action::await_change());
    };
    let key = JobKey::new(
        computation_id(&cluster),
        job_id(job.metadata.uid.as_deref().unwrap_or("")),
    );
    let stopped = ctx
        .engine
        .ask(
            |reply| Request::JobGone { key, reply },
            Duration::from_secs(30),
        )
        .await;
    if stopped {
        Ok(Action::await_change())
    } else {
        Err(Error::TerminateTimeout(job.name_any()))
    }
}

async fn apply(job: Arc<DispyJobResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let name = job.name_any();
    let stored = job.status.clone().unwrap_or_default();
    let Some(cluster) = cluster_of(&job, &ctx) else {
        if stored.status.is_terminal() {
            return Ok(Action::await_change());
        }
        return wait_for_cluster(&job, &ctx, &ns, &name, stored).await;
    };
    let invalid = |message: String| Error::Invalid {
        job: format!("{ns}/{name}"),
        message,
    };
    let program = matches!(
        cluster
            .spec
            .computation
            .as_ref()
            .map(|c| c.program.is_some()),
        Some(true)
    );
    if program && !job.spec.kwargs.is_empty() {
        return Err(invalid(
            "spec.kwargs: a program computation takes no kwargs".into(),
        ));
    }
    let key = JobKey::new(
        computation_id(&cluster),
        job_id(job.metadata.uid.as_deref().unwrap_or("")),
    );
    if ctx.engine.knows(&key) {
        // Our own status writes bring the job back here: nothing new for the engine.
        return Ok(Action::await_change());
    }
    let files = if stored.status.is_terminal() {
        Vec::new()
    } else {
        let config_maps =
            Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(ctx.client.clone(), &ns);
        depends_files(&config_maps, &ns, &job.spec.depends)
            .await
            .map_err(|e| invalid(e.to_string()))?
    };
    let info = JobInfo {
        request: JobRequest {
            id: key.job,
            args: serde_json::Value::Array(job.spec.args.clone()).to_string(),
            kwargs: serde_json::Value::Object(job.spec.kwargs.clone()).to_string(),
            depends: files.iter().map(|(n, _)| n.clone()).collect(),
        },
        key,
        namespace: ns,
        name,
        uid: job.metadata.uid.clone().unwrap_or_default(),
        files,
        node: job.spec.node.clone(),
        deadline: job.spec.active_deadline_seconds.map(Duration::from_secs),
        stored,
    };
    ctx.engine.send(Request::Job(Box::new(info)));
    Ok(Action::await_change())
}

/// The job names a JobCluster that does not exist (yet): say so once, look again later.
async fn wait_for_cluster(
    job: &DispyJobResource,
    ctx: &Ctx,
    ns: &str,
    name: &str,
    mut status: DispyJobStatus,
) -> Result<Action, Error> {
    let message = format!(
        "JobCluster {ns}/{} does not exist; the job runs once it does",
        job.spec.cluster
    );
    let said = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Waiting" && c.status == "True" && c.reason == "ClusterNotFound");
    if !said {
        status.status = JobStatus::Created;
        status.message = Some(message.clone());
        let now = dispy_core::manifest::rfc3339(dispy_core::job::now_secs());
        status.conditions = conditions(
            &status,
            &status.conditions,
            &now,
            Some(("ClusterNotFound", &message)),
        );
        crate::writer::apply_job_status(&ctx.client, ns, name, &status)
            .await
            .map_err(|source| Error::Kube {
                job: format!("{ns}/{name}"),
                action: "update its status",
                source,
            })?;
        let uid = job.metadata.uid.as_deref().unwrap_or("");
        let reference = crate::writer::reference("DispyJob", ns, name, uid);
        ctx.writer
            .publish(reference, "ClusterNotFound", message, true);
    }
    Ok(Action::requeue(Duration::from_secs(5)))
}
