//! The engine's state: what the operator knows of every JobCluster, node and DispyJob, and
//! what it decides to do, as a sans-IO machine. [`EngineState::handle`] takes one [`Input`]
//! (what the controllers read, what a node said, how an IO step ended, the clock) and returns
//! the [`Effect`]s to carry out; nothing here does IO or reads a clock. It owns core's
//! scheduler, which decides placement; this layer adds what Kubernetes needs around it.
//!
//! Each DispyJob has one entry, [`Job`], holding all the engine knows of it: where it stands
//! ([`Stage`]), its status, what a node reported of it before it was admitted, its status
//! write, who waits for its deletion. Removing the entry forgets the job entirely.
//!
//! Rules that hold whatever the inputs (tested in this module, some on random sequences):
//! - restart safety: a job is scheduled only once every node of its cluster has been asked
//!   which of its jobs it holds (set up or attached); a job a node holds is adopted there and
//!   never submitted again; a result is acknowledged to its node only after the terminal
//!   status carrying it is stored, so a result no instance stored is resent to the next;
//! - a job's terminal status is stored once: after that store succeeds no other write of the
//!   job is made;
//! - one status write per job at a time, the newest status wins; a status that is not
//!   terminal waits [`NOT_TERMINAL_DELAY`], so a short job costs one write (its end);
//! - a job is on at most one node (the scheduler's rule; submissions follow its dispatches).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispy_core::driver::{NodeNames, NodeNews};
use dispy_core::job::{JobResult, JobStatus};
use dispy_core::manifest::{rfc3339, DispyJobStatus, JobCounts, NodeSummary};
use dispy_core::protocol::{JobState as HeldJob, SentFile};
use dispy_core::scheduler::{Action, ClusterId, Event, JobKey, JobSpec, NodeId, Scheduler};
use k8s_openapi::api::core::v1::ObjectReference;

use super::arrays::{Array, ArrayInfo, ArrayKey, ArrayWrite};
use super::{ClusterInfo, ClusterStats, JobInfo};
use crate::metrics::Metrics;
use crate::writer::{StoreError, Write};

/// How long a status that is not terminal waits before it is written (a job that ends
/// meanwhile has only its end written).
pub const NOT_TERMINAL_DELAY: Duration = Duration::from_secs(1);
/// Wait before retrying a failed status write, or a node that cannot be reached.
pub const RETRY: Duration = Duration::from_secs(2);
/// A computation whose set-up failed on a node is set up there again after this long (a
/// setup function that failed on a transient cause, a file the node could not write yet).
pub const SETUP_RETRY: Duration = Duration::from_secs(10);
/// Nodes listed per JobCluster in its status.
const NODES_SHOWN: usize = 50;

/// The clock, read by the IO layer: monotonic for delays, wall for the times in statuses.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub at: Instant,
    /// Seconds since the Unix epoch.
    pub unix: f64,
}

/// Someone waiting for a reply (a controller's deletion, a drain), by the IO layer's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplyTo(pub u64);

/// A node's greeting on a new connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub name: String,
    pub cpus: u32,
}

#[derive(Debug)]
pub enum Input {
    Cluster(Arc<ClusterInfo>),
    /// The JobCluster is being deleted: cancel its jobs, close the computation on every node
    /// (cleanup runs), then reply.
    ClusterGone {
        id: ClusterId,
        reply: ReplyTo,
    },
    Job(Arc<JobInfo>),
    /// The DispyJob is being deleted: terminate it on its node and reply once it has stopped.
    JobGone {
        key: JobKey,
        reply: ReplyTo,
    },
    /// Reply once no status write is in flight or waiting (graceful shutdown).
    Drain {
        reply: ReplyTo,
    },
    Connected {
        node: NodeId,
        result: Result<Hello, String>,
    },
    FromNode {
        node: NodeId,
        news: NodeNews,
    },
    SetUp {
        cluster: ClusterId,
        node: NodeId,
        /// The jobs the node holds of the computation (when it had it already).
        result: Result<Vec<HeldJob>, String>,
    },
    SubmitFailed {
        key: JobKey,
        node: NodeId,
        reason: String,
    },
    /// A DispyJobArray read for the first time (its args and what its result ConfigMaps hold).
    Array(Arc<ArrayInfo>),
    ArraySuspend {
        key: ArrayKey,
        suspended: bool,
    },
    /// The DispyJobArray is being deleted: terminate its running jobs, then reply.
    ArrayGone {
        key: ArrayKey,
        reply: ReplyTo,
    },
    ArrayWritten {
        key: ArrayKey,
        result: Result<(), StoreError>,
    },
    Written {
        key: JobKey,
        /// The sent files the write carried, by key and arrival number.
        files: Vec<(String, u64)>,
        result: Result<(), StoreError>,
    },
    /// Time passes: delayed writes, retries, deadlines.
    Tick,
}

/// What a connection to a node needs, from the first JobCluster that uses the node.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectSpec {
    pub secret: String,
    /// `spec.tls`: the nodes' certificate (PEM), pinned; and the cluster's name, for errors.
    pub tls_cert: Option<(Vec<u8>, String)>,
    pub pulse_interval: Duration,
    /// The owner credential: the same JobCluster gives the same owner, so a restarted
    /// operator re-attaches to the computations its predecessor created, and no other can.
    pub owner: String,
}

#[derive(Debug)]
pub enum Effect {
    Connect {
        node: NodeId,
        spec: ConnectSpec,
    },
    /// Close the connection (the node is no longer used, or not wanted).
    Disconnect {
        node: NodeId,
    },
    SetUp {
        node: NodeId,
        cluster: Arc<ClusterInfo>,
    },
    Submit {
        node: NodeId,
        cluster: ClusterId,
        jobs: Vec<Arc<JobInfo>>,
    },
    Cancel {
        node: NodeId,
        key: JobKey,
    },
    Ack {
        node: NodeId,
        key: JobKey,
    },
    /// Close the computation on these nodes (cleanup runs), then reply.
    Close {
        cluster: ClusterId,
        nodes: Vec<NodeId>,
        reply: ReplyTo,
    },
    Store {
        key: JobKey,
        write: Box<Write>,
        files: Vec<(String, u64)>,
    },
    /// A Kubernetes Event; `routine` ones (Normal, on a job) are subject to the Event budget.
    Event {
        on: ObjectReference,
        reason: String,
        note: String,
        warning: bool,
        routine: bool,
    },
    Reply(ReplyTo),
    /// A JobCluster's stats changed (None: the JobCluster is gone).
    Stats {
        namespace: String,
        name: String,
        stats: Option<ClusterStats>,
    },
    /// Whether the engine has the job (for the controllers' `Handle::knows`).
    Knows {
        key: JobKey,
        known: bool,
    },
    /// Write an array's result ConfigMaps and status.
    StoreArray {
        key: ArrayKey,
        write: Box<ArrayWrite>,
    },
    /// Whether the engine has the array (for `Handle::knows_array`).
    ArrayKnows {
        key: ArrayKey,
        known: bool,
    },
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Only a node has spoken of it (it holds it, or sent its result); no DispyJob read yet.
    NodeOnly,
    /// Its JobCluster is not known (yet).
    NoCluster,
    /// Its cluster's nodes are still being asked what they hold.
    Parked,
    /// In the scheduler.
    Admitted,
}

/// All the engine knows of one job.
#[derive(Debug)]
pub struct Job {
    pub stage: Stage,
    /// What the controller read; None while `NodeOnly`.
    pub info: Option<Arc<JobInfo>>,
    pub status: DispyJobStatus,
    /// The status last counted (metrics, the cluster's job counts).
    counted: Option<JobStatus>,
    /// Arrival order, so parked jobs go in as they came.
    seq: u64,
    /// A node reported holding it when asked (adopted there when admitted).
    held: Option<(NodeId, JobStatus)>,
    /// Its result, from a node, before the job was admitted.
    early: Option<(NodeId, JobResult)>,
    /// When it was last queued, for the scheduling latency.
    queued_at: Option<Instant>,
    /// Why it cannot be placed yet: (condition reason, message).
    waiting: Option<(String, String)>,
    /// The whole output, when the status holds only part of it (until it is stored).
    output: Option<BTreeMap<String, String>>,
    /// Sent files not stored yet, by key in the files ConfigMap, with their arrival number
    /// (a newer copy under the same key is not taken for stored).
    unsaved_files: BTreeMap<String, (u64, Vec<u8>)>,
    files_received: u64,
    /// A `FileNotKept` Warning was published.
    warned_files: bool,
    /// The node to acknowledge the result to once the terminal status is stored.
    ack: Option<NodeId>,
    /// A status write: due at this time (None: nothing to write).
    write_due: Option<Instant>,
    write_in_flight: bool,
    /// The terminal status is stored: nothing more is written.
    sealed: bool,
    /// The DispyJob is being deleted: these wait for the job to stop.
    deleted: Option<Vec<ReplyTo>>,
    /// A job of a DispyJobArray: the array and the index (no DispyJob is written for it).
    array: Option<(ArrayKey, u32)>,
    /// An array job's row, from its node's result.
    row: Option<dispy_core::manifest::ArrayResult>,
}

impl Job {
    /// Its terminal status is stored: nothing more is written, and what only a write or a
    /// dispatch reads (arguments, result, output) goes, so an operator that has run 100,000
    /// jobs holds little more than their names.
    fn seal(&mut self) {
        self.sealed = true;
        self.status = self.status.ended_summary();
        self.output = None;
        self.unsaved_files.clear();
        if let Some(info) = self.info.as_mut() {
            *info = Arc::new(info.ended());
        }
    }

    fn new(stage: Stage, seq: u64) -> Job {
        Job {
            stage,
            info: None,
            status: DispyJobStatus::default(),
            counted: None,
            seq,
            held: None,
            early: None,
            queued_at: None,
            waiting: None,
            output: None,
            unsaved_files: BTreeMap::new(),
            files_received: 0,
            warned_files: false,
            ack: None,
            write_due: None,
            write_in_flight: false,
            sealed: false,
            deleted: None,
            array: None,
            row: None,
        }
    }
}

/// A JobCluster on its way to scheduling jobs.
#[derive(Debug)]
struct Cluster {
    info: Arc<ClusterInfo>,
    /// Nodes not yet asked which of this cluster's jobs they hold; jobs wait until none is left.
    unsynced: BTreeSet<NodeId>,
    /// Nodes where the computation is set up.
    ready_on: BTreeSet<NodeId>,
}

impl Cluster {
    fn has_computation(&self) -> bool {
        self.info.computation.is_some()
    }
}

/// A node and the engine's connection to it.
#[derive(Debug)]
struct Node {
    /// The name it reports (its address until it has said).
    name: String,
    connected: bool,
    connecting: bool,
    retry_at: Option<Instant>,
    /// Clusters whose computation is being set up on it.
    setting_up: BTreeSet<ClusterId>,
    /// A set-up failed on it: when to set up again what is not (while it stays connected).
    setup_retry_at: Option<Instant>,
}

pub struct EngineState {
    sched: Scheduler,
    epoch: Instant,
    now: Now,
    metrics: Arc<Metrics>,
    clusters: HashMap<ClusterId, Cluster>,
    nodes: HashMap<NodeId, Node>,
    jobs: HashMap<JobKey, Job>,
    /// Jobs whose terminal status is stored (read so, or stored here), never in `jobs`: only
    /// their status is kept, for the counts and to acknowledge a result a node sends again.
    /// A namespace of 100,000 finished DispyJobs costs about 100 bytes each here.
    ended: HashMap<JobKey, JobStatus>,
    /// `ended` counted by cluster, so the stats do not walk it.
    ended_counts: HashMap<ClusterId, JobCounts>,
    /// JobClusters deleted (an id is never reused: it holds the uid): their jobs that end
    /// are not kept in `ended`, nobody reads their counts.
    gone: HashSet<ClusterId>,
    next_seq: u64,
    drains: Vec<ReplyTo>,
    /// The stats last published, by `namespace/name`.
    published: HashMap<String, ClusterStats>,
    arrays: HashMap<ArrayKey, Array>,
    /// Array jobs ended in this input: forgotten at its end, once the scheduler heard.
    forget_later: Vec<JobKey>,
    /// Arrays that may start more jobs at the end of this input.
    feed_later: BTreeSet<ArrayKey>,
    out: Vec<Effect>,
}

#[path = "array_state.rs"]
mod array_state;

impl EngineState {
    pub fn new(now: Now, metrics: Arc<Metrics>) -> EngineState {
        EngineState {
            sched: Scheduler::new(),
            epoch: now.at,
            now,
            metrics,
            clusters: HashMap::new(),
            nodes: HashMap::new(),
            jobs: HashMap::new(),
            ended: HashMap::new(),
            ended_counts: HashMap::new(),
            gone: HashSet::new(),
            next_seq: 0,
            drains: Vec::new(),
            published: HashMap::new(),
            arrays: HashMap::new(),
            forget_later: Vec::new(),
            feed_later: BTreeSet::new(),
            out: Vec::new(),
        }
    }

    /// Takes one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Now, input: Input) -> Vec<Effect> {
        self.now = now;
        match input {
            Input::Cluster(info) => self.cluster(info),
            Input::ClusterGone { id, reply } => self.cluster_gone(id, reply),
            Input::Job(info) => self.job(info),
            Input::JobGone { key, reply } => self.job_gone(key, reply),
            Input::Drain { reply } => self.drains.push(reply),
            Input::Connected { node, result } => self.connected(node, result),
            Input::FromNode { node, news } => self.news(node, news),
            Input::SetUp {
                cluster,
                node,
                result,
            } => self.set_up(cluster, node, result),
            Input::SubmitFailed { key, node, reason } => {
                self.schedule(Event::DispatchFailed { key, node, reason })
            }
            Input::Written { key, files, result } => self.written(key, files, result),
            Input::Array(info) => self.array(info),
            Input::ArraySuspend { key, suspended } => self.array_suspend(key, suspended),
            Input::ArrayGone { key, reply } => self.array_gone(key, reply),
            Input::ArrayWritten { key, result } => self.array_written(key, result),
            Input::Tick => self.tick(),
        }
        self.array_housekeeping();
        if !self.drains.is_empty()
            && !self
                .jobs
                .values()
                .any(|j| j.write_due.is_some() || j.write_in_flight)
            && !self.arrays_writing()
        {
            for reply in std::mem::take(&mut self.drains) {
                self.out.push(Effect::Reply(reply));
            }
        }
        std::mem::take(&mut self.out)
    }

    /// The job's entry, for tests and the IO layer's logs.
    pub fn job_entry(&self, key: &JobKey) -> Option<&Job> {
        self.jobs.get(key)
    }

    fn schedule(&mut self, event: Event) {
        let actions = self.sched.handle(self.now.at - self.epoch, event);
        self.act(actions);
    }

    // --- clusters and nodes ---------------------------------------------------------------

    fn cluster(&mut self, info: Arc<ClusterInfo>) {
        let id = info.id.clone();
        let previous = self.clusters.get(&id).map(|c| c.info.clone());
        if previous.as_deref() == Some(&*info) {
            return;
        }
        if previous.as_ref().map(|p| &p.policy) != Some(&info.policy) {
            self.schedule(Event::ClusterAdded {
                cluster: id.clone(),
                policy: info.policy.clone(),
            });
        }
        if previous.as_ref().map(|p| p.suspended) != Some(info.suspended) {
            self.schedule(Event::SuspendCluster {
                cluster: id.clone(),
                suspended: info.suspended,
            });
        }
        let old_nodes: BTreeSet<NodeId> = previous
            .map(|p| p.nodes.keys().cloned().collect())
            .unwrap_or_default();
        let new_nodes: BTreeSet<NodeId> = info.nodes.keys().cloned().collect();
        if !self.clusters.contains_key(&id) {
            tracing::info!(cluster = %id, nodes = new_nodes.len(), "cluster known");
            for job in self
                .jobs
                .iter_mut()
                .filter(|(k, _)| k.cluster == id)
                .map(|(_, j)| j)
            {
                if job.stage == Stage::NoCluster {
                    job.stage = Stage::Parked;
                }
            }
        }
        let cluster = self.clusters.entry(id.clone()).or_insert_with(|| Cluster {
            info: info.clone(),
            unsynced: new_nodes.clone(),
            ready_on: BTreeSet::new(),
        });
        cluster.info = info;
        for gone in old_nodes.difference(&new_nodes) {
            cluster.ready_on.remove(gone);
            cluster.unsynced.remove(gone);
        }
        for gone in old_nodes.difference(&new_nodes) {
            if !self.wanted(gone) {
                self.drop_node(gone, "its node pod is gone".into());
            }
        }
        if self.clusters[&id].has_computation() {
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

    /// Is any cluster with a computation still using the node?
    fn wanted(&self, node: &str) -> bool {
        self.clusters
            .values()
            .any(|c| c.info.nodes.contains_key(node) && c.has_computation())
    }

    fn ensure_node(&mut self, node: &NodeId) {
        match self.nodes.get(node) {
            None => {
                self.nodes.insert(
                    node.clone(),
                    Node {
                        name: node.clone(),
                        connected: false,
                        connecting: false,
                        retry_at: None,
                        setting_up: BTreeSet::new(),
                        setup_retry_at: None,
                    },
                );
                self.connect(node);
            }
            Some(n) if n.connected => self.set_up_clusters(node),
            Some(_) => {}
        }
    }

    fn connect(&mut self, node: &NodeId) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        if n.connecting || n.connected {
            return;
        }
        let Some(c) = self
            .clusters
            .values()
            .find(|c| c.info.nodes.contains_key(node))
        else {
            return;
        };
        let spec = ConnectSpec {
            secret: c.info.secret.clone(),
            tls_cert: c
                .info
                .tls_cert
                .clone()
                .map(|pem| (pem, c.info.name.clone())),
            pulse_interval: c.info.pulse_interval,
            owner: dispy_core::auth::owner_credential(&c.info.secret, &c.info.id),
        };
        n.connecting = true;
        n.retry_at = None;
        self.out.push(Effect::Connect {
            node: node.clone(),
            spec,
        });
    }

    fn connected(&mut self, node: NodeId, result: Result<Hello, String>) {
        let wanted = self.wanted(&node);
        let Some(n) = self.nodes.get_mut(&node) else {
            if result.is_ok() {
                self.out.push(Effect::Disconnect { node });
            }
            return;
        };
        n.connecting = false;
        match result {
            Ok(hello) if wanted => {
                tracing::info!(%node, name = %hello.name, cpus = hello.cpus, "node connected");
                n.name = hello.name;
                n.connected = true;
                self.metrics.nodes_up.inc();
                let note = format!("node {} ({node}, {} cpus) connected", n.name, hello.cpus);
                self.cluster_event(&node, "NodeJoined", note, false);
                self.schedule(Event::NodeUp {
                    node: node.clone(),
                    cpus: hello.cpus,
                });
                self.set_up_clusters(&node);
            }
            Ok(_) => {
                self.nodes.remove(&node);
                self.out.push(Effect::Disconnect { node });
            }
            Err(e) => {
                tracing::info!(%node, "cannot connect yet: {e}");
                n.retry_at = Some(self.now.at + RETRY);
                // A node that cannot be reached holds nothing we could adopt.
                let clusters: Vec<ClusterId> = self
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
        let Some(n) = self.nodes.get_mut(node).filter(|n| n.connected) else {
            return;
        };
        for c in self.clusters.values() {
            let todo = c.info.nodes.contains_key(node)
                && !c.ready_on.contains(node)
                && c.has_computation();
            if todo && n.setting_up.insert(c.info.id.clone()) {
                self.out.push(Effect::SetUp {
                    node: node.clone(),
                    cluster: c.info.clone(),
                });
            }
        }
    }

    fn set_up(&mut self, id: ClusterId, node: NodeId, result: Result<Vec<HeldJob>, String>) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.setting_up.remove(&id);
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
                cluster.ready_on.insert(node.clone());
                for h in held {
                    let key = JobKey::new(id.clone(), h.id);
                    if self.ended.contains_key(&key) {
                        continue; // its result, sent again, is acknowledged
                    }
                    let job = self.entry(&key, Stage::NodeOnly);
                    if job.stage != Stage::Admitted {
                        job.held = Some((node.clone(), h.status));
                    }
                }
                self.claim_array_reports(&id);
                self.schedule(Event::ClusterReady {
                    cluster: id.clone(),
                    node,
                });
            }
            Err(e) => {
                tracing::warn!(cluster = %id, %node, "setting up the computation failed: {e}");
                let (info, at) = (cluster.info.clone(), self.now.at + SETUP_RETRY);
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.setup_retry_at.get_or_insert(at);
                }
                self.out.push(Effect::Event {
                    on: crate::writer::reference(
                        "JobCluster",
                        &info.namespace,
                        &info.name,
                        &info.uid,
                    ),
                    reason: "SetupFailed".into(),
                    note: format!("on {node}: {e}; tried again in {} s", SETUP_RETRY.as_secs()),
                    warning: true,
                    routine: false,
                });
            }
        }
        self.maybe_synced(&id);
        self.publish_stats();
    }

    /// Once every node was asked what it holds, the cluster's parked jobs go in, in order.
    fn maybe_synced(&mut self, id: &str) {
        let Some(cluster) = self.clusters.get(id) else {
            return;
        };
        if !cluster.unsynced.is_empty() {
            return;
        }
        let mut parked: Vec<(u64, JobKey)> = self
            .jobs
            .iter()
            .filter(|(k, j)| k.cluster == id && j.stage == Stage::Parked)
            .map(|(k, j)| (j.seq, k.clone()))
            .collect();
        parked.sort();
        for (_, key) in parked {
            self.admit(key);
        }
        let arrays: Vec<ArrayKey> = (self.arrays.iter())
            .filter(|(_, a)| a.info.cluster == id)
            .map(|(k, _)| k.clone())
            .collect();
        self.feed_later.extend(arrays);
    }

    fn drop_node(&mut self, node: &str, reason: String) {
        if let Some(n) = self.nodes.remove(node) {
            if n.connected {
                self.metrics.nodes_up.dec();
                self.schedule(Event::NodeLost {
                    node: node.to_string(),
                    reason,
                });
            }
            self.out.push(Effect::Disconnect {
                node: node.to_string(),
            });
        }
        for c in self.clusters.values_mut() {
            c.ready_on.remove(node);
        }
    }

    fn cluster_gone(&mut self, id: ClusterId, reply: ReplyTo) {
        let Some(cluster) = self.clusters.remove(&id) else {
            self.out.push(Effect::Reply(reply));
            return;
        };
        tracing::info!(cluster = %id, "JobCluster deleted: closing its computation");
        self.ended.retain(|k, status| {
            let keep = k.cluster != id;
            if !keep {
                self.metrics.job_status(Some(*status), None);
            }
            keep
        });
        self.ended_counts.remove(&id);
        self.gone.insert(id.clone());
        let open: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(k, j)| {
                k.cluster == id && j.stage == Stage::Admitted && !j.status.status.is_terminal()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in open {
            if let Some(j) = self.jobs.get_mut(&key) {
                j.status.message = Some("its JobCluster was deleted".into());
            }
            self.schedule(Event::CancelRequested { key });
        }
        for job in self
            .jobs
            .iter_mut()
            .filter(|(k, _)| k.cluster == id)
            .map(|(_, j)| j)
        {
            if job.stage == Stage::Parked {
                job.stage = Stage::NoCluster;
            }
        }
        // Before the nodes it alone used are disconnected.
        self.out.push(Effect::Close {
            cluster: id.clone(),
            nodes: cluster.ready_on.iter().cloned().collect(),
            reply,
        });
        for node in cluster.info.nodes.keys() {
            if !self.wanted(node) {
                self.drop_node(node, "its JobCluster was deleted".into());
            }
        }
        let name = format!("{}/{}", cluster.info.namespace, cluster.info.name);
        self.published.remove(&name);
        self.out.push(Effect::Stats {
            namespace: cluster.info.namespace.clone(),
            name: cluster.info.name.clone(),
            stats: None,
        });
    }

    // --- jobs -----------------------------------------------------------------------------

    fn entry(&mut self, key: &JobKey, stage: Stage) -> &mut Job {
        let seq = self.next_seq;
        self.jobs
            .entry(key.clone())
            .or_insert_with(|| Job::new(stage, seq));
        self.next_seq += 1;
        self.jobs.get_mut(key).unwrap()
    }

    fn job(&mut self, info: Arc<JobInfo>) {
        let key = info.key.clone();
        if self.ended.contains_key(&key) || self.jobs.get(&key).is_some_and(|j| j.info.is_some()) {
            return; // seen: sending it again changes nothing
        }
        if info.stored.status.is_terminal() {
            // Ended before: a result a node still holds is a stale resend.
            if let Some((node, _)) = self.jobs.remove(&key).and_then(|j| j.early) {
                self.out.push(Effect::Ack {
                    node,
                    key: key.clone(),
                });
            }
            return self.end(key, info.stored.status);
        }
        let stage = match self.clusters.get(&key.cluster) {
            Some(c) if c.unsynced.is_empty() => Stage::Admitted,
            Some(_) => Stage::Parked,
            None => Stage::NoCluster,
        };
        let job = self.entry(&key, stage);
        job.stage = if stage == Stage::Admitted {
            Stage::Parked
        } else {
            stage
        };
        job.status = info.stored.clone();
        job.info = Some(info);
        self.out.push(Effect::Knows {
            key: key.clone(),
            known: true,
        });
        self.count(&key);
        if stage == Stage::Admitted {
            self.admit(key);
        }
    }

    /// The job's terminal status is stored: from now on it is only counted.
    fn end(&mut self, key: JobKey, status: JobStatus) {
        if self.gone.contains(&key.cluster) {
            return;
        }
        if self.ended.insert(key.clone(), status).is_none() {
            self.metrics.job_status(None, Some(status));
            *tally(self.ended_counts.entry(key.cluster).or_default(), status) += 1;
        }
    }

    /// Forgets an ended job (its DispyJob is gone); false when it is not one.
    fn unend(&mut self, key: &JobKey) -> bool {
        let Some(status) = self.ended.remove(key) else {
            return false;
        };
        self.metrics.job_status(Some(status), None);
        if let Some(n) = self.ended_counts.get_mut(&key.cluster) {
            *tally(n, status) -= 1;
        }
        true
    }

    /// Counts the job's status (metrics, the cluster's counts) when it changed.
    fn count(&mut self, key: &JobKey) {
        let Some(job) = self.jobs.get_mut(key) else {
            return;
        };
        let now = Some(job.status.status);
        if job.counted != now {
            self.metrics.job_status(job.counted, now);
            job.counted = now;
        }
    }

    /// A parked job enters the scheduler: adopted where a node holds it, or new.
    fn admit(&mut self, key: JobKey) {
        let Some(job) = self.jobs.get(&key) else {
            return;
        };
        let Some(info) = job.info.clone() else {
            return;
        };
        let pin = info
            .node
            .as_ref()
            .map(|want| (want.clone(), self.resolve_node(&key.cluster, want)));
        if let Some((want, None)) = &pin {
            // Not (yet) one of the cluster's nodes: held back, not queued for a name that no
            // node has, and admitted again each time a node of the cluster is set up (a pod
            // that becomes ready, a node that says its name).
            let why = format!(
                "spec.node {want:?} is none of the cluster's nodes ({}); the job waits for it",
                self.node_list(&key.cluster)
            );
            let job = self.jobs.get_mut(&key).unwrap();
            if job.waiting.as_ref().map(|(_, m)| m) != Some(&why) {
                job.status.message = Some(why.clone());
                job.waiting = Some(("NodeNotFound".to_string(), why));
                self.write(&key);
            }
            return;
        }
        let spec = JobSpec {
            key: key.clone(),
            node: pin.and_then(|(_, found)| found),
            active_deadline: info.deadline,
            policy: info.policy.clone(),
        };
        let now = self.now.at;
        let job = self.jobs.get_mut(&key).unwrap();
        let (attempts, stored) = (job.status.attempts, job.status.status);
        let event = match job.held.take() {
            Some((node, held)) => Event::JobAdopted {
                spec,
                attempts: attempts.max(1),
                node: Some(node),
                running: dispy_core::driver::had_started(held),
            },
            None if stored == JobStatus::Running => Event::JobAdopted {
                spec,
                attempts: attempts.max(1),
                node: None,
                running: true,
            },
            None if attempts > 0 => Event::JobAdopted {
                spec,
                attempts,
                node: None,
                running: false,
            },
            None => Event::JobSubmitted(spec),
        };
        job.stage = Stage::Admitted;
        job.queued_at = Some(now);
        if job.waiting.take().is_some() {
            // Its node is there now: the Waiting condition and its message go.
            job.status.message = None;
            self.write(&key);
        }
        self.schedule(event);
        if let Some((node, result)) = self.jobs.get_mut(&key).and_then(|j| j.early.take()) {
            self.done(node, key, result);
        }
    }

    /// The nodes of a cluster as a pinned job may name them.
    fn node_names(&self, cluster: &str) -> Vec<NodeNames<'_>> {
        let Some(c) = self.clusters.get(cluster) else {
            return Vec::new();
        };
        c.info
            .nodes
            .iter()
            .map(|(addr, pod)| NodeNames {
                addr,
                names: self
                    .nodes
                    .get(addr)
                    .map(|n| n.name.as_str())
                    .into_iter()
                    .chain(pod.as_deref())
                    .collect(),
            })
            .collect()
    }

    /// A pinned job's `node` (pod name, node name or address) as a node address, if it is one
    /// of the cluster's nodes.
    fn resolve_node(&self, cluster: &str, want: &str) -> Option<NodeId> {
        dispy_core::driver::resolve_node(want, &self.node_names(cluster)).map(str::to_string)
    }

    fn node_list(&self, cluster: &str) -> String {
        let names = self.node_names(cluster);
        if names.is_empty() && self.clusters.contains_key(cluster) {
            return "none yet".into();
        }
        dispy_core::driver::node_list(&names)
    }

    fn job_gone(&mut self, key: JobKey, reply: ReplyTo) {
        if self.unend(&key) {
            return self.out.push(Effect::Reply(reply));
        }
        let open = self
            .sched
            .job(&key)
            .is_some_and(|r| !r.status().is_terminal());
        match self.jobs.get_mut(&key) {
            Some(job) if job.stage == Stage::Admitted && open => {
                job.deleted.get_or_insert_with(Vec::new).push(reply);
                self.schedule(Event::CancelRequested { key });
            }
            // Never on a node, or done with it. A result waiting for its store is let go with
            // the DispyJob.
            Some(job) => {
                if let Some(node) = job.ack.take() {
                    self.out.push(Effect::Ack {
                        node,
                        key: key.clone(),
                    });
                }
                self.forget(&key);
                self.out.push(Effect::Reply(reply));
            }
            None => {
                self.forget(&key);
                self.out.push(Effect::Reply(reply));
            }
        }
    }

    fn forget(&mut self, key: &JobKey) {
        if let Some(job) = self.jobs.remove(key) {
            self.metrics.job_status(job.counted, None);
            if job.info.is_some() {
                self.out.push(Effect::Knows {
                    key: key.clone(),
                    known: false,
                });
            }
        }
        self.sched.forget(key);
    }

    // --- what nodes say -------------------------------------------------------------------

    /// Whether a result from `node` is the one of the job's current attempt.
    fn is_live(&self, key: &JobKey, node: &str) -> bool {
        self.sched.job(key).is_some_and(|r| {
            !r.status().is_terminal() && r.node().map(String::as_str) == Some(node)
        })
    }

    /// Whether `node` runs the job now (news from an earlier attempt's node is stale).
    fn runs_on(&self, key: &JobKey, node: &str) -> bool {
        self.sched
            .job(key)
            .and_then(|r| r.node().map(String::as_str))
            == Some(node)
    }

    fn news(&mut self, node: NodeId, news: NodeNews) {
        match news {
            NodeNews::Started { key, start_time } => {
                if self.runs_on(&key, &node) {
                    let (name, pod) = self.node_label(&key.cluster, &node);
                    let job = self
                        .jobs
                        .get_mut(&key)
                        .filter(|j| j.stage == Stage::Admitted);
                    if let Some(job) = job.filter(|j| !j.status.status.is_terminal()) {
                        job.status.status = JobStatus::Running;
                        job.status.node = Some(name);
                        job.status.pod = pod;
                        job.status.start_time = Some(rfc3339(start_time));
                        job.status.message = None;
                        self.write(&key);
                    }
                }
                self.schedule(Event::JobStarted { key, node });
            }
            NodeNews::Provisional { key, result } => {
                if self.runs_on(&key, &node) {
                    if let Some(job) = self
                        .jobs
                        .get_mut(&key)
                        .filter(|j| j.stage == Stage::Admitted)
                    {
                        crate::status::record_provisional_bounded(&mut job.status, &result);
                        self.write(&key);
                    }
                }
            }
            NodeNews::File { key, file } => {
                if self.runs_on(&key, &node) {
                    self.sent_file(&key, file);
                }
            }
            NodeNews::Done { key, result } => self.done(node, key, result),
            NodeNews::Lost { reason } => self.node_lost(node, reason),
            NodeNews::Pulse => {}
        }
    }

    fn node_lost(&mut self, node: NodeId, reason: String) {
        tracing::warn!(%node, "node lost: {reason}");
        if let Some(n) = self.nodes.get_mut(&node) {
            if n.connected {
                self.metrics.nodes_up.dec();
            }
            n.connected = false;
            n.setting_up.clear();
            n.setup_retry_at = None; // connected again, it is set up again
            n.retry_at = Some(self.now.at + RETRY);
        }
        for c in self.clusters.values_mut() {
            c.ready_on.remove(&node);
        }
        self.cluster_event(
            &node,
            "NodeLost",
            format!("node {node} lost: {reason}"),
            true,
        );
        self.schedule(Event::NodeLost { node, reason });
        self.publish_stats();
    }

    /// A file the running job sent: into its files ConfigMap with its next status write, or
    /// listed as not kept when the ConfigMap has no room for it.
    fn sent_file(&mut self, key: &JobKey, file: SentFile) {
        let Some(job) = self
            .jobs
            .get_mut(key)
            .filter(|j| j.stage == Stage::Admitted)
        else {
            return;
        };
        let info = job.info.clone().expect("admitted jobs have their DispyJob");
        match crate::status::record_sent_file(&mut job.status, &file) {
            Some(cm_key) => {
                job.status.files_config_map = Some(crate::writer::files_name(&info.name));
                job.files_received += 1;
                job.unsaved_files
                    .insert(cm_key, (job.files_received, file.data));
            }
            None => {
                // One Warning per job: a job may send any number of files.
                if !job.warned_files {
                    job.warned_files = true;
                    let note = format!(
                        "the sent file {} ({} bytes) does not fit in the job's files ConfigMap; later ones that do not fit are not reported",
                        file.name,
                        file.data.len()
                    );
                    self.job_event(&info, "FileNotKept", note, true);
                }
            }
        }
        self.write(key);
    }

    /// The node's name and pod, for a job's status.
    fn node_label(&self, cluster: &str, node: &str) -> (String, Option<String>) {
        let name = self
            .nodes
            .get(node)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| node.to_string());
        let pod = self
            .clusters
            .get(cluster)
            .and_then(|c| c.info.nodes.get(node).cloned().flatten());
        (name, pod)
    }

    fn done(&mut self, node: NodeId, key: JobKey, result: JobResult) {
        if self.ended.contains_key(&key) {
            // Ended before (a stale resend): the stored status stands.
            return self.out.push(Effect::Ack { node, key });
        }
        if !self.jobs.contains_key(&key) {
            if let Some((akey, index)) = self.array_index(&key) {
                if self.array_result_without_entry(&node, &key, &akey, index) {
                    return;
                }
            }
        }
        let stage = self.jobs.get(&key).map(|j| j.stage);
        match stage {
            Some(Stage::Admitted) => {}
            _ => {
                self.entry(&key, Stage::NodeOnly).early = Some((node, result));
                return;
            }
        }
        if self.jobs[&key].sealed {
            // Its terminal status is stored (or its DispyJob is gone): nothing more is
            // recorded, and the node may forget the result.
            self.out.push(Effect::Ack {
                node: node.clone(),
                key: key.clone(),
            });
            self.schedule(Event::JobDone {
                key: key.clone(),
                node,
                status: result.status,
            });
            if self.jobs[&key].deleted.is_some() {
                self.forget(&key);
            }
            return;
        }
        if self.is_live(&key, &node) {
            let (name, pod) = self.node_label(&key.cluster, &node);
            let job = self.jobs.get_mut(&key).unwrap();
            let info = job.info.clone().expect("admitted jobs have their DispyJob");
            if let Some((_, index)) = &job.array {
                job.row = Some(super::arrays::row_of(*index, &result, Some(name.clone())));
            }
            job.output = crate::status::record_bounded(&mut job.status, &result);
            job.status.node = Some(name);
            job.status.pod = pod;
            job.status.output_config_map = job
                .output
                .as_ref()
                .map(|_| crate::writer::output_name(&info.name));
            if job.deleted.is_some() {
                job.status.message = Some(format!(
                    "the DispyJob was deleted; {}",
                    result.status.as_str()
                ));
            }
            job.ack = Some(node.clone());
            self.write(&key);
        } else if self.jobs[&key].ack.as_ref() != Some(&node) {
            // Stale (an earlier attempt's): the status stands and the node may forget it. The
            // one being stored is acknowledged once it is.
            self.out.push(Effect::Ack {
                node: node.clone(),
                key: key.clone(),
            });
        }
        self.schedule(Event::JobDone {
            key,
            node,
            status: result.status,
        });
    }

    fn act(&mut self, actions: Vec<Action>) {
        let mut batches: BTreeMap<(NodeId, ClusterId), Vec<Arc<JobInfo>>> = BTreeMap::new();
        for action in actions {
            match action {
                Action::Dispatch { key, node, attempt } => {
                    let Some(job) = self.jobs.get_mut(&key) else {
                        continue;
                    };
                    job.status.attempts = attempt;
                    job.waiting = None;
                    if let Some((akey, _)) = &job.array {
                        if let Some(a) = self.arrays.get_mut(akey) {
                            a.status
                                .start_time
                                .get_or_insert_with(|| rfc3339(self.now.unix));
                        }
                    }
                    if let Some(at) = job.queued_at.take() {
                        self.metrics
                            .scheduling_latency
                            .observe(self.now.at.saturating_duration_since(at).as_secs_f64());
                    }
                    if let Some(info) = &job.info {
                        batches
                            .entry((node, key.cluster.clone()))
                            .or_default()
                            .push(info.clone());
                    }
                }
                Action::Terminate { key, node, reason } => {
                    if let Some(job) = self.jobs.get_mut(&key) {
                        let why = if job.deleted.is_some() {
                            "the DispyJob was deleted".to_string()
                        } else {
                            reason
                        };
                        job.status.message.get_or_insert(why);
                    }
                    self.out.push(Effect::Cancel { node, key });
                }
                Action::Requeued {
                    key,
                    attempt,
                    reason,
                } => {
                    let Some(job) = self.jobs.get_mut(&key) else {
                        continue;
                    };
                    let Some(info) = job.info.clone() else {
                        continue;
                    };
                    tracing::info!(job = %info.name, "requeued: {reason}");
                    job.status.status = JobStatus::Created;
                    job.status.attempts = attempt;
                    job.status.message = Some(format!("requeued: {reason}"));
                    job.queued_at = Some(self.now.at);
                    self.job_event(
                        &info,
                        "Requeued",
                        format!("attempt {attempt} failed: {reason}"),
                        true,
                    );
                    self.write(&key);
                }
                Action::Finalize {
                    key,
                    status,
                    reason,
                } => {
                    let unix = self.now.unix;
                    let Some(job) = self.jobs.get_mut(&key) else {
                        continue;
                    };
                    job.status.status = status;
                    job.status.end_time = Some(rfc3339(unix));
                    let reason = match job.status.message.take() {
                        Some(m) if !reason.contains(&m) => format!("{m}: {reason}"),
                        _ => reason,
                    };
                    job.status.message = Some(reason);
                    self.write(&key);
                }
            }
        }
        for ((node, cluster), jobs) in batches {
            self.out.push(Effect::Submit {
                node,
                cluster,
                jobs,
            });
        }
    }

    // --- status writes --------------------------------------------------------------------

    /// Stores the job's status: at once when it is terminal (after the write in flight, if
    /// any), else after [`NOT_TERMINAL_DELAY`]. Those waiting for a deleted job's end are
    /// answered once its end is known.
    fn write(&mut self, key: &JobKey) {
        self.count(key);
        if let Some((akey, index)) = self.jobs.get(key).and_then(|j| j.array.clone()) {
            return self.array_job_changed(key, &akey, index);
        }
        let now = self.now.at;
        let Some(job) = self.jobs.get_mut(key) else {
            return;
        };
        if job.sealed {
            return;
        }
        if job.status.status.is_terminal() {
            for reply in job.deleted.iter_mut().flat_map(|w| w.drain(..)) {
                self.out.push(Effect::Reply(reply));
            }
            job.write_due = Some(now);
            if !job.write_in_flight {
                self.flush(key);
            }
        } else {
            job.write_due.get_or_insert(now + NOT_TERMINAL_DELAY);
        }
    }

    /// Sends the job's current status to the API server now.
    fn flush(&mut self, key: &JobKey) {
        let unix = self.now.unix;
        let Some(job) = self.jobs.get_mut(key) else {
            return;
        };
        let Some(info) = job.info.clone() else {
            return;
        };
        job.write_due = None;
        let now = rfc3339(unix);
        let waiting = job.waiting.as_ref().map(|(r, m)| (r.as_str(), m.as_str()));
        job.status.conditions =
            crate::status::conditions(&job.status, &job.status.conditions, &now, waiting);
        let write = Write {
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            uid: info.uid.clone(),
            status: job.status.clone(),
            // Kept until stored: a failed write is retried with them.
            output: job.output.clone(),
            files: job
                .unsaved_files
                .iter()
                .map(|(k, (_, data))| (k.clone(), data.clone()))
                .collect(),
        };
        let files = job
            .unsaved_files
            .iter()
            .map(|(k, (n, _))| (k.clone(), *n))
            .collect();
        job.write_in_flight = true;
        let status = job.status.status;
        let node = job.status.node.clone();
        let message = job.status.message.clone();
        if status.is_terminal() {
            let note =
                message.unwrap_or_else(|| format!("on {}", node.as_deref().unwrap_or("no node")));
            self.job_event(&info, status.as_str(), note, status != JobStatus::Finished);
        } else if status == JobStatus::Running {
            let note = format!("on {}", node.as_deref().unwrap_or("?"));
            self.job_event(&info, "Started", note, false);
        }
        self.out.push(Effect::Store {
            key: key.clone(),
            write: Box::new(write),
            files,
        });
    }

    fn written(&mut self, key: JobKey, files: Vec<(String, u64)>, result: Result<(), StoreError>) {
        let now = self.now.at;
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        job.write_in_flight = false;
        match result {
            Ok(()) => {
                job.output = None;
                for (k, n) in files {
                    if job.unsaved_files.get(&k).is_some_and(|(m, _)| *m == n) {
                        job.unsaved_files.remove(&k);
                    }
                }
                // Terminal and stored: the result may leave its node, nothing more is written.
                if job.status.status.is_terminal() && job.write_due.is_none() {
                    if let Some(node) = job.ack.take() {
                        self.out.push(Effect::Ack {
                            node,
                            key: key.clone(),
                        });
                    }
                    // Deleted: its finalizer goes now, and no JobGone will come again.
                    if job.deleted.is_some() {
                        self.forget(&key);
                        return;
                    }
                    // Off its node too: from now on only counted.
                    if self
                        .sched
                        .job(&key)
                        .is_none_or(|r| r.status().is_terminal())
                    {
                        let status = job.status.status;
                        self.forget(&key);
                        return self.end(key, status);
                    }
                    // Its node still runs the attempt (a cancel on its way): kept, small.
                    job.seal();
                }
                if job.write_due.is_some_and(|due| due <= now) {
                    self.flush(&key);
                }
            }
            Err(StoreError::Gone) => {
                if let Some(node) = job.ack.take() {
                    self.out.push(Effect::Ack {
                        node,
                        key: key.clone(),
                    });
                }
                job.write_due = None;
                job.sealed = true;
                job.deleted.get_or_insert_with(Vec::new);
                let open = self
                    .sched
                    .job(&key)
                    .is_some_and(|r| !r.status().is_terminal());
                if open {
                    self.schedule(Event::CancelRequested { key });
                } else {
                    self.forget(&key);
                }
            }
            Err(StoreError::Failed(e)) => {
                tracing::warn!(%key, "storing the status failed (retrying): {e}");
                job.write_due.get_or_insert(now + RETRY);
            }
        }
    }

    fn tick(&mut self) {
        self.schedule(Event::Tick);
        let now = self.now.at;
        let due: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, j)| !j.write_in_flight && j.write_due.is_some_and(|at| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.flush(&key);
        }
        self.arrays_due();
        let retry: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.retry_at.is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for node in retry {
            if self.wanted(&node) {
                self.connect(&node);
            } else {
                self.nodes.remove(&node);
            }
        }
        let set_up_again: Vec<NodeId> = (self.nodes.iter_mut())
            .filter(|(_, n)| n.connected && n.setup_retry_at.is_some_and(|at| at <= now))
            .map(|(id, n)| {
                n.setup_retry_at = None;
                id.clone()
            })
            .collect();
        for node in set_up_again {
            self.set_up_clusters(&node);
        }
        self.publish_stats();
    }

    // --- what others see ------------------------------------------------------------------

    fn job_event(&mut self, info: &JobInfo, reason: &str, note: String, warning: bool) {
        if let Some((akey, index)) = self.jobs.get(&info.key).and_then(|j| j.array.clone()) {
            // One object for many jobs: only what goes wrong is told, on the array.
            if warning {
                let name = akey.rsplit('/').next().unwrap_or_default();
                self.out.push(Effect::Event {
                    on: crate::writer::reference("DispyJobArray", &info.namespace, name, &info.uid),
                    reason: reason.to_string(),
                    note: format!("job {index}: {note}"),
                    warning,
                    routine: false,
                });
            }
            return;
        }
        self.out.push(Effect::Event {
            on: crate::writer::reference("DispyJob", &info.namespace, &info.name, &info.uid),
            reason: reason.to_string(),
            note,
            warning,
            routine: !warning,
        });
    }

    /// An Event on every JobCluster using the node.
    fn cluster_event(&mut self, node: &str, reason: &str, note: String, warning: bool) {
        for c in self
            .clusters
            .values()
            .filter(|c| c.info.nodes.contains_key(node))
        {
            self.out.push(Effect::Event {
                on: crate::writer::reference(
                    "JobCluster",
                    &c.info.namespace,
                    &c.info.name,
                    &c.info.uid,
                ),
                reason: reason.to_string(),
                note: note.clone(),
                warning,
                routine: false,
            });
        }
    }

    /// Recomputes every cluster's stats; publishes those that changed.
    fn publish_stats(&mut self) {
        let mut counts: HashMap<&str, JobCounts> = self
            .ended_counts
            .iter()
            .map(|(c, n)| (c.as_str(), n.clone()))
            .collect();
        for (key, job) in &self.jobs {
            let Some(status) = job.counted else {
                continue;
            };
            *tally(counts.entry(key.cluster.as_str()).or_default(), status) += 1;
        }
        let mut changed = Vec::new();
        for c in self.clusters.values() {
            let mut s = ClusterStats::default();
            for (addr, pod) in &c.info.nodes {
                let node = self.nodes.get(addr);
                let ready = c.ready_on.contains(addr);
                let (cpus, busy) = self
                    .sched
                    .node_load(addr)
                    .map(|l| (l.cpus, l.busy))
                    .unwrap_or((0, 0));
                if ready {
                    s.cpus += cpus;
                    s.busy += busy;
                }
                if s.nodes.len() < NODES_SHOWN {
                    s.nodes.push(NodeSummary {
                        name: node.map(|n| n.name.clone()).unwrap_or_else(|| addr.clone()),
                        address: addr.clone(),
                        pod: pod.clone(),
                        cpus,
                        busy,
                        ready: ready || !c.has_computation() && node.is_none(),
                    });
                }
            }
            s.counts = counts.get(c.info.id.as_str()).cloned().unwrap_or_default();
            s.counts.failed = s.counts.terminated + s.counts.cancelled + s.counts.abandoned;
            let name = format!("{}/{}", c.info.namespace, c.info.name);
            if self.published.get(&name) != Some(&s) {
                self.published.insert(name, s.clone());
                changed.push(Effect::Stats {
                    namespace: c.info.namespace.clone(),
                    name: c.info.name.clone(),
                    stats: Some(s),
                });
            }
        }
        self.out.extend(changed);
    }
}

/// The count of `status` in `n`.
fn tally(n: &mut JobCounts, status: JobStatus) -> &mut u32 {
    match status {
        JobStatus::Created => &mut n.created,
        JobStatus::Running | JobStatus::ProvisionalResult => &mut n.running,
        JobStatus::Finished => &mut n.finished,
        JobStatus::Terminated => &mut n.terminated,
        JobStatus::Cancelled => &mut n.cancelled,
        JobStatus::Abandoned => &mut n.abandoned,
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
