//! The DispyJobArray controller: the first time it sees an array, it reads the jobs' arguments
//! (inline or a ConfigMap's JSON lines) and what the array's result ConfigMaps already hold,
//! and hands the array to the engine, which runs its jobs and writes their rows and the
//! status. Later it passes `suspend` on, deletes a finished array after
//! `ttlSecondsAfterFinished`, and on deletion waits for the engine to terminate its jobs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dispy_core::array::{read_rows, Chunks};
use dispy_core::manifest::{
    array_args_from_lines, DispyJobArrayResource, DispyJobArrayStatus, JOB_ARRAY_LABEL, RESULTS_KEY,
};
use dispy_core::protocol::JobRequest;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;

use crate::cluster::computation_id;
use crate::engine::arrays::{job_id, prefix, ArrayInfo};
use crate::engine::Request;
use crate::Ctx;

/// The DispyJob's finalizer: held until the array's jobs are off their nodes.
pub use crate::jobs::FINALIZER;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DispyJobArray {array}: {action}: {source}")]
    Kube {
        array: String,
        action: &'static str,
        source: kube::Error,
    },
    #[error("DispyJobArray {array}: {message}")]
    Invalid { array: String, message: String },
    #[error("DispyJobArray {0}: its running jobs did not stop in time")]
    TerminateTimeout(String),
    #[error("DispyJobArray finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "api",
            Error::Invalid { .. } => "invalid",
            Error::TerminateTimeout(_) => "terminate_timeout",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

pub fn error_policy(_a: Arc<DispyJobArrayResource>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!("{error}");
    crate::requeue_after_error(matches!(error, Error::Invalid { .. }))
}

pub async fn reconcile(a: Arc<DispyJobArrayResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = a.namespace().unwrap_or_else(|| "default".into());
    let api = Api::<DispyJobArrayResource>::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, a, |event| async {
        match event {
            Finalizer::Apply(a) => apply(a, ctx.clone()).await,
            Finalizer::Cleanup(a) => cleanup(a, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconciled("dispyjobarray", result.as_ref().err().map(Error::kind));
    result
}

async fn cleanup(a: Arc<DispyJobArrayResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let key = format!("{}/{}", a.namespace().unwrap_or_default(), a.name_any());
    let stopped = ctx
        .engine
        .ask(
            |reply| Request::ArrayGone {
                key: key.clone(),
                reply,
            },
            Duration::from_secs(60),
        )
        .await;
    if stopped {
        Ok(Action::await_change())
    } else {
        Err(Error::TerminateTimeout(key))
    }
}

/// The array's `ttlSecondsAfterFinished`, else the operator's default (DispyJobs' too).
pub fn array_ttl(own: Option<i64>, default: Option<u64>) -> Option<i64> {
    own.or(default.and_then(|t| i64::try_from(t).ok()))
}

/// Seconds until a finished array is to be deleted (0 or less: now), if it is to be.
pub fn ttl_left(ttl: Option<i64>, completion: Option<&str>, now_unix: f64) -> Option<f64> {
    let ttl = ttl?;
    let done = dispy_core::manifest::parse_rfc3339(completion?)?;
    Some(done + ttl as f64 - now_unix)
}

async fn apply(a: Arc<DispyJobArrayResource>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = a.namespace().unwrap_or_else(|| "default".into());
    let name = a.name_any();
    let key = format!("{ns}/{name}");
    let status = a.status.clone().unwrap_or_default();
    let now = dispy_core::job::now_secs();
    if let Some(left) = ttl_left(
        array_ttl(a.spec.ttl_seconds_after_finished, ctx.job_ttl),
        status.completion_time.as_deref(),
        now,
    ) {
        if left <= 0.0 {
            tracing::info!(array = %key, "ttlSecondsAfterFinished passed: deleting it");
            Api::<DispyJobArrayResource>::namespaced(ctx.client.clone(), &ns)
                .delete(&name, &DeleteParams::background())
                .await
                .map_err(|source| Error::Kube {
                    array: key.clone(),
                    action: "delete it (ttlSecondsAfterFinished)",
                    source,
                })?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(Duration::from_secs_f64(left.min(3600.0))));
    }
    if ctx.engine.knows_array(&key) {
        ctx.engine.send(Request::ArraySuspend {
            key,
            suspended: a.spec.suspend,
        });
        return Ok(Action::await_change());
    }
    let invalid = |message: String| Error::Invalid {
        array: key.clone(),
        message,
    };
    let Some(cluster) = crate::jobs::live_cluster(&ctx, &ns, &a.spec.cluster) else {
        let message = format!(
            "JobCluster {ns}/{} does not exist; the jobs run once it does",
            a.spec.cluster
        );
        if status.message.as_deref() != Some(&message) {
            write_message(&ctx, &ns, &name, status, message).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns);
    let lines = match (&a.spec.args, &a.spec.args_from) {
        (Some(args), None) => args
            .iter()
            .map(|a| (a.clone(), serde_json::Map::new()))
            .collect(),
        (None, Some(from)) => {
            let r = &from.config_map_ref;
            let cm = config_maps
                .get_opt(&r.name)
                .await
                .map_err(|source| Error::Kube {
                    array: key.clone(),
                    action: "read spec.argsFrom's ConfigMap",
                    source,
                })?;
            let missing = format!("ConfigMap {ns}/{} (spec.argsFrom)", r.name);
            let cm = cm.ok_or_else(|| invalid(format!("{missing} does not exist")))?;
            let text = cm
                .data
                .and_then(|mut d| d.remove(&r.key))
                .ok_or_else(|| invalid(format!("{missing} has no key {:?}", r.key)))?;
            array_args_from_lines(&text)
                .map_err(|e| invalid(format!("{missing}, key {:?}: {e}", r.key)))?
        }
        _ => {
            return Err(invalid(
                "set exactly one of spec.args or spec.argsFrom".into(),
            ))
        }
    };
    let uid = a.metadata.uid.clone().unwrap_or_default();
    let stored = stored_chunks(&config_maps, &name, &uid)
        .await
        .map_err(|source| Error::Kube {
            array: key.clone(),
            action: "list its result ConfigMaps",
            source,
        })?;
    let (rows, bad) = read_rows(stored.values().map(String::as_str));
    if bad > 0 {
        tracing::warn!(array = %key, lines = bad, "result ConfigMaps have lines that are not rows");
    }
    let p = prefix(&uid);
    let jobs = lines
        .into_iter()
        .enumerate()
        .map(|(i, (args, kwargs))| JobRequest {
            id: job_id(p, i as u32),
            args: serde_json::Value::Array(args).to_string(),
            kwargs: serde_json::Value::Object(kwargs).to_string(),
            depends: Vec::new(),
        })
        .collect();
    let info = ArrayInfo {
        key,
        namespace: ns,
        name,
        uid,
        generation: a.metadata.generation,
        cluster: computation_id(&cluster),
        jobs,
        suspended: a.spec.suspend,
        policy: Some(dispy_core::driver::array_policy(&cluster.spec, &a.spec))
            .filter(|p| *p != dispy_core::driver::policy(&cluster.spec)),
        stored: rows.into_iter().map(|(i, r)| (i, r.status)).collect(),
        chunks: Chunks::resume(&stored),
        status,
    };
    ctx.engine.send(Request::Array(Box::new(info)));
    Ok(Action::await_change())
}

/// The array's result ConfigMaps (its own: owned by its uid), by number.
async fn stored_chunks(
    api: &Api<ConfigMap>,
    name: &str,
    uid: &str,
) -> Result<BTreeMap<u32, String>, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{JOB_ARRAY_LABEL}={name}")))
        .await?;
    let prefix = format!("{name}-results-");
    Ok(list
        .items
        .into_iter()
        .filter(|cm| cm.owner_references().iter().any(|o| o.uid == uid))
        .filter_map(|cm| {
            let n = cm.name_any().strip_prefix(&prefix)?.parse::<u32>().ok()?;
            let text = cm.data?.remove(RESULTS_KEY)?;
            Some((n, text))
        })
        .collect())
}

async fn write_message(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    mut status: DispyJobArrayStatus,
    message: String,
) -> Result<(), Error> {
    status.message = Some(message);
    crate::writer::apply_status::<DispyJobArrayResource>(&ctx.client, ns, name, &status)
        .await
        .map_err(|source| Error::Kube {
            array: format!("{ns}/{name}"),
            action: "update its status",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_array_is_due_for_deletion_its_ttl_after_its_completion() {
        let done = "2026-12-01T10:00:00Z";
        let at = dispy_core::manifest::parse_rfc3339(done).unwrap();
        assert_eq!(ttl_left(Some(30), Some(done), at + 10.0), Some(20.0));
        assert!(ttl_left(Some(30), Some(done), at + 31.0).unwrap() < 0.0);
        assert_eq!(ttl_left(Some(0), Some(done), at), Some(0.0));
        assert_eq!(ttl_left(None, Some(done), at), None, "no ttl: kept");
        assert_eq!(ttl_left(Some(30), None, at), None, "not finished");
        assert_eq!(array_ttl(Some(5), Some(600)), Some(5), "its own first");
        assert_eq!(
            array_ttl(None, Some(600)),
            Some(600),
            "the operator's default"
        );
        assert_eq!(array_ttl(None, None), None);
    }
}
