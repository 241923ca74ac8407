//! The scheduler's IO: the port clients talk to, the port nodes talk to (TCP and UDP), and
//! the tasks that carry out the [`Action`]s of [`Scheduler`]. Every decision is in
//! `sched.rs`; this file reads, checks and writes messages.
//!
//! What must hold whatever a peer sends:
//! - before a client proves the cluster secret (40 bytes, `sha1(cluster_secret + our
//!   sign)`) it learns only our sign, port and version (`CLIENT:`), and makes us read at most
//!   [`PREAUTH_MAX`] bytes, decode at most [`PREAUTH_BUDGET`];
//! - nodes send with no auth prefix (dispy's protocol): a PONG is taken only with
//!   `sha1(node_secret + our sign)`, a job reply only with the uid and per-attempt hash of a
//!   job sent to that node, and a frame longer than [`PREAUTH_MAX`] only from a known node;
//! - a client's requests name its computation and carry its auth: no client acts on another
//!   client's computation, and no client is given a node's token;
//! - after authentication, frames are bounded by `--max_frame`, pickles by the same budget.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispy_core::auth::constant_time_eq;

use crate::kept::PEER_WAITS;
use dispy_core::pickle::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

use crate::auth::{auth_code, AUTH_LEN};
use crate::files;
use crate::limits::{Gate, PREAUTH_BUDGET, PREAUTH_MAX};
use crate::messages::{deserialize, dict, serialize, split, XferFile};
use crate::metrics::Metrics;
use crate::net::{self, Failure, Stream};
use crate::sched::{
    set_attr, Action, ComputeId, NewComputation, NodeInfo, Refusal, Scheduler, Sent, Target,
    ToClient,
};
use crate::wire::{self, text, ClientHello, ComputeReq, JobReq, Pong, ReplyHead};

/// Held while a file goes to a node.
type FileLock = Arc<tokio::sync::Mutex<()>>;

/// Nodes' connections kept for their next JOB_REPLY at once; past that, a reply's connection
/// closes after its ACK, as dispy's protocol has it.
const KEPT_NODE_CONNECTIONS: usize = 1024;

/// How long a node may take to run a computation's setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the IO layer knows about a computation's client, beside the scheduler's state.
struct ClientLink {
    outbox: mpsc::UnboundedSender<ToClient>,
}

pub struct Runtime {
    pub sched: Mutex<Scheduler>,
    pub version: String,
    pub sign: String,
    /// What clients' requests must start with.
    pub cluster_auth: String,
    /// What nodes' PONGs must carry.
    pub node_pong_auth: String,
    pub node_secret: String,
    /// The node-facing port (replies, pongs, pulses) and the client-facing one.
    pub port: u16,
    pub node_port: u16,
    pub scheduler_port: u16,
    /// Our addresses as pings announce them.
    pub ip_addrs: Vec<String>,
    pub node_tls: Option<tokio_rustls::TlsConnector>,
    pub client_tls: Option<tokio_rustls::TlsConnector>,
    pub msg_timeout: Duration,
    pub max_frame: usize,
    pub cleanup_nodes: bool,
    /// Where clients' files are kept, per computation.
    pub dest: PathBuf,
    /// The largest file a client may send; 0: no limit.
    pub max_file_size: u64,
    pub metrics: Metrics,
    gate: Arc<Gate>,
    links: Mutex<HashMap<ComputeId, ClientLink>>,
    /// Pings sent for node announcements, per announced address.
    announced: Mutex<crate::limits::RateLimiter>,
    /// Closes of computations on nodes and clients' message queues in progress (waited for
    /// at shutdown).
    pub closing: std::sync::atomic::AtomicUsize,
    /// Transfers of a file (our path) to a node (its address) in progress.
    file_locks: Mutex<HashMap<(String, String), FileLock>>,
    /// Idle connections to nodes that keep them for the next JOB.
    kept: crate::kept::Kept<Stream>,
    /// Nodes' connections kept open here for their next JOB_REPLY, at most.
    kept_nodes: Arc<tokio::sync::Semaphore>,
}

pub struct Settings {
    pub version: String,
    pub sign: String,
    pub cluster_secret: String,
    pub node_secret: String,
    pub port: u16,
    pub node_port: u16,
    pub scheduler_port: u16,
    pub ip_addrs: Vec<String>,
    pub node_tls: Option<tokio_rustls::TlsConnector>,
    pub client_tls: Option<tokio_rustls::TlsConnector>,
    pub msg_timeout: Duration,
    pub max_frame: usize,
    pub cleanup_nodes: bool,
    pub dest: PathBuf,
    pub max_file_size: u64,
}

impl Runtime {
    pub fn new(s: Settings, sched: Scheduler) -> Arc<Runtime> {
        Arc::new(Runtime {
            sched: Mutex::new(sched),
            cluster_auth: auth_code(&s.cluster_secret, &s.sign),
            node_pong_auth: auth_code(&s.node_secret, &s.sign),
            node_secret: s.node_secret,
            version: s.version,
            sign: s.sign,
            port: s.port,
            node_port: s.node_port,
            scheduler_port: s.scheduler_port,
            ip_addrs: s.ip_addrs,
            node_tls: s.node_tls,
            client_tls: s.client_tls,
            msg_timeout: s.msg_timeout,
            max_frame: s.max_frame,
            cleanup_nodes: s.cleanup_nodes,
            dest: s.dest,
            max_file_size: s.max_file_size,
            metrics: Metrics::new(),
            gate: Gate::new(8, 256),
            links: Mutex::new(HashMap::new()),
            file_locks: Mutex::new(HashMap::new()),
            announced: Mutex::new(crate::limits::RateLimiter::new(4, 1.0, 4096)),
            closing: std::sync::atomic::AtomicUsize::new(0),
            kept: crate::kept::Kept::new(std::time::Instant::now()),
            kept_nodes: Arc::new(tokio::sync::Semaphore::new(KEPT_NODE_CONNECTIONS)),
        })
    }

    /// Runs `f` on the scheduler and carries out what it decided.
    pub fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        let (r, actions) = {
            let mut s = self.sched.lock().unwrap();
            let r = f(&mut s);
            self.metrics.observe(&s);
            (r, s.take_actions())
        };
        self.apply(actions);
        r
    }

    fn apply(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            let rt = self.clone();
            match action {
                Action::Client { compute_id, msg } => rt.to_client(compute_id, msg),
                Action::Forget { compute_id, why } => {
                    rt.links.lock().unwrap().remove(&compute_id);
                    let dir = files::dir(&rt.dest, compute_id);
                    let prefix = dir.to_string_lossy().into_owned();
                    rt.file_locks
                        .lock()
                        .unwrap()
                        .retain(|(_, f), _| !f.starts_with(&prefix));
                    let _ = std::fs::remove_dir_all(dir);
                    tracing::info!(compute_id, "computation {why}");
                }
                Action::Ping { ip, port } => {
                    tokio::spawn(async move { rt.ping_node(&ip, port).await });
                }
                Action::Broadcast => {
                    tokio::spawn(async move { rt.broadcast().await });
                }
                Action::Setup {
                    node,
                    scheduler_ip,
                    compute_id,
                    compute,
                    setup_args,
                    exclusive,
                } => {
                    tokio::spawn(async move {
                        let result = rt
                            .setup(
                                &node,
                                &scheduler_ip,
                                compute_id,
                                &compute,
                                setup_args,
                                exclusive,
                            )
                            .await;
                        if let Err(e) = &result {
                            tracing::warn!(node = %node.ip, compute_id, "setup failed: {e}");
                        } else {
                            tracing::info!(node = %node.ip, compute_id, "computation set up");
                        }
                        rt.with(|s| s.setup_done(now(), &node.ip, compute_id, result));
                    });
                }
                Action::Run {
                    node,
                    uid,
                    hash,
                    job,
                } => {
                    tokio::spawn(async move {
                        let sent = rt.run(&node, uid, &hash, &job).await;
                        match &sent {
                            Sent::Ok => tracing::debug!(node = %node.ip, uid, "job sent"),
                            Sent::Unreachable(e) => {
                                tracing::warn!(node = %node.ip, uid, "node unreachable, dropping it: {e}")
                            }
                            Sent::Refused(e) => {
                                tracing::warn!(node = %node.ip, uid, "node refused a job: {e}")
                            }
                        }
                        rt.with(|s| s.job_sent(now(), uid, &hash, sent));
                    });
                }
                Action::Terminate {
                    node,
                    uid,
                    hash,
                    job,
                } => {
                    tokio::spawn(async move {
                        let j = wire::job_for_node(&job, uid, &hash);
                        let msg = [&b"TERMINATE_JOB:"[..], &serialize(&j)].concat();
                        if let Err(e) = rt.to_node(&node, &msg, false, rt.msg_timeout).await {
                            tracing::warn!(node = %node.ip, uid, "could not terminate a job: {e}");
                        }
                    });
                }
                Action::Close {
                    node,
                    compute_id,
                    node_auth,
                    terminate_pending,
                } => {
                    rt.closing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        match rt
                            .close_on(&node, compute_id, &node_auth, terminate_pending)
                            .await
                        {
                            Ok(_) => {
                                tracing::info!(node = %node.ip, compute_id, "computation closed on node")
                            }
                            Err(e) => {
                                tracing::warn!(node = %node.ip, compute_id, "could not close a computation: {e}")
                            }
                        }
                        rt.closing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    });
                }
            }
        }
    }

    async fn to_node(
        &self,
        node: &Target,
        msg: &[u8],
        reply: bool,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, Failure> {
        net::request(
            &node.ip,
            node.port,
            self.node_tls.as_ref(),
            Some(node.auth.as_bytes()),
            msg,
            reply,
            self.max_frame,
            timeout,
        )
        .await
    }

    /// dispy's `CLOSE` of a computation on a node (`auth`: the computation's own).
    async fn close_on(
        &self,
        node: &Target,
        compute_id: ComputeId,
        auth: &str,
        terminate_pending: bool,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let msg = dict([
            ("compute_id", Value::Int(compute_id)),
            ("auth", auth.into()),
            ("node_ip_addr", node.ip.as_str().into()),
            ("terminate_pending", Value::Bool(terminate_pending)),
            ("close", Value::Bool(true)),
        ]);
        let msg = [&b"CLOSE:"[..], &serialize(&msg)].concat();
        self.to_node(node, &msg, true, SETUP_TIMEOUT).await
    }

    async fn setup(
        &self,
        node: &Target,
        scheduler_ip: &str,
        compute_id: ComputeId,
        compute: &Value,
        setup_args: Value,
        exclusive: bool,
    ) -> Result<u32, String> {
        let c = wire::compute_for_node(
            compute,
            wire::ForNode {
                node_ip: &node.ip,
                scheduler_ip,
                exclusive,
                pulse_interval: self.sched.lock().unwrap().cfg.pulse_interval,
                reply_keepalive: node.keepalive,
            },
        );
        let msg = [&b"COMPUTE:"[..], &serialize(&c)].concat();
        let mut answer = self
            .to_node(node, &msg, true, self.msg_timeout)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        if let Ok(Value::Str(refusal)) = deserialize("COMPUTE answer", &answer, PREAUTH_BUDGET) {
            if refusal.contains("already exists") {
                // The node still has it from before it was dropped here (it was unreachable
                // for a moment, say): its jobs there were given up then, so it is closed, its
                // jobs terminated, and set up afresh.
                tracing::info!(node = %node.ip, compute_id, "the node still has the computation from before it was dropped; closing it there and setting it up again");
                let auth = c.attr("auth").and_then(text).unwrap_or_default();
                self.close_on(node, compute_id, &auth, true)
                    .await
                    .map_err(|e| e.to_string())?;
                answer = self
                    .to_node(node, &msg, true, self.msg_timeout)
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
            }
        }
        let cpus = match deserialize("COMPUTE answer", &answer, PREAUTH_BUDGET) {
            Ok(Value::Int(n)) if n > 0 => n as u32,
            Ok(other) => {
                return Err(format!(
                    "the node refused the computation: {}",
                    text(&other).unwrap_or_else(|| other.kind().into())
                ))
            }
            Err(_) => {
                return Err(format!(
                    "the node refused the computation: {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                ))
            }
        };
        for xf in xfer_files(&c) {
            self.send_file(node, xf).await?;
        }
        let setup = dict([
            ("compute_id", Value::Int(compute_id)),
            ("setup_args", setup_args),
        ]);
        let msg = [&b"SETUP:"[..], &serialize(&setup)].concat();
        let answer = self
            .to_node(node, &msg, true, SETUP_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        if answer == b"ACK" {
            return Ok(cpus);
        }
        match deserialize("SETUP answer", &answer, PREAUTH_BUDGET) {
            Ok(Value::Int(n)) if n >= 0 => Ok(cpus),
            _ => Err(format!(
                "setup failed: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(2000)])
            )),
        }
    }

    async fn run(&self, node: &Target, uid: u64, hash: &str, job: &Value) -> Sent {
        let j = wire::job_for_node(job, uid, hash);
        let msg = [&b"JOB:"[..], &serialize(&j)].concat();
        // A node removes a per-job file when the last job it counts finishes, and a job is
        // counted when it arrives, after its files: another job's end may remove a file between
        // the two. The file is then sent again, a few times at most.
        let mut tries = 0;
        loop {
            for xf in xfer_files(job) {
                if let Err(e) = self.send_file(node, xf).await {
                    return Sent::Unreachable(e);
                }
            }
            let answer = if node.keepalive {
                net::request_kept(
                    &self.kept,
                    &node.ip,
                    node.port,
                    self.node_tls.as_ref(),
                    node.auth.as_bytes(),
                    &msg,
                    self.max_frame,
                    self.msg_timeout,
                )
                .await
            } else {
                let answer = self.to_node(node, &msg, true, self.msg_timeout).await;
                answer.map(|a| (a.unwrap_or_default(), false))
            };
            let sent = match answer {
                Ok((a, kept)) if a == b"ACK" => {
                    self.metrics.job_sent(kept);
                    Sent::Ok
                }
                Ok((a, _)) => Sent::Refused(String::from_utf8_lossy(&a).into_owned()),
                Err(Failure::Unreachable(e)) => Sent::Unreachable(e),
                Err(Failure::Protocol(e)) => Sent::Unreachable(e),
            };
            tries += 1;
            match sent {
                Sent::Refused(e) if tries < 4 && e.contains("was not sent before the job") => {
                    continue
                }
                other => return other,
            }
        }
    }

    async fn send_file(&self, node: &Target, xf: &Value) -> Result<(), String> {
        // One transfer of a file to a node at a time: jobs sharing a file on one node would
        // otherwise send it at once, and the second finds it already there.
        let key = (
            node.ip.clone(),
            xf.attr("name").and_then(text).unwrap_or_default(),
        );
        let lock = self
            .file_locks
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let work = async {
            let s = net::connect(&node.ip, node.port, self.node_tls.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            files::send(s, node.auth.as_bytes(), xf, PREAUTH_BUDGET).await
        };
        tokio::time::timeout(SETUP_TIMEOUT, work)
            .await
            .map_err(|_| format!("file transfer to {} took over {SETUP_TIMEOUT:?}", node.ip))?
            .map_err(|e| format!("file transfer to {}: {e}", node.ip))
    }

    /// Where a client's file goes, after checking its size.
    fn local_file(&self, compute_id: ComputeId, xf: &XferFile) -> Result<PathBuf, String> {
        if self.max_file_size > 0 && xf.size > self.max_file_size {
            return Err(format!(
                "file {:?} is {} bytes, over --max_file_size {}",
                xf.name, xf.size, self.max_file_size
            ));
        }
        Ok(files::dir(&self.dest, compute_id).join(files::relative(xf)?))
    }

    /// Rewrites the `xfer_files` of a `_Compute` or `_DispyJob_` to name our copies.
    fn localize(
        &self,
        compute_id: ComputeId,
        record: &mut Value,
        must_exist: bool,
    ) -> Result<usize, String> {
        let Some(list) = record.attr("xfer_files").and_then(Value::as_seq) else {
            return Ok(0);
        };
        let mut out = Vec::with_capacity(list.len());
        for v in list {
            let xf = XferFile::from_value(v)?;
            let local = self.local_file(compute_id, &xf)?;
            if must_exist && !local.is_file() {
                return Err(format!("file {:?} was not sent before the job", xf.name));
            }
            let mut v = files::for_nodes(v, &local);
            set_attr(&mut v, "compute_id", Value::Int(compute_id));
            out.push(v);
        }
        let n = out.len();
        set_attr(record, "xfer_files", Value::List(out));
        Ok(n)
    }

    async fn ping_node(&self, ip: &str, port: Option<u16>) {
        let port = port.unwrap_or(self.node_port);
        let msg = wire::ping(
            &self.version,
            &self.sign,
            self.port,
            Some(ip),
            &self.ip_addrs,
        );
        let msg = [&b"PING:"[..], &serialize(&msg)].concat();
        let filler = [b'x'; AUTH_LEN];
        match net::request(
            ip,
            port,
            self.node_tls.as_ref(),
            Some(&filler),
            &msg,
            false,
            PREAUTH_MAX,
            self.msg_timeout,
        )
        .await
        {
            Ok(_) => tracing::debug!(node = ip, port, "pinged node"),
            Err(e) => tracing::info!(node = ip, port, "cannot ping node: {e}"),
        }
    }

    async fn broadcast(&self) {
        let msg = wire::ping(&self.version, &self.sign, self.port, None, &self.ip_addrs);
        let msg = [&b"PING:"[..], &serialize(&msg)].concat();
        for ip in &self.ip_addrs {
            let Ok(ip) = ip.parse::<IpAddr>() else {
                continue;
            };
            let Ok(sock) = UdpSocket::bind(SocketAddr::new(ip, 0)).await else {
                continue;
            };
            let _ = sock.set_broadcast(true);
            for to in dispy_core::discovery::ping_targets(self.node_port) {
                if let Err(e) = sock.send_to(&msg, to).await {
                    tracing::debug!(%to, "broadcast ping not sent: {e}");
                }
            }
        }
    }

    // ---- messages to clients, in order per computation -----------------------------------

    fn to_client(self: &Arc<Self>, id: ComputeId, msg: ToClient) {
        let mut links = self.links.lock().unwrap();
        let Some(link) = links.get(&id) else {
            return;
        };
        if link.outbox.send(msg).is_err() {
            links.remove(&id);
        }
    }

    fn open_link(
        self: &Arc<Self>,
        id: ComputeId,
        ip: String,
        port: u16,
        auth: Value,
        own_ip: String,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<ToClient>();
        self.links
            .lock()
            .unwrap()
            .insert(id, ClientLink { outbox: tx });
        let rt = self.clone();
        self.closing
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(msg) = rx.recv().await {
                if let ToClient::Running { uid, .. } = &msg {
                    // A job that is over by now: its result follows, and the client has less
                    // to read (it reads every message on a connection of its own).
                    if !rt.sched.lock().unwrap().jobs.contains_key(uid) {
                        continue;
                    }
                }
                let m = wire::to_client(&msg, id, &auth, &own_ip);
                let bytes = [m.prefix.as_bytes(), &serialize(&m.body)].concat();
                let answer = net::request(
                    &ip,
                    port,
                    rt.client_tls.as_ref(),
                    None,
                    &bytes,
                    m.acked,
                    PREAUTH_MAX,
                    rt.msg_timeout,
                )
                .await;
                let ok = match &answer {
                    Ok(Some(a)) => a == b"ACK",
                    Ok(None) => true,
                    Err(_) => false,
                };
                match &answer {
                    // Once per outage: a client that is gone would repeat it for every result.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(compute_id = id, client = %ip, port, "{} not delivered (results are kept and sent again): {e}", m.prefix.trim_end_matches(':'));
                    }
                    Err(e) => tracing::debug!(
                        compute_id = id,
                        "{} not delivered: {e}",
                        m.prefix.trim_end_matches(':')
                    ),
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!(compute_id = id, client = %ip, port, "client reachable again");
                    }
                    Ok(_) => {}
                }
                match msg {
                    ToClient::Scheduled { .. } => rt.with(|s| s.scheduled(now(), id, ok)),
                    ToClient::Result { uid, .. } => {
                        if ok {
                            rt.metrics.results_delivered.inc();
                        }
                        rt.with(|s| s.delivered(now(), id, uid, ok))
                    }
                    _ => {}
                }
            }
            rt.closing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }

    // ---- the client-facing port ----------------------------------------------------------

    pub async fn serve_clients(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let permit = match self.gate.enter(peer.ip()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%peer, "client connection refused: {e}");
                    continue;
                }
            };
            let local = tcp
                .local_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            tcp.set_nodelay(true).ok();
            let rt = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let stream: Stream = match tls {
                    None => net::buffered(tcp),
                    Some(acc) => {
                        match tokio::time::timeout(rt.msg_timeout, acc.accept(tcp)).await {
                            Ok(Ok(s)) => net::buffered(s),
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, "client TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                };
                rt.client_conn(stream, peer, local, permit).await;
            });
        }
    }

    async fn client_conn(
        self: &Arc<Self>,
        mut s: Stream,
        peer: SocketAddr,
        local: String,
        permit: crate::limits::Permit,
    ) {
        let timeout = self.msg_timeout;
        let mut auth = [0u8; AUTH_LEN];
        match tokio::time::timeout(timeout, s.read_exact(&mut auth)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        if !constant_time_eq(&auth, self.cluster_auth.as_bytes()) {
            let head = tokio::time::timeout(timeout, net::read_head(&mut s, PREAUTH_MAX)).await;
            let Ok(Ok((_, head))) = head else {
                return;
            };
            self.unauthenticated(&mut s, peer, &head).await;
            return;
        }
        drop(permit);
        let msg = match tokio::time::timeout(timeout, net::recv(&mut s, self.max_frame)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                self.metrics.bad_requests.inc();
                tracing::warn!(%peer, "client request unreadable: {e}");
                return;
            }
            Err(_) => return,
        };
        let (command, body) = split(&msg);
        let command = command.to_owned();
        let answer = match self
            .client_request(&mut s, peer, &local, &command, body)
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                self.metrics.bad_requests.inc();
                tracing::warn!(%peer, "client {command} refused: {e}");
                refusal_answer(&command, &e)
            }
        };
        if let Some(answer) = answer {
            let _ = tokio::time::timeout(timeout, net::send(&mut s, &answer)).await;
        }
    }

    /// A peer without the cluster secret may only ask who we are (`CLIENT:`). A COMPUTE is
    /// answered with why it is refused, which the client raises as its error.
    async fn unauthenticated(&self, s: &mut Stream, peer: SocketAddr, head: &[u8]) {
        let (command, body) = split(head);
        if command == "CLIENT" {
            let hello = deserialize("CLIENT", body, PREAUTH_BUDGET)
                .and_then(|v| ClientHello::from_value(&v));
            match hello {
                Ok(h) if h.version == self.version => {
                    let reply = dict([
                        (
                            "ip_addr",
                            h.ip_addr.unwrap_or_else(|| peer.ip().to_string()).into(),
                        ),
                        ("port", Value::Int(self.scheduler_port as i64)),
                        ("sign", self.sign.clone().into()),
                        ("version", self.version.clone().into()),
                    ]);
                    let _ =
                        tokio::time::timeout(self.msg_timeout, net::send(s, &serialize(&reply)))
                            .await;
                }
                Ok(h) => {
                    tracing::warn!(%peer, "client of dispy {} refused: this scheduler speaks dispy {}", h.version, self.version)
                }
                Err(e) => {
                    self.metrics.bad_requests.inc();
                    tracing::warn!(%peer, "{e}");
                }
            }
            return;
        }
        self.metrics.auth_failures.inc();
        tracing::warn!(%peer, "client {command} refused: its auth does not prove the cluster secret (the client's secret= must be this scheduler's --cluster_secret)");
        if command == "COMPUTE" {
            let answer = Value::from(
                "wrong secret: the client's secret must be dispyscheduler's --cluster_secret",
            );
            let _ = tokio::time::timeout(self.msg_timeout, net::send(s, &serialize(&answer))).await;
            // Read what is left of the request (bounded) so the answer is not lost to a reset.
            let mut sink = vec![0u8; 16 << 10];
            let mut left = 256usize << 10;
            while left > 0 {
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut sink)).await {
                    Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                    _ => break,
                }
            }
        }
    }

    async fn client_request(
        self: &Arc<Self>,
        s: &mut Stream,
        peer: SocketAddr,
        local: &str,
        command: &str,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, String> {
        let budget = self.max_frame;
        let value = || deserialize(command, body, budget);
        let refused = |e: Refusal| e.to_string();
        match command {
            "COMPUTE" => {
                let req = ComputeReq::from_value(&value()?)?;
                let auth = text(&req.auth).ok_or("_Compute.auth is not text")?;
                let node_auth = crate::auth::new_sign();
                let mut compute = req.compute.clone();
                let cleanup_set = req.cleanup_set;
                let id = self.with(|sch| {
                    sch.new_computation(
                        now(),
                        NewComputation {
                            client_auth: auth,
                            node_auth: node_auth.clone(),
                            compute: Value::None,
                            exclusive: req.exclusive,
                            reentrant: req.reentrant,
                            allocs: req.allocs.clone(),
                            client_ip: req.client_ip.clone(),
                            client_port: req.client_port,
                        },
                    )
                });
                set_attr(&mut compute, "id", Value::Int(id));
                if let Err(e) = self.localize(id, &mut compute, false) {
                    let auth = text(&req.auth).unwrap_or_default();
                    self.with(|sch| sch.close(id, &auth, false)).ok();
                    return Err(e);
                }
                set_attr(
                    &mut compute,
                    "job_result_port",
                    Value::Int(self.port as i64),
                );
                set_attr(&mut compute, "scheduler_port", Value::Int(self.port as i64));
                set_attr(&mut compute, "auth", node_auth.into());
                if self.cleanup_nodes && !cleanup_set {
                    set_attr(&mut compute, "cleanup", Value::Bool(true));
                }
                self.with(|sch| sch.set_compute(id, compute));
                self.open_link(
                    id,
                    req.client_ip.clone(),
                    req.client_port,
                    req.auth.clone(),
                    local.to_owned(),
                );
                tracing::info!(%peer, compute_id = id, name = %req.name, exclusive = req.exclusive, "new computation");
                let reply = dict([("compute_id", Value::Int(id)), ("auth", req.auth)]);
                Ok(Some(serialize(&reply)))
            }
            "SCHEDULE" => {
                let (id, auth) = wire::compute_auth(&value()?, command)?;
                let compute = self
                    .sched
                    .lock()
                    .unwrap()
                    .clusters
                    .get(&id)
                    .map(|c| c.compute.clone());
                if let Some(c) = compute {
                    for xf in xfer_files(&c) {
                        let name = xf.attr("name").and_then(text).unwrap_or_default();
                        if !std::path::Path::new(&name).is_file() {
                            tracing::warn!(%peer, compute_id = id, "SCHEDULE refused: file {name:?} has not arrived");
                            return Ok(Some(b"NAK".to_vec()));
                        }
                    }
                }
                match self.with(|sch| sch.schedule(now(), id, &auth)) {
                    Ok(()) => Ok(Some(b"ACK".to_vec())),
                    Err(e) => {
                        tracing::warn!(%peer, "SCHEDULE refused: {e}");
                        Ok(Some(b"NAK".to_vec()))
                    }
                }
            }
            "JOB" => {
                let mut req = JobReq::from_value(&value()?)?;
                let auth = req.auth.clone();
                let id = req.compute_id;
                self.sched
                    .lock()
                    .unwrap()
                    .check(id, &auth)
                    .map_err(refused)?;
                if req.files > 0 {
                    self.localize(id, &mut req.job, true)?;
                }
                let uid = self.with(|sch| -> Result<u64, Refusal> {
                    sch.check(id, &auth)?;
                    if let Some(ip) = &req.node {
                        if !sch.nodes.get(ip).is_some_and(|n| n.clusters.contains(&id)) {
                            return Err(Refusal::UnknownNode(ip.clone(), id));
                        }
                    }
                    Ok(sch.new_uid())
                });
                let uid = match uid {
                    Ok(uid) => uid,
                    Err(e) => {
                        tracing::warn!(%peer, "JOB refused: {e}");
                        return Ok(Some(serialize(&Value::None)));
                    }
                };
                net::send(s, &serialize(&crate::messages::uid_value(uid))).await?;
                let ack = tokio::time::timeout(self.msg_timeout, net::recv(s, PREAUTH_MAX))
                    .await
                    .map_err(|_| "no ACK for the job's uid".to_string())??;
                if ack != b"ACK" {
                    return Ok(None);
                }
                self.metrics.jobs_submitted.inc();
                let hash = req.hash.clone();
                let queued = self.with(|sch| {
                    let r = sch.submit(now(), id, &auth, uid, req.hash, req.node, req.job);
                    if r.is_err() {
                        sch.not_queued(id, uid, hash);
                    }
                    r
                });
                queued.map_err(refused)?;
                Ok(None)
            }
            "PULSE" => {
                let v = value()?;
                if let Some(port) = v
                    .attr("client_port")
                    .and_then(Value::as_int)
                    .and_then(|p| u16::try_from(p).ok())
                {
                    let ip = peer.ip().to_string();
                    let claimed = v.attr("client_ip_addr").and_then(text);
                    self.with(|sch| {
                        sch.client_pulse(now(), &ip, port);
                        if let Some(c) = claimed.filter(|c| *c != ip) {
                            sch.client_pulse(now(), &c, port);
                        }
                    });
                }
                Ok(None)
            }
            "CLOSE" => {
                let v = value()?;
                let (id, auth) = wire::compute_auth(&v, command)?;
                let terminate = v
                    .attr("terminate_pending")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.with(|sch| sch.close(id, &auth, terminate))
                    .map_err(refused)?;
                tracing::info!(%peer, compute_id = id, "computation closed by its client");
                Ok(None)
            }
            "TERMINATE_JOB" => {
                let v = value()?;
                let (id, auth) = wire::compute_auth(&v, command)?;
                let uid = v
                    .attr("uid")
                    .and_then(crate::messages::uid)
                    .ok_or("TERMINATE_JOB.uid is not a job id")?;
                self.with(|sch| sch.cancel(now(), id, &auth, uid))
                    .map_err(refused)?;
                Ok(None)
            }
            "NODE_JOBS" => {
                let v = value()?;
                let (id, auth) = wire::compute_auth(&v, command)?;
                let node = v.attr("node").and_then(text).unwrap_or_default();
                let uids = self
                    .with(|sch| sch.node_jobs(id, &auth, &node))
                    .unwrap_or_default();
                let list = Value::List(uids.into_iter().map(crate::messages::uid_value).collect());
                Ok(Some(serialize(&list)))
            }
            "SET_NODE_CPUS" => {
                let v = value()?;
                let (id, auth) = wire::compute_auth(&v, command)?;
                let node = v.attr("node").and_then(text).unwrap_or_default();
                let cpus = v.attr("cpus").and_then(Value::as_int).unwrap_or(0);
                let answer = match self.with(|sch| sch.set_node_cpus(now(), id, &auth, &node, cpus))
                {
                    Ok(_) => Value::Int(0),
                    Err(e) => {
                        tracing::warn!(%peer, "SET_NODE_CPUS refused: {e}");
                        Value::Int(-1)
                    }
                };
                Ok(Some(serialize(&answer)))
            }
            "RESEND_JOB_RESULTS" => {
                let (id, auth) = wire::compute_auth(&value()?, command)?;
                let n = match self.with(|sch| sch.pending(id, &auth)) {
                    Ok((done, pending)) => {
                        self.with(|sch| sch.resend(id));
                        (done.len() + pending) as i64
                    }
                    Err(_) => 0,
                };
                Ok(Some(serialize(&Value::Int(n))))
            }
            "PENDING_JOBS" => {
                let (id, auth) = wire::compute_auth(&value()?, command)?;
                let (done, pending) = self.with(|sch| sch.pending(id, &auth)).unwrap_or_default();
                let reply = dict([
                    (
                        "done",
                        Value::List(
                            done.into_iter()
                                .take(50)
                                .map(crate::messages::uid_value)
                                .collect(),
                        ),
                    ),
                    ("pending", Value::Int(pending as i64)),
                ]);
                Ok(Some(serialize(&reply)))
            }
            "FILEXFER" => {
                let v = value()?;
                let xf = XferFile::from_value(&v)?;
                let id = xf.compute_id;
                let allowed = self.sched.lock().unwrap().clusters.get(&id).map(|c| {
                    c.phase == crate::sched::Phase::Pending || c.client_ip == peer.ip().to_string()
                });
                match allowed {
                    Some(true) => {}
                    Some(false) => {
                        return Err(format!(
                            "file for computation {id} from another address than its client's"
                        ))
                    }
                    None => return Err(refused(Refusal::UnknownComputation(id))),
                }
                let path = self.local_file(id, &xf)?;
                let got = files::receive(s, &path, &xf).await;
                let answer = match got {
                    Ok(n) => n as i64,
                    Err(e) => {
                        tracing::warn!(%peer, compute_id = id, "file {:?} not received: {e}", xf.name);
                        -1
                    }
                };
                Ok(Some(serialize(&Value::Int(answer))))
            }
            "ALLOCATE_NODE" => {
                let v = value()?;
                let (id, auth) = wire::compute_auth(&v, command)?;
                let allocs = match v.attr("node_alloc") {
                    Some(Value::List(l)) | Some(Value::Tuple(l)) => l.clone(),
                    Some(one) => vec![one.clone()],
                    None => vec![],
                };
                let allocs = allocs
                    .iter()
                    .map(wire::alloc_from_value)
                    .collect::<Result<Vec<_>, _>>()?;
                self.with(|sch| sch.allocate_node(now(), id, &auth, allocs))
                    .map_err(refused)?;
                Ok(Some(serialize(&Value::Int(0))))
            }
            "DEALLOCATE_NODE" | "CLOSE_NODE" => {
                let v = value()?;
                let (id, auth) = wire::compute_auth(&v, command)?;
                let node = v.attr("node").and_then(text).unwrap_or_default();
                let terminate = v
                    .attr("terminate_pending")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let done = self.with(|sch| {
                    if command == "CLOSE_NODE" {
                        sch.close_node(id, &auth, &node, terminate)
                    } else {
                        sch.deallocate_node(id, &auth, &node)
                    }
                });
                let answer = match done {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(%peer, "{command} refused: {e}");
                        -1
                    }
                };
                Ok(Some(serialize(&Value::Int(answer))))
            }
            "SENDFILE" | "RETRIEVE_JOB" => {
                let answer = if command == "RETRIEVE_JOB" {
                    Value::None
                } else {
                    Value::Int(-1)
                };
                tracing::warn!(%peer, "client {command}: not supported by this scheduler yet");
                Ok(Some(serialize(&answer)))
            }
            other => Err(format!("unknown request {other:?}")),
        }
    }

    // ---- the node-facing port ------------------------------------------------------------

    pub async fn serve_nodes(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let permit = match self.gate.enter(peer.ip()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%peer, "node connection refused: {e}");
                    continue;
                }
            };
            tcp.set_nodelay(true).ok();
            let rt = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let stream: Stream = match tls {
                    None => net::buffered(tcp),
                    Some(acc) => {
                        match tokio::time::timeout(rt.msg_timeout, acc.accept(tcp)).await {
                            Ok(Ok(s)) => net::buffered(s),
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, "node TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                };
                rt.node_conn(stream, peer, permit).await;
            });
        }
    }

    /// A node's connection: one message, or, after a JOB_REPLY that was taken (it named a job
    /// running there by its attempt's hash), the next ones too, as our dispynode sends them
    /// (see `crate::kept`).
    async fn node_conn(
        self: &Arc<Self>,
        mut s: Stream,
        peer: SocketAddr,
        permit: crate::limits::Permit,
    ) {
        let timeout = self.msg_timeout;
        let mut permit = Some(permit);
        let mut kept = None;
        loop {
            let wait = if kept.is_some() { PEER_WAITS } else { timeout };
            let Ok(Ok((len, head))) =
                tokio::time::timeout(wait, net::read_head(&mut s, PREAUTH_MAX)).await
            else {
                return;
            };
            let msg = if len > head.len() {
                // Only nodes we use send large messages (job replies).
                let ip = peer.ip().to_string();
                let known = self.sched.lock().unwrap().node_known(&ip);
                if !known || len > self.max_frame {
                    self.metrics.bad_requests.inc();
                    tracing::warn!(%peer, len, "a {len}-byte message from a peer that is not a node in use (or over --max_frame); dropped");
                    return;
                }
                match tokio::time::timeout(timeout, net::read_rest(&mut s, len, head)).await {
                    Ok(Ok(m)) => m,
                    _ => return,
                }
            } else {
                head
            };
            permit.take();
            let (command, body) = split(&msg);
            match self.node_message(&mut s, peer, command, body).await {
                Ok(true) => {
                    self.metrics.reply_received(kept.is_some());
                    if kept.is_none() {
                        kept = self.kept_nodes.clone().try_acquire_owned().ok();
                        if kept.is_none() {
                            return;
                        }
                    }
                }
                Ok(false) => return,
                Err(e) => {
                    self.metrics.bad_requests.inc();
                    tracing::warn!(%peer, "node {command}: {e}");
                    return;
                }
            }
        }
    }

    /// Handles one message from a node; true for a JOB_REPLY that was taken.
    async fn node_message(
        self: &Arc<Self>,
        s: &mut Stream,
        peer: SocketAddr,
        command: &str,
        body: &[u8],
    ) -> Result<bool, String> {
        let timeout = self.msg_timeout;
        match command {
            "JOB_REPLY" => {
                let v = deserialize(command, body, self.max_frame)?;
                // dispy's scheduler acknowledges every reply, taken or not.
                let _ = tokio::time::timeout(timeout, net::send(s, b"ACK")).await;
                let head = ReplyHead::from_value(&v)?;
                let from = peer.ip().to_string();
                let node_ip = if self.sched.lock().unwrap().node_known(&head.ip_addr) {
                    head.ip_addr.clone()
                } else {
                    from
                };
                let taken = self.with(|sch| {
                    sch.job_reply(now(), &node_ip, head.uid, &head.hash, head.status, v)
                });
                if taken {
                    self.metrics.result(head.status);
                } else {
                    tracing::warn!(%peer, uid = head.uid, "a reply for a job not running there (stale, or forged); ignored");
                }
                Ok(taken)
            }
            "PULSE" => {
                let v = deserialize(command, body, PREAUTH_BUDGET)?;
                let ip = v.attr("ip_addr").and_then(text).unwrap_or_default();
                if self.with(|sch| sch.node_pulse(now(), &ip)) {
                    let _ = tokio::time::timeout(timeout, net::send(s, b"PULSE")).await;
                }
                Ok(false)
            }
            "PONG" => {
                let v = deserialize(command, body, PREAUTH_BUDGET)?;
                let pong = Pong::from_value(&v)?;
                if !constant_time_eq(pong.auth.as_bytes(), self.node_pong_auth.as_bytes()) {
                    self.metrics.auth_failures.inc();
                    return Err(format!(
                        "node {} ignored: its PONG does not prove the node secret (dispynode's --secret must be this scheduler's --node_secret)",
                        pong.ip_addr
                    ));
                }
                if pong.version.as_deref().is_some_and(|v| v != self.version) {
                    return Err(format!(
                        "node {} runs dispy {:?}, not {}",
                        pong.ip_addr, pong.version, self.version
                    ));
                }
                let cpus = u32::try_from(pong.cpus).unwrap_or(0);
                tracing::info!(node = %pong.ip_addr, port = pong.port, cpus, name = %pong.name, "node found");
                let info = NodeInfo {
                    keepalive: pong.job_keepalive,
                    auth: auth_code(&self.node_secret, &pong.sign),
                    ip: pong.ip_addr,
                    port: pong.port,
                    name: pong.name,
                    cpus,
                    scheduler_ip: pong
                        .scheduler_ip_addr
                        .filter(|a| !a.is_empty())
                        .unwrap_or_else(|| self.ip_addrs.first().cloned().unwrap_or_default()),
                };
                self.with(|sch| sch.node_found(now(), info));
                Ok(false)
            }
            "PING" => {
                self.node_announced(body, peer);
                Ok(false)
            }
            "TERMINATED" => {
                self.node_terminated(body, peer);
                Ok(false)
            }
            "FILEXFER" => {
                let _ = net::send(s, &serialize(&Value::Int(-1))).await;
                Err("a job's dispy_send_file through this scheduler is not supported yet".into())
            }
            "RELAY_INFO" => {
                let _ = net::send(s, &serialize(&Value::None)).await;
                Ok(false)
            }
            "NODE_CPUS" => {
                let v = deserialize(command, body, PREAUTH_BUDGET)?;
                let ip = v.attr("ip_addr").and_then(text).unwrap_or_default();
                let sign = v.attr("sign").and_then(text).unwrap_or_default();
                let cpus = v.attr("cpus").and_then(Value::as_int).unwrap_or(-1);
                let auth = auth_code(&self.node_secret, &sign);
                let known = self
                    .sched
                    .lock()
                    .unwrap()
                    .nodes
                    .get(&ip)
                    .is_some_and(|n| constant_time_eq(n.auth.as_bytes(), auth.as_bytes()));
                if !known {
                    self.metrics.auth_failures.inc();
                    return Err(format!("NODE_CPUS for {ip:?} without its token; ignored"));
                }
                let cpus = u32::try_from(cpus).unwrap_or(0);
                tracing::info!(node = %ip, cpus, "node changed its cpus");
                self.with(|sch| sch.node_cpus(now(), &ip, cpus));
                Ok(false)
            }
            other => Err(format!("unknown message {other:?}")),
        }
    }

    /// A node's `PING:` (its start-up announcement): we ask it for a PONG.
    fn node_announced(self: &Arc<Self>, body: &[u8], peer: SocketAddr) {
        let Ok(v) = deserialize("PING", body, PREAUTH_BUDGET) else {
            return;
        };
        if v.attr("version").and_then(text).as_deref() != Some(self.version.as_str()) {
            return;
        }
        let Some(ip) = v.attr("ip_addr").and_then(text) else {
            return;
        };
        let Some(port) = v
            .attr("port")
            .and_then(Value::as_int)
            .and_then(|p| u16::try_from(p).ok())
        else {
            return;
        };
        if port == self.port && self.ip_addrs.contains(&ip) {
            return;
        }
        let known = self.sched.lock().unwrap().node_known(&ip);
        let wanted = self.sched.lock().unwrap().wants(&ip);
        if known || !wanted {
            return;
        }
        // Anyone can send an announcement naming any address: a few pings per address.
        let target = ip.parse::<IpAddr>().ok();
        let allowed = target.is_some_and(|t| {
            self.announced
                .lock()
                .unwrap()
                .allow(t, std::time::Instant::now())
        });
        if !allowed {
            tracing::debug!(%peer, node = %ip, "announcement not answered: not an address, or over its rate limit");
            return;
        }
        tracing::debug!(%peer, node = %ip, "node announced itself");
        let rt = self.clone();
        tokio::spawn(async move { rt.ping_node(&ip, Some(port)).await });
    }

    fn node_terminated(self: &Arc<Self>, body: &[u8], peer: SocketAddr) {
        let Ok(v) = deserialize("TERMINATED", body, PREAUTH_BUDGET) else {
            return;
        };
        let (Some(ip), Some(sign)) = (
            v.attr("ip_addr").and_then(text),
            v.attr("sign").and_then(text),
        ) else {
            return;
        };
        let auth = auth_code(&self.node_secret, &sign);
        let matches = self
            .sched
            .lock()
            .unwrap()
            .nodes
            .get(&ip)
            .is_some_and(|n| constant_time_eq(n.auth.as_bytes(), auth.as_bytes()));
        if matches {
            tracing::info!(%peer, node = %ip, "node terminated");
            self.with(|sch| sch.node_lost(now(), &ip));
        }
    }

    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket) {
        let mut buf = vec![0u8; PREAUTH_MAX];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let (command, body) = split(&buf[..n]);
            match command {
                "PING" => self.node_announced(body, peer),
                "TERMINATED" => self.node_terminated(body, peer),
                _ => {}
            }
        }
    }

    pub async fn clock(self: Arc<Self>) {
        let every = {
            let s = self.sched.lock().unwrap();
            let p = s.cfg.pulse_interval;
            Duration::from_secs_f64((p / 2.0).clamp(0.1, 5.0))
        };
        loop {
            tokio::time::sleep(every).await;
            self.with(|sch| sch.tick(now()));
        }
    }
}

/// The `xfer_files` of a `_Compute` or `_DispyJob_`.
fn xfer_files(record: &Value) -> Vec<&Value> {
    record
        .attr("xfer_files")
        .and_then(Value::as_seq)
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// The answer a refused request gets, so the client fails with our reason.
fn refusal_answer(command: &str, error: &str) -> Option<Vec<u8>> {
    match command {
        "COMPUTE" => Some(serialize(&Value::from(error))),
        "JOB" => Some(serialize(&Value::None)),
        "NODE_JOBS" => Some(serialize(&Value::List(vec![]))),
        "SCHEDULE" => Some(b"NAK".to_vec()),
        "RESEND_JOB_RESULTS" | "SET_NODE_CPUS" | "FILEXFER" | "ALLOCATE_NODE"
        | "DEALLOCATE_NODE" | "CLOSE_NODE" => Some(serialize(&Value::Int(-1))),
        _ => None,
    }
}
