//! `dispy run`: connects to the nodes (starting local ones when none are given), ships each
//! computation, then lets core's scheduler place the jobs and follows them to the end.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispy_core::job::{JobId, JobStatus};
use dispy_core::manifest::{rfc3339, DispyJobStatus, SentFileStatus};
use dispy_core::protocol::{ComputeRequest, JobEventKind, JobRequest, SentFile};
use dispy_core::scheduler::{Action, ClusterPolicy, Event, JobKey, JobSpec, Scheduler};
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
pub struct Outcome {
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

/// A file as (name, contents).
type File = (String, Vec<u8>);
/// A job ready to submit: its key, the request and its own files.
type Outgoing = (JobKey, JobRequest, Vec<File>);

enum Input {
    Node(String, ClientEvent),
    Submitted {
        key: JobKey,
        node: String,
        error: Option<String>,
    },
    Interrupt,
}

/// What the run loop knows of one job.
struct JobView {
    status: DispyJobStatus,
    done: bool,
}

pub async fn run(plan: &Plan, opts: &RunOptions) -> Result<Vec<Outcome>, String> {
    let started = Instant::now();
    let config = ClientConfig {
        secret: opts.secret.clone(),
        name: format!("dispy run (pid {})", std::process::id()),
        pulse_interval: opts.pulse_interval,
        ..Default::default()
    };

    // Nodes: given, listed in the clusters, discovered, or started here.
    let mut addrs: Vec<String> = opts.nodes.iter().map(|a| with_port(a)).collect();
    for c in &plan.clusters {
        addrs.extend(c.spec.nodes.external.iter().map(|a| with_port(a)));
    }
    let discover = opts.discover || plan.clusters.iter().any(|c| c.spec.nodes.discover);
    if discover {
        addrs.extend(discover_nodes().await?);
    }
    addrs.sort();
    addrs.dedup();
    let local = if addrs.is_empty() {
        let cpus = plan
            .clusters
            .iter()
            .filter_map(|c| c.spec.nodes.cpus)
            .max()
            .unwrap_or(0);
        let nodes = start_local_nodes(opts.local_nodes.max(1), cpus, &opts.secret)?;
        addrs = nodes.iter().map(|n| n.addr.clone()).collect();
        nodes
    } else {
        Vec::new()
    };
    if addrs.is_empty() {
        return Err("no nodes: give --node, list spec.nodes.external, or use --discover".into());
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let mut clients: HashMap<String, NodeClient> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut scheduler = Scheduler::new();
    let now = || started.elapsed();
    let mut actions = Vec::new();
    let comp_id = |i: usize| {
        format!(
            "{}/{}/{}",
            plan.clusters[i].namespace,
            plan.clusters[i].name,
            std::process::id()
        )
    };
    for (i, c) in plan.clusters.iter().enumerate() {
        let policy = ClusterPolicy {
            reentrant: c.spec.reentrant,
            backoff_limit: c
                .spec
                .backoff_limit
                .unwrap_or(ClusterPolicy::default().backoff_limit),
        };
        actions.extend(scheduler.handle(
            now(),
            Event::ClusterAdded {
                cluster: comp_id(i),
                policy,
            },
        ));
        if c.spec.suspend {
            actions.extend(scheduler.handle(
                now(),
                Event::SuspendCluster {
                    cluster: comp_id(i),
                    suspended: true,
                },
            ));
        }
    }

    for addr in &addrs {
        let connect = connect_node(addr, &config, local.is_empty()).await;
        let (client, mut events) = match connect {
            Ok(c) => c,
            Err(e) => {
                eprintln!("dispy: skipping node {addr}: {e}");
                continue;
            }
        };
        names.insert(addr.clone(), client.info().name.clone());
        let (tx, node) = (tx.clone(), addr.clone());
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if tx.send(Input::Node(node.clone(), ev)).is_err() {
                    return;
                }
            }
        });
        actions.extend(scheduler.handle(
            now(),
            Event::NodeUp {
                node: addr.clone(),
                cpus: client.info().cpus,
            },
        ));
        clients.insert(addr.clone(), client);
    }
    if clients.is_empty() {
        return Err(format!(
            "none of the nodes could be reached: {}",
            addrs.join(", ")
        ));
    }

    // Ship every computation to every node, in parallel.
    let mut setups = Vec::new();
    for (addr, client) in &clients {
        for (i, c) in plan.clusters.iter().enumerate() {
            let (client, addr, id) = (client.clone(), addr.clone(), comp_id(i));
            let (computation, files) = (c.computation.clone(), c.files.clone());
            setups.push(tokio::spawn(async move {
                let result = async {
                    client
                        .compute(ComputeRequest {
                            computation: id.clone(),
                            spec: computation,
                            keep_files: false,
                        })
                        .await?;
                    for (name, data) in &files {
                        client.send_file(&id, name, data, 0o644, None).await?;
                    }
                    client.setup(&id).await
                }
                .await;
                (i, addr, result)
            }));
        }
    }
    let mut setup_errors: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for s in setups {
        let (i, addr, result) = s.await.map_err(|e| e.to_string())?;
        match result {
            Ok(_) => actions.extend(scheduler.handle(
                now(),
                Event::ClusterReady {
                    cluster: comp_id(i),
                    node: addr,
                },
            )),
            Err(e) => {
                eprintln!(
                    "dispy: JobCluster {}: setup on {addr} failed: {e}",
                    plan.clusters[i].name
                );
                setup_errors.entry(i).or_default().push(e.to_string());
            }
        }
    }

    let mut views: Vec<JobView> = plan
        .jobs
        .iter()
        .map(|_| JobView {
            status: DispyJobStatus::default(),
            done: false,
        })
        .collect();
    let key_of = |j: usize| JobKey::new(comp_id(plan.jobs[j].cluster), j as JobId);
    let mut progress = Progress::new(plan.jobs.len(), opts.quiet);
    let mut finals: Vec<(usize, JobStatus, String)> = Vec::new();
    for (j, job) in plan.jobs.iter().enumerate() {
        let cluster = job.cluster;
        let failed_everywhere = setup_errors
            .get(&cluster)
            .is_some_and(|e| e.len() == clients.len());
        if failed_everywhere {
            let why = format!("setup failed on every node: {}", setup_errors[&cluster][0]);
            finals.push((j, JobStatus::Abandoned, why));
            continue;
        }
        let pinned = match &job.spec.node {
            None => None,
            Some(want) => match resolve_node(want, &names) {
                Some(addr) => Some(addr),
                None => {
                    let why = format!(
                        "node {want:?} is not one of the nodes in use ({})",
                        node_list(&names)
                    );
                    finals.push((j, JobStatus::Abandoned, why));
                    continue;
                }
            },
        };
        let spec = JobSpec {
            key: key_of(j),
            node: pinned,
            active_deadline: job.spec.active_deadline_seconds.map(Duration::from_secs),
        };
        actions.extend(scheduler.handle(now(), Event::JobSubmitted(spec)));
    }
    for (j, status, why) in finals {
        finish(
            &mut views[j],
            status,
            why,
            &mut progress,
            &plan.jobs[j].name,
        );
    }

    let interrupt_tx = tx.clone();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if interrupt_tx.send(Input::Interrupt).is_err() {
                return;
            }
        }
    });
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut interrupted = false;

    loop {
        // Jobs dispatched together to one node go in one request.
        let mut batches: BTreeMap<(String, String), Vec<Outgoing>> = BTreeMap::new();
        for action in std::mem::take(&mut actions) {
            match action {
                Action::Dispatch { key, node, attempt } => {
                    let j = key.job as usize;
                    views[j].status.attempts = attempt;
                    let job = &plan.jobs[j];
                    let request = JobRequest {
                        id: key.job,
                        args: job.args.clone(),
                        kwargs: job.kwargs.clone(),
                        depends: job.files.iter().map(|(n, _)| n.clone()).collect(),
                    };
                    batches
                        .entry((node, key.cluster.clone()))
                        .or_default()
                        .push((key, request, job.files.clone()));
                }
                Action::Terminate { key, node, reason } => {
                    views[key.job as usize].status.message = Some(reason);
                    if let Some(client) = clients.get(&node).cloned() {
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
                    let v = &mut views[key.job as usize];
                    v.status.attempts = attempt;
                    v.status.status = JobStatus::Created;
                    v.status.message = Some(format!("requeued: {reason}"));
                    progress.note(&format!(
                        "job {} requeued: {reason}",
                        plan.jobs[key.job as usize].name
                    ));
                }
                Action::Finalize {
                    key,
                    status,
                    reason,
                } => {
                    let j = key.job as usize;
                    finish(
                        &mut views[j],
                        status,
                        reason,
                        &mut progress,
                        &plan.jobs[j].name,
                    );
                }
            }
        }
        for ((node, cluster), jobs) in batches {
            match clients.get(&node).cloned() {
                Some(client) => {
                    tokio::spawn(submit_batch(client, node, cluster, jobs, tx.clone()));
                }
                None => {
                    for (key, _, _) in jobs {
                        let error = Some("the node is gone".to_string());
                        let _ = tx.send(Input::Submitted {
                            key,
                            node: node.clone(),
                            error,
                        });
                    }
                }
            }
        }
        progress.update(
            &views
                .iter()
                .map(|v| (v.status.status, v.done))
                .collect::<Vec<_>>(),
        );
        if views.iter().all(|v| v.done) {
            break;
        }
        if clients.is_empty() {
            // Every node is gone: what is still queued cannot run.
            for (j, v) in views.iter_mut().enumerate() {
                if !v.done {
                    finish(
                        v,
                        JobStatus::Abandoned,
                        "no node left to run it".into(),
                        &mut progress,
                        &plan.jobs[j].name,
                    );
                }
            }
            break;
        }
        let input = tokio::select! {
            i = rx.recv() => i,
            _ = ticker.tick() => {
                actions.extend(scheduler.handle(now(), Event::Tick));
                continue;
            }
        };
        let Some(input) = input else { break };
        match input {
            Input::Interrupt if interrupted => return Err("interrupted twice: stopping now".into()),
            Input::Interrupt => {
                interrupted = true;
                progress.note("interrupted: cancelling jobs (Ctrl-C again to stop at once)");
                for (j, v) in views.iter().enumerate() {
                    if !v.done {
                        actions.extend(
                            scheduler.handle(now(), Event::CancelRequested { key: key_of(j) }),
                        );
                    }
                }
            }
            Input::Submitted { key, node, error } => {
                if let Some(reason) = error {
                    actions.extend(
                        scheduler.handle(now(), Event::DispatchFailed { key, node, reason }),
                    );
                }
            }
            Input::Node(node, ClientEvent::Job(ev)) => {
                let key = JobKey::new(ev.computation.clone(), ev.job);
                let j = ev.job as usize;
                if j >= views.len() || key != key_of(j) {
                    continue;
                }
                match ev.kind {
                    JobEventKind::Running { start_time } => {
                        if !views[j].done {
                            let v = &mut views[j].status;
                            v.status = JobStatus::Running;
                            v.node = names.get(&node).cloned();
                            v.start_time = Some(rfc3339(start_time));
                        }
                        actions.extend(scheduler.handle(now(), Event::JobStarted { key, node }));
                    }
                    JobEventKind::Provisional { result } => {
                        if is_current(&scheduler, &key, &node) {
                            views[j].status.record_provisional(&result);
                        }
                    }
                    JobEventKind::File(file) => {
                        if is_current(&scheduler, &key, &node) {
                            let job = &plan.jobs[j];
                            let dir = job_files_dir(
                                &opts.files_dir,
                                &plan.clusters[job.cluster].namespace,
                                &job.name,
                            );
                            let saved = save_sent_file(&dir, &file);
                            if let Some(why) = &saved.message {
                                progress.note(&format!(
                                    "{}: a sent file was not saved: {why}",
                                    job.name
                                ));
                            }
                            views[j].status.record_sent_file(saved);
                        }
                    }
                    JobEventKind::Done(result) => {
                        let current = scheduler.job(&key).and_then(|r| r.node().cloned());
                        if current.as_deref() == Some(node.as_str()) && !views[j].done {
                            let v = &mut views[j];
                            v.status.record_result(&result);
                            v.status.node = names.get(&node).cloned();
                            v.done = true;
                            progress.job_done(&plan.jobs[j].name, &v.status);
                        }
                        actions.extend(scheduler.handle(
                            now(),
                            Event::JobDone {
                                key: key.clone(),
                                node: node.clone(),
                                status: result.status,
                            },
                        ));
                        if let Some(client) = clients.get(&node).cloned() {
                            tokio::spawn(async move {
                                let _ = client.ack(&key.cluster, vec![key.job]).await;
                            });
                        }
                    }
                }
            }
            Input::Node(node, ClientEvent::Disconnected { reason, .. }) => {
                clients.remove(&node);
                progress.note(&format!(
                    "node {} lost: {reason}",
                    names.get(&node).unwrap_or(&node)
                ));
                actions.extend(scheduler.handle(now(), Event::NodeLost { node, reason }));
            }
            Input::Node(_, ClientEvent::Pulse { .. }) => {}
        }
    }
    progress.finish();

    // Close the computations (cleanup runs on each node), then stop local nodes.
    let closes: Vec<_> = clients
        .values()
        .flat_map(|client| {
            (0..plan.clusters.len()).map(move |i| {
                let client = client.clone();
                let id = comp_id(i);
                tokio::spawn(async move { client.close(&id, true).await })
            })
        })
        .collect();
    for c in closes {
        if let Ok(Err(e)) = c.await {
            if e.node_code() != Some(dispy_core::protocol::ErrorCode::UnknownComputation) {
                eprintln!("dispy: closing a computation failed: {e}");
            }
        }
    }
    drop(clients);
    drop(local);

    Ok(plan
        .jobs
        .iter()
        .zip(views)
        .map(|(job, v)| Outcome {
            name: job.name.clone(),
            cluster: plan.clusters[job.cluster].name.clone(),
            namespace: plan.clusters[job.cluster].namespace.clone(),
            status: v.status,
            submitted: started,
        })
        .collect())
}

/// Whether `node` runs the job now (news from an earlier attempt's node is stale).
fn is_current(scheduler: &Scheduler, key: &JobKey, node: &str) -> bool {
    scheduler
        .job(key)
        .and_then(|r| r.node().map(String::as_str))
        == Some(node)
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

/// Sends the jobs' own files, then the jobs in one request; reports each refused job.
async fn submit_batch(
    client: NodeClient,
    node: String,
    cluster: String,
    jobs: Vec<Outgoing>,
    tx: mpsc::UnboundedSender<Input>,
) {
    let mut requests = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    for (key, request, files) in jobs {
        let mut sent = Ok(());
        for (name, data) in &files {
            if let Err(e) = client
                .send_file(&cluster, name, data, 0o644, Some(key.job))
                .await
            {
                sent = Err(e.to_string());
                break;
            }
        }
        match sent {
            Ok(()) => {
                requests.push(request);
                keys.push(key);
            }
            Err(error) => {
                let _ = tx.send(Input::Submitted {
                    key,
                    node: node.clone(),
                    error: Some(error),
                });
            }
        }
    }
    match client.submit_many(&cluster, requests).await {
        Ok(rejected) => {
            for r in rejected {
                let key = JobKey::new(cluster.clone(), r.job);
                let _ = tx.send(Input::Submitted {
                    key,
                    node: node.clone(),
                    error: Some(r.error.to_string()),
                });
            }
        }
        Err(e) => {
            for key in keys {
                let _ = tx.send(Input::Submitted {
                    key,
                    node: node.clone(),
                    error: Some(e.to_string()),
                });
            }
        }
    }
}

fn finish(v: &mut JobView, status: JobStatus, why: String, progress: &mut Progress, name: &str) {
    if v.done {
        return;
    }
    v.status.status = status;
    v.status.message = Some(why);
    v.status.end_time = Some(rfc3339(dispy_core::job::now_secs()));
    v.done = true;
    progress.job_done(name, &v.status);
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

/// A pinned job's `node`: a node name or an address.
fn resolve_node(want: &str, names: &HashMap<String, String>) -> Option<String> {
    names
        .iter()
        .find(|(addr, name)| *addr == want || *name == want || **addr == with_port(want))
        .map(|(addr, _)| addr.clone())
}

fn node_list(names: &HashMap<String, String>) -> String {
    let mut list: Vec<_> = names.iter().map(|(a, n)| format!("{n} at {a}")).collect();
    list.sort();
    list.join(", ")
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
