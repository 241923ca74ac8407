//! What the engine writes to the API server: DispyJob statuses (server-side apply on the
//! status subresource), output ConfigMaps owned by their job, and Events. Writes run at most
//! `concurrency` at a time; Events are best effort: when their queue is full they are dropped
//! (and counted) rather than slowing jobs down. A job's routine (Normal) Events also have a
//! budget, `--event-qps`: each is a write, and at a hundred jobs a second one per job would
//! take as much of the API server as the jobs' statuses do. Warnings and the JobClusters'
//! Events are never held to it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dispy_core::manifest::{DispyJobResource, DispyJobStatus};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::{mpsc, Semaphore};

use crate::metrics::Metrics;
use crate::MANAGER;

/// Why a status write failed.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreError {
    /// The DispyJob is gone (deleted without waiting for the engine).
    Gone,
    Failed(String),
}

/// One status to store.
#[derive(Debug, Clone)]
pub struct Write {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub status: DispyJobStatus,
    /// The whole output, for the job's output ConfigMap.
    pub output: Option<BTreeMap<String, String>>,
    /// Sent files to add to the job's files ConfigMap, by key.
    pub files: Vec<(String, Vec<u8>)>,
}

/// The name of a job's output ConfigMap.
pub fn output_name(job: &str) -> String {
    format!("{job}-output")
}

/// The name of the ConfigMap holding the files a job sent.
pub fn files_name(job: &str) -> String {
    format!("{job}-files")
}

#[derive(Clone)]
pub struct Writer {
    client: Client,
    permits: Arc<Semaphore>,
    events: mpsc::Sender<(ObjectReference, Event)>,
    budget: Arc<Mutex<Budget>>,
    metrics: Arc<Metrics>,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
pub struct Budget {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    pub fn new(rate: f64, burst: u32) -> Budget {
        let burst = f64::from(burst.max(1));
        Budget {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now.max(self.at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Writer {
    /// `event_qps`/`event_burst`: the budget of routine Events.
    pub fn new(
        client: Client,
        concurrency: usize,
        event_qps: f64,
        event_burst: u32,
        metrics: Arc<Metrics>,
    ) -> Writer {
        let (events, mut queue) = mpsc::channel::<(ObjectReference, Event)>(1024);
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        tokio::spawn(async move {
            while let Some((reference, event)) = queue.recv().await {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::debug!("publishing an Event failed: {e}");
                }
            }
        });
        Writer {
            client,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            events,
            budget: Arc::new(Mutex::new(Budget::new(event_qps, event_burst))),
            metrics,
        }
    }

    /// Stores a status (and first the output and files ConfigMaps, when there are any).
    pub async fn store(&self, w: Write) -> Result<(), StoreError> {
        let _permit = self.permits.acquire().await.expect("never closed");
        let apply = PatchParams::apply(MANAGER).force();
        if let Some(output) = &w.output {
            let cm = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": output_name(&w.name),
                    "namespace": w.namespace,
                    "labels": {"app.kubernetes.io/managed-by": MANAGER, "dispy.io/job": w.name},
                    "ownerReferences": [owner(&w.name, &w.uid)],
                },
                "data": output,
            });
            Api::<ConfigMap>::namespaced(self.client.clone(), &w.namespace)
                .patch(&output_name(&w.name), &apply, &Patch::Apply(&cm))
                .await
                .map_err(|e| describe(&e, "output ConfigMap"))?;
        }
        if !w.files.is_empty() {
            self.add_files(&w)
                .await
                .map_err(|e| describe(&e, "files ConfigMap"))?;
        }
        let result = apply_job_status(&self.client, &w.namespace, &w.name, &w.status).await;
        self.metrics.status_writes.inc();
        result.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => StoreError::Gone,
            e => describe(&e, "status"),
        })
    }

    /// Writes an array's result ConfigMaps (each whole, server-side apply), then its status.
    pub async fn store_array(
        &self,
        w: crate::engine::arrays::ArrayWrite,
    ) -> Result<(), StoreError> {
        use dispy_core::manifest::{DispyJobArrayResource, JOB_ARRAY_LABEL, RESULTS_KEY};
        let _permit = self.permits.acquire().await.expect("never closed");
        let apply = PatchParams::apply(MANAGER).force();
        let config_maps = Api::<ConfigMap>::namespaced(self.client.clone(), &w.namespace);
        for (n, text) in &w.chunks {
            let name = dispy_core::array::chunk_name(&w.name, *n);
            let cm = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": w.namespace,
                    "labels": {"app.kubernetes.io/managed-by": MANAGER, JOB_ARRAY_LABEL: w.name},
                    "ownerReferences": [{
                        "apiVersion": "dispy.io/v1alpha1",
                        "kind": "DispyJobArray",
                        "name": w.name,
                        "uid": w.uid,
                        "controller": true,
                        // Not blocking: that would need update on dispyjobarrays/finalizers.
                        "blockOwnerDeletion": false,
                    }],
                },
                "data": {RESULTS_KEY: text},
            });
            config_maps
                .patch(&name, &apply, &Patch::Apply(&cm))
                .await
                .map_err(|e| describe(&e, "result ConfigMap"))?;
        }
        let result =
            apply_status::<DispyJobArrayResource>(&self.client, &w.namespace, &w.name, &w.status)
                .await;
        self.metrics.status_writes.inc();
        result.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => StoreError::Gone,
            e => describe(&e, "status"),
        })
    }

    /// Adds files to the job's files ConfigMap (a merge: the files stored before stay),
    /// creating it the first time.
    async fn add_files(&self, w: &Write) -> Result<(), kube::Error> {
        let name = files_name(&w.name);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(w.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        MANAGER.to_string(),
                    ),
                    ("dispy.io/job".to_string(), w.name.clone()),
                ])),
                owner_references: Some(vec![owner(&w.name, &w.uid)]),
                ..Default::default()
            },
            binary_data: Some(
                w.files
                    .iter()
                    .map(|(k, data)| (k.clone(), ByteString(data.clone())))
                    .collect(),
            ),
            ..Default::default()
        };
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &w.namespace);
        match api.create(&PostParams::default(), &cm).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            other => return other.map(|_| ()),
        }
        // It exists: merge into it only if it is this job's (a ConfigMap of that name made by
        // someone else is not taken over, nor handed to the job's garbage collection).
        let existing = api.get(&name).await?;
        let ours = existing
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == w.uid);
        if !ours {
            tracing::warn!(job = %w.name, "ConfigMap {name} exists and is not the job's: its sent files are not stored");
            return Ok(());
        }
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&cm))
            .await
            .map(|_| ())
    }

    /// A routine Event (a job's Normal one): published only within the budget.
    pub fn routine_event(&self, reference: ObjectReference, reason: &str, note: String) {
        if !self.budget.lock().unwrap().take(Instant::now()) {
            self.metrics.events_skipped.inc();
            return;
        }
        self.publish(reference, reason, note, false);
    }

    pub fn publish(&self, reference: ObjectReference, reason: &str, note: String, warning: bool) {
        let mut note = note;
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if self.events.try_send((reference, event)).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

/// A dispy.io object, for Events.
pub fn reference(kind: &str, namespace: &str, name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("dispy.io/v1alpha1".into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: Some(uid.into()),
        ..Default::default()
    }
}

/// Writes a DispyJob's whole status by server-side apply (field manager `dispy-operator`).
pub async fn apply_job_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &DispyJobStatus,
) -> Result<(), kube::Error> {
    apply_status::<DispyJobResource>(client, namespace, name, status).await
}

/// Writes a dispy.io object's whole status by server-side apply (field manager
/// `dispy-operator`).
pub async fn apply_status<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &impl k8s_openapi::serde::Serialize,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    Api::<K>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
}

fn owner(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "dispy.io/v1alpha1".into(),
        kind: "DispyJob".into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A failed write of anything but the status itself (a missing ConfigMap's namespace, say)
/// is retried; only the DispyJob's own absence means it is gone.
fn describe(e: &kube::Error, what: &str) -> StoreError {
    StoreError::Failed(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::Budget;
    use std::time::{Duration, Instant};

    #[test]
    fn the_event_budget_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(5.0, 3);
        let burst = (0..10).filter(|_| b.take(t0)).count();
        assert_eq!(burst, 3, "the burst, then nothing at the same instant");
        // 5 a second: one more token every 200 ms.
        assert!(!b.take(t0 + Duration::from_millis(100)));
        assert!(b.take(t0 + Duration::from_millis(210)));
        assert!(!b.take(t0 + Duration::from_millis(220)));
        // A long pause saves up no more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
        // Rate 0: the burst only.
        let mut none = Budget::new(0.0, 2);
        assert_eq!((0..5).filter(|_| none.take(later)).count(), 2);
    }
}
