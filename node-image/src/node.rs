//! The node's state: computations, their jobs, the cpu slots and the FIFO of waiting jobs.
//!
//! Sessions call in with requests; job processes report back through [`Outcome`]s on one
//! channel. Every change happens under one lock, with no I/O held across it except sends on
//! unbounded channels, so the rules below hold by construction:
//! - never more running jobs than cpus; waiting jobs start in the order they were submitted;
//! - each job gets exactly one terminal result, buffered until the client acknowledges it;
//! - a computation whose client is gone longer than the zombie interval is closed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dispy_core::frame::frame;
use dispy_core::job::{now_secs, JobId, JobResult, JobStatus};
use dispy_core::protocol::*;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::process::{resolve_program, signal_group, spawn_program, ProgramJob};
use crate::pyhost::{HostSettings, PyHost};

pub type SessionId = u64;

/// Who may act on a computation: the client that created it, known by the SHA-256 of the
/// credential it presented when it authenticated (never the credential itself). A client
/// without a credential gets one no one else has, so its computations are its connection's.
#[derive(Clone, PartialEq, Eq)]
pub struct Owner([u8; 32]);

impl Owner {
    pub fn of_credential(credential: &str) -> Owner {
        let digest = ring::digest::digest(&ring::digest::SHA256, credential.as_bytes());
        Owner(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    pub fn unique() -> Owner {
        Owner::of_credential(&dispy_core::auth::random_credential())
    }
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Owner({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// How a computation's Python host reads a job's call and writes its result: JSON for the
/// native protocol, pickle for dispy's own clients (arguments and results stay opaque bytes
/// that only the host opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    #[default]
    Json,
    Pickle,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Pickle => "pickle",
        }
    }
}
/// Framed messages to one client connection.
pub type Outbox = mpsc::UnboundedSender<Vec<u8>>;

type NodeResult<T> = Result<T, NodeError>;

pub struct Node {
    pub cfg: NodeConfig,
    pub metrics: Metrics,
    state: Mutex<State>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    host_dir: PathBuf,
    next_run: AtomicU64,
    /// Becomes true when the node starts shutting down.
    pub shutdown: watch::Sender<bool>,
    /// The Python interpreter's `sys.path`, learnt once, for Python hosts.
    python_path: tokio::sync::OnceCell<String>,
    /// The latest figures of what the machine has free ([`crate::avail`] samples them).
    avail: Mutex<Option<AvailInfo>>,
}

struct State {
    /// Cpus offered now (the console's `cpus N`, `stop`, `start`), at most `--cpus`.
    offered: u32,
    /// Where the day is in the service window.
    service: crate::service::Phase,
    /// The service window (`--service_*`, changed by dispy's admin `SERVICE_TIME`).
    window: crate::service::Window,
    /// `--serve` (changed by the admin's `SERVE_CLIENTS`).
    serve: Option<u64>,
    comps: HashMap<ComputationId, Comp>,
    queue: VecDeque<(ComputationId, JobId)>,
    running: u32,
    runs: HashMap<u64, (ComputationId, JobId)>,
    served: u64,
    closing_all: bool,
}

impl State {
    /// How many jobs may run now.
    fn serving_cpus(&self) -> u32 {
        match self.service {
            crate::service::Phase::Open => self.offered,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Registered,
    SettingUp,
    Ready,
    Closing,
}

enum Runner {
    Python(Arc<PyHost>),
    Program {
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
}

struct Comp {
    owner: Owner,
    spec: Computation,
    codec: Codec,
    /// Globals the Python host adds for this computation's code.
    env: serde_json::Map<String, serde_json::Value>,
    dir: PathBuf,
    keep_files: bool,
    phase: Phase,
    runner: Option<Runner>,
    /// Why the computation can no longer run jobs (its Python host died).
    broken: Option<String>,
    jobs: HashMap<JobId, Job>,
    /// Terminal results not yet acknowledged by the client.
    done: BTreeMap<JobId, JobResult>,
    subscriber: Option<(SessionId, Outbox)>,
    detached_since: Option<Instant>,
    /// Per-job files and how many queued or running jobs use each.
    job_files: HashMap<String, usize>,
    idle: Arc<Notify>,
}

struct Job {
    req: JobRequest,
    /// The call as the Python host's codec reads it, when not built from `req`'s JSON.
    call: Option<Vec<u8>>,
    run: Option<Running>,
}

struct Running {
    run: u64,
    start: f64,
    pid: Option<i32>,
    terminating: bool,
    /// Bytes of files the job has sent, against [`Node::max_sent_file`] (the host counts
    /// too, but a job can write frames itself).
    sent: usize,
}

fn event(computation: &str, job: JobId, kind: JobEventKind) -> Vec<u8> {
    frame(&encode(&NodeMsg::Event(JobEvent {
        computation: computation.into(),
        job,
        kind,
    })))
}

fn unknown_computation(id: &str) -> NodeError {
    NodeError::new(
        ErrorCode::UnknownComputation,
        format!("unknown computation {id:?} on this node"),
    )
}

/// A client-supplied file name as a path inside the computation's directory.
pub fn safe_relative(name: &str) -> NodeResult<PathBuf> {
    dispy_core::protocol::relative_path(name)
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            NodeError::new(
                ErrorCode::BadRequest,
                format!("file name {name:?} must be a relative path without '..'"),
            )
        })
}

/// A computation's directory name: one path component that cannot be `.`, `..` or hidden.
fn dir_name(computation: &str) -> String {
    computation
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let keep = c.is_ascii_alphanumeric() || "_-".contains(c) || (c == '.' && i > 0);
            if keep {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Node {
    pub fn new(cfg: NodeConfig) -> std::io::Result<(Arc<Node>, mpsc::UnboundedReceiver<Outcome>)> {
        std::fs::create_dir_all(&cfg.dest_path_prefix)?;
        let host_dir = cfg.dest_path_prefix.join(".dispy-host");
        std::fs::create_dir_all(&host_dir)?;
        std::fs::write(
            host_dir.join(crate::pyhost::HOST_MODULE_FILE),
            crate::pyhost::HOST_SCRIPT,
        )?;
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Metrics::new(cfg.cpus);
        let (cpus, window, serve) = (cfg.cpus, cfg.service, cfg.serve);
        let node = Arc::new(Node {
            cfg,
            metrics,
            state: Mutex::new(State {
                offered: cpus,
                service: crate::service::Phase::Open,
                window,
                serve,
                comps: HashMap::new(),
                queue: VecDeque::new(),
                running: 0,
                runs: HashMap::new(),
                served: 0,
                closing_all: false,
            }),
            outcomes: tx,
            host_dir,
            next_run: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            python_path: tokio::sync::OnceCell::new(),
            avail: Mutex::new(None),
        });
        Ok((node, rx))
    }

    /// What the node says of itself; `owner` sees only its own computations listed (`None`:
    /// all, for the node's own console).
    pub fn info(&self, owner: Option<&Owner>) -> NodeInfo {
        let avail = self.avail();
        let st = self.state.lock().unwrap();
        let mut computations: Vec<_> = st
            .comps
            .iter()
            .filter(|(_, c)| owner.is_none_or(|o| c.owner == *o))
            .map(|(id, _)| id.clone())
            .collect();
        computations.sort();
        NodeInfo {
            name: self.cfg.name.clone(),
            addr: self.cfg.public_addr(),
            port: self.cfg.port,
            cpus: st.serving_cpus(),
            busy: st.running,
            queued: st.queue.len() as u32,
            platform: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            computations,
            max_file_size: self.cfg.max_file_size,
            avail,
        }
    }

    /// What the machine has free, as last sampled; `None` when it cannot be told.
    pub fn avail(&self) -> Option<AvailInfo> {
        *self.avail.lock().unwrap()
    }

    pub fn set_avail(&self, avail: Option<AvailInfo>) {
        *self.avail.lock().unwrap() = avail;
    }

    pub fn load(&self) -> (u32, u32, u32) {
        let st = self.state.lock().unwrap();
        (st.running, st.serving_cpus(), st.queue.len() as u32)
    }

    /// Offers `cpus` of the node's `--cpus` (0 stops taking jobs; running ones go on).
    pub fn set_cpus(self: &Arc<Self>, cpus: u32) -> Result<(), String> {
        if cpus > self.cfg.cpus {
            return Err(format!(
                "cpus {cpus}: this node was started with --cpus {}",
                self.cfg.cpus
            ));
        }
        let mut st = self.state.lock().unwrap();
        st.offered = cpus;
        self.pump(&mut st);
        self.update_gauges(&st);
        tracing::info!(cpus, "cpus offered");
        Ok(())
    }

    /// The service window moved on: outside it no job starts, and after its end running
    /// jobs are terminated.
    pub fn set_service(self: &Arc<Self>, phase: crate::service::Phase) {
        let mut st = self.state.lock().unwrap();
        if st.service == phase {
            return;
        }
        st.service = phase;
        tracing::info!(?phase, "service window");
        if phase == crate::service::Phase::Ended {
            let running: Vec<(ComputationId, JobId)> = st.runs.values().cloned().collect();
            for (id, job) in running {
                self.terminate(&mut st, &id, job);
            }
        }
        self.pump(&mut st);
        self.update_gauges(&st);
    }

    /// Follows the service window for the node's lifetime.
    pub async fn keep_service_window(self: Arc<Self>) {
        let window = self.window();
        if !window.is_always_open() {
            tracing::info!("service window: {}", window.describe());
        }
        loop {
            let phase = self.window().phase(crate::service::local_minute());
            self.set_service(phase);
            tokio::time::sleep(std::time::Duration::from_secs(15)).await;
        }
    }

    pub fn window(&self) -> crate::service::Window {
        self.state.lock().unwrap().window
    }

    /// A new service window (dispy's admin); takes effect at once.
    pub fn set_window(self: &Arc<Self>, window: crate::service::Window) {
        self.state.lock().unwrap().window = window;
        tracing::info!("service window now {}", window.describe());
        self.set_service(window.phase(crate::service::local_minute()));
    }

    /// How many computations the node serves before it exits (`--serve`); `None`: no limit.
    pub fn serve_limit(&self) -> Option<u64> {
        self.state.lock().unwrap().serve
    }

    pub fn set_serve_limit(&self, serve: Option<u64>) {
        self.state.lock().unwrap().serve = serve;
        tracing::info!(?serve, "computations to serve");
        self.check_serve_limit();
    }

    /// Registers a computation. Its directory is `<prefix>/<its name>`, or `dir` (a relative
    /// path under the prefix, which other computations may share, as dispy's `dest_path`).
    pub fn compute(
        &self,
        session: SessionId,
        outbox: &Outbox,
        owner: Owner,
        req: ComputeRequest,
        dir: Option<&str>,
    ) -> NodeResult<()> {
        let id = req.computation.clone();
        if id.is_empty() {
            return Err(NodeError::new(
                ErrorCode::BadRequest,
                "the computation needs a name",
            ));
        }
        match &req.spec {
            Computation::Python(py) if py.function.is_empty() => {
                return Err(NodeError::new(
                    ErrorCode::BadRequest,
                    format!("computation {id:?}: python.function is empty"),
                ));
            }
            Computation::Program(p) if p.command.is_empty() => {
                return Err(NodeError::new(
                    ErrorCode::BadRequest,
                    format!("computation {id:?}: program.command is empty"),
                ));
            }
            _ => {}
        }
        let mut st = self.state.lock().unwrap();
        if st.closing_all {
            return Err(NodeError::new(
                ErrorCode::Closing,
                "the node is shutting down",
            ));
        }
        if let Some(limit) = st.serve {
            if st.served + st.comps.len() as u64 >= limit {
                return Err(NodeError::new(
                    ErrorCode::Closing,
                    format!("this node serves {limit} computation(s) (--serve) and takes no more"),
                ));
            }
        }
        if st.comps.contains_key(&id) {
            return Err(NodeError::new(
                ErrorCode::AlreadyExists,
                format!("computation {id:?} already exists on this node; close it or attach to it"),
            ));
        }
        let dir = match dir {
            None => self.cfg.dest_path_prefix.join(dir_name(&id)),
            Some(d) => self.cfg.dest_path_prefix.join(safe_relative(d)?),
        };
        std::fs::create_dir_all(&dir).map_err(|e| {
            NodeError::new(
                ErrorCode::Internal,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        st.comps.insert(
            id.clone(),
            Comp {
                owner,
                spec: req.spec,
                codec: Codec::Json,
                env: Default::default(),
                dir,
                keep_files: req.keep_files && !self.cfg.force_cleanup,
                phase: Phase::Registered,
                runner: None,
                broken: None,
                jobs: HashMap::new(),
                done: BTreeMap::new(),
                subscriber: Some((session, outbox.clone())),
                detached_since: None,
                job_files: HashMap::new(),
                idle: Arc::new(Notify::new()),
            },
        );
        self.metrics.computations.set(st.comps.len() as i64);
        tracing::info!(computation = %id, "computation registered");
        Ok(())
    }

    /// Refuses a request on a computation of another client.
    pub fn check_owner(&self, id: &str, owner: &Owner) -> NodeResult<()> {
        let st = self.state.lock().unwrap();
        match st.comps.get(id) {
            Some(c) if c.owner == *owner => Ok(()),
            Some(_) => Err(NodeError::new(
                ErrorCode::NotOwner,
                format!(
                    "computation {id:?} belongs to another client (a client acts only on the computations it created, with the same owner credential)"
                ),
            )),
            None => Err(unknown_computation(id)),
        }
    }

    /// Replaces a registered computation's spec and codec before its setup (dispy clients
    /// send setup arguments after the computation and its files).
    pub fn configure(
        &self,
        id: &str,
        spec: Computation,
        codec: Codec,
        env: serde_json::Map<String, serde_json::Value>,
    ) -> NodeResult<()> {
        let mut st = self.state.lock().unwrap();
        let comp = st
            .comps
            .get_mut(id)
            .ok_or_else(|| unknown_computation(id))?;
        if comp.phase != Phase::Registered {
            return Err(NodeError::new(
                ErrorCode::BadRequest,
                format!("computation {id:?} is already set up"),
            ));
        }
        comp.spec = spec;
        comp.codec = codec;
        comp.env = env;
        Ok(())
    }

    /// Ids of the computation's queued and running jobs.
    pub fn job_ids(&self, id: &str) -> NodeResult<Vec<JobId>> {
        let st = self.state.lock().unwrap();
        let comp = st.comps.get(id).ok_or_else(|| unknown_computation(id))?;
        Ok(comp.jobs.keys().copied().collect())
    }

    /// Ids of the computation's results not yet acknowledged.
    pub fn done_ids(&self, id: &str) -> NodeResult<Vec<JobId>> {
        let st = self.state.lock().unwrap();
        let comp = st.comps.get(id).ok_or_else(|| unknown_computation(id))?;
        Ok(comp.done.keys().copied().collect())
    }

    /// A result not yet acknowledged.
    pub fn done_result(&self, id: &str, job: JobId) -> NodeResult<Option<JobResult>> {
        let st = self.state.lock().unwrap();
        let comp = st.comps.get(id).ok_or_else(|| unknown_computation(id))?;
        Ok(comp.done.get(&job).cloned())
    }

    /// The computation's directory, for file transfers.
    pub fn comp_dir(&self, id: &str) -> NodeResult<PathBuf> {
        let st = self.state.lock().unwrap();
        let comp = st.comps.get(id).ok_or_else(|| unknown_computation(id))?;
        if comp.phase == Phase::Closing {
            return Err(NodeError::new(
                ErrorCode::Closing,
                format!("computation {id:?} is closing"),
            ));
        }
        Ok(comp.dir.clone())
    }

    /// Checks a file offer against the size limit; whether the node already has that file.
    pub fn check_file(&self, id: &str, meta: &FileMeta) -> NodeResult<(PathBuf, bool)> {
        let rel = safe_relative(&meta.name)?;
        self.check_size(&meta.name, meta.size)?;
        let path = self.comp_dir(id)?.join(rel);
        let present = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() == meta.size => std::fs::read(&path)
                .map(|d| dispy_core::auth::sha256_hex(&d) == meta.sha256)
                .unwrap_or(false),
            _ => false,
        };
        Ok((path, present))
    }

    pub fn check_size(&self, name: &str, size: u64) -> NodeResult<()> {
        let max = self.cfg.max_file_size;
        if max > 0 && size > max {
            return Err(NodeError::new(
                ErrorCode::TooLarge,
                format!("file {name:?} is {size} bytes, over this node's --max-file-size of {max} bytes"),
            ));
        }
        Ok(())
    }

    /// Records that a per-job file now exists, so it is removed after its last job.
    pub fn note_job_file(&self, id: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(comp) = st.comps.get_mut(id) {
            comp.job_files.entry(name.to_string()).or_insert(0);
        }
    }

    /// Runs the computation's setup: starts its Python host or finds its program.
    pub async fn setup(self: &Arc<Self>, id: &str) -> NodeResult<u32> {
        let (spec, dir, codec, env) = {
            let mut st = self.state.lock().unwrap();
            let comp = st
                .comps
                .get_mut(id)
                .ok_or_else(|| unknown_computation(id))?;
            match comp.phase {
                Phase::Registered => {}
                // A client that re-attached after a restart sets up again: nothing to do.
                Phase::Ready => return Ok(self.cfg.cpus),
                _ => {
                    return Err(NodeError::new(
                        ErrorCode::AlreadyExists,
                        format!("computation {id:?} is being set up or closed"),
                    ))
                }
            }
            comp.phase = Phase::SettingUp;
            (
                comp.spec.clone(),
                comp.dir.clone(),
                comp.codec,
                comp.env.clone(),
            )
        };
        let runner = match &spec {
            Computation::Program(p) => {
                resolve_program(&p.command[0], &dir).map(|program| Runner::Program {
                    program,
                    args: p.command[1..].to_vec(),
                    env: p.env.clone(),
                })
            }
            Computation::Python(py) => self
                .start_python(id, py, &dir, codec, env)
                .await
                .map(Runner::Python),
        };
        let mut st = self.state.lock().unwrap();
        let Some(comp) = st.comps.get_mut(id) else {
            return Err(unknown_computation(id));
        };
        match runner {
            Ok(runner) => {
                comp.runner = Some(runner);
                comp.phase = Phase::Ready;
                tracing::info!(computation = %id, "computation set up");
                Ok(self.cfg.cpus)
            }
            Err(e) => {
                comp.phase = Phase::Registered;
                tracing::warn!(computation = %id, "setup failed: {e}");
                Err(NodeError::new(
                    ErrorCode::SetupFailed,
                    format!("computation {id:?}: {e}"),
                ))
            }
        }
    }

    /// Queues jobs in order. A problem with the computation refuses them all; a problem with
    /// one job refuses that job only.
    async fn start_python(
        &self,
        id: &str,
        py: &PythonComputation,
        dir: &Path,
        codec: Codec,
        extra_env: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Arc<PyHost>, String> {
        let sys_path = self
            .python_path
            .get_or_try_init(|| crate::pyhost::probe_interpreter(&self.cfg.python, &self.host_dir))
            .await?;
        let mut env = serde_json::json!({
            "dispy_node_name": self.cfg.name,
            "dispy_node_ip_addr": self.cfg.public_addr(),
            "dispy_job_path": dir,
        });
        if let serde_json::Value::Object(map) = &mut env {
            map.extend(extra_env);
        }
        let settings = HostSettings {
            python: &self.cfg.python,
            sys_path,
            host_dir: &self.host_dir,
            dir,
            workers: self.cfg.cpus,
            max_output: self.cfg.max_output,
            // Room for the result (checked exactly against --max-frame later) and for stdout
            // and stderr as JSON, whose escapes can take six bytes for one.
            max_reply: self.cfg.max_frame.saturating_mul(2) + 12 * self.cfg.max_output + (64 << 10),
            max_sent_file: self.max_sent_file(),
            codec: codec.name(),
            env,
        };
        PyHost::start(id, py, settings, self.outcomes.clone()).await
    }

    pub fn submit(self: &Arc<Self>, id: &str, jobs: Vec<JobRequest>) -> NodeResult<Vec<Rejected>> {
        self.submit_calls(id, jobs.into_iter().map(|req| (req, None)).collect())
    }

    /// Queues jobs whose calls may be given ready-made in the Python host's codec.
    pub fn submit_calls(
        self: &Arc<Self>,
        id: &str,
        jobs: Vec<(JobRequest, Option<Vec<u8>>)>,
    ) -> NodeResult<Vec<Rejected>> {
        let mut st = self.state.lock().unwrap();
        if st.closing_all {
            return Err(NodeError::new(
                ErrorCode::Closing,
                "the node is shutting down",
            ));
        }
        let comp = st
            .comps
            .get_mut(id)
            .ok_or_else(|| unknown_computation(id))?;
        match comp.phase {
            Phase::Ready => {}
            Phase::Closing => {
                return Err(NodeError::new(
                    ErrorCode::Closing,
                    format!("computation {id:?} is closing"),
                ));
            }
            _ => {
                return Err(NodeError::new(
                    ErrorCode::BadRequest,
                    format!("computation {id:?} is not set up yet"),
                ));
            }
        }
        let mut rejected = Vec::new();
        let mut accepted = Vec::with_capacity(jobs.len());
        for (req, call) in jobs {
            match admit(comp, id, &req) {
                Ok(()) => {
                    for name in &req.depends {
                        *comp.job_files.entry(name.clone()).or_insert(0) += 1;
                    }
                    // A client reusing an id (as dispy's do) has moved on from the old result.
                    comp.done.remove(&req.id);
                    accepted.push(req.id);
                    comp.jobs.insert(
                        req.id,
                        Job {
                            req,
                            call,
                            run: None,
                        },
                    );
                }
                Err(error) => rejected.push(Rejected { job: req.id, error }),
            }
        }
        st.queue
            .extend(accepted.into_iter().map(|job| (id.to_string(), job)));
        self.pump(&mut st);
        self.update_gauges(&st);
        Ok(rejected)
    }

    /// Cancels a queued job or terminates a running one.
    pub fn cancel(self: &Arc<Self>, id: &str, job: JobId) -> NodeResult<()> {
        let mut st = self.state.lock().unwrap();
        let comp = st
            .comps
            .get_mut(id)
            .ok_or_else(|| unknown_computation(id))?;
        if comp.done.contains_key(&job) {
            return Ok(());
        }
        let Some(j) = comp.jobs.get(&job) else {
            return Err(NodeError::new(
                ErrorCode::UnknownJob,
                format!("unknown job {job} of computation {id:?}"),
            ));
        };
        if j.run.is_some() {
            self.terminate(&mut st, id, job);
        } else {
            let result = JobResult::failed(JobStatus::Cancelled, "cancelled before it started");
            self.finish(&mut st, id, job, result);
            self.update_gauges(&st);
        }
        Ok(())
    }

    fn terminate(self: &Arc<Self>, st: &mut State, id: &str, job: JobId) {
        let Some(comp) = st.comps.get_mut(id) else {
            return;
        };
        let Some(Job {
            run: Some(running), ..
        }) = comp.jobs.get_mut(&job)
        else {
            return;
        };
        running.terminating = true;
        let (run, pid) = (running.run, running.pid);
        Self::signal_run(&comp.runner, run, pid, libc::SIGTERM);
        let node = self.clone();
        let grace = self.cfg.terminate_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut st = node.state.lock().unwrap();
            let Some((cid, jid)) = st.runs.get(&run).cloned() else {
                return;
            };
            let Some(comp) = st.comps.get_mut(&cid) else {
                return;
            };
            if let Some(Job {
                run: Some(running), ..
            }) = comp.jobs.get(&jid)
            {
                tracing::warn!(computation = %cid, job = jid, "job ignored SIGTERM; sending SIGKILL");
                Self::signal_run(&comp.runner, running.run, running.pid, libc::SIGKILL);
            }
        });
    }

    fn signal_run(runner: &Option<Runner>, run: u64, pid: Option<i32>, signal: i32) {
        match (runner, pid) {
            (Some(Runner::Python(host)), _) => host.kill(run, signal),
            (_, Some(pid)) => signal_group(pid, signal),
            _ => {}
        }
    }

    pub fn ack(&self, id: &str, jobs: &[JobId]) -> NodeResult<()> {
        let mut st = self.state.lock().unwrap();
        let comp = st
            .comps
            .get_mut(id)
            .ok_or_else(|| unknown_computation(id))?;
        for j in jobs {
            comp.done.remove(j);
        }
        Ok(())
    }

    /// Makes `session` the computation's client; resends unacknowledged results.
    pub fn attach(
        &self,
        session: SessionId,
        outbox: &Outbox,
        id: &str,
    ) -> NodeResult<Vec<JobState>> {
        let mut st = self.state.lock().unwrap();
        let comp = st
            .comps
            .get_mut(id)
            .ok_or_else(|| unknown_computation(id))?;
        comp.subscriber = Some((session, outbox.clone()));
        comp.detached_since = None;
        let mut jobs: Vec<JobState> = comp
            .jobs
            .iter()
            .map(|(&id, j)| JobState {
                id,
                status: if j.run.is_some() {
                    JobStatus::Running
                } else {
                    JobStatus::Created
                },
            })
            .chain(comp.done.iter().map(|(&id, r)| JobState {
                id,
                status: r.status,
            }))
            .collect();
        jobs.sort_by_key(|j| j.id);
        tracing::info!(computation = %id, "client re-attached; resending {} result(s)", comp.done.len());
        Ok(jobs)
    }

    /// Sends the buffered results after the attach reply went out.
    pub fn resend_results(&self, id: &str) {
        let st = self.state.lock().unwrap();
        let Some(comp) = st.comps.get(id) else { return };
        let Some((_, outbox)) = &comp.subscriber else {
            return;
        };
        for (&job, result) in &comp.done {
            let _ = outbox.send(event(id, job, JobEventKind::Done(result.clone())));
        }
    }

    /// A client connection ended: its computations wait for it (up to the zombie interval).
    pub fn detach_session(&self, session: SessionId) {
        let mut st = self.state.lock().unwrap();
        for (id, comp) in st.comps.iter_mut() {
            if matches!(&comp.subscriber, Some((s, _)) if *s == session) {
                comp.subscriber = None;
                comp.detached_since = Some(Instant::now());
                tracing::info!(computation = %id, "client disconnected; keeping its results for the zombie interval");
            }
        }
    }

    /// Closes a computation: with `terminate_pending` its jobs are cancelled or terminated,
    /// otherwise they run to the end. Then cleanup runs and its files go.
    pub async fn close(self: &Arc<Self>, id: &str, terminate_pending: bool) -> NodeResult<()> {
        if !self.drain(id, terminate_pending).await? {
            return Ok(());
        }
        let comp = {
            let mut st = self.state.lock().unwrap();
            let Some(comp) = st.comps.remove(id) else {
                return Ok(());
            };
            st.served += 1;
            self.metrics.computations.set(st.comps.len() as i64);
            comp
        };
        let mut result = Ok(());
        if let Some(Runner::Python(host)) = &comp.runner {
            if let Err(e) = host.close(true).await {
                tracing::warn!(computation = %id, "{e}");
                result = Err(NodeError::new(
                    ErrorCode::Internal,
                    format!("computation {id:?}: {e}"),
                ));
            }
        }
        if !comp.keep_files {
            if let Err(e) = std::fs::remove_dir_all(&comp.dir) {
                tracing::warn!(computation = %id, "cannot remove {}: {e}", comp.dir.display());
            }
        }
        tracing::info!(computation = %id, "computation closed");
        result
    }

    /// Stops the computation taking jobs and waits until it has none queued or running (with
    /// `terminate_pending`, after cancelling and terminating them). False when it went away
    /// meanwhile.
    async fn drain(self: &Arc<Self>, id: &str, terminate_pending: bool) -> NodeResult<bool> {
        let idle = {
            let mut st = self.state.lock().unwrap();
            let comp = st
                .comps
                .get_mut(id)
                .ok_or_else(|| unknown_computation(id))?;
            comp.phase = Phase::Closing;
            let idle = comp.idle.clone();
            if terminate_pending {
                self.terminate_all(&mut st, id);
            }
            idle
        };
        loop {
            let notified = idle.notified();
            {
                let st = self.state.lock().unwrap();
                match st.comps.get(id) {
                    None => return Ok(false),
                    Some(c) if c.jobs.is_empty() => return Ok(true),
                    _ => {}
                }
            }
            notified.await;
        }
    }

    /// dispy's `resetup_node`: the computation's jobs end, its cleanup runs and its Python
    /// host goes, but it stays registered with its files, to be set up again (fresh globals).
    pub async fn reset(self: &Arc<Self>, id: &str, terminate_pending: bool) -> NodeResult<()> {
        if !self.drain(id, terminate_pending).await? {
            return Err(unknown_computation(id));
        }
        let runner = {
            let mut st = self.state.lock().unwrap();
            let comp = st
                .comps
                .get_mut(id)
                .ok_or_else(|| unknown_computation(id))?;
            comp.phase = Phase::Registered;
            comp.broken = None;
            comp.runner.take()
        };
        if let Some(Runner::Python(host)) = runner {
            host.close(true).await.map_err(|e| {
                NodeError::new(ErrorCode::Internal, format!("computation {id:?}: {e}"))
            })?;
        }
        tracing::info!(computation = %id, "computation closed for a new setup");
        Ok(())
    }

    /// With `--serve N`: shuts the node down once N computations were served. Called after
    /// the close was answered, so the client hears the answer before the shutdown notice.
    pub fn check_serve_limit(&self) {
        let st = self.state.lock().unwrap();
        if let Some(limit) = st.serve {
            if st.served >= limit && st.comps.is_empty() {
                tracing::info!("served {limit} computation(s) (--serve); shutting down");
                self.shutdown.send_replace(true);
            }
        }
    }

    fn terminate_all(self: &Arc<Self>, st: &mut State, id: &str) {
        let Some(comp) = st.comps.get(id) else { return };
        let (running, queued): (Vec<_>, Vec<_>) =
            comp.jobs.iter().partition(|(_, j)| j.run.is_some());
        let running: Vec<JobId> = running.into_iter().map(|(&k, _)| k).collect();
        let queued: Vec<JobId> = queued.into_iter().map(|(&k, _)| k).collect();
        for job in queued {
            let result = JobResult::failed(
                JobStatus::Cancelled,
                "cancelled: the computation was closed",
            );
            self.finish(st, id, job, result);
        }
        for job in running {
            self.terminate(st, id, job);
        }
        self.update_gauges(st);
    }

    /// The most bytes a job may send in files: `--max_file_size` (when set), and what one
    /// frame to the client carries.
    pub fn max_sent_file(&self) -> usize {
        let frame = self.cfg.max_frame.saturating_sub(64 << 10);
        match self.cfg.max_file_size {
            0 => frame,
            limit => frame.min(usize::try_from(limit).unwrap_or(usize::MAX)),
        }
    }

    /// Handles what job processes and hosts report; runs for the node's lifetime.
    pub async fn run_outcomes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Outcome>) {
        while let Some(outcome) = rx.recv().await {
            let mut st = self.state.lock().unwrap();
            self.take_outcome(&mut st, outcome);
            // Take whatever else is ready before giving the lock back.
            while let Ok(outcome) = rx.try_recv() {
                self.take_outcome(&mut st, outcome);
            }
            self.pump(&mut st);
            self.update_gauges(&st);
        }
    }

    fn take_outcome(self: &Arc<Self>, st: &mut State, outcome: Outcome) {
        match outcome {
            Outcome::Job { run, result } => self.job_ended(st, run, result),
            Outcome::News { run, news } => {
                // Only a job still running has news; its client gets it if connected.
                let max = self.max_sent_file();
                let Some((id, job)) = st.runs.get(&run).cloned() else {
                    return;
                };
                let Some(comp) = st.comps.get_mut(&id) else {
                    return;
                };
                if let JobEventKind::File(file) = &news {
                    let running = comp.jobs.get_mut(&job).and_then(|j| j.run.as_mut());
                    let Some(running) = running else { return };
                    running.sent += file.data.len();
                    if running.sent > max {
                        tracing::warn!(computation = %id, job, "a sent file dropped: the job has sent more than the {max} bytes a job may send");
                        return;
                    }
                }
                if let Some((_, outbox)) = &comp.subscriber {
                    let _ = outbox.send(event(&id, job, news));
                }
            }
            Outcome::HostExited {
                computation,
                host,
                reason,
            } => {
                let Some(comp) = st.comps.get_mut(&computation) else {
                    return;
                };
                let current = matches!(&comp.runner, Some(Runner::Python(h)) if h.pid() == host);
                // A host closed on purpose, or one a new setup has replaced, broke nothing.
                if comp.phase == Phase::Closing || !current {
                    return;
                }
                tracing::error!(%computation, "{reason}; its jobs are terminated");
                comp.broken = Some(reason.clone());
                if let Some(Runner::Python(host)) = &comp.runner {
                    let host = host.clone();
                    tokio::spawn(async move { host.reap().await });
                }
                let runs: Vec<u64> = comp
                    .jobs
                    .values()
                    .filter_map(|j| j.run.as_ref().map(|r| r.run))
                    .collect();
                for run in runs {
                    let result = JobResult::failed(JobStatus::Terminated, reason.clone());
                    self.job_ended(st, run, result);
                }
            }
        }
    }

    fn job_ended(self: &Arc<Self>, st: &mut State, run: u64, mut result: JobResult) {
        let Some((id, job)) = st.runs.get(&run).cloned() else {
            return;
        };
        let running = st
            .comps
            .get(&id)
            .and_then(|c| c.jobs.get(&job))
            .and_then(|j| j.run.as_ref());
        let (terminating, start) = running
            .map(|r| (r.terminating, r.start))
            .unwrap_or((false, 0.0));
        result.start_time.get_or_insert(start);
        if terminating && result.status == JobStatus::Finished {
            // A terminated job that still exited cleanly: dispy reports Terminated.
            result.status = JobStatus::Terminated;
            result
                .exception
                .get_or_insert_with(|| "terminated on request".into());
        }
        self.finish(st, &id, job, result);
    }

    /// Records a job's terminal result and tells its client.
    fn finish(&self, st: &mut State, id: &str, job: JobId, result: JobResult) {
        let Some(comp) = st.comps.get_mut(id) else {
            return;
        };
        let Some(j) = comp.jobs.remove(&job) else {
            return;
        };
        if let Some(running) = &j.run {
            if let Some(Runner::Python(host)) = &comp.runner {
                host.job_over(running.run);
            }
        }
        for name in &j.req.depends {
            if let Some(uses) = comp.job_files.get_mut(name) {
                *uses = uses.saturating_sub(1);
                if *uses == 0 {
                    comp.job_files.remove(name);
                    let _ = std::fs::remove_file(comp.dir.join(name));
                }
            }
        }
        let result = fit_frame(id, job, result, self.cfg.max_frame);
        self.metrics.job_done(result.status);
        if let Some((_, outbox)) = &comp.subscriber {
            let _ = outbox.send(event(id, job, JobEventKind::Done(result.clone())));
        }
        comp.done.insert(job, result);
        if comp.jobs.is_empty() {
            comp.idle.notify_waiters();
        }
        if let Some(running) = j.run {
            st.runs.remove(&running.run);
            st.running -= 1;
        }
    }

    /// Starts waiting jobs while cpus are free.
    fn pump(&self, st: &mut State) {
        while st.running < st.serving_cpus() {
            let Some((id, job)) = st.queue.pop_front() else {
                break;
            };
            let Some(comp) = st.comps.get_mut(&id) else {
                continue;
            };
            let Some(j) = comp.jobs.get_mut(&job) else {
                continue;
            };
            if j.run.is_some() {
                continue;
            }
            let run = self.next_run.fetch_add(1, Ordering::Relaxed);
            let started = match (&comp.broken, &comp.runner) {
                (Some(reason), _) => Err(reason.clone()),
                (None, Some(Runner::Python(host))) => match j.call.take() {
                    Some(call) => host.start_job(run, &call).map(|_| None),
                    None => {
                        let call = format!("[{},{}]", j.req.args, j.req.kwargs);
                        host.start_job(run, call.as_bytes()).map(|_| None)
                    }
                },
                (None, Some(Runner::Program { program, args, env })) => {
                    let mut argv = args.clone();
                    argv.extend(program_args(&j.req.args));
                    spawn_program(
                        ProgramJob {
                            program,
                            args: argv,
                            dir: &comp.dir,
                            env,
                            max_output: self.cfg.max_output,
                            run,
                        },
                        self.outcomes.clone(),
                    )
                    .map(Some)
                }
                (None, None) => Err("the computation is not set up".into()),
            };
            match started {
                Ok(pid) => {
                    let start = now_secs();
                    j.run = Some(Running {
                        run,
                        start,
                        pid,
                        terminating: false,
                        sent: 0,
                    });
                    if let Some((_, outbox)) = &comp.subscriber {
                        let _ = outbox.send(event(
                            &id,
                            job,
                            JobEventKind::Running { start_time: start },
                        ));
                    }
                    st.runs.insert(run, (id, job));
                    st.running += 1;
                }
                Err(reason) => {
                    let result = JobResult::failed(JobStatus::Terminated, reason);
                    self.finish(st, &id, job, result);
                }
            }
        }
    }

    fn update_gauges(&self, st: &State) {
        self.metrics.busy.set(st.running as i64);
        self.metrics.queued.set(st.queue.len() as i64);
    }

    /// Closes computations whose client has been gone for the zombie interval.
    pub async fn reap_zombies(self: Arc<Self>) {
        let every = (self.cfg.zombie_interval / 4).clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(5),
        );
        loop {
            tokio::time::sleep(every).await;
            let zombies: Vec<ComputationId> = {
                let st = self.state.lock().unwrap();
                st.comps
                    .iter()
                    .filter(|(_, c)| c.phase != Phase::Closing)
                    .filter(|(_, c)| {
                        c.detached_since
                            .is_some_and(|t| t.elapsed() >= self.cfg.zombie_interval)
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            for id in zombies {
                tracing::warn!(computation = %id, "client gone for the zombie interval; closing the computation");
                let node = self.clone();
                tokio::spawn(async move {
                    let _ = node.close(&id, true).await;
                    node.check_serve_limit();
                });
            }
        }
    }

    /// SIGTERM: refuse new work, cancel queued jobs, give running ones `grace`, then terminate
    /// them; run every cleanup.
    pub async fn shut_down(self: &Arc<Self>) {
        let ids: Vec<ComputationId> = {
            let mut st = self.state.lock().unwrap();
            st.closing_all = true;
            let queued: Vec<_> = st.queue.drain(..).collect();
            for (id, job) in queued {
                let result =
                    JobResult::failed(JobStatus::Cancelled, "cancelled: the node is shutting down");
                self.finish(&mut st, &id, job, result);
            }
            self.update_gauges(&st);
            st.comps.keys().cloned().collect()
        };
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown_grace;
        while self.state.lock().unwrap().running > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let closes: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let node = self.clone();
                tokio::spawn(async move { node.close(&id, true).await })
            })
            .collect();
        for c in closes {
            let _ = c.await;
        }
    }
}

/// Checks one job before it is queued.
/// Room in a frame for everything of a job event but its result, stdout, stderr and exception.
const EVENT_OVERHEAD: usize = 1024;

/// A result whose event would not fit in one frame becomes a job error naming the sizes: a
/// client refuses an oversize frame and drops the connection, and every other job on it
/// would be lost with it.
fn fit_frame(id: &str, job: JobId, mut result: JobResult, max_frame: usize) -> JobResult {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let output = result.stdout.len() + result.stderr.len() + text(&result.exception);
    let rough = text(&result.result) + output + id.len();
    if rough + EVENT_OVERHEAD <= max_frame {
        return result;
    }
    let size = encode(&NodeMsg::Event(JobEvent {
        computation: id.into(),
        job,
        kind: JobEventKind::Done(result.clone()),
    }))
    .len();
    if size <= max_frame {
        return result;
    }
    let reason = format!(
        "the job's result, stdout and stderr come to {size} bytes, over this node's --max-frame of {max_frame} bytes: return less (write large data to a file) or raise --max-frame on the node and its clients"
    );
    tracing::warn!(computation = %id, job, "{reason}");
    result.status = JobStatus::Terminated;
    result.result = None;
    if output + id.len() + EVENT_OVERHEAD + reason.len() > max_frame {
        result.stdout_dropped += std::mem::take(&mut result.stdout).len() as u64;
        result.stderr_dropped += std::mem::take(&mut result.stderr).len() as u64;
    }
    result.exception = Some(match result.exception.take() {
        Some(e) if e.len() < max_frame / 4 => format!("{reason}\n{e}"),
        _ => reason,
    });
    result
}

fn admit(comp: &Comp, id: &str, req: &JobRequest) -> NodeResult<()> {
    let bad = |m: String| {
        NodeError::new(
            ErrorCode::BadRequest,
            format!("job {} of {id:?}: {m}", req.id),
        )
    };
    match json_opening(&req.args) {
        Ok('[') => {}
        Ok(_) => return Err(bad("args must be a JSON list".into())),
        Err(e) => return Err(bad(format!("args are not valid JSON: {e}"))),
    }
    match json_opening(&req.kwargs) {
        Ok('{') => {}
        Ok(_) => return Err(bad("kwargs must be a JSON object".into())),
        Err(e) => return Err(bad(format!("kwargs are not valid JSON: {e}"))),
    }
    if matches!(comp.spec, Computation::Program(_))
        && !serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&req.kwargs)
            .is_ok_and(|m| m.is_empty())
    {
        return Err(bad("a program computation takes no kwargs".into()));
    }
    if comp.jobs.contains_key(&req.id) {
        return Err(NodeError::new(
            ErrorCode::AlreadyExists,
            format!("job {} of {id:?} is already queued or running", req.id),
        ));
    }
    for name in &req.depends {
        safe_relative(name)?;
        if !comp.dir.join(name).is_file() {
            return Err(bad(format!(
                "per-job file {name:?} was not sent before the job"
            )));
        }
    }
    Ok(())
}

/// Validates JSON text without building it; returns its first character.
fn json_opening(text: &str) -> Result<char, serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)?;
    Ok(text.trim_start().chars().next().unwrap_or(' '))
}

/// A program job's arguments as argv strings: strings as they are, anything else as JSON.
fn program_args(args_json: &str) -> Vec<String> {
    match serde_json::from_str::<serde_json::Value>(args_json) {
        Ok(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_over_the_frame_limit_become_a_job_error() {
        let big = JobResult {
            status: JobStatus::Finished,
            result: Some("x".repeat(100_000)),
            stdout: "printed".into(),
            ..Default::default()
        };
        let cut = fit_frame("c", 7, big.clone(), 64 * 1024);
        assert_eq!(cut.status, JobStatus::Terminated);
        assert_eq!(cut.result, None);
        assert_eq!(cut.stdout, "printed");
        let why = cut.exception.unwrap();
        assert!(
            why.contains("over this node's --max-frame of 65536 bytes"),
            "{why}"
        );
        let fits = fit_frame("c", 7, big.clone(), 1 << 20);
        assert_eq!(fits, big);
        // Output too large with it: dropped and counted, so the error itself fits.
        let loud = JobResult {
            stdout: "y".repeat(70_000),
            ..big
        };
        let cut = fit_frame("c", 7, loud, 64 * 1024);
        assert!(cut.stdout.is_empty() && cut.stdout_dropped == 70_000);
        let event = encode(&NodeMsg::Event(JobEvent {
            computation: "c".into(),
            job: 7,
            kind: JobEventKind::Done(cut),
        }));
        assert!(event.len() <= 64 * 1024);
    }

    #[test]
    fn file_names_stay_inside_the_computation() {
        assert!(safe_relative("data/words.txt").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "./a", "a\0b"] {
            let err = safe_relative(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn program_args_are_strings() {
        assert_eq!(
            program_args(r#"["a b", 3, 1.5, true, null]"#),
            vec!["a b", "3", "1.5", "true", "null"]
        );
        assert!(program_args("{}").is_empty());
    }

    #[test]
    fn computation_dirs_are_flat_names() {
        assert_eq!(dir_name("default/wordcount"), "default_wordcount");
        assert_eq!(dir_name("../x"), "_._x");
        assert_eq!(dir_name(".."), "_.");
    }
}
