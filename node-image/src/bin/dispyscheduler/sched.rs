//! The scheduler's decisions, without IO: which node a SharedJobCluster client's computation
//! is set up on, which job runs next on which node (dispy's three orders), what happens to
//! jobs when a node is lost, and when a client that went quiet loses its computation.
//!
//! The IO layer calls a method per thing that happened (a request from a client, a message
//! from a node, the clock), passing the time, and carries out the [`Action`]s it takes from
//! [`Scheduler::take_actions`]. Pickled records stay [`Value`]s here: data to pass on.
//!
//! Rules that hold:
//! - a node never runs more of our jobs than its `cpus`;
//! - every job submitted ends in exactly one result sent to its client (the node's reply,
//!   or Cancelled / Abandoned made here), unless the client closes or is declared a zombie;
//! - a job's reply is taken only from the node and attempt it was sent to (a per-attempt
//!   hash), and reaches the client with the hash the client gave it;
//! - an exclusive computation is active only when no other one is, and none starts while it is;
//! - a result stays queued for its client until the client acknowledges it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use dispy_core::pickle::Value;

pub type ComputeId = i64;

/// How often results not acknowledged are sent again, at most.
const RESEND_EVERY: f64 = 10.0;
/// How often listed nodes not found yet are asked again without `--ping_interval`.
const REPING_LISTED: f64 = 30.0;
pub type Uid = u64;

/// dispy's job and node status numbers, as clients read them.
pub mod status {
    pub const RUNNING: i64 = 6;
    pub const PROVISIONAL: i64 = 7;
    pub const CANCELLED: i64 = 8;
    pub const TERMINATED: i64 = 9;
    pub const ABANDONED: i64 = 10;
    pub const NODE_INITIALIZED: i64 = 4;
    pub const NODE_CLOSED: i64 = 16;
}

/// The order in which jobs of different computations get a free cpu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// dispy's default: the job submitted first, whichever computation it belongs to.
    EarliestJob,
    /// `--fair_cluster_scheduler`: the computation that was given a cpu longest ago.
    FairCluster,
    /// `--early_cluster_scheduler`: the computation created first.
    EarliestCluster,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: Policy,
    /// Seconds between node pulses; a busy node silent for 5 of them is lost.
    pub pulse_interval: f64,
    /// Seconds between discovery rounds; `None`: discover at start and when a client asks.
    pub ping_interval: Option<f64>,
    /// Seconds a client may be silent before its computation is closed.
    pub zombie_interval: Option<f64>,
    /// `--cooperative`: clients' `NodeAllocate` cpus limit what a node runs for everyone.
    pub cooperative: bool,
    /// The scheduler's own `-n` list: only nodes it matches are used. Empty: any node,
    /// unless `listed_only`.
    pub nodes: Vec<NodeAlloc>,
    /// The list is all there is (`--nodes_file`): an empty list means no node, and the
    /// scheduler never broadcasts.
    pub listed_only: bool,
}

/// One element of a `nodes=` list (dispy's `NodeAllocate`): an address or pattern with `*`,
/// and how many of a matching node's cpus to use (0: all, negative: all but that many).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAlloc {
    pub host: String,
    pub port: Option<u16>,
    pub cpus: i64,
    /// The arguments of the computation's setup on nodes this matches (a tuple).
    pub setup_args: Value,
}

impl NodeAlloc {
    pub fn any() -> NodeAlloc {
        NodeAlloc {
            host: "*".into(),
            port: None,
            cpus: 0,
            setup_args: Value::Tuple(vec![]),
        }
    }

    pub fn is_pattern(&self) -> bool {
        self.host.contains('*')
    }

    /// Whether the address matches, `*` standing for any run of characters.
    pub fn matches(&self, ip: &str) -> bool {
        glob(self.host.as_bytes(), ip.as_bytes())
    }

    /// dispy's `NodeAllocate.allocate`: the cpus to use of a node offering `cpus`, 0 when
    /// it does not match.
    pub fn allocate(&self, ip: &str, cpus: u32) -> u32 {
        if !self.matches(ip) {
            return 0;
        }
        let cpus = cpus as i64;
        let n = if self.cpus > 0 {
            self.cpus.min(cpus)
        } else {
            cpus + self.cpus
        };
        n.max(0) as u32
    }
}

fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// How to reach a node with an authenticated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub ip: String,
    pub port: u16,
    /// `sha1(node_secret + node sign)`, the first 40 bytes of every request.
    pub auth: String,
    /// The node keeps a connection open for job after job (ours says so in its PONG).
    pub keepalive: bool,
}

/// A job reply on its way to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientReply {
    /// The node's `_JobReply`, its hash set back to the client's.
    Node(Arc<Value>),
    /// A reply made here: a job cancelled before it ran, or abandoned with its node.
    Made {
        hash: String,
        ip: String,
        status: i64,
    },
}

/// A message to a client's result port.
#[derive(Debug, Clone, PartialEq)]
pub enum ToClient {
    /// The computation may submit jobs now (answered with ACK).
    Scheduled { pulse_interval: f64 },
    /// A job was sent to a node.
    Running {
        uid: Uid,
        hash: String,
        node: String,
        start_time: f64,
    },
    /// The computation is set up on a node.
    NodeInitialized { ip: String, name: String, cpus: u32 },
    /// The computation is no longer on a node.
    NodeClosed { ip: String },
    /// A job's result (answered with ACK; see [`Scheduler::delivered`]).
    Result { uid: Uid, reply: ClientReply },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask one node to announce itself to us (TCP `PING:`).
    Ping { ip: String, port: Option<u16> },
    /// Ask every node on our networks (UDP broadcast).
    Broadcast,
    /// Send the computation to a node, then its files, then `SETUP:`; report with
    /// [`Scheduler::setup_done`].
    Setup {
        node: Target,
        scheduler_ip: String,
        compute_id: ComputeId,
        compute: Arc<Value>,
        setup_args: Value,
        exclusive: bool,
    },
    /// Send a job; report with [`Scheduler::job_sent`].
    Run {
        node: Target,
        uid: Uid,
        hash: String,
        job: Arc<Value>,
    },
    /// Terminate a running job (its reply comes as usual, Terminated).
    Terminate {
        node: Target,
        uid: Uid,
        hash: String,
        job: Arc<Value>,
    },
    /// Close a computation on a node.
    Close {
        node: Target,
        compute_id: ComputeId,
        node_auth: String,
        terminate_pending: bool,
    },
    /// A message to a computation's client, in the order given.
    Client {
        compute_id: ComputeId,
        msg: ToClient,
    },
    /// The computation is gone: drop what the IO layer keeps for it (its sender, its files).
    Forget { compute_id: ComputeId, why: Gone },
}

/// Why a computation left the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Its client sent CLOSE.
    Closed,
    /// Its client was silent for the zombie interval.
    Zombie,
    /// Its client did not acknowledge SCHEDULED.
    NotAcknowledged,
    /// The scheduler is stopping.
    Shutdown,
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Gone::Closed => "closed by its client",
            Gone::Zombie => "closed: its client silent for the zombie interval",
            Gone::NotAcknowledged => "dropped: its client did not acknowledge SCHEDULED",
            Gone::Shutdown => "closed: the scheduler is stopping",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// COMPUTE received; files may follow, then SCHEDULE.
    Pending,
    /// SCHEDULE received; waiting for its turn (an exclusive computation is active, or this
    /// one is exclusive and others are).
    Waiting,
    /// SCHEDULED sent, waiting for the client's ACK.
    Announcing,
    Active,
}

/// A computation of one SharedJobCluster client.
#[derive(Debug)]
pub struct Cluster {
    pub id: ComputeId,
    /// What the client proves in every request (the `auth` it sent with COMPUTE).
    pub client_auth: String,
    /// The computation's auth toward nodes (made here; clients never see it).
    pub node_auth: String,
    /// The `_Compute` to send to nodes.
    pub compute: Arc<Value>,
    pub exclusive: bool,
    pub reentrant: bool,
    pub allocs: Vec<NodeAlloc>,
    pub phase: Phase,
    /// The client's address and its port for pulses and results.
    pub client_ip: String,
    pub client_port: u16,
    queue: VecDeque<Uid>,
    /// Jobs submitted and not finished.
    pub pending: usize,
    pub last_pulse: f64,
    created: u64,
    /// When a job of it last got a cpu (a counter), for the fair order.
    served: u64,
    /// Results sent or to send, until the client acknowledges them.
    undelivered: BTreeMap<Uid, (ClientReply, bool)>,
    /// Nodes its client closed it on (`close_node`).
    closed_on: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Node {
    pub ip: String,
    pub port: u16,
    pub name: String,
    pub auth: String,
    /// The address the node reaches us at.
    pub scheduler_ip: String,
    /// See [`Target::keepalive`].
    pub keepalive: bool,
    pub avail_cpus: u32,
    /// The cpus used here (`avail_cpus`, or less for exclusive/cooperative computations).
    pub cpus: u32,
    pub busy: u32,
    /// Computations set up on it, and being set up.
    pub clusters: BTreeSet<ComputeId>,
    setting_up: BTreeSet<ComputeId>,
    /// Jobs submitted for this node only (`submit_node`).
    pinned: VecDeque<Uid>,
    /// Computations set up on it that its client deallocated from it.
    parked: BTreeSet<ComputeId>,
    pub last_pulse: f64,
}

#[derive(Debug)]
pub struct Job {
    pub uid: Uid,
    pub compute_id: ComputeId,
    /// The client's hash; every attempt on a node gets its own.
    pub hash: String,
    attempt: u32,
    submitted: u64,
    pub pinned: Option<String>,
    /// The node it is on (sent or being sent).
    pub node: Option<String>,
    pub payload: Arc<Value>,
}

impl Job {
    /// The hash of the current attempt: the client's for the first.
    pub fn node_hash(&self) -> String {
        if self.attempt == 0 {
            self.hash.clone()
        } else {
            format!("{}.{}", self.hash, self.attempt)
        }
    }
}

/// A computation as a client asks for it (COMPUTE), already checked by the IO layer.
#[derive(Debug, Clone)]
pub struct NewComputation {
    pub client_auth: String,
    pub node_auth: String,
    pub compute: Value,
    pub exclusive: bool,
    pub reentrant: bool,
    pub allocs: Vec<NodeAlloc>,
    pub client_ip: String,
    pub client_port: u16,
}

/// A node's PONG, its token already checked.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub ip: String,
    pub port: u16,
    pub name: String,
    pub cpus: u32,
    pub auth: String,
    pub scheduler_ip: String,
    /// See [`Target::keepalive`].
    pub keepalive: bool,
}

/// How sending a job to a node went.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    Ok,
    /// The node could not be reached: it is dropped and the job goes elsewhere.
    Unreachable(String),
    /// The node refused the job.
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("computation {0} is unknown to this scheduler (closed, or never created)")]
    UnknownComputation(ComputeId),
    #[error("wrong auth for computation {0}")]
    WrongAuth(ComputeId),
    #[error("computation {0} is not scheduled yet")]
    NotScheduled(ComputeId),
    #[error("node {0} is not a node of computation {1}")]
    UnknownNode(String, ComputeId),
    #[error("job {0} is not queued or running for computation {1}")]
    UnknownJob(Uid, ComputeId),
    #[error("computation {0} is not exclusive and the scheduler is not --cooperative: it may not set a node's cpus")]
    NotExclusive(ComputeId),
}

pub struct Scheduler {
    pub cfg: Config,
    pub clusters: BTreeMap<ComputeId, Cluster>,
    pub nodes: BTreeMap<String, Node>,
    pub jobs: BTreeMap<Uid, Job>,
    waiting: VecDeque<ComputeId>,
    next_id: i64,
    next_uid: Uid,
    seq: u64,
    actions: Vec<Action>,
    last_ping: f64,
    last_tick: f64,
}

impl Scheduler {
    pub fn new(cfg: Config, now: f64) -> Scheduler {
        // Ids unlike any earlier run's, so a late reply for an old job never matches.
        let base = (now * 1000.0) as i64;
        Scheduler {
            cfg,
            clusters: BTreeMap::new(),
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            waiting: VecDeque::new(),
            next_id: base.max(1),
            next_uid: (base.max(1) as u64) << 12,
            seq: 0,
            actions: Vec::new(),
            last_ping: now,
            last_tick: now,
        }
    }

    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn tick_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The first discovery round.
    pub fn start(&mut self) {
        self.discover(None);
    }

    fn discover(&mut self, allocs: Option<Vec<NodeAlloc>>) {
        let allocs = allocs.unwrap_or_else(|| self.cfg.nodes.clone());
        // Only the scheduler's own list may make it broadcast, and a fixed list never does.
        let may_broadcast = !self.cfg.listed_only
            && (self.cfg.nodes.is_empty() || self.cfg.nodes.iter().any(|n| n.is_pattern()));
        let mut broadcast = may_broadcast && allocs.is_empty();
        for a in &allocs {
            if a.is_pattern() {
                broadcast |= may_broadcast;
            } else if !self.nodes.contains_key(&a.host) && self.wants(&a.host) {
                self.actions.push(Action::Ping {
                    ip: a.host.clone(),
                    port: a.port,
                });
            }
        }
        if broadcast {
            self.actions.push(Action::Broadcast);
        }
    }

    /// Whether the scheduler's own list lets it use the node at `ip`.
    pub fn wants(&self, ip: &str) -> bool {
        (self.cfg.nodes.is_empty() && !self.cfg.listed_only)
            || self.cfg.nodes.iter().any(|a| a.matches(ip))
    }

    /// A new list of the scheduler's own nodes (`--nodes_file` changed): nodes it no longer
    /// matches are closed and dropped (their reentrant jobs run elsewhere), new addresses
    /// are pinged.
    pub fn set_nodes(&mut self, now: f64, nodes: Vec<NodeAlloc>) {
        self.cfg.nodes = nodes;
        let unlisted: Vec<String> = self
            .nodes
            .keys()
            .filter(|ip| !self.wants(ip))
            .cloned()
            .collect();
        for ip in unlisted {
            let node = &self.nodes[&ip];
            let on: BTreeSet<ComputeId> = (node.clusters.iter())
                .chain(&node.setting_up)
                .chain(&node.parked)
                .copied()
                .collect();
            for id in &on {
                if let Some(c) = self.clusters.get(id) {
                    self.actions.push(Action::Close {
                        node: target(node),
                        compute_id: *id,
                        node_auth: c.node_auth.clone(),
                        terminate_pending: true,
                    });
                }
            }
            self.node_lost(now, &ip);
        }
        self.discover(None);
    }

    fn cluster_checked(&self, id: ComputeId, auth: &str) -> Result<&Cluster, Refusal> {
        let c = self
            .clusters
            .get(&id)
            .ok_or(Refusal::UnknownComputation(id))?;
        if !dispy_core::auth::constant_time_eq(c.client_auth.as_bytes(), auth.as_bytes()) {
            return Err(Refusal::WrongAuth(id));
        }
        Ok(c)
    }

    /// Whether `auth` is the client's auth of computation `id`.
    pub fn check(&self, id: ComputeId, auth: &str) -> Result<(), Refusal> {
        self.cluster_checked(id, auth).map(|_| ())
    }

    // ---- clients -------------------------------------------------------------------------

    /// COMPUTE: a new computation, pending until SCHEDULE.
    pub fn new_computation(&mut self, now: f64, req: NewComputation) -> ComputeId {
        self.next_id += 1;
        let id = self.next_id;
        let created = self.tick_seq();
        self.clusters.insert(
            id,
            Cluster {
                id,
                client_auth: req.client_auth,
                node_auth: req.node_auth,
                compute: Arc::new(req.compute),
                exclusive: req.exclusive,
                reentrant: req.reentrant,
                allocs: if req.allocs.is_empty() {
                    vec![NodeAlloc::any()]
                } else {
                    req.allocs
                },
                phase: Phase::Pending,
                client_ip: req.client_ip,
                client_port: req.client_port,
                queue: VecDeque::new(),
                pending: 0,
                last_pulse: now,
                created,
                served: 0,
                undelivered: BTreeMap::new(),
                closed_on: BTreeSet::new(),
            },
        );
        id
    }

    /// Replaces the `_Compute` sent to nodes (the IO layer sets the `_Compute`'s id in it).
    pub fn set_compute(&mut self, id: ComputeId, compute: Value) {
        if let Some(c) = self.clusters.get_mut(&id) {
            c.compute = Arc::new(compute);
        }
    }

    /// SCHEDULE: the client has sent its files; the computation waits for its turn.
    pub fn schedule(&mut self, now: f64, id: ComputeId, auth: &str) -> Result<(), Refusal> {
        let c = self.cluster_checked(id, auth)?;
        if c.phase != Phase::Pending {
            return Err(Refusal::NotScheduled(id));
        }
        let c = self.clusters.get_mut(&id).expect("checked");
        c.phase = Phase::Waiting;
        c.last_pulse = now;
        self.waiting.push_back(id);
        self.activate();
        Ok(())
    }

    /// Starts waiting computations in order while exclusivity allows.
    fn activate(&mut self) {
        while let Some(&id) = self.waiting.front() {
            let Some(c) = self.clusters.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let others: Vec<&Cluster> = self
                .clusters
                .values()
                .filter(|o| matches!(o.phase, Phase::Announcing | Phase::Active))
                .collect();
            if !others.is_empty() && (c.exclusive || others.iter().any(|o| o.exclusive)) {
                return;
            }
            self.waiting.pop_front();
            let c = self.clusters.get_mut(&id).expect("present");
            c.phase = Phase::Announcing;
            self.actions.push(Action::Client {
                compute_id: id,
                msg: ToClient::Scheduled {
                    pulse_interval: self.cfg.pulse_interval,
                },
            });
        }
    }

    /// The client's answer to SCHEDULED: with an ACK the computation goes to the nodes.
    pub fn scheduled(&mut self, now: f64, id: ComputeId, acked: bool) {
        let Some(c) = self.clusters.get_mut(&id) else {
            return;
        };
        if c.phase != Phase::Announcing {
            return;
        }
        if !acked {
            self.drop_cluster(id, false, Gone::NotAcknowledged);
            self.activate();
            return;
        }
        c.phase = Phase::Active;
        c.last_pulse = now;
        let allocs = c.allocs.clone();
        self.discover(Some(allocs));
        let ips: Vec<String> = self.nodes.keys().cloned().collect();
        for ip in ips {
            self.offer(&ip, id);
        }
    }

    /// Sets up computation `id` on node `ip` if its allocations want the node.
    fn offer(&mut self, ip: &str, id: ComputeId) {
        let Some(c) = self.clusters.get(&id) else {
            return;
        };
        let Some(node) = self.nodes.get_mut(ip) else {
            return;
        };
        if c.phase != Phase::Active
            || node.clusters.contains(&id)
            || node.setting_up.contains(&id)
            || node.parked.contains(&id)
            || c.closed_on.contains(ip)
        {
            return;
        }
        let Some((alloc, cpus)) = c
            .allocs
            .iter()
            .map(|a| (a, a.allocate(ip, node.avail_cpus)))
            .find(|(_, cpus)| *cpus > 0)
        else {
            return;
        };
        if c.exclusive || self.cfg.cooperative {
            node.cpus = node.avail_cpus.min(cpus);
        }
        node.setting_up.insert(id);
        self.actions.push(Action::Setup {
            node: target(node),
            scheduler_ip: node.scheduler_ip.clone(),
            compute_id: id,
            compute: c.compute.clone(),
            setup_args: alloc.setup_args.clone(),
            exclusive: c.exclusive,
        });
    }

    /// A uid for a job about to be submitted (the client is told it before the job is queued).
    pub fn new_uid(&mut self) -> Uid {
        self.next_uid += 1;
        self.next_uid
    }

    /// JOB, after the client acknowledged its uid: the job is queued.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        now: f64,
        id: ComputeId,
        auth: &str,
        uid: Uid,
        hash: String,
        pinned: Option<String>,
        payload: Value,
    ) -> Result<(), Refusal> {
        let c = self.cluster_checked(id, auth)?;
        // A client submits as soon as it has acknowledged SCHEDULED, which may be before
        // its ACK has reached us.
        if !matches!(c.phase, Phase::Active | Phase::Announcing) {
            return Err(Refusal::NotScheduled(id));
        }
        if let Some(ip) = &pinned {
            if !self.nodes.get(ip).is_some_and(|n| n.clusters.contains(&id)) {
                return Err(Refusal::UnknownNode(ip.clone(), id));
            }
        }
        let submitted = self.tick_seq();
        self.jobs.insert(
            uid,
            Job {
                uid,
                compute_id: id,
                hash,
                attempt: 0,
                submitted,
                pinned: pinned.clone(),
                node: None,
                payload: Arc::new(payload),
            },
        );
        match pinned {
            Some(ip) => self
                .nodes
                .get_mut(&ip)
                .expect("checked")
                .pinned
                .push_back(uid),
            None => self
                .clusters
                .get_mut(&id)
                .expect("checked")
                .queue
                .push_back(uid),
        }
        let c = self.clusters.get_mut(&id).expect("checked");
        c.pending += 1;
        c.last_pulse = now;
        self.dispatch(now);
        Ok(())
    }

    /// A job whose uid the client acknowledged but that could not be queued (its computation
    /// or pinned node went away meanwhile) ends Cancelled, so the client is not left waiting.
    pub fn not_queued(&mut self, id: ComputeId, uid: Uid, hash: String) {
        let job = Job {
            uid,
            compute_id: id,
            hash,
            attempt: 0,
            submitted: 0,
            pinned: None,
            node: None,
            payload: Arc::new(Value::None),
        };
        if let Some(c) = self.clusters.get_mut(&id) {
            c.pending += 1;
        }
        self.finish_made(&job, String::new(), status::CANCELLED);
    }

    /// PULSE from a client: every computation of that client is alive.
    pub fn client_pulse(&mut self, now: f64, ip: &str, port: u16) {
        for c in self.clusters.values_mut() {
            if c.client_ip == ip && c.client_port == port {
                c.last_pulse = now;
            }
        }
    }

    /// TERMINATE_JOB: a queued job is cancelled here, a running one terminated on its node.
    pub fn cancel(&mut self, now: f64, id: ComputeId, auth: &str, uid: Uid) -> Result<(), Refusal> {
        self.cluster_checked(id, auth)?;
        let job = self
            .jobs
            .get(&uid)
            .filter(|j| j.compute_id == id)
            .ok_or(Refusal::UnknownJob(uid, id))?;
        self.clusters.get_mut(&id).expect("checked").last_pulse = now;
        if let Some(ip) = &job.node {
            if let Some(node) = self.nodes.get(ip) {
                self.actions.push(Action::Terminate {
                    node: target(node),
                    uid,
                    hash: job.node_hash(),
                    job: job.payload.clone(),
                });
            }
            return Ok(());
        }
        let job = self.jobs.remove(&uid).expect("present");
        match &job.pinned {
            Some(ip) => {
                if let Some(n) = self.nodes.get_mut(ip) {
                    n.pinned.retain(|u| *u != uid);
                }
            }
            None => self
                .clusters
                .get_mut(&id)
                .expect("checked")
                .queue
                .retain(|u| *u != uid),
        }
        self.finish_made(&job, String::new(), status::CANCELLED);
        Ok(())
    }

    /// A result made here for a job that leaves the scheduler.
    fn finish_made(&mut self, job: &Job, ip: String, status: i64) {
        if let Some(c) = self.clusters.get_mut(&job.compute_id) {
            c.pending = c.pending.saturating_sub(1);
            let reply = ClientReply::Made {
                hash: job.hash.clone(),
                ip,
                status,
            };
            c.undelivered.insert(job.uid, (reply.clone(), true));
            self.actions.push(Action::Client {
                compute_id: job.compute_id,
                msg: ToClient::Result {
                    uid: job.uid,
                    reply,
                },
            });
        }
    }

    /// CLOSE from the client (or its zombie timeout): the computation leaves every node.
    pub fn close(
        &mut self,
        id: ComputeId,
        auth: &str,
        terminate_pending: bool,
    ) -> Result<(), Refusal> {
        self.cluster_checked(id, auth)?;
        self.drop_cluster(id, terminate_pending, Gone::Closed);
        self.activate();
        Ok(())
    }

    fn drop_cluster(&mut self, id: ComputeId, terminate_pending: bool, why: Gone) {
        let Some(c) = self.clusters.remove(&id) else {
            return;
        };
        self.waiting.retain(|w| *w != id);
        let queued: Vec<Uid> = self
            .jobs
            .values()
            .filter(|j| j.compute_id == id && j.node.is_none())
            .map(|j| j.uid)
            .collect();
        for uid in queued {
            self.jobs.remove(&uid);
        }
        for node in self.nodes.values_mut() {
            node.pinned.retain(|u| self.jobs.contains_key(u));
            let was_on =
                node.clusters.remove(&id) | node.setting_up.remove(&id) | node.parked.remove(&id);
            if was_on {
                self.actions.push(Action::Close {
                    node: target(node),
                    compute_id: id,
                    node_auth: c.node_auth.clone(),
                    terminate_pending,
                });
            }
            if !node
                .clusters
                .iter()
                .any(|cid| self.clusters.get(cid).is_some_and(|c| c.exclusive))
                && !self.cfg.cooperative
            {
                node.cpus = node.avail_cpus;
            }
        }
        // Running jobs stay in `jobs` until their node replies, so their cpus stay counted.
        self.actions.push(Action::Forget {
            compute_id: id,
            why,
        });
    }

    /// NODE_JOBS: the uids of the computation's jobs on a node.
    pub fn node_jobs(&self, id: ComputeId, auth: &str, ip: &str) -> Result<Vec<Uid>, Refusal> {
        self.cluster_checked(id, auth)?;
        Ok(self
            .jobs
            .values()
            .filter(|j| j.compute_id == id && j.node.as_deref() == Some(ip))
            .map(|j| j.uid)
            .collect())
    }

    /// SET_NODE_CPUS (exclusive or cooperative computations only, as dispy): the cpus used on
    /// a node; negative: all but that many.
    pub fn set_node_cpus(
        &mut self,
        now: f64,
        id: ComputeId,
        auth: &str,
        ip: &str,
        cpus: i64,
    ) -> Result<u32, Refusal> {
        let c = self.cluster_checked(id, auth)?;
        if !(c.exclusive || self.cfg.cooperative) {
            return Err(Refusal::NotExclusive(id));
        }
        let node = self
            .nodes
            .get_mut(ip)
            .ok_or_else(|| Refusal::UnknownNode(ip.into(), id))?;
        let avail = node.avail_cpus as i64;
        let n = if cpus >= 0 {
            cpus.min(avail)
        } else {
            (avail + cpus).max(0)
        };
        node.cpus = n as u32;
        self.dispatch(now);
        Ok(n as u32)
    }

    /// The client acknowledged a result (or could not be reached: it is sent again later).
    pub fn delivered(&mut self, now: f64, id: ComputeId, uid: Uid, ok: bool) {
        if let Some(c) = self.clusters.get_mut(&id) {
            if ok {
                c.undelivered.remove(&uid);
                c.last_pulse = now;
            } else if let Some(entry) = c.undelivered.get_mut(&uid) {
                entry.1 = false;
            }
        }
    }

    /// RESEND_JOB_RESULTS / PENDING_JOBS: results not acknowledged, and jobs not done.
    pub fn pending(&self, id: ComputeId, auth: &str) -> Result<(Vec<Uid>, usize), Refusal> {
        let c = self.cluster_checked(id, auth)?;
        Ok((c.undelivered.keys().copied().collect(), c.pending))
    }

    /// Sends every unacknowledged result again.
    pub fn resend(&mut self, id: ComputeId) {
        let Some(c) = self.clusters.get_mut(&id) else {
            return;
        };
        for (uid, (reply, in_flight)) in c.undelivered.iter_mut() {
            if !*in_flight {
                *in_flight = true;
                self.actions.push(Action::Client {
                    compute_id: id,
                    msg: ToClient::Result {
                        uid: *uid,
                        reply: reply.clone(),
                    },
                });
            }
        }
    }

    // ---- nodes ---------------------------------------------------------------------------

    /// A node answered our ping with the right token. A known node with another token has
    /// restarted: what ran there is lost.
    pub fn node_found(&mut self, now: f64, info: NodeInfo) {
        if !self.wants(&info.ip) || info.cpus == 0 || info.port == 0 {
            return;
        }
        let restarted = self.nodes.get(&info.ip).is_some_and(|n| {
            n.auth != info.auth || n.port != info.port || n.keepalive != info.keepalive
        });
        if restarted {
            self.node_lost(now, &info.ip);
        }
        match self.nodes.get_mut(&info.ip) {
            Some(n) => {
                n.last_pulse = now;
                n.avail_cpus = info.cpus;
                n.cpus = n.cpus.min(info.cpus);
                n.name = info.name;
            }
            None => {
                self.nodes.insert(
                    info.ip.clone(),
                    Node {
                        ip: info.ip.clone(),
                        port: info.port,
                        name: info.name,
                        auth: info.auth,
                        scheduler_ip: info.scheduler_ip,
                        keepalive: info.keepalive,
                        avail_cpus: info.cpus,
                        cpus: info.cpus,
                        busy: 0,
                        clusters: BTreeSet::new(),
                        setting_up: BTreeSet::new(),
                        pinned: VecDeque::new(),
                        parked: BTreeSet::new(),
                        last_pulse: now,
                    },
                );
            }
        }
        let ids: Vec<ComputeId> = self.clusters.keys().copied().collect();
        for id in ids {
            self.offer(&info.ip, id);
        }
    }

    /// Whether a token is the one of the node at `ip` (messages from nodes carry no auth
    /// prefix; pulses name the node).
    pub fn node_known(&self, ip: &str) -> bool {
        self.nodes.contains_key(ip)
    }

    pub fn node_pulse(&mut self, now: f64, ip: &str) -> bool {
        match self.nodes.get_mut(ip) {
            Some(n) => {
                n.last_pulse = now;
                true
            }
            None => false,
        }
    }

    /// How a setup went: `Ok(cpus)` with the cpus the node offers the computation.
    pub fn setup_done(&mut self, now: f64, ip: &str, id: ComputeId, result: Result<u32, String>) {
        let Some(node) = self.nodes.get_mut(ip) else {
            return;
        };
        if !node.setting_up.remove(&id) {
            return;
        }
        let Some(c) = self.clusters.get(&id) else {
            return;
        };
        match result {
            Ok(cpus) => {
                node.last_pulse = now;
                node.avail_cpus = cpus.max(1);
                node.cpus = node.cpus.min(node.avail_cpus).max(1);
                node.clusters.insert(id);
                self.actions.push(Action::Client {
                    compute_id: id,
                    msg: ToClient::NodeInitialized {
                        ip: node.ip.clone(),
                        name: node.name.clone(),
                        cpus: node.cpus,
                    },
                });
                self.dispatch(now);
            }
            Err(_) => {
                self.actions.push(Action::Close {
                    node: target(node),
                    compute_id: id,
                    node_auth: c.node_auth.clone(),
                    terminate_pending: true,
                });
            }
        }
    }

    /// How sending a job went.
    pub fn job_sent(&mut self, now: f64, uid: Uid, hash: &str, sent: Sent) {
        let Some(job) = self.jobs.get(&uid) else {
            return;
        };
        if job.node_hash() != hash {
            return;
        }
        let ip = job.node.clone().unwrap_or_default();
        match sent {
            Sent::Ok => {
                let msg = ToClient::Running {
                    uid,
                    hash: job.hash.clone(),
                    node: ip,
                    start_time: now,
                };
                let id = job.compute_id;
                if self.clusters.contains_key(&id) {
                    self.actions.push(Action::Client {
                        compute_id: id,
                        msg,
                    });
                }
            }
            Sent::Unreachable(_) => {
                self.node_lost(now, &ip);
            }
            Sent::Refused(_) => {
                let job = self.jobs.remove(&uid).expect("present");
                if let Some(n) = self.nodes.get_mut(&ip) {
                    n.busy = n.busy.saturating_sub(1);
                }
                self.finish_made(&job, ip, status::ABANDONED);
                self.dispatch(now);
            }
        }
    }

    /// A `_JobReply` from a node, decoded: `uid`, `hash` and `status` read from it. Returns
    /// whether it was taken (else it is stale or forged, and dropped).
    pub fn job_reply(
        &mut self,
        now: f64,
        from_ip: &str,
        uid: Uid,
        hash: &str,
        status: i64,
        mut reply: Value,
    ) -> bool {
        let Some(job) = self.jobs.get(&uid) else {
            return false;
        };
        if job.node_hash() != hash || job.node.as_deref() != Some(from_ip) {
            return false;
        }
        if let Some(n) = self.nodes.get_mut(from_ip) {
            n.last_pulse = now;
        }
        if job.hash != hash {
            set_attr(&mut reply, "hash", Value::Str(job.hash.clone()));
        }
        let id = job.compute_id;
        if status != status::PROVISIONAL {
            let job = self.jobs.remove(&uid).expect("present");
            if let Some(n) = self.nodes.get_mut(from_ip) {
                n.busy = n.busy.saturating_sub(1);
            }
            if let Some(c) = self.clusters.get_mut(&id) {
                c.pending = c.pending.saturating_sub(1);
            }
            drop(job);
        }
        if let Some(c) = self.clusters.get_mut(&id) {
            let reply = ClientReply::Node(Arc::new(reply));
            if status != status::PROVISIONAL {
                c.undelivered.insert(uid, (reply.clone(), true));
            }
            self.actions.push(Action::Client {
                compute_id: id,
                msg: ToClient::Result { uid, reply },
            });
        }
        self.dispatch(now);
        true
    }

    /// A node is gone (unreachable, silent, restarted, or it said TERMINATED): its
    /// reentrant jobs go back to their queues, the others are abandoned.
    pub fn node_lost(&mut self, now: f64, ip: &str) {
        let Some(node) = self.nodes.remove(ip) else {
            return;
        };
        for id in node.clusters.iter() {
            if self.clusters.contains_key(id) {
                self.actions.push(Action::Client {
                    compute_id: *id,
                    msg: ToClient::NodeClosed { ip: ip.into() },
                });
            }
        }
        let on_node: Vec<Uid> = self
            .jobs
            .values()
            .filter(|j| j.node.as_deref() == Some(ip))
            .map(|j| j.uid)
            .collect();
        let mut requeue: Vec<Uid> = Vec::new();
        for uid in on_node {
            let job = self.jobs.get_mut(&uid).expect("present");
            let reentrant = self
                .clusters
                .get(&job.compute_id)
                .is_some_and(|c| c.reentrant);
            if reentrant && job.pinned.is_none() {
                job.node = None;
                job.attempt += 1;
                requeue.push(uid);
            } else {
                let job = self.jobs.remove(&uid).expect("present");
                self.finish_made(&job, ip.into(), status::ABANDONED);
            }
        }
        // Back at the front, in their submission order.
        requeue.sort_by_key(|u| std::cmp::Reverse(self.jobs[u].submitted));
        for uid in requeue {
            let id = self.jobs[&uid].compute_id;
            if let Some(c) = self.clusters.get_mut(&id) {
                c.queue.push_front(uid);
            }
        }
        for uid in node.pinned {
            if let Some(job) = self.jobs.remove(&uid) {
                self.finish_made(&job, ip.into(), status::CANCELLED);
            }
        }
        self.dispatch(now);
    }

    /// The scheduler is stopping: every job not done ends Terminated for its client, and every
    /// computation leaves its nodes.
    pub fn shutdown(&mut self) {
        let uids: Vec<Uid> = self.jobs.keys().copied().collect();
        for uid in uids {
            let job = self.jobs.remove(&uid).expect("listed");
            let ip = job.node.clone().unwrap_or_default();
            self.finish_made(&job, ip, status::TERMINATED);
        }
        let ids: Vec<ComputeId> = self.clusters.keys().copied().collect();
        for id in ids {
            self.drop_cluster(id, true, Gone::Shutdown);
        }
    }

    // ---- the clock -----------------------------------------------------------------------

    /// Lost nodes, zombie clients, results to send again, discovery rounds.
    pub fn tick(&mut self, now: f64) {
        let silent = 5.0 * self.cfg.pulse_interval;
        let lost: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.busy > 0 && now - n.last_pulse > silent)
            .map(|n| n.ip.clone())
            .collect();
        for ip in lost {
            self.node_lost(now, &ip);
        }
        if let Some(zombie) = self.cfg.zombie_interval {
            let zombies: Vec<ComputeId> = self
                .clusters
                .values()
                .filter(|c| now - c.last_pulse > zombie)
                .map(|c| c.id)
                .collect();
            for id in zombies {
                self.drop_cluster(id, true, Gone::Zombie);
            }
            self.activate();
        }
        if now - self.last_tick >= self.cfg.pulse_interval.min(RESEND_EVERY) {
            self.last_tick = now;
            let ids: Vec<ComputeId> = self.clusters.keys().copied().collect();
            for id in ids {
                self.resend(id);
            }
        }
        let every = self.cfg.ping_interval.unwrap_or(REPING_LISTED);
        if now - self.last_ping >= every {
            self.last_ping = now;
            if self.cfg.ping_interval.is_none() {
                // Without --ping_interval, only listed nodes not found yet are asked again.
                let listed: Vec<NodeAlloc> = self
                    .cfg
                    .nodes
                    .iter()
                    .filter(|a| !a.is_pattern())
                    .cloned()
                    .collect();
                for a in listed {
                    if !self.nodes.contains_key(&a.host) {
                        self.actions.push(Action::Ping {
                            ip: a.host,
                            port: a.port,
                        });
                    }
                }
            } else {
                self.discover(None);
                let allocs: Vec<NodeAlloc> = self
                    .clusters
                    .values()
                    .filter(|c| c.phase == Phase::Active)
                    .flat_map(|c| c.allocs.clone())
                    .filter(|a| !a.is_pattern())
                    .collect();
                if !allocs.is_empty() {
                    self.discover(Some(allocs));
                }
            }
        }
    }

    // ---- a client's node requests ----------------------------------------------------------

    /// ALLOCATE_NODE: more nodes for a computation (its `allocate_node`). A node it was set
    /// up on and deallocated from gets its jobs again.
    pub fn allocate_node(
        &mut self,
        now: f64,
        id: ComputeId,
        auth: &str,
        allocs: Vec<NodeAlloc>,
    ) -> Result<(), Refusal> {
        self.cluster_checked(id, auth)?;
        let mut new = Vec::new();
        for a in allocs {
            let parked = self
                .nodes
                .get_mut(&a.host)
                .filter(|n| n.parked.contains(&id));
            if let Some(n) = parked {
                n.parked.remove(&id);
                n.clusters.insert(id);
                continue;
            }
            let c = self.clusters.get_mut(&id).expect("checked");
            if !c.allocs.iter().any(|x| x.host == a.host) {
                c.allocs.push(a.clone());
            }
            new.push(a);
        }
        if !new.is_empty() {
            self.discover(Some(new));
            let ips: Vec<String> = self.nodes.keys().cloned().collect();
            for ip in ips {
                self.offer(&ip, id);
            }
        }
        self.dispatch(now);
        Ok(())
    }

    /// DEALLOCATE_NODE: no more jobs of the computation go to the node (the computation stays
    /// set up there; running jobs finish).
    pub fn deallocate_node(&mut self, id: ComputeId, auth: &str, ip: &str) -> Result<(), Refusal> {
        self.cluster_checked(id, auth)?;
        let node = self
            .nodes
            .get_mut(ip)
            .filter(|n| n.clusters.contains(&id))
            .ok_or_else(|| Refusal::UnknownNode(ip.into(), id))?;
        node.clusters.remove(&id);
        node.parked.insert(id);
        Ok(())
    }

    /// CLOSE_NODE: the computation leaves the node.
    pub fn close_node(
        &mut self,
        id: ComputeId,
        auth: &str,
        ip: &str,
        terminate_pending: bool,
    ) -> Result<(), Refusal> {
        let c = self.cluster_checked(id, auth)?;
        let node_auth = c.node_auth.clone();
        let node = self
            .nodes
            .get_mut(ip)
            .filter(|n| n.clusters.contains(&id) || n.parked.contains(&id))
            .ok_or_else(|| Refusal::UnknownNode(ip.into(), id))?;
        node.clusters.remove(&id);
        node.parked.remove(&id);
        let t = target(node);
        if let Some(c) = self.clusters.get_mut(&id) {
            // Not set up there again when the node is rediscovered.
            c.closed_on.insert(ip.into());
        }
        self.actions.push(Action::Close {
            node: t,
            compute_id: id,
            node_auth,
            terminate_pending,
        });
        self.actions.push(Action::Client {
            compute_id: id,
            msg: ToClient::NodeClosed { ip: ip.into() },
        });
        Ok(())
    }

    /// NODE_CPUS from a node (its console `cpus N`): what it offers now.
    pub fn node_cpus(&mut self, now: f64, ip: &str, cpus: u32) {
        let Some(n) = self.nodes.get_mut(ip) else {
            return;
        };
        n.avail_cpus = cpus;
        n.cpus = cpus;
        n.last_pulse = now;
        self.dispatch(now);
    }

    // ---- which job runs where ------------------------------------------------------------

    /// Gives free cpus jobs until none can be placed.
    fn dispatch(&mut self, _now: f64) {
        while let Some((uid, ip)) = self.select() {
            let node = self.nodes.get_mut(&ip).expect("selected");
            node.busy += 1;
            let target = target(node);
            let job = self.jobs.get_mut(&uid).expect("selected");
            job.node = Some(ip);
            let seq = {
                self.seq += 1;
                self.seq
            };
            if let Some(c) = self.clusters.get_mut(&job.compute_id) {
                c.served = seq;
            }
            self.actions.push(Action::Run {
                node: target,
                uid,
                hash: job.node_hash(),
                job: job.payload.clone(),
            });
        }
    }

    /// dispy's `load_balance_node`: a node with a pinned job first, else the least loaded
    /// node with work for it.
    fn pick_node(&self) -> Option<String> {
        let mut best: Option<(&Node, f64)> = None;
        for n in self.nodes.values() {
            if n.busy >= n.cpus {
                continue;
            }
            if !n.pinned.is_empty() {
                return Some(n.ip.clone());
            }
            let has_work = n
                .clusters
                .iter()
                .any(|id| self.clusters.get(id).is_some_and(|c| !c.queue.is_empty()));
            if !has_work {
                continue;
            }
            let load = n.busy as f64 / n.cpus as f64;
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((n, load));
            }
        }
        best.map(|(n, _)| n.ip.clone())
    }

    fn select(&mut self) -> Option<(Uid, String)> {
        let ip = self.pick_node()?;
        let node = &self.nodes[&ip];
        // The key each policy orders by: smaller goes first.
        let key = |s: &Scheduler, c: &Cluster| -> u64 {
            match s.cfg.policy {
                Policy::EarliestJob => s.jobs[c.queue.front().expect("non-empty")].submitted,
                Policy::FairCluster => c.served,
                Policy::EarliestCluster => c.created,
            }
        };
        let best = node
            .clusters
            .iter()
            .filter_map(|id| self.clusters.get(id))
            .filter(|c| !c.queue.is_empty())
            .min_by_key(|c| (key(self, c), c.created))
            .map(|c| (c.id, key(self, c)));
        let pinned = node.pinned.front().map(|uid| {
            let j = &self.jobs[uid];
            let k = match self.cfg.policy {
                Policy::EarliestJob => j.submitted,
                Policy::FairCluster => self.clusters.get(&j.compute_id).map_or(0, |c| c.served),
                Policy::EarliestCluster => {
                    self.clusters.get(&j.compute_id).map_or(0, |c| c.created)
                }
            };
            (*uid, k)
        });
        let take_pinned = match (pinned, best) {
            (Some((_, pk)), Some((_, ck))) => pk < ck,
            (Some(_), None) => true,
            _ => false,
        };
        if take_pinned {
            let uid = self.nodes.get_mut(&ip)?.pinned.pop_front()?;
            return Some((uid, ip));
        }
        let (id, _) = best?;
        let uid = self.clusters.get_mut(&id)?.queue.pop_front()?;
        Some((uid, ip))
    }
}

fn target(n: &Node) -> Target {
    Target {
        ip: n.ip.clone(),
        port: n.port,
        auth: n.auth.clone(),
        keepalive: n.keepalive,
    }
}

/// Sets an attribute in an instance's `BUILD` state dict.
pub fn set_attr(v: &mut Value, name: &str, value: Value) {
    let dict = match v {
        Value::Dict(d) => d,
        Value::Object(o) => match o.state.as_mut() {
            Some(Value::Dict(d)) => d,
            Some(Value::Tuple(t)) if t.len() == 2 => match &mut t[0] {
                Value::Dict(d) => d,
                _ => return,
            },
            None => {
                o.state = Some(Value::Dict(vec![]));
                match o.state.as_mut() {
                    Some(Value::Dict(d)) => d,
                    _ => return,
                }
            }
            _ => return,
        },
        _ => return,
    };
    match dict.iter_mut().find(|(k, _)| k.as_str() == Some(name)) {
        Some((_, slot)) => *slot = value,
        None => dict.push((Value::Str(name.into()), value)),
    }
}

#[cfg(test)]
mod tests;
