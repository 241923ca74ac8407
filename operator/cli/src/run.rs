//! `dispy run`: connects to the nodes (starting local ones when none are given), ships each
//! computation, then lets core's scheduler place the jobs and follows them to the end.
//!
//! A DispyJobArray's indexes are jobs of its cluster's computation, in a scheduler cluster of
//! their own (the array's policy, its suspend). They reach the scheduler a window at a time
//! and leave it when they end, each as one row spooled to disk, so a run holds a few words per
//! index however large the array.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispy_core::driver::{NodeNames, NodeNews, Outgoing};
use dispy_core::job::{JobId, JobResult, JobStatus};
use dispy_core::manifest::{rfc3339, DispyJobArrayStatus, DispyJobStatus, SentFileStatus};
use dispy_core::protocol::{JobRequest, SentFile};
use dispy_core::scheduler::{Action, Event, JobKey, JobSpec, Scheduler};
use dispy_core::{ClientConfig, ClientEvent, NodeClient};
use tokio::sync::mpsc;

use crate::load::Plan;
use crate::progress::Progress;
use crate::rows::{results_path, spool_path, RowSpool};

pub struct RunOptions {
    /// Local nodes to start when no node is given.
    pub local_nodes: usize,
    /// Nodes given on the command line (`host:port` or `host`).
    pub nodes: Vec<String>,
    pub discover: bool,
    pub secret: String,
    pub pulse_interval: Duration,
    pub quiet: bool,
    /// Where sent files are saved (see [`save_sent_file`]).
    pub files_dir: PathBuf,
    /// Where arrays' results files are written; `None`: kept for standard output.
    pub results_dir: Option<PathBuf>,
}

/// One job's end state, for the table and the YAML/JSON output.
pub struct JobReport {
    pub name: String,
    pub cluster: String,
    pub namespace: String,
    pub status: DispyJobStatus,
    pub submitted: Instant,
}

/// One array's end state and where its rows are.
pub struct ArrayReport {
    pub name: String,
    pub cluster: String,
    pub namespace: String,
    pub status: DispyJobArrayStatus,
    pub submitted: Instant,
    pub rows: Rows,
}

pub enum Rows {
    /// In this file, in index order.
    Written(PathBuf),
    /// Still spooled, for standard output.
    Spooled(RowSpool),
    Failed(String),
}

/// What a run ends with.
pub struct Report {
    pub jobs: Vec<JobReport>,
    pub arrays: Vec<ArrayReport>,
}

impl Report {
    /// Every job and every index Finished.
    pub fn all_finished(&self) -> bool {
        self.jobs
            .iter()
            .all(|o| o.status.status == JobStatus::Finished)
            && self
                .arrays
                .iter()
                .all(|a| a.status.finished == a.status.total)
    }
}

/// A local `dispynode` started for this run, stopped when dropped.
struct LocalNode {
    child: Child,
    addr: String,
    _dir: PathBuf,
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of the process we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self._dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn dispynode_binary() -> PathBuf {
    std::env::var_os("DISPYNODE")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let beside = exe.parent()?.join("dispynode");
            beside.exists().then_some(beside)
        })
        .unwrap_or_else(|| PathBuf::from("dispynode"))
}

fn start_local_nodes(count: usize, cpus: u32, secret: &str) -> Result<Vec<LocalNode>, String> {
    let bin = dispynode_binary();
    let base = std::env::temp_dir().join(format!("dispy-run-{}", std::process::id()));
    (1..=count)
        .map(|i| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("cannot find a free port: {e}"))?
                .port();
            let dir = base.join(format!("node-{i}"));
            let child = Command::new(&bin)
                .args(["-i", "127.0.0.1", "--port", &port.to_string(), "--daemon"])
                // Only this run uses the node, through the native protocol.
                .arg("--no-dispy")
                .args(["--name", &format!("local-{i}"), "--cpus", &cpus.to_string()])
                .arg("--dest-path-prefix")
                .arg(&dir)
                .env("DISPYNODE_SECRET", secret)
                .env(
                    "RUST_LOG",
                    std::env::var("DISPYNODE_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| {
                    format!(
                        "cannot start {}: {e} (build it, or set DISPYNODE)",
                        bin.display()
                    )
                })?;
            Ok(LocalNode {
                child,
                addr: format!("127.0.0.1:{port}"),
                _dir: dir,
            })
        })
        .collect()
}

enum Input {
    Node(String, NodeNews),
    /// `key` as the node knows it (the computation and the job's id there).
    Refused {
        key: JobKey,
        node: String,
        reason: String,
    },
    Interrupt,
}

/// What the run knows of one job.
struct JobView {
    status: DispyJobStatus,
    done: bool,
}

/// Whose a job id on the nodes is: DispyJob `j` has id `j`, index `i` of array `a` has
/// `(a + 1) << 32 | i`, so the two never meet in one computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Job(usize),
    Index(usize, u32),
}

impl Owner {
    fn id(self) -> JobId {
        match self {
            Owner::Job(j) => j as JobId,
            Owner::Index(a, i) => ((a as JobId + 1) << 32) | JobId::from(i),
        }
    }

    fn of(id: JobId) -> Owner {
        match id >> 32 {
            0 => Owner::Job(id as usize),
            a => Owner::Index(a as usize - 1, id as u32),
        }
    }
}

/// Indexes of an array given to the scheduler at a time, per cpu of all the nodes (at least
/// [`MIN_WINDOW`]): enough to keep every cpu busy, few enough that the run stays small.
const WINDOW_PER_CPU: usize = 4;
const MIN_WINDOW: usize = 16;

/// An index given to the scheduler that has not ended.
#[derive(Default)]
struct OpenIndex {
    /// The node's name, once it runs there.
    node: Option<String>,
    running: bool,
    /// Why it was terminated or requeued, for its row.
    message: Option<String>,
}

/// What the run knows of one array.
struct ArrayView {
    /// The next index not yet given to the scheduler.
    next: u32,
    open: HashMap<u32, OpenIndex>,
    finished: u32,
    failed: u32,
    start_time: Option<String>,
    completion_time: Option<String>,
    /// When set, the indexes not yet given to the scheduler end at once with this status and
    /// reason (setup failed everywhere, no node left, interrupted).
    stopped: Option<(JobStatus, String)>,
    /// `None` once written out.
    spool: Option<RowSpool>,
    rows: Option<Rows>,
}

impl ArrayView {
    fn ended(&self) -> u32 {
        self.finished + self.failed
    }
}

/// Connects to the nodes, ships each computation, submits the jobs, follows them to the end
/// and closes the computations (cleanup runs on each node); local nodes are stopped last.
pub async fn run(plan: &Plan, opts: &RunOptions) -> Result<Report, String> {
    let mut run = Run::new(plan, opts)?;
    let (addrs, local) = nodes_to_use(plan, opts).await?;
    run.connect(&addrs, local.is_empty()).await?;
    let setup_errors = run.set_up().await?;
    run.submit(&setup_errors);
    run.follow().await?;
    run.close().await;
    drop(local);
    Ok(run.outcomes())
}

/// The nodes given, listed in the clusters or discovered; else local ones started for the run.
async fn nodes_to_use(
    plan: &Plan,
    opts: &RunOptions,
) -> Result<(Vec<String>, Vec<LocalNode>), String> {
    let mut addrs: Vec<String> = opts.nodes.iter().map(|a| with_port(a)).collect();
    for c in &plan.clusters {
        addrs.extend(c.spec.nodes.external.iter().map(|a| with_port(a)));
    }
    if opts.discover || plan.clusters.iter().any(|c| c.spec.nodes.discover) {
        addrs.extend(discover_nodes().await?);
    }
    addrs.sort();
    addrs.dedup();
    if !addrs.is_empty() {
        return Ok((addrs, Vec::new()));
    }
    let cpus = plan
        .clusters
        .iter()
        .filter_map(|c| c.spec.nodes.cpus)
        .max()
        .unwrap_or(0);
    let local = start_local_nodes(opts.local_nodes.max(1), cpus, &opts.secret)?;
    let addrs = local.iter().map(|n| n.addr.clone()).collect();
    Ok((addrs, local))
}

/// One run: core's scheduler, the connections, and what is known of each job and array.
///
/// The scheduler's clusters ("lanes") are each cluster's computation for its DispyJobs (key
/// `(computation, j)`), then one per array (key `(lane, index)`); on the nodes every job is
/// `(computation, Owner::id)`.
struct Run<'a> {
    plan: &'a Plan,
    opts: &'a RunOptions,
    started: Instant,
    scheduler: Scheduler,
    /// The scheduler's actions not carried out yet.
    actions: Vec<Action>,
    clients: HashMap<String, NodeClient>,
    /// Node address -> the name it reports.
    names: HashMap<String, String>,
    views: Vec<JobView>,
    arrays: Vec<ArrayView>,
    /// Indexes of each array in the scheduler at a time.
    window: usize,
    progress: Progress,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    interrupted: bool,
    /// Each cluster's computation on the nodes, unique to this run (named once: every node
    /// event is checked against it).
    comp_ids: Vec<String>,
    /// The scheduler's clusters: `comp_ids`, then one per array.
    lanes: Vec<String>,
    lane_of: HashMap<String, usize>,
    /// Results to acknowledge, by node and computation: sent together in `act`.
    acks: BTreeMap<(String, String), Vec<JobId>>,
    /// Acknowledgements on their way, awaited before the computations are closed.
    acking: Vec<tokio::task::JoinHandle<()>>,
}

impl<'a> Run<'a> {
    fn new(plan: &'a Plan, opts: &'a RunOptions) -> Result<Run<'a>, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let comp_ids: Vec<String> = plan
            .clusters
            .iter()
            .map(|c| {
                let pid = std::process::id().to_string();
                dispy_core::driver::computation_id(&c.namespace, &c.name, &pid)
            })
            .collect();
        let lanes: Vec<String> = comp_ids
            .iter()
            .cloned()
            .chain(
                plan.arrays
                    .iter()
                    .map(|a| format!("{} (DispyJobArray {})", comp_ids[a.cluster], a.name)),
            )
            .collect();
        let mut arrays = Vec::new();
        for a in &plan.arrays {
            let namespace = &plan.clusters[a.cluster].namespace;
            let spool = match &opts.results_dir {
                Some(dir) => spool_path(&results_path(dir, namespace, &a.name)),
                None => std::env::temp_dir().join(format!(
                    "dispy-run-{}-{namespace}-{}.results.jsonl",
                    std::process::id(),
                    a.name
                )),
            };
            arrays.push(ArrayView {
                next: 0,
                open: HashMap::new(),
                finished: 0,
                failed: 0,
                start_time: None,
                completion_time: None,
                stopped: None,
                spool: Some(RowSpool::create(spool)?),
                rows: None,
            });
        }
        let total = plan.jobs.len() + plan.arrays.iter().map(|a| a.calls.len()).sum::<usize>();
        let mut run = Run {
            plan,
            opts,
            started: Instant::now(),
            scheduler: Scheduler::new(),
            actions: Vec::new(),
            clients: HashMap::new(),
            names: HashMap::new(),
            views: plan
                .jobs
                .iter()
                .map(|_| JobView {
                    status: DispyJobStatus::default(),
                    done: false,
                })
                .collect(),
            arrays,
            window: MIN_WINDOW,
            progress: Progress::new(total, opts.quiet),
            tx,
            rx,
            interrupted: false,
            comp_ids,
            lane_of: lanes.iter().cloned().zip(0..).collect(),
            lanes,
            acks: BTreeMap::new(),
            acking: Vec::new(),
        };
        for (i, c) in plan.clusters.iter().enumerate() {
            let policy = dispy_core::driver::policy(&c.spec);
            run.add_lane(i, policy, c.spec.suspend);
        }
        for (a, array) in plan.arrays.iter().enumerate() {
            let suspend = array.suspend || plan.clusters[array.cluster].spec.suspend;
            if suspend {
                run.progress.note(&format!(
                    "DispyJobArray {} is suspended: its jobs wait (Ctrl-C cancels them)",
                    array.name
                ));
            }
            run.add_lane(plan.clusters.len() + a, array.policy.clone(), suspend);
        }
        Ok(run)
    }

    fn add_lane(
        &mut self,
        lane: usize,
        policy: dispy_core::scheduler::ClusterPolicy,
        suspend: bool,
    ) {
        let cluster = self.lanes[lane].clone();
        self.handle(Event::ClusterAdded {
            cluster: cluster.clone(),
            policy,
        });
        if suspend {
            self.handle(Event::SuspendCluster {
                cluster,
                suspended: true,
            });
        }
    }

    fn handle(&mut self, event: Event) {
        let actions = self.scheduler.handle(self.started.elapsed(), event);
        self.actions.extend(actions);
    }

    /// Cluster `i`'s computation on the nodes.
    fn comp_id(&self, i: usize) -> String {
        self.comp_ids[i].clone()
    }

    /// The cluster whose computation runs the owner's job.
    fn cluster_of(&self, owner: Owner) -> usize {
        match owner {
            Owner::Job(j) => self.plan.jobs[j].cluster,
            Owner::Index(a, _) => self.plan.arrays[a].cluster,
        }
    }

    /// The job's key in the scheduler.
    fn key_of(&self, owner: Owner) -> JobKey {
        match owner {
            Owner::Job(j) => JobKey::new(self.comp_id(self.plan.jobs[j].cluster), j as JobId),
            Owner::Index(a, i) => JobKey::new(
                self.lanes[self.plan.clusters.len() + a].clone(),
                JobId::from(i),
            ),
        }
    }

    /// Whose a scheduler key is.
    fn owner_of(&self, key: &JobKey) -> Owner {
        let lane = self.lane_of[&key.cluster];
        match lane.checked_sub(self.plan.clusters.len()) {
            None => Owner::Job(key.job as usize),
            Some(a) => Owner::Index(a, key.job as u32),
        }
    }

    /// The job as the nodes know it.
    fn node_key(&self, owner: Owner) -> JobKey {
        JobKey::new(self.comp_id(self.cluster_of(owner)), owner.id())
    }

    /// Whose a node's job is, if it is one of this run's.
    fn owner_on_node(&self, key: &JobKey) -> Option<Owner> {
        let owner = Owner::of(key.job);
        let ours = match owner {
            Owner::Job(j) => j < self.views.len(),
            Owner::Index(a, i) => {
                a < self.arrays.len() && (i as usize) < self.plan.arrays[a].calls.len()
            }
        };
        (ours && key.cluster == self.comp_ids[self.cluster_of(owner)]).then_some(owner)
    }

    /// Connects to every node (a local one may still be starting); their events come in as
    /// [`Input::Node`].
    async fn connect(&mut self, addrs: &[String], external: bool) -> Result<(), String> {
        let config = ClientConfig {
            secret: self.opts.secret.clone(),
            name: format!("dispy run (pid {})", std::process::id()),
            pulse_interval: self.opts.pulse_interval,
            ..Default::default()
        };
        for addr in addrs {
            let (client, mut events) = match connect_node(addr, &config, external).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dispy: skipping node {addr}: {e}");
                    continue;
                }
            };
            self.names.insert(addr.clone(), client.info().name.clone());
            let (tx, node) = (self.tx.clone(), addr.clone());
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    if tx
                        .send(Input::Node(node.clone(), NodeNews::of(ev)))
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let cpus = client.info().cpus;
            self.handle(Event::NodeUp {
                node: addr.clone(),
                cpus,
            });
            self.clients.insert(addr.clone(), client);
        }
        if self.clients.is_empty() {
            return Err(format!(
                "none of the nodes could be reached: {}",
                addrs.join(", ")
            ));
        }
        let cpus: usize = self.clients.values().map(|c| c.info().cpus as usize).sum();
        self.window = (cpus * WINDOW_PER_CPU).max(MIN_WINDOW);
        Ok(())
    }

    /// Ships every computation to every node, in parallel. Returns the setup errors by cluster.
    async fn set_up(&mut self) -> Result<BTreeMap<usize, Vec<String>>, String> {
        let mut setups = Vec::new();
        for (addr, client) in &self.clients {
            for (i, c) in self.plan.clusters.iter().enumerate() {
                let (client, addr, id) = (client.clone(), addr.clone(), self.comp_id(i));
                let (computation, files) = (c.computation.clone(), c.files.clone());
                setups.push(tokio::spawn(async move {
                    let result =
                        dispy_core::driver::set_up(&client, &id, &computation, &files).await;
                    (i, addr, result)
                }));
            }
        }
        let mut errors: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for s in setups {
            let (i, node, result) = s.await.map_err(|e| e.to_string())?;
            match result {
                Ok(_) => {
                    let lanes = std::iter::once(i).chain(
                        (0..self.plan.arrays.len())
                            .filter(|a| self.plan.arrays[*a].cluster == i)
                            .map(|a| self.plan.clusters.len() + a),
                    );
                    for cluster in lanes.map(|l| self.lanes[l].clone()).collect::<Vec<_>>() {
                        let node = node.clone();
                        self.handle(Event::ClusterReady { cluster, node });
                    }
                }
                Err(e) => {
                    eprintln!(
                        "dispy: JobCluster {}: setup on {node} failed: {e}",
                        self.plan.clusters[i].name
                    );
                    errors.entry(i).or_default().push(e);
                }
            }
        }
        Ok(errors)
    }

    /// Every job to the scheduler, except those that cannot run: their cluster's setup failed
    /// on every node, or they are pinned to a node not in use. Arrays' indexes follow in
    /// [`Run::feed`].
    fn submit(&mut self, setup_errors: &BTreeMap<usize, Vec<String>>) {
        let failed_everywhere = |cluster: usize| {
            setup_errors
                .get(&cluster)
                .filter(|e| e.len() == self.clients.len())
                .map(|e| format!("setup failed on every node: {}", e[0]))
        };
        for (a, array) in self.plan.arrays.iter().enumerate() {
            if let Some(why) = failed_everywhere(array.cluster) {
                self.arrays[a].stopped = Some((JobStatus::Abandoned, why));
            }
        }
        let nodes: Vec<NodeNames<'_>> = self
            .names
            .iter()
            .map(|(addr, name)| NodeNames {
                addr,
                names: vec![name.as_str()],
            })
            .collect();
        let mut submitted = Vec::new();
        let mut refused = Vec::new();
        for (j, job) in self.plan.jobs.iter().enumerate() {
            if let Some(why) = failed_everywhere(job.cluster) {
                refused.push((j, why));
                continue;
            }
            let node = match &job.spec.node {
                None => None,
                Some(want) => match dispy_core::driver::resolve_node(want, &nodes) {
                    Some(addr) => Some(addr.to_string()),
                    None => {
                        let list = dispy_core::driver::node_list(&nodes);
                        refused.push((
                            j,
                            format!("node {want:?} is not one of the nodes in use ({list})"),
                        ));
                        continue;
                    }
                },
            };
            let active_deadline = job.spec.active_deadline_seconds.map(Duration::from_secs);
            submitted.push(JobSpec {
                key: self.key_of(Owner::Job(j)),
                node,
                active_deadline,
                policy: None,
            });
        }
        drop(nodes);
        for spec in submitted {
            self.handle(Event::JobSubmitted(spec));
        }
        for (j, why) in refused {
            self.finish(j, JobStatus::Abandoned, why);
        }
    }

    /// Tops up each array's indexes in the scheduler to the window; a stopped array's others
    /// end at once.
    fn feed(&mut self) {
        for a in 0..self.arrays.len() {
            let total = self.plan.arrays[a].calls.len() as u32;
            if let Some((status, why)) = self.arrays[a].stopped.clone() {
                while self.arrays[a].next < total {
                    let i = self.arrays[a].next;
                    self.arrays[a].next += 1;
                    self.end_index(
                        a,
                        i,
                        &JobResult::failed(status, ""),
                        None,
                        Some(why.clone()),
                    );
                }
                continue;
            }
            while self.arrays[a].open.len() < self.window && self.arrays[a].next < total {
                let i = self.arrays[a].next;
                self.arrays[a].next += 1;
                self.arrays[a].open.insert(i, OpenIndex::default());
                let key = self.key_of(Owner::Index(a, i));
                self.handle(Event::JobSubmitted(JobSpec::new(key)));
            }
        }
    }

    /// Carries out the scheduler's actions; jobs dispatched together to one node go in one
    /// request.
    fn act(&mut self) {
        let mut batches: BTreeMap<(String, String), Vec<Outgoing>> = BTreeMap::new();
        for action in std::mem::take(&mut self.actions) {
            match action {
                Action::Dispatch { key, node, attempt } => {
                    let owner = self.owner_of(&key);
                    let node_key = self.node_key(owner);
                    let (request, files) = match owner {
                        Owner::Job(j) => {
                            self.views[j].status.attempts = attempt;
                            let job = &self.plan.jobs[j];
                            let request = JobRequest {
                                id: node_key.job,
                                args: job.args.clone(),
                                kwargs: job.kwargs.clone(),
                                depends: job.files.iter().map(|(n, _)| n.clone()).collect(),
                            };
                            (request, job.files.clone())
                        }
                        Owner::Index(a, i) => {
                            let call = &self.plan.arrays[a].calls[i as usize];
                            let request = JobRequest {
                                id: node_key.job,
                                args: call.args.to_string(),
                                kwargs: call.kwargs.to_string(),
                                depends: Vec::new(),
                            };
                            (request, Vec::new())
                        }
                    };
                    let batch = batches.entry((node, node_key.cluster.clone())).or_default();
                    batch.push(Outgoing {
                        key: node_key,
                        request,
                        files,
                    });
                }
                Action::Terminate { key, node, reason } => {
                    let owner = self.owner_of(&key);
                    match owner {
                        Owner::Job(j) => self.views[j].status.message = Some(reason),
                        Owner::Index(a, i) => {
                            if let Some(open) = self.arrays[a].open.get_mut(&i) {
                                open.message = Some(reason);
                            }
                        }
                    }
                    let node_key = self.node_key(owner);
                    if let Some(client) = self.clients.get(&node).cloned() {
                        tokio::spawn(async move {
                            let _ = client.cancel(&node_key.cluster, node_key.job).await;
                        });
                    }
                }
                Action::Requeued {
                    key,
                    attempt,
                    reason,
                } => {
                    let what = match self.owner_of(&key) {
                        Owner::Job(j) => {
                            let v = &mut self.views[j].status;
                            v.attempts = attempt;
                            v.status = JobStatus::Created;
                            v.message = Some(format!("requeued: {reason}"));
                            format!("job {}", self.plan.jobs[j].name)
                        }
                        Owner::Index(a, i) => {
                            if let Some(open) = self.arrays[a].open.get_mut(&i) {
                                open.running = false;
                                open.message = Some(format!("requeued: {reason}"));
                            }
                            format!("DispyJobArray {} index {i}", self.plan.arrays[a].name)
                        }
                    };
                    self.progress.note(&format!("{what} requeued: {reason}"));
                }
                Action::Finalize {
                    key,
                    status,
                    reason,
                } => match self.owner_of(&key) {
                    Owner::Job(j) => self.finish(j, status, reason),
                    Owner::Index(a, i) => {
                        if let Some(open) = self.arrays[a].open.get(&i) {
                            let node = open.node.clone();
                            let failed = JobResult::failed(status, "");
                            self.end_index(a, i, &failed, node, Some(reason));
                        }
                    }
                },
            }
        }
        self.send_acks();
        for ((node, cluster), jobs) in batches {
            let (client, tx) = (self.clients.get(&node).cloned(), self.tx.clone());
            tokio::spawn(async move {
                let refused =
                    dispy_core::driver::submit_batch(client.as_ref(), &cluster, jobs).await;
                for (key, reason) in refused {
                    let _ = tx.send(Input::Refused {
                        key,
                        node: node.clone(),
                        reason,
                    });
                }
            });
        }
    }

    fn send_acks(&mut self) {
        self.acking.retain(|a| !a.is_finished());
        for ((node, cluster), jobs) in std::mem::take(&mut self.acks) {
            if let Some(client) = self.clients.get(&node).cloned() {
                self.acking.push(tokio::spawn(async move {
                    let _ = client.ack(&cluster, jobs).await;
                }));
            }
        }
    }

    fn all_done(&self) -> bool {
        self.views.iter().all(|v| v.done)
            && self
                .arrays
                .iter()
                .zip(&self.plan.arrays)
                .all(|(v, a)| v.ended() as usize == a.calls.len())
    }

    /// (running, finished, done) over every job and index, for the progress bar.
    fn tally(&self) -> (usize, usize, usize) {
        let mut running = 0;
        let mut finished = 0;
        let mut done = 0;
        for v in &self.views {
            running += usize::from(!v.done && v.status.status == JobStatus::Running);
            finished += usize::from(v.done && v.status.status == JobStatus::Finished);
            done += usize::from(v.done);
        }
        for a in &self.arrays {
            running += a.open.values().filter(|o| o.running).count();
            finished += a.finished as usize;
            done += a.ended() as usize;
        }
        (running, finished, done)
    }

    /// Until every job is done (or no node is left): actions out, inputs in.
    async fn follow(&mut self) -> Result<(), String> {
        let interrupt_tx = self.tx.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if interrupt_tx.send(Input::Interrupt).is_err() {
                    return;
                }
            }
        });
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        loop {
            self.feed();
            self.act();
            let (running, finished, done) = self.tally();
            self.progress.update(running, finished, done);
            if self.all_done() {
                break;
            }
            if self.clients.is_empty() {
                // Every node is gone: what is still queued cannot run.
                let why = "no node left to run it".to_string();
                for j in 0..self.views.len() {
                    self.finish(j, JobStatus::Abandoned, why.clone());
                }
                self.stop_arrays(JobStatus::Abandoned, &why);
                for a in 0..self.arrays.len() {
                    let open: Vec<u32> = self.arrays[a].open.keys().copied().collect();
                    for i in open {
                        let failed = JobResult::failed(JobStatus::Abandoned, "");
                        self.end_index(a, i, &failed, None, Some(why.clone()));
                    }
                }
                self.feed();
                continue;
            }
            let input = tokio::select! {
                i = self.rx.recv() => i,
                _ = ticker.tick() => {
                    self.handle(Event::Tick);
                    continue;
                }
            };
            match input {
                None => break,
                Some(input) => self.input(input)?,
            }
        }
        self.progress.finish();
        Ok(())
    }

    /// No more indexes of any array go to the scheduler: the rest end with `status`.
    fn stop_arrays(&mut self, status: JobStatus, why: &str) {
        for a in &mut self.arrays {
            a.stopped.get_or_insert_with(|| (status, why.to_string()));
        }
    }

    fn input(&mut self, input: Input) -> Result<(), String> {
        match input {
            Input::Interrupt if self.interrupted => {
                return Err("interrupted twice: stopping now".into())
            }
            Input::Interrupt => {
                self.interrupted = true;
                self.progress
                    .note("interrupted: cancelling jobs (Ctrl-C again to stop at once)");
                self.stop_arrays(
                    JobStatus::Cancelled,
                    "cancelled (interrupted) before it was queued",
                );
                let mut open: Vec<Owner> = (0..self.views.len())
                    .filter(|j| !self.views[*j].done)
                    .map(Owner::Job)
                    .collect();
                for (a, v) in self.arrays.iter().enumerate() {
                    open.extend(v.open.keys().map(|i| Owner::Index(a, *i)));
                }
                for owner in open {
                    let key = self.key_of(owner);
                    self.handle(Event::CancelRequested { key });
                }
            }
            Input::Refused { key, node, reason } => {
                if let Some(owner) = self.owner_on_node(&key) {
                    let key = self.key_of(owner);
                    self.handle(Event::DispatchFailed { key, node, reason })
                }
            }
            Input::Node(node, NodeNews::Lost { reason }) => {
                self.clients.remove(&node);
                let name = self.names.get(&node).unwrap_or(&node);
                self.progress.note(&format!("node {name} lost: {reason}"));
                self.handle(Event::NodeLost { node, reason });
            }
            Input::Node(_, NodeNews::Pulse) => {}
            Input::Node(node, news) => self.job_news(node, news),
        }
        Ok(())
    }

    /// What a node says of one of the run's jobs.
    fn job_news(&mut self, node: String, news: NodeNews) {
        let node_key = match &news {
            NodeNews::Started { key, .. }
            | NodeNews::Done { key, .. }
            | NodeNews::Provisional { key, .. }
            | NodeNews::File { key, .. } => key.clone(),
            NodeNews::Lost { .. } | NodeNews::Pulse => return,
        };
        let Some(owner) = self.owner_on_node(&node_key) else {
            return;
        };
        let key = self.key_of(owner);
        // News from a node that no longer runs the job (an earlier attempt's) is stale.
        let current = self
            .scheduler
            .job(&key)
            .and_then(|r| r.node())
            .map(String::as_str)
            == Some(node.as_str());
        let name = self.names.get(&node).cloned();
        if let NodeNews::Done { result, .. } = &news {
            // Nothing is kept beyond this run: the node may forget the result at once.
            self.acks
                .entry((node.clone(), node_key.cluster))
                .or_default()
                .push(node_key.job);
            if let Owner::Index(a, i) = owner {
                let status = result.status;
                let why = self.arrays[a]
                    .open
                    .get(&i)
                    .filter(|_| current)
                    .map(|open| (status != JobStatus::Finished).then(|| open.message.clone()));
                self.handle(Event::JobDone { key, node, status });
                if let Some(why) = why {
                    self.end_index(a, i, result, name, why.flatten());
                }
                return;
            }
        }
        let j = match owner {
            Owner::Job(j) => j,
            Owner::Index(a, i) => {
                self.index_news(a, i, node, name, news, current);
                return;
            }
        };
        let v = &mut self.views[j];
        match news {
            NodeNews::Started { start_time, .. } => {
                if !v.done {
                    v.status.status = JobStatus::Running;
                    v.status.node = name;
                    v.status.start_time = Some(rfc3339(start_time));
                }
                self.handle(Event::JobStarted { key, node });
            }
            NodeNews::Provisional { result, .. } if current => v.status.record_provisional(&result),
            NodeNews::File { file, .. } if current => {
                let job = &self.plan.jobs[j];
                let namespace = &self.plan.clusters[job.cluster].namespace;
                let dir = job_files_dir(&self.opts.files_dir, namespace, &job.name);
                let saved = save_sent_file(&dir, &file);
                if let Some(why) = &saved.message {
                    self.progress
                        .note(&format!("{}: a sent file was not saved: {why}", job.name));
                }
                v.status.record_sent_file(saved);
            }
            NodeNews::Done { result, .. } => {
                if current && !v.done {
                    v.status.record_result(&result);
                    v.status.node = name;
                    v.done = true;
                    self.progress.job_done(&self.plan.jobs[j].name, &v.status);
                }
                let status = result.status;
                self.handle(Event::JobDone { key, node, status });
            }
            _ => {}
        }
    }

    /// What a node says of an array's index, but its end.
    fn index_news(
        &mut self,
        a: usize,
        i: u32,
        node: String,
        name: Option<String>,
        news: NodeNews,
        current: bool,
    ) {
        let key = self.key_of(Owner::Index(a, i));
        match news {
            NodeNews::Started { start_time, .. } => {
                let v = &mut self.arrays[a];
                if let Some(open) = v.open.get_mut(&i) {
                    open.running = true;
                    open.node = name;
                    v.start_time.get_or_insert_with(|| rfc3339(start_time));
                }
                self.handle(Event::JobStarted { key, node });
            }
            NodeNews::File { file, .. } if current => {
                let array = &self.plan.arrays[a];
                let namespace = &self.plan.clusters[array.cluster].namespace;
                let dir = job_files_dir(&self.opts.files_dir, namespace, &array.name);
                let saved = save_sent_file(&dir.join(i.to_string()), &file);
                if let Some(why) = &saved.message {
                    let what = format!("DispyJobArray {} index {i}", array.name);
                    self.progress
                        .note(&format!("{what}: a sent file was not saved: {why}"));
                }
            }
            // A row holds only the final result.
            _ => {}
        }
    }

    fn finish(&mut self, j: usize, status: JobStatus, why: String) {
        let v = &mut self.views[j];
        if v.done {
            return;
        }
        v.status.status = status;
        v.status.message = Some(why);
        v.status.end_time = Some(rfc3339(dispy_core::job::now_secs()));
        v.done = true;
        self.progress.job_done(&self.plan.jobs[j].name, &v.status);
    }

    /// Index `i` of array `a` ended with `result`: its row is spooled and the scheduler
    /// forgets it. The array's results are written out once its last index ended.
    fn end_index(
        &mut self,
        a: usize,
        i: u32,
        result: &JobResult,
        node: Option<String>,
        why: Option<String>,
    ) {
        let v = &mut self.arrays[a];
        let was_open = v.open.remove(&i).is_some();
        let mut row = dispy_core::array::row(i, result, node);
        if let Some(why) = why {
            row.message = Some(why);
        }
        if row.status == JobStatus::Finished {
            v.finished += 1;
        } else {
            v.failed += 1;
            // Once interrupted, every index left is cancelled: nothing to tell one by one.
            if !self.interrupted {
                self.progress.index_failed(&self.plan.arrays[a].name, &row);
            }
        }
        v.spool
            .as_mut()
            .expect("spooling until the last index")
            .push(&row);
        if was_open {
            let key = self.key_of(Owner::Index(a, i));
            self.scheduler.forget(&key);
        }
        let v = &mut self.arrays[a];
        if v.ended() as usize == self.plan.arrays[a].calls.len() {
            v.completion_time = Some(rfc3339(dispy_core::job::now_secs()));
            let spool = v.spool.take().expect("the last index ends once");
            v.rows = Some(match &self.opts.results_dir {
                None => Rows::Spooled(spool),
                Some(dir) => {
                    let array = &self.plan.arrays[a];
                    let path = results_path(
                        dir,
                        &self.plan.clusters[array.cluster].namespace,
                        &array.name,
                    );
                    match spool.finish_to(&path) {
                        Ok(()) => Rows::Written(path),
                        Err(e) => Rows::Failed(e),
                    }
                }
            });
        }
    }

    /// Closes every computation on every node (cleanup runs there), once the last results
    /// are acknowledged.
    async fn close(&mut self) {
        self.send_acks();
        for a in std::mem::take(&mut self.acking) {
            let _ = a.await;
        }
        let mut closes = Vec::new();
        for client in self.clients.values() {
            for i in 0..self.plan.clusters.len() {
                let (client, id) = (client.clone(), self.comp_id(i));
                closes.push(tokio::spawn(async move { client.close(&id, true).await }));
            }
        }
        for c in closes {
            if let Ok(Err(e)) = c.await {
                if e.node_code() != Some(dispy_core::protocol::ErrorCode::UnknownComputation) {
                    eprintln!("dispy: closing a computation failed: {e}");
                }
            }
        }
        self.clients.clear();
    }

    fn outcomes(mut self) -> Report {
        let (plan, started) = (self.plan, self.started);
        let arrays = plan
            .arrays
            .iter()
            .zip(&mut self.arrays)
            .map(|(array, v)| {
                let cluster = &plan.clusters[array.cluster];
                let total = array.calls.len() as u32;
                // An empty array had no last index to write its (empty) results.
                let rows = v.rows.take().unwrap_or_else(|| match v.spool.take() {
                    Some(spool) => match &self.opts.results_dir {
                        None => Rows::Spooled(spool),
                        Some(dir) => {
                            let path = results_path(dir, &cluster.namespace, &array.name);
                            spool
                                .finish_to(&path)
                                .map_or_else(Rows::Failed, |()| Rows::Written(path))
                        }
                    },
                    None => Rows::Failed("no results".into()),
                });
                ArrayReport {
                    name: array.name.clone(),
                    cluster: cluster.name.clone(),
                    namespace: cluster.namespace.clone(),
                    status: DispyJobArrayStatus {
                        total,
                        finished: v.finished,
                        failed: v.failed,
                        running: 0,
                        start_time: v.start_time.clone(),
                        completion_time: v.completion_time.clone(),
                        message: Some(array_message(v.finished, v.failed, total, &rows)),
                        ..Default::default()
                    },
                    submitted: started,
                    rows,
                }
            })
            .collect();
        let jobs = plan
            .jobs
            .iter()
            .zip(self.views)
            .map(|(job, v)| JobReport {
                name: job.name.clone(),
                cluster: plan.clusters[job.cluster].name.clone(),
                namespace: plan.clusters[job.cluster].namespace.clone(),
                status: v.status,
                submitted: started,
            })
            .collect();
        Report { jobs, arrays }
    }
}

/// An array's end in a sentence: counts and where the rows are.
fn array_message(finished: u32, failed: u32, total: u32, rows: &Rows) -> String {
    let counts = format!("{finished} of {total} Finished, {failed} failed");
    match rows {
        Rows::Written(path) => format!("{counts}; results in {}", path.display()),
        Rows::Spooled(_) => counts,
        Rows::Failed(e) => format!("{counts}; results not written: {e}"),
    }
}

/// Where a job's sent files go: `base/JOB`, or `base/NAMESPACE/JOB` outside `default`.
fn job_files_dir(base: &std::path::Path, namespace: &str, job: &str) -> PathBuf {
    if namespace == "default" {
        base.join(job)
    } else {
        base.join(namespace).join(job)
    }
}

/// Saves a file a job sent under `dir`, if its name (from the network) stays inside it.
fn save_sent_file(dir: &std::path::Path, file: &SentFile) -> SentFileStatus {
    let mut status = SentFileStatus {
        name: file.name.clone(),
        size: file.data.len() as u64,
        ..Default::default()
    };
    let Some(relative) = dispy_core::protocol::relative_path(&file.name) else {
        status.message = Some(format!(
            "{:?} is not a relative path inside the job's directory",
            file.name
        ));
        return status;
    };
    let path = dir.join(relative);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, &file.data));
    match written {
        Ok(()) => status.saved_as = Some(path.display().to_string()),
        Err(e) => status.message = Some(format!("cannot write {}: {e}", path.display())),
    }
    status
}

async fn connect_node(
    addr: &str,
    config: &ClientConfig,
    external: bool,
) -> Result<(NodeClient, mpsc::UnboundedReceiver<ClientEvent>), String> {
    // A local node may still be starting: give it a few seconds.
    let deadline = Instant::now() + Duration::from_secs(if external { 0 } else { 15 });
    loop {
        match NodeClient::connect(addr, config).await {
            Ok(c) => return Ok(c),
            Err(e @ dispy_core::ClientError::Connect { .. }) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

pub use dispy_core::discovery::with_port;

/// Nodes that answer a discovery ping on this host's networks, as `host:port`.
pub async fn discover_nodes() -> Result<Vec<String>, String> {
    dispy_core::discovery::discover_nodes(Duration::from_secs(2)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(name: &str) -> SentFile {
        SentFile {
            name: name.into(),
            data: b"data".to_vec(),
        }
    }

    #[test]
    fn node_job_ids_of_dispyjobs_and_of_arrays_indexes_never_meet() {
        for owner in [
            Owner::Job(0),
            Owner::Job(499),
            Owner::Index(0, 0),
            Owner::Index(0, u32::MAX),
            Owner::Index(3, 7),
        ] {
            assert_eq!(Owner::of(owner.id()), owner);
        }
        assert_ne!(Owner::Job(7).id(), Owner::Index(0, 7).id());
        assert_ne!(Owner::Index(0, 7).id(), Owner::Index(1, 7).id());
    }

    #[test]
    fn a_sent_file_is_saved_under_the_job_s_directory_only() {
        let base = tempfile::tempdir().unwrap();
        let dir = job_files_dir(base.path(), "default", "j");
        let ok = save_sent_file(&dir, &sent("out/a.txt"));
        assert_eq!(std::fs::read(dir.join("out/a.txt")).unwrap(), b"data");
        assert_eq!(
            ok.saved_as,
            Some(dir.join("out/a.txt").display().to_string())
        );
        // Names come from the node: none may leave the job's directory.
        for bad in ["../escape", "/etc/passwd-dispy", "out/../../x", ""] {
            let refused = save_sent_file(&dir, &sent(bad));
            assert_eq!(refused.saved_as, None, "{bad:?}");
            assert!(
                refused.message.unwrap().contains("not a relative path"),
                "{bad:?}"
            );
        }
        assert!(!base.path().join("escape").exists());
        assert_eq!(
            job_files_dir(base.path(), "team", "j"),
            base.path().join("team/j")
        );
    }
}
