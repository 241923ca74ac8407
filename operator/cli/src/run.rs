//! `dispy run`: connects to the nodes (starting local ones when none are given), ships each
//! computation, then lets core's scheduler place the jobs and follows them to the end.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispy_core::driver::{NodeNames, NodeNews, Outgoing};
use dispy_core::job::{JobId, JobStatus};
use dispy_core::manifest::{rfc3339, DispyJobStatus, SentFileStatus};
use dispy_core::protocol::{JobRequest, SentFile};
use dispy_core::scheduler::{Action, Event, JobKey, JobSpec, Scheduler};
use dispy_core::{ClientConfig, ClientEvent, NodeClient};
use tokio::sync::mpsc;

use crate::load::Plan;
use crate::progress::Progress;

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
}

/// One job's end state, for the table and the YAML/JSON output.
pub struct JobReport {
    pub name: String,
    pub cluster: String,
    pub namespace: String,
    pub status: DispyJobStatus,
    pub submitted: Instant,
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

/// Connects to the nodes, ships each computation, submits the jobs, follows them to the end
/// and closes the computations (cleanup runs on each node); local nodes are stopped last.
pub async fn run(plan: &Plan, opts: &RunOptions) -> Result<Vec<JobReport>, String> {
    let (addrs, local) = nodes_to_use(plan, opts).await?;
    let mut run = Run::new(plan, opts);
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

/// One run: core's scheduler, the connections, and what is known of each job (job `j` of the
/// plan has id `j` in its cluster's computation).
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
    progress: Progress,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    interrupted: bool,
    /// Each cluster's computation on the nodes, unique to this run (named once: every node
    /// event is checked against it).
    comp_ids: Vec<String>,
}

impl<'a> Run<'a> {
    fn new(plan: &'a Plan, opts: &'a RunOptions) -> Run<'a> {
        let (tx, rx) = mpsc::unbounded_channel();
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
            progress: Progress::new(plan.jobs.len(), opts.quiet),
            tx,
            rx,
            interrupted: false,
            comp_ids: plan
                .clusters
                .iter()
                .map(|c| {
                    let pid = std::process::id().to_string();
                    dispy_core::driver::computation_id(&c.namespace, &c.name, &pid)
                })
                .collect(),
        };
        for (i, c) in plan.clusters.iter().enumerate() {
            let cluster = run.comp_id(i);
            let policy = dispy_core::driver::policy(&c.spec);
            run.handle(Event::ClusterAdded {
                cluster: cluster.clone(),
                policy,
            });
            if c.spec.suspend {
                run.handle(Event::SuspendCluster {
                    cluster,
                    suspended: true,
                });
            }
        }
        run
    }

    fn handle(&mut self, event: Event) {
        let actions = self.scheduler.handle(self.started.elapsed(), event);
        self.actions.extend(actions);
    }

    /// Cluster `i`'s computation on the nodes.
    fn comp_id(&self, i: usize) -> String {
        self.comp_ids[i].clone()
    }

    fn key_of(&self, j: usize) -> JobKey {
        JobKey::new(self.comp_id(self.plan.jobs[j].cluster), j as JobId)
    }

    /// The job a key names, if it is one of this run's.
    fn job_of(&self, key: &JobKey) -> Option<usize> {
        let j = key.job as usize;
        let ours = j < self.views.len() && key.cluster == self.comp_ids[self.plan.jobs[j].cluster];
        ours.then_some(j)
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
                    let cluster = self.comp_id(i);
                    self.handle(Event::ClusterReady { cluster, node });
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
    /// on every node, or they are pinned to a node not in use.
    fn submit(&mut self, setup_errors: &BTreeMap<usize, Vec<String>>) {
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
            let errors = setup_errors.get(&job.cluster);
            if errors.is_some_and(|e| e.len() == self.clients.len()) {
                refused.push((
                    j,
                    format!("setup failed on every node: {}", errors.unwrap()[0]),
                ));
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
                key: self.key_of(j),
                node,
                active_deadline,
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

    /// Carries out the scheduler's actions; jobs dispatched together to one node go in one
    /// request.
    fn act(&mut self) {
        let mut batches: BTreeMap<(String, String), Vec<Outgoing>> = BTreeMap::new();
        for action in std::mem::take(&mut self.actions) {
            match action {
                Action::Dispatch { key, node, attempt } => {
                    let j = key.job as usize;
                    self.views[j].status.attempts = attempt;
                    let job = &self.plan.jobs[j];
                    let request = JobRequest {
                        id: key.job,
                        args: job.args.clone(),
                        kwargs: job.kwargs.clone(),
                        depends: job.files.iter().map(|(n, _)| n.clone()).collect(),
                    };
                    let batch = batches.entry((node, key.cluster.clone())).or_default();
                    batch.push(Outgoing {
                        key,
                        request,
                        files: job.files.clone(),
                    });
                }
                Action::Terminate { key, node, reason } => {
                    self.views[key.job as usize].status.message = Some(reason);
                    if let Some(client) = self.clients.get(&node).cloned() {
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
                    let j = key.job as usize;
                    let v = &mut self.views[j].status;
                    v.attempts = attempt;
                    v.status = JobStatus::Created;
                    v.message = Some(format!("requeued: {reason}"));
                    self.progress.note(&format!(
                        "job {} requeued: {reason}",
                        self.plan.jobs[j].name
                    ));
                }
                Action::Finalize {
                    key,
                    status,
                    reason,
                } => self.finish(key.job as usize, status, reason),
            }
        }
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
            self.act();
            let statuses: Vec<(JobStatus, bool)> = self
                .views
                .iter()
                .map(|v| (v.status.status, v.done))
                .collect();
            self.progress.update(&statuses);
            if self.views.iter().all(|v| v.done) {
                break;
            }
            if self.clients.is_empty() {
                // Every node is gone: what is still queued cannot run.
                for j in 0..self.views.len() {
                    self.finish(j, JobStatus::Abandoned, "no node left to run it".into());
                }
                break;
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

    fn input(&mut self, input: Input) -> Result<(), String> {
        match input {
            Input::Interrupt if self.interrupted => {
                return Err("interrupted twice: stopping now".into())
            }
            Input::Interrupt => {
                self.interrupted = true;
                self.progress
                    .note("interrupted: cancelling jobs (Ctrl-C again to stop at once)");
                let open: Vec<usize> = (0..self.views.len())
                    .filter(|j| !self.views[*j].done)
                    .collect();
                for j in open {
                    let key = self.key_of(j);
                    self.handle(Event::CancelRequested { key });
                }
            }
            Input::Refused { key, node, reason } => {
                self.handle(Event::DispatchFailed { key, node, reason })
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
        let key = match &news {
            NodeNews::Started { key, .. }
            | NodeNews::Done { key, .. }
            | NodeNews::Provisional { key, .. }
            | NodeNews::File { key, .. } => key.clone(),
            NodeNews::Lost { .. } | NodeNews::Pulse => return,
        };
        let Some(j) = self.job_of(&key) else {
            return;
        };
        // News from a node that no longer runs the job (an earlier attempt's) is stale.
        let current = self
            .scheduler
            .job(&key)
            .and_then(|r| r.node())
            .map(String::as_str)
            == Some(node.as_str());
        let name = self.names.get(&node).cloned();
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
                let dir = job_files_dir(
                    &self.opts.files_dir,
                    &self.plan.clusters[job.cluster].namespace,
                    &job.name,
                );
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
                // Nothing is kept beyond this run: the node may forget the result at once.
                if let Some(client) = self.clients.get(&node).cloned() {
                    let key = key.clone();
                    tokio::spawn(async move {
                        let _ = client.ack(&key.cluster, vec![key.job]).await;
                    });
                }
                self.handle(Event::JobDone { key, node, status });
            }
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

    /// Closes every computation on every node (cleanup runs there).
    async fn close(&mut self) {
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

    fn outcomes(self) -> Vec<JobReport> {
        let (plan, started) = (self.plan, self.started);
        plan.jobs
            .iter()
            .zip(self.views)
            .map(|(job, v)| JobReport {
                name: job.name.clone(),
                cluster: plan.clusters[job.cluster].name.clone(),
                namespace: plan.clusters[job.cluster].namespace.clone(),
                status: v.status,
                submitted: started,
            })
            .collect()
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
