//! The one task that talks to the nodes. It owns core's scheduler (the same one `dispy run`
//! uses) and a connection to every node of every JobCluster; the controllers tell it what the
//! API server holds ([`Input::Cluster`], [`Input::Job`], deletions) and it writes DispyJob
//! statuses back.
//!
//! Restart safety rests on three rules:
//! - a DispyJob's id on the nodes comes from its uid, so any operator instance names it alike;
//! - a result is acknowledged to its node only after its terminal status is stored, so a
//!   result the old instance never stored is resent to the new one;
//! - jobs of a cluster are scheduled only once every node of the cluster has been asked which
//!   of its jobs it holds (`attach`): those are adopted where they are, never sent again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispy_core::job::{JobResult, JobStatus};
use dispy_core::manifest::{rfc3339, DispyJobStatus, JobCounts, NodeSummary};
use dispy_core::protocol::{
    Computation, ComputeRequest, ErrorCode, JobEventKind, JobRequest, JobState as NodeJobState,
};
use dispy_core::scheduler::{Action, ClusterPolicy, Event, JobKey, JobSpec, NodeId, Scheduler};
use dispy_core::{ClientConfig, ClientEvent, NodeClient};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::writer::{Write, Writer};

/// A file as (name, contents).
pub type File = (String, Vec<u8>);
/// How long a status that is not terminal waits before it is written (a job that ends
/// meanwhile has only its end written).
const NOT_TERMINAL_DELAY: Duration = Duration::from_secs(1);
/// Jobs going to one node in one submit.
type Batch = Vec<(JobKey, Arc<JobInfo>)>;

/// A JobCluster as the engine needs it, read from the API server by its controller.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterInfo {
    /// The computation's name on the nodes and the scheduler's cluster id:
    /// `namespace/name/uid-prefix`, so a re-created JobCluster is a new computation.
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub computation: Option<Computation>,
    pub files: Vec<File>,
    pub policy: ClusterPolicy,
    pub suspended: bool,
    pub secret: String,
    /// `spec.tls`: the nodes' certificate (PEM), which the engine pins.
    pub tls_cert: Option<Vec<u8>>,
    pub pulse_interval: Duration,
    /// Node addresses (`host:port`) with the pod behind each, if any.
    pub nodes: BTreeMap<NodeId, Option<String>>,
}

/// A DispyJob as the engine needs it.
#[derive(Clone, Debug)]
pub struct JobInfo {
    pub key: JobKey,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub request: JobRequest,
    pub files: Vec<File>,
    /// `spec.node`: a node name, pod name or address.
    pub node: Option<String>,
    pub deadline: Option<Duration>,
    /// The status stored in the API server when the controller read the object.
    pub stored: DispyJobStatus,
}

/// What the engine reports for a JobCluster's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterStats {
    pub nodes: Vec<NodeSummary>,
    pub cpus: u32,
    pub busy: u32,
    pub counts: JobCounts,
}

pub enum Input {
    Cluster(Box<ClusterInfo>),
    /// The JobCluster is being deleted: cancel its jobs, close the computation on every node
    /// (cleanup runs), then reply.
    ClusterGone {
        id: String,
        reply: oneshot::Sender<()>,
    },
    Job(Box<JobInfo>),
    /// The DispyJob is being deleted: terminate it on its node and reply once it has stopped.
    JobGone {
        key: JobKey,
        reply: oneshot::Sender<()>,
    },
    Connected {
        node: NodeId,
        result: Result<NodeClient, String>,
    },
    FromNode(NodeId, ClientEvent),
    SetUp {
        cluster: String,
        node: NodeId,
        result: Result<Vec<NodeJobState>, String>,
    },
    Submitted {
        key: JobKey,
        node: NodeId,
        error: Option<String>,
    },
    Written {
        key: JobKey,
        terminal: bool,
        /// The sent files the write carried, by key and event number.
        files: Vec<(String, u64)>,
        result: Result<(), String>,
    },
    /// Reply once no status write is in flight or waiting (graceful shutdown).
    Drain {
        reply: oneshot::Sender<()>,
    },
}

/// What the controllers hold to talk to the engine.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Input>,
    stats: Arc<Mutex<HashMap<String, ClusterStats>>>,
    /// Jobs the engine has been given (and not told gone): sending them again changes nothing.
    known: Arc<Mutex<HashSet<JobKey>>>,
}

impl Handle {
    pub fn send(&self, input: Input) {
        let _ = self.tx.send(input);
    }

    /// Whether the engine already has this job: the controller then need not read its
    /// ConfigMaps and send it again.
    pub fn knows(&self, key: &JobKey) -> bool {
        self.known.lock().unwrap().contains(key)
    }

    /// Stats of the JobCluster `namespace/name`.
    pub fn stats(&self, cluster: &str) -> ClusterStats {
        self.stats
            .lock()
            .unwrap()
            .get(cluster)
            .cloned()
            .unwrap_or_default()
    }

    /// Sends `make(reply)` and waits for the reply, at most `limit`.
    pub async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<()>) -> Input,
        limit: Duration,
    ) -> bool {
        let (reply, done) = oneshot::channel();
        self.send(make(reply));
        matches!(tokio::time::timeout(limit, done).await, Ok(Ok(())))
    }
}

/// Where a JobCluster is on its way to scheduling jobs.
struct Cluster {
    info: ClusterInfo,
    /// Nodes not yet asked which of this cluster's jobs they hold; jobs wait until none is left.
    unsynced: BTreeSet<NodeId>,
    /// Jobs that arrived before the cluster was synced.
    parked: Vec<JobInfo>,
    /// Nodes where the computation is set up.
    ready_on: BTreeSet<NodeId>,
}

struct Conn {
    client: Option<NodeClient>,
    name: String,
    connecting: bool,
    retry_at: Option<Instant>,
    /// Clusters whose computation is being set up on the node.
    setting_up: BTreeSet<String>,
}

/// What the engine knows of a job.
struct View {
    info: Arc<JobInfo>,
    status: DispyJobStatus,
    /// The whole output, when the status holds only part of it (until it is stored).
    output: Option<BTreeMap<String, String>>,
    /// Sent files not stored yet, by their key in the files ConfigMap, with the number of the
    /// event that brought each (a newer copy under the same key is not taken for stored).
    unsaved_files: BTreeMap<String, (u64, Vec<u8>)>,
    files_received: u64,
    /// The node to acknowledge the result to once the terminal status is stored.
    ack: Option<NodeId>,
    waiting: Option<(String, String)>,
}

pub struct Engine {
    rx: mpsc::UnboundedReceiver<Input>,
    tx: mpsc::UnboundedSender<Input>,
    stats: Arc<Mutex<HashMap<String, ClusterStats>>>,
    writer: Writer,
    metrics: Arc<Metrics>,
    /// Told the `namespace/name` of a JobCluster whose stats changed.
    changed: mpsc::UnboundedSender<(String, String)>,
    sched: Scheduler,
    epoch: Instant,
    clusters: HashMap<String, Cluster>,
    nodes: HashMap<NodeId, Conn>,
    jobs: HashMap<JobKey, View>,
    /// Jobs by cluster with their last known status, terminal ones included (for counts and so
    /// a stale read of a finished job never schedules it again).
    known: HashMap<String, BTreeMap<JobKey, JobStatus>>,
    /// The keys of `known`, shared with the controllers ([`Handle::knows`]).
    known_keys: Arc<Mutex<HashSet<JobKey>>>,
    /// Jobs nodes reported holding when asked (`attach`), not yet claimed by a DispyJob.
    found: HashMap<JobKey, (NodeId, JobStatus)>,
    /// Results of jobs not yet known (resent by a node before the DispyJob was read).
    early: HashMap<JobKey, (NodeId, JobResult)>,
    in_flight: HashSet<JobKey>,
    pending: HashMap<JobKey, Instant>,
    gone_waiters: HashMap<JobKey, Vec<oneshot::Sender<()>>>,
    dispatched_at: HashMap<JobKey, Instant>,
    /// Jobs of clusters not (yet) sent by the JobCluster controller.
    orphans: HashMap<String, Vec<JobInfo>>,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

/// Starts the engine; the returned handle is how controllers reach it.
pub fn start(
    writer: Writer,
    metrics: Arc<Metrics>,
    changed: mpsc::UnboundedSender<(String, String)>,
) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(HashMap::new()));
    let known = Arc::new(Mutex::new(HashSet::new()));
    let engine = Engine {
        rx,
        tx: tx.clone(),
        stats: stats.clone(),
        writer,
        metrics,
        changed,
        sched: Scheduler::new(),
        epoch: Instant::now(),
        clusters: HashMap::new(),
        nodes: HashMap::new(),
        jobs: HashMap::new(),
        known: HashMap::new(),
        known_keys: known.clone(),
        found: HashMap::new(),
        early: HashMap::new(),
        in_flight: HashSet::new(),
        pending: HashMap::new(),
        gone_waiters: HashMap::new(),
        dispatched_at: HashMap::new(),
        orphans: HashMap::new(),
        drain_waiters: Vec::new(),
    };
    tokio::spawn(engine.run());
    Handle { tx, stats, known }
}

impl Engine {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                input = self.rx.recv() => match input {
                    Some(input) => self.input(input),
                    None => return,
                },
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn handle(&mut self, event: Event) {
        let actions = self.sched.handle(self.now(), event);
        self.act(actions);
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Cluster(info) => self.cluster(*info),
            Input::ClusterGone { id, reply } => self.cluster_gone(id, reply),
            Input::Job(info) => self.job(*info),
            Input::JobGone { key, reply } => self.job_gone(key, reply),
            Input::Connected { node, result } => self.connected(node, result),
            Input::FromNode(node, event) => self.node_event(node, event),
            Input::SetUp {
                cluster,
                node,
                result,
            } => self.set_up(cluster, node, result),
            Input::Submitted { key, node, error } => {
                if let Some(reason) = error {
                    self.handle(Event::DispatchFailed { key, node, reason });
                }
            }
            Input::Written {
                key,
                terminal,
                files,
                result,
            } => self.written(key, terminal, files, result),
            Input::Drain { reply } => self.drain_waiters.push(reply),
        }
        if !self.drain_waiters.is_empty() && self.in_flight.is_empty() && self.pending.is_empty() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    // --- clusters and nodes ---------------------------------------------------------------

    fn cluster(&mut self, info: ClusterInfo) {
        let id = info.id.clone();
        let previous = self.clusters.get(&id).map(|c| c.info.clone());
        if previous.as_ref() == Some(&info) {
            return;
        }
        if previous.as_ref().map(|p| &p.policy) != Some(&info.policy) {
            self.handle(Event::ClusterAdded {
                cluster: id.clone(),
                policy: info.policy.clone(),
            });
        }
        if previous.as_ref().map(|p| p.suspended) != Some(info.suspended) {
            self.handle(Event::SuspendCluster {
                cluster: id.clone(),
                suspended: info.suspended,
            });
        }
        let old_nodes: BTreeSet<NodeId> = previous
            .map(|p| p.nodes.keys().cloned().collect())
            .unwrap_or_default();
        let new_nodes: BTreeSet<NodeId> = info.nodes.keys().cloned().collect();
        let first = !self.clusters.contains_key(&id);
        let cluster = self.clusters.entry(id.clone()).or_insert_with(|| Cluster {
            info: info.clone(),
            unsynced: new_nodes.clone(),
            parked: Vec::new(),
            ready_on: BTreeSet::new(),
        });
        cluster.info = info;
        if first {
            tracing::info!(cluster = %id, nodes = new_nodes.len(), "cluster known");
            cluster.parked = self.orphans.remove(&id).unwrap_or_default();
        }
        for gone in old_nodes.difference(&new_nodes) {
            cluster.ready_on.remove(gone);
            cluster.unsynced.remove(gone);
        }
        for gone in old_nodes.difference(&new_nodes) {
            if !self.wanted(gone) {
                self.drop_node(gone, "its node pod is gone".into());
            }
        }
        if cluster_has_computation(&self.clusters[&id]) {
            for node in &new_nodes {
                self.ensure_node(node);
            }
        } else {
            // A node pool: nothing to set up, nothing to schedule.
            self.clusters.get_mut(&id).unwrap().unsynced.clear();
        }
        self.maybe_synced(&id);
        self.publish_stats();
    }

    /// Is any cluster still using the node?
    fn wanted(&self, node: &str) -> bool {
        self.clusters
            .values()
            .any(|c| c.info.nodes.contains_key(node) && cluster_has_computation(c))
    }

    fn ensure_node(&mut self, node: &NodeId) {
        match self.nodes.get(node) {
            None => {
                self.nodes.insert(
                    node.clone(),
                    Conn {
                        client: None,
                        name: node.clone(),
                        connecting: false,
                        retry_at: None,
                        setting_up: BTreeSet::new(),
                    },
                );
                self.connect(node);
            }
            Some(conn) if conn.client.is_some() => self.set_up_clusters(node),
            Some(_) => {}
        }
    }

    fn connect(&mut self, node: &NodeId) {
        let Some(conn) = self.nodes.get_mut(node) else {
            return;
        };
        if conn.connecting || conn.client.is_some() {
            return;
        }
        let Some(cluster) = self
            .clusters
            .values()
            .find(|c| c.info.nodes.contains_key(node))
        else {
            return;
        };
        let tls = match &cluster.info.tls_cert {
            None => None,
            Some(pem) => {
                let trust = dispy_core::tls::Trust::PinnedPem {
                    pem: pem.clone(),
                    source: format!("the TLS Secret of {}", cluster.info.name),
                };
                match dispy_core::tls::client_config(&trust) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(%node, "cannot use the cluster's TLS certificate: {e}");
                        conn.retry_at = Some(Instant::now() + Duration::from_secs(10));
                        return;
                    }
                }
            }
        };
        conn.connecting = true;
        conn.retry_at = None;
        let config = ClientConfig {
            tls,
            secret: cluster.info.secret.clone(),
            name: format!("dispy-operator ({})", std::process::id()),
            pulse_interval: cluster.info.pulse_interval,
            connect_timeout: Duration::from_secs(5),
            // The same JobCluster gives the same owner, so a restarted operator re-attaches to
            // the computations its predecessor created, and no other client can.
            owner: dispy_core::auth::owner_credential(&cluster.info.secret, &cluster.info.id),
            ..Default::default()
        };
        let (tx, node) = (self.tx.clone(), node.clone());
        tokio::spawn(async move {
            match NodeClient::connect(&node, &config).await {
                Ok((client, mut events)) => {
                    let _ = tx.send(Input::Connected {
                        node: node.clone(),
                        result: Ok(client),
                    });
                    while let Some(ev) = events.recv().await {
                        if tx.send(Input::FromNode(node.clone(), ev)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Input::Connected {
                        node,
                        result: Err(e.to_string()),
                    });
                }
            }
        });
    }

    fn connected(&mut self, node: NodeId, result: Result<NodeClient, String>) {
        let wanted = self.wanted(&node);
        let Some(conn) = self.nodes.get_mut(&node) else {
            return;
        };
        conn.connecting = false;
        match result {
            Ok(client) if wanted => {
                conn.name = client.info().name.clone();
                let cpus = client.info().cpus;
                tracing::info!(%node, name = %conn.name, cpus, "node connected");
                conn.client = Some(client);
                self.metrics.nodes_up.inc();
                let note = format!("node {} ({node}, {cpus} cpus) connected", conn.name);
                self.cluster_event(&node, "NodeJoined", &note, false);
                self.handle(Event::NodeUp {
                    node: node.clone(),
                    cpus,
                });
                self.set_up_clusters(&node);
            }
            Ok(_) => {
                self.nodes.remove(&node);
            }
            Err(e) => {
                tracing::info!(%node, "cannot connect yet: {e}");
                conn.retry_at = Some(Instant::now() + Duration::from_secs(2));
                // A node that cannot be reached holds nothing we could adopt.
                let clusters: Vec<String> = self
                    .clusters
                    .iter_mut()
                    .filter_map(|(id, c)| c.unsynced.remove(&node).then(|| id.clone()))
                    .collect();
                for id in clusters {
                    self.maybe_synced(&id);
                }
            }
        }
        self.publish_stats();
    }

    /// Sends every cluster that wants the node its computation, files and setup.
    fn set_up_clusters(&mut self, node: &NodeId) {
        let Some(client) = self.nodes.get(node).and_then(|c| c.client.clone()) else {
            return;
        };
        let todo: Vec<ClusterInfo> = self
            .clusters
            .values()
            .filter(|c| c.info.nodes.contains_key(node) && !c.ready_on.contains(node))
            .filter(|c| cluster_has_computation(c))
            .map(|c| c.info.clone())
            .collect();
        let conn = self.nodes.get_mut(node).unwrap();
        for info in todo {
            if !conn.setting_up.insert(info.id.clone()) {
                continue;
            }
            let (client, tx, node) = (client.clone(), self.tx.clone(), node.clone());
            tokio::spawn(async move {
                let result = set_up_on(&client, &info).await;
                let _ = tx.send(Input::SetUp {
                    cluster: info.id,
                    node,
                    result,
                });
            });
        }
    }

    fn set_up(&mut self, id: String, node: NodeId, result: Result<Vec<NodeJobState>, String>) {
        if let Some(conn) = self.nodes.get_mut(&node) {
            conn.setting_up.remove(&id);
        }
        let Some(cluster) = self.clusters.get_mut(&id) else {
            return;
        };
        cluster.unsynced.remove(&node);
        match result {
            Ok(held) => {
                if !held.is_empty() {
                    tracing::info!(cluster = %id, %node, jobs = held.len(), "re-attached to jobs the node holds");
                }
                for j in held {
                    self.found
                        .insert(JobKey::new(id.clone(), j.id), (node.clone(), j.status));
                }
                cluster.ready_on.insert(node.clone());
                self.handle(Event::ClusterReady {
                    cluster: id.clone(),
                    node,
                });
            }
            Err(e) => {
                tracing::warn!(cluster = %id, %node, "setting up the computation failed: {e}");
            }
        }
        self.maybe_synced(&id);
        self.publish_stats();
    }

    /// Once every node was asked what it holds, the cluster's waiting jobs go in.
    fn maybe_synced(&mut self, id: &str) {
        let Some(cluster) = self.clusters.get_mut(id) else {
            return;
        };
        if !cluster.unsynced.is_empty() || cluster.parked.is_empty() {
            return;
        }
        for job in std::mem::take(&mut cluster.parked) {
            self.admit(job);
        }
    }

    fn drop_node(&mut self, node: &str, reason: String) {
        if let Some(conn) = self.nodes.remove(node) {
            if conn.client.is_some() {
                self.metrics.nodes_up.dec();
                self.handle(Event::NodeLost {
                    node: node.to_string(),
                    reason,
                });
            }
        }
        for c in self.clusters.values_mut() {
            c.ready_on.remove(node);
        }
    }

    fn cluster_gone(&mut self, id: String, reply: oneshot::Sender<()>) {
        let Some(cluster) = self.clusters.remove(&id) else {
            let _ = reply.send(());
            return;
        };
        tracing::info!(cluster = %id, "JobCluster deleted: closing its computation");
        let open: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(k, v)| k.cluster == id && !v.status.status.is_terminal())
            .map(|(k, _)| k.clone())
            .collect();
        for key in open {
            if let Some(v) = self.jobs.get_mut(&key) {
                v.status.message = Some("its JobCluster was deleted".into());
            }
            self.handle(Event::CancelRequested { key });
        }
        let clients: Vec<NodeClient> = cluster
            .ready_on
            .iter()
            .filter_map(|n| self.nodes.get(n).and_then(|c| c.client.clone()))
            .collect();
        for node in cluster.info.nodes.keys() {
            if !self.wanted(node) {
                self.drop_node(node, "its JobCluster was deleted".into());
            }
        }
        self.stats
            .lock()
            .unwrap()
            .remove(&format!("{}/{}", cluster.info.namespace, cluster.info.name));
        tokio::spawn(async move {
            let closes = clients.into_iter().map(|c| {
                let id = id.clone();
                async move {
                    if let Err(e) = c.close(&id, true).await {
                        tracing::warn!(node = %c.addr(), "closing {id}: {e}");
                    }
                }
            });
            futures::future::join_all(closes).await;
            let _ = reply.send(());
        });
    }

    // --- jobs -----------------------------------------------------------------------------

    fn job(&mut self, info: JobInfo) {
        let key = info.key.clone();
        let seen = self
            .known
            .get(&key.cluster)
            .and_then(|m| m.get(&key))
            .copied();
        if seen.is_some() {
            return;
        }
        self.set_known(&key, info.stored.status);
        if info.stored.status.is_terminal() {
            return;
        }
        match self.clusters.get_mut(&key.cluster) {
            Some(c) if c.unsynced.is_empty() => self.admit(info),
            Some(c) => c.parked.push(info),
            None => self
                .orphans
                .entry(key.cluster.clone())
                .or_default()
                .push(info),
        }
    }

    fn set_known(&mut self, key: &JobKey, status: JobStatus) {
        let old = self
            .known
            .entry(key.cluster.clone())
            .or_default()
            .insert(key.clone(), status);
        if old.is_none() {
            self.known_keys.lock().unwrap().insert(key.clone());
        }
        self.metrics.job_status(old, Some(status));
    }

    fn set_known_remove(&mut self, key: &JobKey) {
        let old = self.known.get_mut(&key.cluster).and_then(|m| m.remove(key));
        self.metrics.job_status(old, None);
        self.known_keys.lock().unwrap().remove(key);
    }

    /// A job of a synced cluster enters the scheduler: adopted where a node holds it, or new.
    fn admit(&mut self, info: JobInfo) {
        let key = info.key.clone();
        let stored = info.stored.clone();
        let pin = info
            .node
            .as_ref()
            .map(|n| (n.clone(), self.resolve_node(&key.cluster, n)));
        let waiting = match &pin {
            Some((want, None)) => Some((
                "NodeNotFound".to_string(),
                format!(
                    "spec.node {want:?} is none of the cluster's nodes ({}); the job waits for it",
                    self.node_list(&key.cluster)
                ),
            )),
            _ => None,
        };
        let spec = JobSpec {
            key: key.clone(),
            node: pin.map(|(want, found)| found.unwrap_or_else(|| crate::with_port(&want))),
            active_deadline: info.deadline,
        };
        let event = match self.found.remove(&key) {
            Some((node, held)) => Event::JobAdopted {
                spec,
                attempts: stored.attempts.max(1),
                node: Some(node),
                running: held != JobStatus::Created,
            },
            None if stored.status == JobStatus::Running => Event::JobAdopted {
                spec,
                attempts: stored.attempts.max(1),
                node: None,
                running: true,
            },
            None if stored.attempts > 0 => Event::JobAdopted {
                spec,
                attempts: stored.attempts,
                node: None,
                running: false,
            },
            None => Event::JobSubmitted(spec),
        };
        self.jobs.insert(
            key.clone(),
            View {
                info: Arc::new(info),
                status: stored,
                output: None,
                unsaved_files: BTreeMap::new(),
                files_received: 0,
                ack: None,
                waiting,
            },
        );
        self.dispatched_at.insert(key.clone(), Instant::now());
        if let Some(v) = self.jobs.get_mut(&key) {
            if let Some((_, why)) = &v.waiting {
                v.status.message = Some(why.clone());
                self.write(&key);
            }
        }
        self.handle(event);
        if let Some((node, result)) = self.early.remove(&key) {
            self.done(node, key, result);
        }
    }

    /// A pinned job's `node` (pod name, node name or address) as a node address, if it is one
    /// of the cluster's nodes.
    fn resolve_node(&self, cluster: &str, want: &str) -> Option<NodeId> {
        let c = self.clusters.get(cluster)?;
        c.info
            .nodes
            .iter()
            .find(|(addr, pod)| {
                *addr == want
                    || **addr == crate::with_port(want)
                    || pod.as_deref() == Some(want)
                    || self.nodes.get(*addr).is_some_and(|n| n.name == want)
            })
            .map(|(addr, _)| addr.clone())
    }

    fn node_list(&self, cluster: &str) -> String {
        let Some(c) = self.clusters.get(cluster) else {
            return "none".into();
        };
        let names: Vec<String> = c
            .info
            .nodes
            .iter()
            .map(|(addr, pod)| match pod {
                Some(pod) => format!("{pod} at {addr}"),
                None => addr.clone(),
            })
            .collect();
        if names.is_empty() {
            "none yet".into()
        } else {
            names.join(", ")
        }
    }

    fn job_gone(&mut self, key: JobKey, reply: oneshot::Sender<()>) {
        // Not admitted yet: it never reached a node.
        for list in self
            .clusters
            .values_mut()
            .map(|c| &mut c.parked)
            .chain(self.orphans.values_mut())
        {
            list.retain(|j| j.key != key);
        }
        let open = self
            .sched
            .job(&key)
            .is_some_and(|r| !r.status().is_terminal());
        if open {
            if let Some(v) = self.jobs.get_mut(&key) {
                v.status.message = Some("the DispyJob was deleted".into());
            }
            self.gone_waiters
                .entry(key.clone())
                .or_default()
                .push(reply);
            self.handle(Event::CancelRequested { key });
        } else {
            self.forget(&key);
            let _ = reply.send(());
        }
    }

    fn forget(&mut self, key: &JobKey) {
        self.jobs.remove(key);
        self.sched.forget(key);
        self.set_known_remove(key);
        self.found.remove(key);
        self.dispatched_at.remove(key);
        self.pending.remove(key);
    }

    fn node_event(&mut self, node: NodeId, event: ClientEvent) {
        match event {
            ClientEvent::Job(ev) => {
                let key = JobKey::new(ev.computation, ev.job);
                match ev.kind {
                    JobEventKind::Running { start_time } => {
                        let current = self.sched.job(&key).and_then(|r| r.node().cloned());
                        if current.as_deref() == Some(node.as_str()) {
                            let (name, pod) = self.node_names(&key.cluster, &node);
                            if let Some(v) = self.jobs.get_mut(&key) {
                                if !v.status.status.is_terminal() {
                                    v.status.status = JobStatus::Running;
                                    v.status.node = Some(name);
                                    v.status.pod = pod;
                                    v.status.start_time = Some(rfc3339(start_time));
                                    v.status.message = None;
                                    self.write(&key);
                                }
                            }
                        }
                        self.handle(Event::JobStarted { key, node });
                    }
                    JobEventKind::Provisional { result } => {
                        if self.runs_on(&key, &node) {
                            if let Some(v) = self.jobs.get_mut(&key) {
                                crate::status::record_provisional_bounded(&mut v.status, &result);
                                self.write(&key);
                            }
                        }
                    }
                    JobEventKind::File(file) => {
                        if self.runs_on(&key, &node) {
                            self.sent_file(&key, file);
                        }
                    }
                    JobEventKind::Done(result) => self.done(node, key, result),
                }
            }
            ClientEvent::Disconnected { reason, .. } => {
                tracing::warn!(%node, "node lost: {reason}");
                if let Some(conn) = self.nodes.get_mut(&node) {
                    conn.client = None;
                    conn.setting_up.clear();
                    conn.retry_at = Some(Instant::now() + Duration::from_secs(2));
                    self.metrics.nodes_up.dec();
                }
                for c in self.clusters.values_mut() {
                    c.ready_on.remove(&node);
                }
                self.cluster_event(
                    &node,
                    "NodeLost",
                    &format!("node {node} lost: {reason}"),
                    true,
                );
                self.handle(Event::NodeLost { node, reason });
                self.publish_stats();
            }
            ClientEvent::Pulse { .. } => {}
        }
    }

    /// Whether `node` runs the job now (news from an earlier attempt's node is stale).
    fn runs_on(&self, key: &JobKey, node: &str) -> bool {
        self.sched
            .job(key)
            .and_then(|r| r.node().map(String::as_str))
            == Some(node)
    }

    /// A file the running job sent: into its files ConfigMap with its next status write, or
    /// listed as not kept when the ConfigMap has no room for it.
    fn sent_file(&mut self, key: &JobKey, file: dispy_core::protocol::SentFile) {
        let Some(v) = self.jobs.get_mut(key) else {
            return;
        };
        match crate::status::record_sent_file(&mut v.status, &file) {
            Some(cm_key) => {
                v.status.files_config_map = Some(crate::writer::files_name(&v.info.name));
                v.files_received += 1;
                v.unsaved_files
                    .insert(cm_key, (v.files_received, file.data));
            }
            None => {
                let note = format!(
                    "the sent file {} ({} bytes) does not fit in the job's files ConfigMap",
                    file.name,
                    file.data.len()
                );
                self.writer.event(&v.info, "FileNotKept", note, true);
            }
        }
        self.write(key);
    }

    fn node_names(&self, cluster: &str, node: &str) -> (String, Option<String>) {
        let name = self
            .nodes
            .get(node)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| node.to_string());
        let pod = self
            .clusters
            .get(cluster)
            .and_then(|c| c.info.nodes.get(node).cloned().flatten());
        (name, pod)
    }

    fn done(&mut self, node: NodeId, key: JobKey, result: JobResult) {
        if !self.jobs.contains_key(&key) {
            let known = self
                .known
                .get(&key.cluster)
                .and_then(|m| m.get(&key))
                .is_some_and(|s| s.is_terminal());
            if known {
                // Finished before (a stale resend): the stored status stands.
                self.ack(&node, &key);
            } else {
                self.early.insert(key, (node, result));
            }
            return;
        }
        let live = self
            .sched
            .job(&key)
            .is_some_and(|r| !r.status().is_terminal() && r.node() == Some(&node));
        if live {
            let (name, pod) = self.node_names(&key.cluster, &node);
            let v = self.jobs.get_mut(&key).unwrap();
            v.output = crate::status::record_bounded(&mut v.status, &result);
            v.status.node = Some(name);
            v.status.pod = pod;
            v.status.output_config_map = v
                .output
                .as_ref()
                .map(|_| crate::writer::output_name(&v.info.name));
            if v.status.message.as_deref() == Some("the DispyJob was deleted") {
                v.status.message = Some(format!(
                    "the DispyJob was deleted; {}",
                    result.status.as_str()
                ));
            }
            v.ack = Some(node.clone());
            self.write(&key);
        } else {
            self.ack(&node, &key);
        }
        self.handle(Event::JobDone {
            key,
            node,
            status: result.status,
        });
    }

    /// An Event on every JobCluster using the node.
    fn cluster_event(&self, node: &str, reason: &str, note: &str, warning: bool) {
        for c in self
            .clusters
            .values()
            .filter(|c| c.info.nodes.contains_key(node))
        {
            self.writer
                .cluster_event(&c.info, reason, note.to_string(), warning);
        }
    }

    fn ack(&self, node: &str, key: &JobKey) {
        if let Some(client) = self.nodes.get(node).and_then(|c| c.client.clone()) {
            let key = key.clone();
            tokio::spawn(async move {
                let _ = client.ack(&key.cluster, vec![key.job]).await;
            });
        }
    }

    fn act(&mut self, actions: Vec<Action>) {
        let mut batches: BTreeMap<(NodeId, String), Batch> = BTreeMap::new();
        for action in actions {
            match action {
                Action::Dispatch { key, node, attempt } => {
                    let Some(v) = self.jobs.get_mut(&key) else {
                        continue;
                    };
                    v.status.attempts = attempt;
                    v.waiting = None;
                    if let Some(at) = self.dispatched_at.remove(&key) {
                        self.metrics
                            .scheduling_latency
                            .observe(at.elapsed().as_secs_f64());
                    }
                    batches
                        .entry((node, key.cluster.clone()))
                        .or_default()
                        .push((key, v.info.clone()));
                }
                Action::Terminate { key, node, reason } => {
                    if let Some(v) = self.jobs.get_mut(&key) {
                        v.status.message.get_or_insert(reason);
                    }
                    if let Some(client) = self.nodes.get(&node).and_then(|c| c.client.clone()) {
                        tokio::spawn(async move {
                            let _ = client.cancel(&key.cluster, key.job).await;
                        });
                    }
                }
                Action::Requeued {
                    key,
                    attempt,
                    reason,
                } => {
                    if let Some(v) = self.jobs.get_mut(&key) {
                        tracing::info!(job = %v.info.name, "requeued: {reason}");
                        v.status.status = JobStatus::Created;
                        v.status.attempts = attempt;
                        v.status.message = Some(format!("requeued: {reason}"));
                        self.writer.event(
                            &v.info,
                            "Requeued",
                            format!("attempt {attempt} failed: {reason}"),
                            true,
                        );
                        self.dispatched_at.insert(key.clone(), Instant::now());
                        self.write(&key);
                    }
                }
                Action::Finalize {
                    key,
                    status,
                    reason,
                } => {
                    if let Some(v) = self.jobs.get_mut(&key) {
                        v.status.status = status;
                        v.status.end_time = Some(rfc3339(dispy_core::job::now_secs()));
                        let reason = match v.status.message.take() {
                            Some(m) if !reason.contains(&m) => format!("{m}: {reason}"),
                            _ => reason,
                        };
                        v.status.message = Some(reason);
                        self.write(&key);
                    }
                }
            }
        }
        for ((node, cluster), jobs) in batches {
            let client = self.nodes.get(&node).and_then(|c| c.client.clone());
            let tx = self.tx.clone();
            tokio::spawn(submit_batch(client, node, cluster, jobs, tx));
        }
    }

    /// Stores the job's status: one write per job at a time, the newest status wins. A status
    /// that is not terminal waits [`NOT_TERMINAL_DELAY`] first, so a short job costs one write
    /// (its end), not two.
    fn write(&mut self, key: &JobKey) {
        let Some(status) = self.jobs.get(key).map(|v| v.status.status) else {
            return;
        };
        self.set_known(key, status);
        if status.is_terminal() {
            self.finish_waiters(key);
            if self.in_flight.contains(key) {
                self.pending.insert(key.clone(), Instant::now());
            } else {
                self.pending.remove(key);
                self.flush(key);
            }
        } else {
            self.pending
                .entry(key.clone())
                .or_insert_with(|| Instant::now() + NOT_TERMINAL_DELAY);
        }
    }

    /// Sends the job's current status to the API server now.
    fn flush(&mut self, key: &JobKey) {
        let Some(v) = self.jobs.get_mut(key) else {
            return;
        };
        let now = rfc3339(dispy_core::job::now_secs());
        let waiting = v.waiting.as_ref().map(|(r, m)| (r.as_str(), m.as_str()));
        v.status.conditions =
            crate::status::conditions(&v.status, &v.status.conditions, &now, waiting);
        let write = Write {
            namespace: v.info.namespace.clone(),
            name: v.info.name.clone(),
            uid: v.info.uid.clone(),
            status: v.status.clone(),
            // Kept until stored: a failed write is retried with them.
            output: v.output.clone(),
            files: v
                .unsaved_files
                .iter()
                .map(|(k, (_, data))| (k.clone(), data.clone()))
                .collect(),
        };
        let files: Vec<(String, u64)> = v
            .unsaved_files
            .iter()
            .map(|(k, (n, _))| (k.clone(), *n))
            .collect();
        let terminal = v.status.status.is_terminal();
        if terminal {
            let (word, note) = (v.status.status.as_str(), v.status.message.clone());
            let note = note
                .unwrap_or_else(|| format!("on {}", v.status.node.as_deref().unwrap_or("no node")));
            self.writer
                .event(&v.info, word, note, v.status.status != JobStatus::Finished);
        } else if v.status.status == JobStatus::Running {
            let note = format!("on {}", v.status.node.as_deref().unwrap_or("?"));
            self.writer.event(&v.info, "Started", note, false);
        }
        self.in_flight.insert(key.clone());
        let (tx, key) = (self.tx.clone(), key.clone());
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let result = writer.store(write).await;
            let _ = tx.send(Input::Written {
                key,
                terminal,
                files,
                result,
            });
        });
    }

    fn finish_waiters(&mut self, key: &JobKey) {
        if let Some(waiters) = self.gone_waiters.remove(key) {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }

    fn written(
        &mut self,
        key: JobKey,
        terminal: bool,
        files: Vec<(String, u64)>,
        result: Result<(), String>,
    ) {
        self.in_flight.remove(&key);
        match result {
            Ok(()) => {
                if let Some(v) = self.jobs.get_mut(&key) {
                    v.output = None;
                    for (k, n) in files {
                        if v.unsaved_files.get(&k).is_some_and(|(m, _)| *m == n) {
                            v.unsaved_files.remove(&k);
                        }
                    }
                }
                if terminal {
                    if let Some(node) = self.jobs.get_mut(&key).and_then(|v| v.ack.take()) {
                        self.ack(&node, &key);
                    }
                }
            }
            Err(e) if e.contains("NotFound") => {
                // The DispyJob is gone (deleted without waiting for us).
                if let Some(node) = self.jobs.get_mut(&key).and_then(|v| v.ack.take()) {
                    self.ack(&node, &key);
                }
                let open = self
                    .sched
                    .job(&key)
                    .is_some_and(|r| !r.status().is_terminal());
                if open {
                    self.handle(Event::CancelRequested { key: key.clone() });
                } else {
                    self.forget(&key);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(%key, "storing the status failed (retrying): {e}");
                self.pending
                    .entry(key.clone())
                    .or_insert_with(|| Instant::now() + Duration::from_secs(1));
                return;
            }
        }
        if self
            .pending
            .get(&key)
            .is_some_and(|due| *due <= Instant::now())
        {
            self.pending.remove(&key);
            self.flush(&key);
        }
    }

    fn tick(&mut self) {
        self.handle(Event::Tick);
        let now = Instant::now();
        let due: Vec<JobKey> = self
            .pending
            .iter()
            .filter(|(k, at)| **at <= now && !self.in_flight.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.pending.remove(&key);
            self.flush(&key);
        }
        let retry: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, c)| c.retry_at.is_some_and(|at| at <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for node in retry {
            if self.wanted(&node) {
                self.connect(&node);
            } else {
                self.nodes.remove(&node);
            }
        }
        self.publish_stats();
    }

    /// Recomputes every cluster's stats; tells the JobCluster controller about changes.
    fn publish_stats(&mut self) {
        let mut stats = self.stats.lock().unwrap();
        for c in self.clusters.values() {
            let mut s = ClusterStats::default();
            for (addr, pod) in &c.info.nodes {
                let conn = self.nodes.get(addr);
                let load = self.sched.node_load(addr);
                let ready = c.ready_on.contains(addr);
                let (cpus, busy) = load.map(|l| (l.cpus, l.busy)).unwrap_or((0, 0));
                if ready {
                    s.cpus += cpus;
                    s.busy += busy;
                }
                if s.nodes.len() < 50 {
                    s.nodes.push(NodeSummary {
                        name: conn.map(|c| c.name.clone()).unwrap_or_else(|| addr.clone()),
                        address: addr.clone(),
                        pod: pod.clone(),
                        cpus,
                        busy,
                        ready: ready || !cluster_has_computation(c) && conn.is_none(),
                    });
                }
            }
            if let Some(jobs) = self.known.get(&c.info.id) {
                for status in jobs.values() {
                    let n = &mut s.counts;
                    match status {
                        JobStatus::Created => n.created += 1,
                        JobStatus::Running => n.running += 1,
                        JobStatus::Finished => n.finished += 1,
                        JobStatus::Terminated => n.terminated += 1,
                        JobStatus::Cancelled => n.cancelled += 1,
                        JobStatus::Abandoned => n.abandoned += 1,
                        _ => {}
                    }
                }
                s.counts.failed = s.counts.terminated + s.counts.cancelled + s.counts.abandoned;
            }
            let name = format!("{}/{}", c.info.namespace, c.info.name);
            if stats.get(&name) != Some(&s) {
                stats.insert(name, s);
                let _ = self
                    .changed
                    .send((c.info.namespace.clone(), c.info.name.clone()));
            }
        }
    }
}

fn cluster_has_computation(c: &Cluster) -> bool {
    c.info.computation.is_some()
}

/// Computation, files and setup on one node. A node that already has the computation (an
/// earlier operator instance sent it) is attached to instead; it reports the jobs it holds.
async fn set_up_on(client: &NodeClient, info: &ClusterInfo) -> Result<Vec<NodeJobState>, String> {
    let Some(spec) = info.computation.clone() else {
        return Ok(Vec::new());
    };
    let request = ComputeRequest {
        computation: info.id.clone(),
        spec,
        keep_files: false,
    };
    let held = match client.compute(request).await {
        Ok(()) => Vec::new(),
        Err(e) if e.node_code() == Some(ErrorCode::AlreadyExists) => {
            client.attach(&info.id).await.map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    for (name, data) in &info.files {
        client
            .send_file(&info.id, name, data, 0o644, None)
            .await
            .map_err(|e| format!("sending {name}: {e}"))?;
    }
    client.setup(&info.id).await.map_err(|e| e.to_string())?;
    Ok(held)
}

/// Sends the jobs' own files, then the jobs in one request; reports each refused job.
async fn submit_batch(
    client: Option<NodeClient>,
    node: NodeId,
    cluster: String,
    jobs: Batch,
    tx: mpsc::UnboundedSender<Input>,
) {
    let refuse = |key: JobKey, error: String| {
        let _ = tx.send(Input::Submitted {
            key,
            node: node.clone(),
            error: Some(error),
        });
    };
    let Some(client) = client else {
        for (key, _) in jobs {
            refuse(key, "the node is not connected".into());
        }
        return;
    };
    let mut requests = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    'jobs: for (key, info) in jobs {
        for (name, data) in &info.files {
            if let Err(e) = client
                .send_file(&cluster, name, data, 0o644, Some(key.job))
                .await
            {
                refuse(key, format!("sending {name}: {e}"));
                continue 'jobs;
            }
        }
        requests.push(info.request.clone());
        keys.push(key);
    }
    match client.submit_many(&cluster, requests).await {
        Ok(rejected) => {
            for r in rejected {
                refuse(JobKey::new(cluster.clone(), r.job), r.error.to_string());
            }
        }
        Err(e) => {
            for key in keys {
                refuse(key, e.to_string());
            }
        }
    }
}
