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

/// What the controller's cache keeps of a DispyJob, applied to every object the watch brings
/// (its memory is per job, and a namespace may hold 100,000 that have ended): never its
/// managedFields or kubectl's last-applied copy; of a job that has ended, only what its
/// reconcile reads (status, node, attempts, times for the TTL), not its arguments, result or
/// output. An ended job never runs again and its status is never written again, so nothing
/// dropped here is missed; the API server keeps all of it.
pub fn slim(job: &mut DispyJobResource) {
    job.metadata.managed_fields = None;
    if let Some(annotations) = job.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        if annotations.is_empty() {
            job.metadata.annotations = None;
        }
    }
    if let Some(status) = job.status.as_mut().filter(|s| s.status.is_terminal()) {
        *status = status.ended_summary();
        job.spec.args = Vec::new();
        job.spec.kwargs = serde_json::Map::new();
        job.spec.depends = Vec::new();
    }
}

/// A DispyJob left the API server. One that ended without ever needing the finalizer (or
/// whose finalizer let it go) is no longer reconciled, so the engine is told here to forget
/// it: a namespace whose jobs come and go (ttlSecondsAfterFinished) keeps the engine small.
pub fn deleted(ctx: &Ctx, job: &DispyJobResource) {
    let Some(key) = engine_key(job, ctx) else {
        return; // its cluster is gone, and the cluster's jobs with it
    };
    // Nobody waits for the reply: the finalizer's cleanup, if any, has had it.
    let (reply, _) = tokio::sync::oneshot::channel();
    ctx.engine.send(Request::JobGone { key, reply });
}

pub fn error_policy(_job: Arc<DispyJobResource>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!("{error}");
    crate::requeue_after_error(matches!(error, Error::Invalid { .. }))
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

/// The engine's key of a job of `cluster`.
fn key_of(cluster: &JobClusterResource, job: &DispyJobResource) -> JobKey {
    JobKey::new(
        computation_id(cluster),
        job_id(job.metadata.uid.as_deref().unwrap_or("")),
    )
}

/// The engine's key of the job, while its JobCluster is there.
fn engine_key(job: &DispyJobResource, ctx: &Ctx) -> Option<JobKey> {
    cluster_of(job, ctx).map(|cluster| key_of(&cluster, job))
}

/// The JobCluster `namespace/name` from the controller's cache, unless it is being deleted.
pub fn live_cluster(ctx: &Ctx, namespace: &str, name: &str) -> Option<Arc<JobClusterResource>> {
    ctx.clusters
        .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
        .filter(|c| c.metadata.deletion_timestamp.is_none())
}

async fn cleanup(job: Arc<DispyJobResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(key) = engine_key(&job, &ctx) else {
        return Ok(Action::await_change());
    };
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
    let key = key_of(&cluster, &job);
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
    ctx.engine
        .send(Request::Job(Box::new(job_info(&job, key, files))));
    Ok(Action::await_change())
}

/// The job as the engine takes it. Of a job that has ended, only what the engine keeps
/// ([`JobInfo::ended`]): it never runs again, so its arguments are not even encoded.
fn job_info(job: &DispyJobResource, key: JobKey, files: Vec<crate::engine::File>) -> JobInfo {
    let stored = job.status.clone().unwrap_or_default();
    let (args, kwargs, stored) = if stored.status.is_terminal() {
        (String::new(), String::new(), stored.ended_summary())
    } else {
        let args = serde_json::Value::Array(job.spec.args.clone()).to_string();
        let kwargs = serde_json::Value::Object(job.spec.kwargs.clone()).to_string();
        (args, kwargs, stored)
    };
    JobInfo {
        request: JobRequest {
            id: key.job,
            args,
            kwargs,
            depends: files.iter().map(|(n, _)| n.clone()).collect(),
        },
        key,
        namespace: job.namespace().unwrap_or_else(|| "default".into()),
        name: job.name_any(),
        uid: job.metadata.uid.clone().unwrap_or_default(),
        files,
        node: job.spec.node.clone(),
        deadline: job.spec.active_deadline_seconds.map(Duration::from_secs),
        policy: None,
        stored,
    }
}

/// Whether the cache leaves the job out: it has ended, is not being deleted and has no
/// `ttlSecondsAfterFinished` (its own or `default_ttl`) to wait for, so nothing would
/// reconcile it again. Its deletion, once asked, brings it back (its finalizer).
pub fn left_out(job: &DispyJobResource, default_ttl: Option<u64>) -> bool {
    job.status.as_ref().is_some_and(|s| s.status.is_terminal())
        && job.metadata.deletion_timestamp.is_none()
        && job
            .spec
            .ttl_seconds_after_finished
            .or(default_ttl)
            .is_none()
}

/// Which watch events reach the DispyJob cache: a job [`left_out`] is handed to the engine
/// (which counts it) here instead, and never cached: listed, it is skipped; updated, it
/// leaves the cache as if deleted. The cache then grows with the jobs that have not ended
/// (and those waiting for their TTL), not with every job the namespace ever ran.
pub fn cache_event(
    ctx: &Ctx,
    event: kube::runtime::watcher::Event<DispyJobResource>,
) -> Option<kube::runtime::watcher::Event<DispyJobResource>> {
    use kube::runtime::watcher::Event;
    match event {
        Event::Apply(job) if left_out(&job, ctx.job_ttl) => {
            ended(ctx, &job);
            Some(Event::Delete(job))
        }
        Event::InitApply(job) if left_out(&job, ctx.job_ttl) => {
            ended(ctx, &job);
            None
        }
        other => Some(other),
    }
}

/// Tells the engine of a job that has ended (it counts it, and acknowledges its result if a
/// node sends it again).
fn ended(ctx: &Ctx, job: &DispyJobResource) {
    if let Some(key) = engine_key(job, ctx) {
        let info = job_info(job, key, Vec::new());
        ctx.engine.send(Request::Job(Box::new(info)));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::manifest::{Condition, DispyJobSpec};

    fn job(status: JobStatus) -> DispyJobResource {
        let mut job = DispyJobResource::new(
            "j1",
            DispyJobSpec {
                cluster: "jc".into(),
                args: vec![serde_json::json!("x".repeat(1000))],
                ttl_seconds_after_finished: Some(60),
                ..Default::default()
            },
        );
        job.metadata.managed_fields = Some(vec![Default::default()]);
        job.metadata.annotations = Some(
            [
                (
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{…}".into(),
                ),
                ("team".into(), "a".into()),
            ]
            .into(),
        );
        job.metadata.finalizers = Some(vec![FINALIZER.into()]);
        job.status = Some(DispyJobStatus {
            status,
            node: Some("10.0.0.1:9701".into()),
            attempts: 1,
            result: Some(serde_json::json!([1, 2, 3])),
            stdout: Some("out".into()),
            exception: Some("Traceback".into()),
            conditions: vec![Condition {
                type_: "Complete".into(),
                status: "True".into(),
                last_transition_time: Some("2026-12-01T00:00:05Z".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        job
    }

    #[test]
    fn the_cache_keeps_of_an_ended_job_only_what_its_reconcile_reads() {
        let mut j = job(JobStatus::Finished);
        slim(&mut j);
        assert_eq!(j.metadata.managed_fields, None);
        assert_eq!(
            j.metadata.annotations,
            Some([("team".to_string(), "a".to_string())].into()),
            "only kubectl's copy goes"
        );
        assert_eq!(j.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
        assert!(j.spec.args.is_empty());
        assert_eq!(
            (j.spec.cluster.as_str(), j.spec.ttl_seconds_after_finished),
            ("jc", Some(60))
        );
        let s = j.status.unwrap();
        assert_eq!((s.status, s.attempts), (JobStatus::Finished, 1));
        assert_eq!(s.node.as_deref(), Some("10.0.0.1:9701"));
        assert_eq!((s.result, s.stdout, s.exception), (None, None, None));
        assert!(s.conditions.is_empty());
        // The TTL still reads when it ended: the condition's time, as endTime.
        assert_eq!(s.end_time.as_deref(), Some("2026-12-01T00:00:05Z"));
    }

    #[test]
    fn the_cache_keeps_all_of_a_job_that_has_not_ended_but_its_managed_fields() {
        let mut j = job(JobStatus::Running);
        let before = j.clone();
        slim(&mut j);
        assert_eq!(j.metadata.managed_fields, None);
        assert_eq!((&j.spec, &j.status), (&before.spec, &before.status));
    }

    #[test]
    fn only_an_ended_job_with_nothing_left_to_reconcile_is_left_out_of_the_cache() {
        let mut j = job(JobStatus::Finished);
        j.spec.ttl_seconds_after_finished = None;
        assert!(left_out(&j, None));
        assert!(
            !left_out(&j, Some(600)),
            "the operator's default TTL is waited for"
        );
        assert!(
            !left_out(&job(JobStatus::Finished), None),
            "its own TTL is waited for"
        );
        assert!(!left_out(&job(JobStatus::Running), None));
        j.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-01T00:00:00Z".parse().unwrap(),
        ));
        assert!(
            !left_out(&j, None),
            "its deletion needs the finalizer removed"
        );
    }
}
