//! Which job runs on which node's CPU: dispy's job scheduler as sans-IO logic.
//!
//! The caller (the `dispy` CLI, the operator) feeds [`Event`]s together with the current
//! monotonic time and carries out the [`Action`]s that come back. Nothing here does IO or reads
//! a clock, so every rule is tested with a simulated clock and random event sequences.
//!
//! A job's life: queued → dispatched (from here on it holds one of its node's cpus) → running →
//! terminal. A lost node or a refused dispatch sends it back to the queue (reentrant cluster,
//! backoff left, not pinned) or makes it Abandoned.
//!
//! What holds whatever the events (checked on random sequences in `tests/scheduler_props.rs`):
//! - a job holds a cpu on at most one node at a time, and a node never holds more jobs than
//!   its cpus;
//! - a job gets at most one terminal status: a `Finalize` or an accepted `JobDone`;
//! - a cluster that is not reentrant never requeues;
//! - once every node that was up is lost, no job is dispatched or running: each is terminal,
//!   or queued and either unpinned or pinned to a node never seen up. Those wait for a node;
//!   when to give up on them (cancel) is the caller's call.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::job::{JobId, JobStatus};

/// A node's address, `host:port`.
pub type NodeId = String;
/// A computation's name, e.g. `default/wordcount` (namespace/JobCluster).
pub type ClusterId = String;

/// A job, named by its cluster and its id within it (job ids are only unique per cluster).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub cluster: ClusterId,
    pub job: JobId,
}

impl JobKey {
    pub fn new(cluster: impl Into<ClusterId>, job: JobId) -> Self {
        JobKey {
            cluster: cluster.into(),
            job,
        }
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {} of {}", self.job, self.cluster)
    }
}

/// What a cluster allows when one of its jobs' attempts fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    /// dispy's `reentrant`: a job may run again elsewhere after its node was lost mid-run.
    pub reentrant: bool,
    /// How many times a job may be requeued (Kubernetes' `backoffLimit`): a job is dispatched
    /// at most `backoff_limit + 1` times.
    pub backoff_limit: u32,
}

impl Default for ClusterPolicy {
    /// dispy's default (not reentrant) and Kubernetes Job's default backoff limit (6).
    fn default() -> Self {
        ClusterPolicy {
            reentrant: false,
            backoff_limit: 6,
        }
    }
}

/// A job as submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub key: JobKey,
    /// Run only on this node (dispy's `submit_node`, DispyJob's `node`).
    pub node: Option<NodeId>,
    /// `activeDeadlineSeconds`: longest time one attempt may run, counted from JobStarted.
    pub active_deadline: Option<Duration>,
    /// The job's own policy where it overrides its cluster's (a DispyJobArray's `reentrant`
    /// and `backoffLimit`); None follows the cluster's.
    pub policy: Option<ClusterPolicy>,
}

impl JobSpec {
    pub fn new(key: JobKey) -> Self {
        JobSpec {
            key,
            node: None,
            active_deadline: None,
            policy: None,
        }
    }
}

/// Something that happened, reported by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A cluster and its policy; sent again to change the policy. Jobs and `ClusterReady` of a
    /// cluster never added get [`ClusterPolicy::default`].
    ClusterAdded {
        cluster: ClusterId,
        policy: ClusterPolicy,
    },
    /// A node is reachable with `cpus` cpus. For a node that is already up this only changes
    /// its cpus (a reconnect); after `NodeLost` the node starts empty.
    NodeUp {
        node: NodeId,
        cpus: u32,
    },
    /// The cluster's computation is set up on that node; only then may its jobs go there.
    /// Ignored for a node that is not up (it must be re-sent after the node comes back).
    ClusterReady {
        cluster: ClusterId,
        node: NodeId,
    },
    /// Missed pulses or a closed connection.
    NodeLost {
        node: NodeId,
        reason: String,
    },
    /// A new job. A key seen before is ignored: submitting is idempotent.
    JobSubmitted(JobSpec),
    /// A job an earlier instance of the caller dispatched (an operator restart): `node` is
    /// where a node reported it, still pending or running (`running`), after `attempts`
    /// dispatches. With `node: None` no node has it any more: if it had started, that attempt
    /// was lost with its node (requeued or Abandoned by the cluster's policy); if it had not,
    /// it is queued again. A key seen before is ignored.
    JobAdopted {
        spec: JobSpec,
        attempts: u32,
        node: Option<NodeId>,
        running: bool,
    },
    /// The node says the job is Running.
    JobStarted {
        key: JobKey,
        node: NodeId,
    },
    /// A terminal result (Finished/Terminated/Cancelled/...) from `node`. Ignored unless the
    /// job is dispatched to or running on that node: a result of an earlier attempt is stale.
    JobDone {
        key: JobKey,
        node: NodeId,
        status: JobStatus,
    },
    /// The node refused the submit.
    DispatchFailed {
        key: JobKey,
        node: NodeId,
        reason: String,
    },
    CancelRequested {
        key: JobKey,
    },
    /// While suspended nothing new of the cluster is dispatched; running jobs go on.
    SuspendCluster {
        cluster: ClusterId,
        suspended: bool,
    },
    /// Only the passing of time (activeDeadlineSeconds).
    Tick,
}

/// What the caller must do, or record, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Submit the job to the node; `attempt` counts dispatches of this job, from 1.
    Dispatch {
        key: JobKey,
        node: NodeId,
        attempt: u32,
    },
    /// Ask the node to stop the job; its terminal status comes later as `JobDone`.
    Terminate {
        key: JobKey,
        node: NodeId,
        reason: String,
    },
    /// The job is queued again after attempt number `attempt` failed.
    Requeued {
        key: JobKey,
        attempt: u32,
        reason: String,
    },
    /// A terminal status the scheduler decided itself (no node will report one).
    Finalize {
        key: JobKey,
        status: JobStatus,
        reason: String,
    },
}

/// Where a job is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    /// Sent to the node, not yet reported Running.
    Dispatched {
        node: NodeId,
    },
    Running {
        node: NodeId,
        since: Duration,
    },
    /// `node` is where the result came from, if any.
    Terminal {
        status: JobStatus,
        node: Option<NodeId>,
    },
}

/// What the scheduler knows of a job.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub state: JobState,
    /// Dispatches so far.
    pub attempts: u32,
    /// Submission order, so a requeued job goes back to its place in the FIFO.
    seq: u64,
    /// A Terminate was sent for the current attempt (it is never repeated).
    terminate_sent: bool,
    cancel_requested: bool,
}

impl JobRecord {
    /// dispy's status: Created until the node says Running.
    pub fn status(&self) -> JobStatus {
        match &self.state {
            JobState::Queued | JobState::Dispatched { .. } => JobStatus::Created,
            JobState::Running { .. } => JobStatus::Running,
            JobState::Terminal { status, .. } => *status,
        }
    }

    pub fn node(&self) -> Option<&NodeId> {
        match &self.state {
            JobState::Queued => None,
            JobState::Dispatched { node } | JobState::Running { node, .. } => Some(node),
            JobState::Terminal { node, .. } => node.as_ref(),
        }
    }

    /// The node holding one of its cpus for this job, if any.
    fn in_flight_on(&self) -> Option<&NodeId> {
        match &self.state {
            JobState::Dispatched { node } | JobState::Running { node, .. } => Some(node),
            _ => None,
        }
    }
}

/// A node's cpus and how many of them hold a dispatched or running job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLoad {
    pub cpus: u32,
    pub busy: u32,
}

#[derive(Default)]
struct Cluster {
    policy: ClusterPolicy,
    suspended: bool,
    /// Queued jobs free to go anywhere, by submission order.
    queue: BTreeMap<u64, JobId>,
    /// Queued pinned jobs, per node, by submission order (a busy pinned node never blocks the
    /// cluster's other jobs).
    pinned: BTreeMap<NodeId, BTreeMap<u64, JobId>>,
}

struct Node {
    cpus: u32,
    jobs: BTreeSet<JobKey>,
    ready: BTreeSet<ClusterId>,
}

/// The scheduler's whole state; see the module docs.
#[derive(Default)]
pub struct Scheduler {
    clusters: BTreeMap<ClusterId, Cluster>,
    nodes: BTreeMap<NodeId, Node>,
    /// Nodes lost and not back, with the reason, so jobs pinned to them are Abandoned.
    lost: BTreeMap<NodeId, String>,
    jobs: BTreeMap<JobKey, JobRecord>,
    next_seq: u64,
    /// Jobs not yet terminal, kept so `all_terminal` is cheap for a progress display.
    open: usize,
    /// The cluster that got the last dispatch; the next round starts after it.
    last_served: Option<ClusterId>,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `event` at monotonic time `now`, then terminates jobs past their deadline and
    /// dispatches as much as fits. Actions come in a deterministic order.
    pub fn handle(&mut self, now: Duration, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::ClusterAdded { cluster, policy } => self.cluster_mut(&cluster).policy = policy,
            Event::NodeUp { node, cpus } => {
                self.lost.remove(&node);
                self.nodes
                    .entry(node)
                    .or_insert_with(|| Node {
                        cpus,
                        jobs: BTreeSet::new(),
                        ready: BTreeSet::new(),
                    })
                    .cpus = cpus;
            }
            Event::ClusterReady { cluster, node } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.ready.insert(cluster.clone());
                    self.cluster_mut(&cluster);
                }
            }
            Event::NodeLost { node, reason } => self.node_lost(node, reason, &mut out),
            Event::JobSubmitted(spec) => self.submit(spec, &mut out),
            Event::JobAdopted {
                spec,
                attempts,
                node,
                running,
            } => self.adopt(now, spec, attempts, node, running, &mut out),
            Event::JobStarted { key, node } => {
                if let Some(rec) = self.jobs.get_mut(&key) {
                    if matches!(&rec.state, JobState::Dispatched { node: n } if *n == node) {
                        rec.state = JobState::Running { node, since: now };
                    }
                }
            }
            Event::JobDone { key, node, status } => {
                let on_node = self.jobs.get(&key).and_then(|r| r.in_flight_on()) == Some(&node);
                if on_node && status.is_terminal() {
                    self.release(&key, &node);
                    self.finish(&key, status, Some(node));
                }
            }
            Event::DispatchFailed { key, node, reason } => {
                let dispatched = matches!(self.jobs.get(&key).map(|r| &r.state),
                    Some(JobState::Dispatched { node: n }) if *n == node);
                if dispatched {
                    self.release(&key, &node);
                    let cause = format!("node {node} refused {key}: {reason}");
                    self.attempt_failed(&key, cause, &mut out);
                }
            }
            Event::CancelRequested { key } => self.cancel(key, &mut out),
            Event::SuspendCluster { cluster, suspended } => {
                self.cluster_mut(&cluster).suspended = suspended
            }
            Event::Tick => {}
        }
        self.check_deadlines(now, &mut out);
        self.dispatch(&mut out);
        out
    }

    pub fn job(&self, key: &JobKey) -> Option<&JobRecord> {
        self.jobs.get(key)
    }

    /// All jobs in key order.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// `None` for a node that is not up.
    pub fn node_load(&self, node: &str) -> Option<NodeLoad> {
        self.nodes.get(node).map(Node::load)
    }

    /// Nodes that are up, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeId, NodeLoad)> {
        self.nodes.iter().map(|(id, n)| (id, n.load()))
    }

    /// Jobs by dispy status (queued and dispatched jobs are Created), all clusters or one.
    pub fn counts(&self, cluster: Option<&str>) -> BTreeMap<JobStatus, usize> {
        let mut counts = BTreeMap::new();
        for rec in self.jobs.values() {
            if cluster.is_none_or(|c| c == rec.spec.key.cluster) {
                *counts.entry(rec.status()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Queued jobs, all clusters.
    pub fn queued(&self) -> usize {
        self.clusters
            .values()
            .map(|c| c.queue.len() + c.pinned.values().map(BTreeMap::len).sum::<usize>())
            .sum()
    }

    /// No job is dispatched or running: no node holds a cpu for a job.
    pub fn is_idle(&self) -> bool {
        self.nodes.values().all(|n| n.jobs.is_empty())
    }

    /// Every job submitted so far has a terminal status.
    pub fn all_terminal(&self) -> bool {
        self.open == 0
    }

    /// Drops a terminal job (e.g. its DispyJob was deleted) so memory stays bounded; a later
    /// `JobSubmitted` with the same key is then a new job. Returns whether it was dropped.
    pub fn forget(&mut self, key: &JobKey) -> bool {
        let terminal = matches!(
            self.jobs.get(key).map(|r| &r.state),
            Some(JobState::Terminal { .. })
        );
        if terminal {
            self.jobs.remove(key);
        }
        terminal
    }

    fn cluster_mut(&mut self, cluster: &str) -> &mut Cluster {
        self.clusters.entry(cluster.to_string()).or_default()
    }

    fn submit(&mut self, spec: JobSpec, out: &mut Vec<Action>) {
        if self.jobs.contains_key(&spec.key) {
            return;
        }
        let key = spec.key.clone();
        let seq = self.next_seq;
        self.next_seq += 1;
        let pinned_lost = spec
            .node
            .as_ref()
            .and_then(|n| self.lost.get(n).map(|reason| (n.clone(), reason.clone())));
        self.jobs.insert(
            key.clone(),
            JobRecord {
                spec,
                state: JobState::Queued,
                attempts: 0,
                seq,
                terminate_sent: false,
                cancel_requested: false,
            },
        );
        self.open += 1;
        match pinned_lost {
            Some((node, reason)) => {
                let reason = format!("{key} is pinned to node {node}, which was lost: {reason}");
                self.finalize(&key, JobStatus::Abandoned, reason, out);
            }
            None => self.enqueue(&key),
        }
    }

    fn adopt(
        &mut self,
        now: Duration,
        spec: JobSpec,
        attempts: u32,
        node: Option<NodeId>,
        running: bool,
        out: &mut Vec<Action>,
    ) {
        if self.jobs.contains_key(&spec.key) {
            return;
        }
        let key = spec.key.clone();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.jobs.insert(
            key.clone(),
            JobRecord {
                spec,
                state: JobState::Queued,
                attempts,
                seq,
                terminate_sent: false,
                cancel_requested: false,
            },
        );
        self.open += 1;
        self.cluster_mut(&key.cluster);
        match node {
            Some(node) if self.nodes.contains_key(&node) => {
                self.nodes.get_mut(&node).unwrap().jobs.insert(key.clone());
                self.jobs.get_mut(&key).unwrap().state = if running {
                    JobState::Running { node, since: now }
                } else {
                    JobState::Dispatched { node }
                };
            }
            Some(node) if running => {
                let cause = format!("node {node}, where it was running, is not up");
                self.attempt_failed(&key, cause, out);
            }
            None if running => {
                let cause = "its node no longer has it (lost while the scheduler was away)";
                self.attempt_failed(&key, cause.into(), out);
            }
            _ => self.enqueue(&key),
        }
    }

    fn enqueue(&mut self, key: &JobKey) {
        let rec = &self.jobs[key];
        let (seq, pin) = (rec.seq, rec.spec.node.clone());
        let cluster = self.cluster_mut(&key.cluster);
        match pin {
            Some(node) => cluster.pinned.entry(node).or_default().insert(seq, key.job),
            None => cluster.queue.insert(seq, key.job),
        };
        self.jobs.get_mut(key).unwrap().state = JobState::Queued;
    }

    /// Takes a queued job out of its cluster's queue.
    fn dequeue(&mut self, key: &JobKey) {
        let rec = &self.jobs[key];
        let (seq, pin) = (rec.seq, rec.spec.node.clone());
        let cluster = self.cluster_mut(&key.cluster);
        match pin {
            Some(node) => {
                if let Some(q) = cluster.pinned.get_mut(&node) {
                    q.remove(&seq);
                    if q.is_empty() {
                        cluster.pinned.remove(&node);
                    }
                }
            }
            None => {
                cluster.queue.remove(&seq);
            }
        }
    }

    /// Frees the cpu the job held on `node`.
    fn release(&mut self, key: &JobKey, node: &str) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.jobs.remove(key);
        }
    }

    fn finish(&mut self, key: &JobKey, status: JobStatus, node: Option<NodeId>) {
        let rec = self.jobs.get_mut(key).unwrap();
        if !matches!(rec.state, JobState::Terminal { .. }) {
            self.open -= 1;
        }
        rec.state = JobState::Terminal { status, node };
    }

    fn finalize(&mut self, key: &JobKey, status: JobStatus, reason: String, out: &mut Vec<Action>) {
        let node = self.jobs[key].in_flight_on().cloned();
        self.finish(key, status, node);
        out.push(Action::Finalize {
            key: key.clone(),
            status,
            reason,
        });
    }

    fn node_lost(&mut self, node: NodeId, reason: String, out: &mut Vec<Action>) {
        let Some(lost) = self.nodes.remove(&node) else {
            return;
        };
        for key in &lost.jobs {
            self.attempt_failed(key, format!("node {node} lost: {reason}"), out);
        }
        // Queued jobs pinned to the node would wait forever.
        let mut stranded = Vec::new();
        for (cluster, c) in &self.clusters {
            for job in c.pinned.get(&node).into_iter().flat_map(BTreeMap::values) {
                stranded.push(JobKey::new(cluster.clone(), *job));
            }
        }
        for key in stranded {
            self.dequeue(&key);
            let why = format!("{key} is pinned to node {node}, which was lost: {reason}");
            self.finalize(&key, JobStatus::Abandoned, why, out);
        }
        self.lost.insert(node, reason);
    }

    /// The job's current attempt ended without a result (its cpu is already released):
    /// requeue it, or give it the terminal status that says why not.
    fn attempt_failed(&mut self, key: &JobKey, cause: String, out: &mut Vec<Action>) {
        let rec = &self.jobs[key];
        let policy = rec
            .spec
            .policy
            .as_ref()
            .unwrap_or(&self.clusters[&key.cluster].policy);
        let verdict = if rec.cancel_requested {
            Some((
                JobStatus::Cancelled,
                format!("{cause}; {key} had been cancelled"),
            ))
        } else if rec.terminate_sent {
            let why = format!("{cause}; {key} had exceeded its activeDeadlineSeconds");
            Some((JobStatus::Terminated, why))
        } else if rec.spec.node.is_some() {
            let why = format!("{cause}; {key} is pinned to that node");
            Some((JobStatus::Abandoned, why))
        } else if !policy.reentrant {
            let why = format!("{cause}; cluster {} is not reentrant", key.cluster);
            Some((JobStatus::Abandoned, why))
        } else if rec.attempts > policy.backoff_limit {
            let why = format!(
                "{cause}; backoff limit {} reached after {} attempts",
                policy.backoff_limit, rec.attempts
            );
            Some((JobStatus::Abandoned, why))
        } else {
            None
        };
        match verdict {
            Some((status, reason)) => self.finalize(key, status, reason, out),
            None => {
                let attempt = rec.attempts;
                self.enqueue(key);
                out.push(Action::Requeued {
                    key: key.clone(),
                    attempt,
                    reason: cause,
                });
            }
        }
    }

    fn cancel(&mut self, key: JobKey, out: &mut Vec<Action>) {
        let Some(rec) = self.jobs.get_mut(&key) else {
            return;
        };
        match rec.state.clone() {
            JobState::Queued => {
                self.dequeue(&key);
                let reason = format!("{key} was cancelled while queued");
                self.finalize(&key, JobStatus::Cancelled, reason, out);
            }
            JobState::Dispatched { node } | JobState::Running { node, .. } => {
                rec.cancel_requested = true;
                if !rec.terminate_sent {
                    rec.terminate_sent = true;
                    let reason = format!("{key} was cancelled");
                    out.push(Action::Terminate { key, node, reason });
                }
            }
            JobState::Terminal { .. } => {}
        }
    }

    fn check_deadlines(&mut self, now: Duration, out: &mut Vec<Action>) {
        let is_due = |rec: &JobRecord| match (&rec.state, rec.spec.active_deadline) {
            (JobState::Running { since, .. }, Some(d)) => !rec.terminate_sent && *since + d <= now,
            _ => false,
        };
        let mut due: Vec<JobKey> = (self.nodes.values().flat_map(|n| &n.jobs))
            .filter(|key| is_due(&self.jobs[*key]))
            .cloned()
            .collect();
        due.sort();
        for key in due {
            let rec = self.jobs.get_mut(&key).unwrap();
            rec.terminate_sent = true;
            let deadline = rec.spec.active_deadline.unwrap_or_default().as_secs_f64();
            let reason = format!("{key} ran longer than its activeDeadlineSeconds ({deadline}s)");
            let node = rec.in_flight_on().unwrap().clone();
            out.push(Action::Terminate { key, node, reason });
        }
    }

    /// Round-robin between clusters, one job per cluster per round, until nothing fits.
    fn dispatch(&mut self, out: &mut Vec<Action>) {
        loop {
            if self.nodes.values().all(|n| n.jobs.len() >= n.cpus as usize) {
                return;
            }
            let names: Vec<ClusterId> = self.clusters.keys().cloned().collect();
            let start = match &self.last_served {
                Some(last) => names.partition_point(|c| c <= last),
                None => 0,
            };
            let mut progressed = false;
            for i in 0..names.len() {
                let cluster = &names[(start + i) % names.len()];
                if let Some((key, node)) = self.pick(cluster) {
                    self.dequeue(&key);
                    let rec = self.jobs.get_mut(&key).unwrap();
                    rec.attempts += 1;
                    rec.terminate_sent = false;
                    rec.state = JobState::Dispatched { node: node.clone() };
                    let attempt = rec.attempts;
                    self.nodes.get_mut(&node).unwrap().jobs.insert(key.clone());
                    out.push(Action::Dispatch { key, node, attempt });
                    self.last_served = Some(cluster.clone());
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// The cluster's earliest queued job that fits somewhere now, and where it goes.
    fn pick(&self, cluster: &str) -> Option<(JobKey, NodeId)> {
        let c = &self.clusters[cluster];
        if c.suspended {
            return None;
        }
        let fits = |n: &Node| n.ready.contains(cluster) && n.jobs.len() < n.cpus as usize;
        let mut best: Option<(u64, JobId, &NodeId)> = None;
        if let Some((&seq, &job)) = c.queue.first_key_value() {
            // Least loaded by busy/cpus, compared without division; ties go to the first id.
            let least = self.nodes.iter().filter(|(_, n)| fits(n)).min_by(|a, b| {
                let (a, b) = (a.1, b.1);
                (a.jobs.len() as u64 * b.cpus as u64).cmp(&(b.jobs.len() as u64 * a.cpus as u64))
            });
            if let Some((id, _)) = least {
                best = Some((seq, job, id));
            }
        }
        for (id, q) in &c.pinned {
            let Some((&seq, &job)) = q.first_key_value() else {
                continue;
            };
            let earlier = best.is_none_or(|(s, _, _)| seq < s);
            if earlier && self.nodes.get(id).is_some_and(fits) {
                best = Some((seq, job, id));
            }
        }
        best.map(|(_, job, node)| (JobKey::new(cluster, job), node.clone()))
    }
}

impl Node {
    fn load(&self) -> NodeLoad {
        NodeLoad {
            cpus: self.cpus,
            busy: self.jobs.len() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a:9701";
    const B: &str = "b:9701";
    const WC: &str = "default/wc";
    const OTHER: &str = "default/other";

    fn key(cluster: &str, job: JobId) -> JobKey {
        JobKey::new(cluster, job)
    }
    fn up(node: &str, cpus: u32) -> Event {
        Event::NodeUp {
            node: node.into(),
            cpus,
        }
    }
    fn ready(cluster: &str, node: &str) -> Event {
        Event::ClusterReady {
            cluster: cluster.into(),
            node: node.into(),
        }
    }
    fn added(cluster: &str, reentrant: bool, backoff_limit: u32) -> Event {
        Event::ClusterAdded {
            cluster: cluster.into(),
            policy: ClusterPolicy {
                reentrant,
                backoff_limit,
            },
        }
    }
    fn submit(cluster: &str, job: JobId) -> Event {
        Event::JobSubmitted(JobSpec::new(key(cluster, job)))
    }
    fn submit_pinned(cluster: &str, job: JobId, node: &str) -> Event {
        Event::JobSubmitted(JobSpec {
            node: Some(node.into()),
            ..JobSpec::new(key(cluster, job))
        })
    }
    fn lost(node: &str) -> Event {
        Event::NodeLost {
            node: node.into(),
            reason: "missed 5 pulses".into(),
        }
    }
    fn started(cluster: &str, job: JobId, node: &str) -> Event {
        Event::JobStarted {
            key: key(cluster, job),
            node: node.into(),
        }
    }
    fn done(cluster: &str, job: JobId, node: &str) -> Event {
        Event::JobDone {
            key: key(cluster, job),
            node: node.into(),
            status: JobStatus::Finished,
        }
    }
    fn dispatch(cluster: &str, job: JobId, node: &str, attempt: u32) -> Action {
        Action::Dispatch {
            key: key(cluster, job),
            node: node.into(),
            attempt,
        }
    }
    fn abandoned(cluster: &str, job: JobId, reason: &str) -> Action {
        Action::Finalize {
            key: key(cluster, job),
            status: JobStatus::Abandoned,
            reason: reason.into(),
        }
    }

    /// A scheduler and a simulated clock.
    struct Sim {
        s: Scheduler,
        now: Duration,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                s: Scheduler::new(),
                now: Duration::ZERO,
            }
        }
        fn ev(&mut self, e: Event) -> Vec<Action> {
            self.s.handle(self.now, e)
        }
        fn at(&mut self, secs: u64, e: Event) -> Vec<Action> {
            self.now = Duration::from_secs(secs);
            self.ev(e)
        }
        /// Applies events whose actions the test does not look at.
        fn all(&mut self, events: impl IntoIterator<Item = Event>) {
            for e in events {
                self.ev(e);
            }
        }
    }

    #[test]
    fn jobs_wait_for_cluster_ready_and_never_exceed_cpus() {
        let mut sim = Sim::new();
        sim.all([added(WC, false, 0), up(A, 2)]);
        assert!(
            sim.ev(submit(WC, 1)).is_empty(),
            "computation not set up on A yet"
        );
        assert_eq!(sim.ev(submit(WC, 2)), vec![]);
        assert_eq!(
            sim.ev(ready(WC, A)),
            vec![dispatch(WC, 1, A, 1), dispatch(WC, 2, A, 1)]
        );
        assert_eq!(sim.ev(submit(WC, 3)), vec![], "A's 2 cpus are busy");
        assert_eq!(sim.s.node_load(A), Some(NodeLoad { cpus: 2, busy: 2 }));
        assert_eq!(sim.ev(started(WC, 1, A)), vec![]);
        assert_eq!(sim.ev(done(WC, 1, A)), vec![dispatch(WC, 3, A, 1)]);
    }

    #[test]
    fn least_loaded_node_by_busy_over_cpus_ties_by_id() {
        let mut sim = Sim::new();
        sim.all([up(B, 4), up(A, 2), ready(WC, A), ready(WC, B)]);
        let actions: Vec<_> = (1..=6).flat_map(|j| sim.ev(submit(WC, j))).collect();
        // 0/2 vs 0/4: tie → a; then 1/2 > 0/4 → b; 1/2 vs 1/4 → b; 1/2 = 2/4 → a; ...
        assert_eq!(
            actions,
            vec![
                dispatch(WC, 1, A, 1),
                dispatch(WC, 2, B, 1),
                dispatch(WC, 3, B, 1),
                dispatch(WC, 4, A, 1),
                dispatch(WC, 5, B, 1),
                dispatch(WC, 6, B, 1),
            ]
        );
    }

    #[test]
    fn fifo_within_a_cluster() {
        let mut sim = Sim::new();
        sim.all([up(A, 1), ready(WC, A)]);
        sim.all((1..=4).map(|j| submit(WC, j)));
        let mut order = Vec::new();
        for j in 1..=4 {
            let a = sim.ev(done(WC, j, A));
            order.extend(a);
        }
        assert_eq!(
            order,
            vec![
                dispatch(WC, 2, A, 1),
                dispatch(WC, 3, A, 1),
                dispatch(WC, 4, A, 1)
            ]
        );
    }

    #[test]
    fn clusters_sharing_nodes_take_turns() {
        let mut sim = Sim::new();
        sim.all([up(A, 1), ready(WC, A), ready(OTHER, A)]);
        sim.all((1..=3).map(|j| submit(WC, j)));
        sim.all((1..=3).map(|j| submit(OTHER, j)));
        // WC 1 took the cpu at submit; the rest alternate though all of WC was submitted first.
        let mut order = vec![];
        for (c, j) in [(WC, 1), (OTHER, 1), (WC, 2), (OTHER, 2), (WC, 3)] {
            order.extend(sim.ev(done(c, j, A)));
        }
        assert_eq!(
            order,
            vec![
                dispatch(OTHER, 1, A, 1),
                dispatch(WC, 2, A, 1),
                dispatch(OTHER, 2, A, 1),
                dispatch(WC, 3, A, 1),
                dispatch(OTHER, 3, A, 1),
            ]
        );
        sim.all([up(B, 4), ready(OTHER, B)]);
        assert_eq!(sim.s.queued(), 0);
    }

    #[test]
    fn pinned_jobs_go_only_to_their_node_and_wait_while_it_is_unknown() {
        let mut sim = Sim::new();
        sim.all([up(A, 1), ready(WC, A)]);
        assert_eq!(
            sim.ev(submit_pinned(WC, 1, B)),
            vec![],
            "B is unknown: wait"
        );
        assert_eq!(sim.ev(submit(WC, 2)), vec![dispatch(WC, 2, A, 1)]);
        assert_eq!(sim.ev(submit(WC, 3)), vec![]);
        assert_eq!(sim.ev(up(B, 2)), vec![]);
        // Ready on B: only the pinned job may go there, even though job 3 waits.
        assert_eq!(
            sim.ev(ready(WC, B)),
            vec![dispatch(WC, 1, B, 1), dispatch(WC, 3, B, 1)]
        );
        // A full pinned node does not block the cluster's other jobs.
        sim.all([submit_pinned(WC, 4, A), submit(WC, 5)]);
        assert_eq!(sim.ev(done(WC, 1, B)), vec![dispatch(WC, 5, B, 1)]);
        assert_eq!(sim.ev(done(WC, 2, A)), vec![dispatch(WC, 4, A, 1)]);
    }

    #[test]
    fn pinned_jobs_of_a_lost_node_are_abandoned_naming_it() {
        let mut sim = Sim::new();
        sim.all([
            added(WC, true, 5),
            up(A, 1),
            up(B, 1),
            ready(WC, A),
            ready(WC, B),
        ]);
        sim.all([submit_pinned(WC, 1, A), submit_pinned(WC, 2, A)]);
        assert_eq!(
            sim.ev(lost(A)),
            vec![
                abandoned(
                    WC,
                    1,
                    "node a:9701 lost: missed 5 pulses; job 1 of default/wc is pinned to that node"
                ),
                abandoned(
                    WC,
                    2,
                    "job 2 of default/wc is pinned to node a:9701, which was lost: missed 5 pulses"
                ),
            ]
        );
        assert_eq!(
            sim.ev(submit_pinned(WC, 3, A)),
            vec![abandoned(
                WC,
                3,
                "job 3 of default/wc is pinned to node a:9701, which was lost: missed 5 pulses"
            )]
        );
        assert!(sim.s.all_terminal());
    }

    #[test]
    fn lost_node_requeues_jobs_of_a_reentrant_cluster() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 1), up(A, 1), up(B, 1), ready(WC, A)]);
        sim.all([submit(WC, 1), started(WC, 1, A), submit(WC, 2)]);
        sim.ev(ready(WC, B));
        assert_eq!(
            sim.ev(lost(A)),
            vec![Action::Requeued {
                key: key(WC, 1),
                attempt: 1,
                reason: "node a:9701 lost: missed 5 pulses".into()
            }]
        );
        assert_eq!(sim.s.job(&key(WC, 1)).unwrap().state, JobState::Queued);
        assert_eq!(sim.s.node_load(A), None);
        // Back in its FIFO place: before nothing newer, and it goes when B frees up.
        sim.ev(submit(WC, 3));
        assert_eq!(sim.ev(done(WC, 2, B)), vec![dispatch(WC, 1, B, 2)]);
    }

    #[test]
    fn a_jobs_own_policy_overrides_its_clusters_when_its_node_is_lost() {
        let mut sim = Sim::new();
        sim.all([
            added(WC, false, 6),
            up(A, 1),
            up(B, 1),
            ready(WC, A),
            ready(WC, B),
        ]);
        let own = |job, reentrant, backoff_limit| {
            Event::JobSubmitted(JobSpec {
                policy: Some(ClusterPolicy {
                    reentrant,
                    backoff_limit,
                }),
                ..JobSpec::new(key(WC, job))
            })
        };
        // Reentrant on its own in a cluster that is not: requeued, then run on B.
        sim.all([own(1, true, 6), started(WC, 1, A)]);
        assert_eq!(
            sim.ev(lost(A)),
            vec![
                Action::Requeued {
                    key: key(WC, 1),
                    attempt: 1,
                    reason: "node a:9701 lost: missed 5 pulses".into()
                },
                dispatch(WC, 1, B, 2)
            ]
        );
        // Reentrant with no requeue left: abandoned, with the job's own limit in the reason.
        sim.all([up(A, 1), ready(WC, A), own(2, true, 0), started(WC, 2, A)]);
        let why = "node a:9701 lost: missed 5 pulses; backoff limit 0 reached after 1 attempts";
        assert_eq!(sim.ev(lost(A)), vec![abandoned(WC, 2, why)]);
    }

    fn adopted(cluster: &str, job: JobId, node: Option<&str>, running: bool) -> Event {
        Event::JobAdopted {
            spec: JobSpec::new(key(cluster, job)),
            attempts: 2,
            node: node.map(str::to_string),
            running,
        }
    }

    #[test]
    fn adopted_jobs_hold_their_cpu_or_follow_the_policy() {
        let mut sim = Sim::new();
        sim.all([added(WC, false, 6), up(A, 2), ready(WC, A)]);
        // Running on A as the node said: it holds a cpu and is not dispatched again.
        assert_eq!(sim.ev(adopted(WC, 1, Some(A), true)), vec![]);
        let rec = sim.s.job(&key(WC, 1)).unwrap();
        assert_eq!((rec.status(), rec.attempts), (JobStatus::Running, 2));
        assert_eq!(sim.s.node_load(A), Some(NodeLoad { cpus: 2, busy: 1 }));
        assert_eq!(sim.ev(adopted(WC, 1, None, true)), vec![], "seen before");
        // Dispatched but never started anywhere: queued again, and dispatched as attempt 3.
        assert_eq!(
            sim.ev(adopted(WC, 2, None, false)),
            vec![dispatch(WC, 2, A, 3)]
        );
        // It had started and no node has it: lost, and the cluster is not reentrant.
        let why = "its node no longer has it (lost while the scheduler was away); cluster default/wc is not reentrant";
        assert_eq!(
            sim.ev(adopted(WC, 3, None, true)),
            vec![abandoned(WC, 3, why)]
        );
        // Its result still counts once.
        assert_eq!(sim.ev(done(WC, 1, A)), vec![]);
        assert_eq!(
            sim.s.job(&key(WC, 1)).unwrap().status(),
            JobStatus::Finished
        );
        assert_eq!(sim.s.node_load(A), Some(NodeLoad { cpus: 2, busy: 1 }));
    }

    #[test]
    fn an_adopted_job_whose_node_is_down_is_requeued_when_reentrant() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 6), up(B, 1), ready(WC, B)]);
        let actions = sim.ev(adopted(WC, 1, Some(A), true));
        assert!(
            matches!(&actions[..], [Action::Requeued { attempt: 2, .. }, Action::Dispatch { node, attempt: 3, .. }] if node == B),
            "{actions:?}"
        );
    }

    #[test]
    fn lost_node_abandons_jobs_of_a_cluster_that_is_not_reentrant() {
        let mut sim = Sim::new();
        sim.all([
            added(WC, false, 6),
            up(A, 2),
            ready(WC, A),
            submit(WC, 1),
            submit(WC, 2),
        ]);
        sim.ev(started(WC, 1, A));
        let reason = "node a:9701 lost: missed 5 pulses; cluster default/wc is not reentrant";
        assert_eq!(
            sim.ev(lost(A)),
            vec![abandoned(WC, 1, reason), abandoned(WC, 2, reason)]
        );
        let rec = sim.s.job(&key(WC, 1)).unwrap();
        assert_eq!(rec.status(), JobStatus::Abandoned);
        assert_eq!(rec.node(), Some(&A.to_string()), "where it was lost");
    }

    #[test]
    fn backoff_limit_bounds_requeues() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 1), submit(WC, 1)]);
        sim.all([up(A, 1), ready(WC, A)]);
        let requeue = sim.ev(lost(A));
        assert!(matches!(requeue[..], [Action::Requeued { attempt: 1, .. }]));
        assert_eq!(
            sim.ev(up(A, 1)),
            vec![],
            "back but the cluster must be set up again"
        );
        assert_eq!(sim.ev(ready(WC, A)), vec![dispatch(WC, 1, A, 2)]);
        assert_eq!(
            sim.ev(lost(A)),
            vec![abandoned(
                WC,
                1,
                "node a:9701 lost: missed 5 pulses; backoff limit 1 reached after 2 attempts"
            )]
        );
    }

    #[test]
    fn refused_dispatch_is_a_failed_attempt_with_the_nodes_words() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 1), up(A, 1), ready(WC, A)]);
        sim.ev(submit(WC, 1));
        let refuse = || Event::DispatchFailed {
            key: key(WC, 1),
            node: A.into(),
            reason: "computation default/wc unknown".into(),
        };
        let words = "node a:9701 refused job 1 of default/wc: computation default/wc unknown";
        assert_eq!(
            sim.ev(refuse()),
            vec![
                Action::Requeued {
                    key: key(WC, 1),
                    attempt: 1,
                    reason: words.into()
                },
                dispatch(WC, 1, A, 2)
            ]
        );
        assert_eq!(
            sim.ev(refuse()),
            vec![abandoned(
                WC,
                1,
                &format!("{words}; backoff limit 1 reached after 2 attempts")
            )]
        );
        assert_eq!(sim.s.node_load(A).unwrap().busy, 0);
        assert_eq!(sim.ev(refuse()), vec![], "stale: the job is terminal");
    }

    #[test]
    fn deadline_terminates_a_running_job_once() {
        let mut sim = Sim::new();
        sim.all([up(A, 1), ready(WC, A)]);
        sim.ev(Event::JobSubmitted(JobSpec {
            active_deadline: Some(Duration::from_secs(10)),
            ..JobSpec::new(key(WC, 1))
        }));
        assert_eq!(
            sim.at(5, Event::Tick),
            vec![],
            "the clock starts at Running"
        );
        sim.at(6, started(WC, 1, A));
        assert_eq!(sim.at(15, Event::Tick), vec![]);
        let terminate = Action::Terminate {
            key: key(WC, 1),
            node: A.into(),
            reason: "job 1 of default/wc ran longer than its activeDeadlineSeconds (10s)".into(),
        };
        assert_eq!(
            sim.at(16, submit(WC, 2)),
            vec![terminate],
            "any event checks"
        );
        assert_eq!(sim.at(30, Event::Tick), vec![]);
        assert_eq!(sim.ev(Event::CancelRequested { key: key(WC, 1) }), vec![]);
        let terminated = Event::JobDone {
            key: key(WC, 1),
            node: A.into(),
            status: JobStatus::Terminated,
        };
        assert_eq!(sim.ev(terminated), vec![dispatch(WC, 2, A, 1)]);
        assert_eq!(
            sim.s.job(&key(WC, 1)).unwrap().status(),
            JobStatus::Terminated
        );
    }

    #[test]
    fn cancel_queued_running_and_terminal_jobs() {
        let mut sim = Sim::new();
        sim.all([
            up(A, 1),
            ready(WC, A),
            submit(WC, 1),
            submit(WC, 2),
            submit(WC, 3),
        ]);
        let cancel = |j| Event::CancelRequested { key: key(WC, j) };
        assert_eq!(
            sim.ev(cancel(2)),
            vec![Action::Finalize {
                key: key(WC, 2),
                status: JobStatus::Cancelled,
                reason: "job 2 of default/wc was cancelled while queued".into()
            }]
        );
        let terminate = Action::Terminate {
            key: key(WC, 1),
            node: A.into(),
            reason: "job 1 of default/wc was cancelled".into(),
        };
        assert_eq!(sim.ev(cancel(1)), vec![terminate]);
        assert_eq!(sim.ev(cancel(1)), vec![], "Terminate is sent once");
        let cancelled = Event::JobDone {
            key: key(WC, 1),
            node: A.into(),
            status: JobStatus::Cancelled,
        };
        assert_eq!(sim.ev(cancelled), vec![dispatch(WC, 3, A, 1)]);
        assert_eq!(sim.ev(cancel(1)), vec![]);
        assert_eq!(sim.ev(cancel(2)), vec![]);
        assert_eq!(sim.ev(cancel(99)), vec![], "unknown job");
    }

    #[test]
    fn cancelled_job_on_a_lost_node_is_cancelled_not_requeued() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 3), up(A, 1), ready(WC, A), submit(WC, 1)]);
        sim.ev(Event::CancelRequested { key: key(WC, 1) });
        assert_eq!(
            sim.ev(lost(A)),
            vec![Action::Finalize {
                key: key(WC, 1),
                status: JobStatus::Cancelled,
                reason: "node a:9701 lost: missed 5 pulses; job 1 of default/wc had been cancelled"
                    .into()
            }]
        );
    }

    #[test]
    fn stale_results_and_starts_are_ignored() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 3), up(A, 1), up(B, 1), ready(WC, A)]);
        sim.all([submit(WC, 1), started(WC, 1, B)]);
        assert_eq!(
            sim.s.job(&key(WC, 1)).unwrap().state,
            JobState::Dispatched { node: A.into() }
        );
        sim.all([lost(A), ready(WC, B)]);
        assert_eq!(sim.s.job(&key(WC, 1)).unwrap().attempts, 2);
        assert_eq!(
            sim.ev(done(WC, 1, A)),
            vec![],
            "attempt 1's result from the lost node"
        );
        assert_eq!(sim.s.job(&key(WC, 1)).unwrap().status(), JobStatus::Created);
        let not_terminal = Event::JobDone {
            key: key(WC, 1),
            node: B.into(),
            status: JobStatus::Running,
        };
        assert_eq!(sim.ev(not_terminal), vec![]);
        sim.ev(done(WC, 1, B));
        sim.ev(Event::JobDone {
            key: key(WC, 1),
            node: B.into(),
            status: JobStatus::Terminated,
        });
        let rec = sim.s.job(&key(WC, 1)).unwrap();
        assert_eq!(
            rec.state,
            JobState::Terminal {
                status: JobStatus::Finished,
                node: Some(B.into())
            }
        );
        assert_eq!(sim.ev(done(WC, 7, B)), vec![], "unknown job");
        assert_eq!(sim.ev(started(WC, 1, B)), vec![], "terminal job");
    }

    #[test]
    fn a_node_back_after_loss_starts_empty_and_needs_cluster_ready_again() {
        let mut sim = Sim::new();
        sim.all([added(WC, true, 3), up(A, 2), ready(WC, A), submit(WC, 1)]);
        sim.all([lost(A), up(A, 2)]);
        assert_eq!(sim.s.node_load(A), Some(NodeLoad { cpus: 2, busy: 0 }));
        assert_eq!(
            sim.ev(ready(OTHER, B)),
            vec![],
            "ClusterReady of an unknown node is ignored"
        );
        assert_eq!(sim.ev(ready(WC, A)), vec![dispatch(WC, 1, A, 2)]);
        // NodeUp of a node that is up only changes its cpus.
        assert_eq!(sim.ev(up(A, 1)), vec![]);
        assert_eq!(sim.s.node_load(A), Some(NodeLoad { cpus: 1, busy: 1 }));
    }

    #[test]
    fn a_suspended_cluster_dispatches_nothing_new() {
        let mut sim = Sim::new();
        let suspend = |suspended| Event::SuspendCluster {
            cluster: WC.into(),
            suspended,
        };
        sim.all([up(A, 2), ready(WC, A), submit(WC, 1)]);
        assert_eq!(sim.ev(suspend(true)), vec![]);
        assert_eq!(sim.ev(submit(WC, 2)), vec![]);
        assert_eq!(sim.s.job(&key(WC, 1)).unwrap().status(), JobStatus::Created);
        assert_eq!(sim.ev(suspend(false)), vec![dispatch(WC, 2, A, 1)]);
    }

    #[test]
    fn queries_for_the_cli_and_operator() {
        let mut sim = Sim::new();
        assert!(sim.s.is_idle() && sim.s.all_terminal());
        sim.all([
            up(A, 2),
            ready(WC, A),
            submit(WC, 1),
            submit(WC, 2),
            submit(WC, 3),
        ]);
        sim.all([started(WC, 1, A), done(WC, 2, A), submit(OTHER, 1)]);
        assert_eq!(
            sim.s.counts(None),
            BTreeMap::from([
                (JobStatus::Created, 2),
                (JobStatus::Running, 1),
                (JobStatus::Finished, 1)
            ])
        );
        assert_eq!(
            sim.s.counts(Some(OTHER)),
            BTreeMap::from([(JobStatus::Created, 1)])
        );
        assert_eq!(sim.s.queued(), 1);
        assert!(!sim.s.is_idle() && !sim.s.all_terminal());
        assert_eq!(
            sim.ev(submit(WC, 1)),
            vec![],
            "a duplicate submit is ignored"
        );
        assert!(
            !sim.s.forget(&key(WC, 1)),
            "only terminal jobs are forgotten"
        );
        assert!(sim.s.forget(&key(WC, 2)));
        assert_eq!(sim.s.jobs().count(), 3);
        sim.all([
            done(WC, 1, A),
            done(WC, 3, A),
            Event::CancelRequested { key: key(OTHER, 1) },
        ]);
        assert!(sim.s.is_idle() && sim.s.all_terminal());
        let nodes: Vec<_> = sim.s.nodes().collect();
        assert_eq!(nodes, vec![(&A.to_string(), NodeLoad { cpus: 2, busy: 0 })]);
    }
}
