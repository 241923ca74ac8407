//! dispy 4.15's own wire protocol, so unmodified `pip install dispy` clients use this node.
//!
//! Every request is one TCP connection: 40 bytes of auth, one length-prefixed frame
//! `PREFIX:` + pickle, at most one reply. Discovery is UDP `PING:` both ways; results go back
//! to the client's port (9700) on connections the node opens. The records clients send are
//! read as data ([`messages`]); nothing a client sends is ever executed here — the
//! computation's source and the jobs' pickled arguments go to the Python host as they came.
//!
//! The node's state machine does the work: a dispy computation is a node computation whose
//! Python host speaks pickle, a dispy job a node job keyed by the client's uid. Results come
//! back as the node's job events and are delivered as `JOB_REPLY`s; one that cannot be
//! delivered stays buffered for `RETRIEVE_JOB` and `RESEND_JOB_RESULTS`.
//!
//! dispy's auth token is `sha1(secret + node sign)`, and the node's sign is public (it is in
//! every PING and PONG). What must stay true: nothing the node sends a peer that has not
//! proven the secret is a value that authenticates a request here. A PONG carries
//! `sha1(secret + the pinger's sign)`, which dispy clients check; so the node never signs a
//! ping carrying its own sign (that signature would be its token). Pongs go out over TCP to
//! addresses the ping names, so they are rate-limited per source and per destination, with
//! few in flight at once.

pub mod auth;
mod handler;
pub mod messages;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispy_core::frame::{frame_within, read_frame, MAX_LEN};
use dispy_core::job::{JobId, JobResult};
use dispy_core::pickle::Value;
use dispy_core::protocol::{JobEventKind, NodeMsg};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};

use dispy_core::client::Stream;

use crate::limits::{RateLimiter, Throttled, PREAUTH_BUDGET};
use crate::node::{Node, Owner, SessionId};
use messages::{deserialize, dict, serialize, Compute, JobReply};

/// Job replies in flight at once, per node.
const DELIVERIES: usize = 16;
/// Node-side session ids of dispy computations, apart from native sessions'.
const SESSION_BASE: SessionId = 1 << 62;
/// Connections kept open for a client's next JOB at once (kept::PEER_WAITS); past
/// that, a JOB's connection closes after its answer, as dispy's node does.
const KEPT_CONNECTIONS: usize = 64;
/// Pongs being delivered at once, and addresses one ping may name.
const PONGS_IN_FLIGHT: usize = 16;
const PONG_TARGETS: usize = 4;

static SIGN_REPLAYED: Throttled = Throttled::new(Duration::from_secs(10));
static PONGS_LIMITED: Throttled = Throttled::new(Duration::from_secs(10));

pub struct Dispy {
    node: Arc<Node>,
    /// This node's sign, sent in clear in PING and PONG.
    sign: String,
    /// `sha1(secret + sign)`: what every request but `PING:` must start with.
    auth: String,
    /// The dispy version announced; clients want it to equal theirs exactly.
    version: String,
    /// For connections to clients when the node has `--certfile` (dispy's TLS mode: the peer's
    /// certificate must be the shared certificate itself).
    tls: Option<tokio_rustls::TlsConnector>,
    state: Mutex<State>,
    /// The owner of every dispy computation on the node: no native client can act on them.
    owner: Owner,
    deliveries: Arc<Semaphore>,
    /// See [`KEPT_CONNECTIONS`].
    kept: Arc<Semaphore>,
    /// Connections to clients that keep them for the next JOB_REPLY.
    kept_replies: crate::kept::Kept<Box<dyn Stream>>,
    pongs: Arc<Semaphore>,
    /// Pongs per ping source and per address a pong goes to.
    pong_sources: Mutex<RateLimiter>,
    pong_targets: Mutex<RateLimiter>,
}

#[derive(Default)]
struct State {
    comps: HashMap<i64, DispyComp>,
    /// The client (its address and port) the node serves; dispy's node serves one at a time,
    /// with any number of computations from it.
    client: Option<(String, u16)>,
    next_session: SessionId,
}

/// A pickled `_JobReply`, where it goes, the node's computation id, the job's hash, and
/// whether the client keeps the connection for the next reply.
type Outgoing = (Vec<u8>, (String, u16), String, String, bool);

struct DispyComp {
    compute: Compute,
    /// The computation's id in the node's state machine.
    node_id: String,
    /// Each queued, running or undelivered job's hash, echoed in its reply.
    hashes: HashMap<JobId, String>,
    last_contact: Instant,
    /// Its SETUP succeeded (before that, a client that goes away leaves it closed).
    set_up: bool,
    /// Closed for a new setup (`resetup_node`): jobs that come meanwhile wait in `held` and
    /// are queued once the new setup is done, as a dispy client expects.
    resetting: bool,
    held: Vec<(dispy_core::protocol::JobRequest, Option<Vec<u8>>)>,
}

impl Dispy {
    pub fn new(node: Arc<Node>) -> Result<Arc<Dispy>, String> {
        let sign = auth::new_sign();
        let tls = match &node.cfg.certfile {
            None => None,
            Some(cert) => {
                let trust = dispy_core::tls::Trust::PinnedCert(cert.clone());
                let config = dispy_core::tls::client_config(&trust).map_err(|e| e.to_string())?;
                Some(tokio_rustls::TlsConnector::from(config))
            }
        };
        Ok(Arc::new(Dispy {
            auth: auth::auth_code(&node.cfg.secret, &sign),
            version: node.cfg.dispy_version.clone(),
            sign,
            tls,
            node,
            state: Mutex::new(State {
                next_session: SESSION_BASE,
                ..State::default()
            }),
            owner: Owner::unique(),
            deliveries: Arc::new(Semaphore::new(DELIVERIES)),
            kept: Arc::new(Semaphore::new(KEPT_CONNECTIONS)),
            kept_replies: crate::kept::Kept::new(Instant::now()),
            pongs: Arc::new(Semaphore::new(PONGS_IN_FLIGHT)),
            pong_sources: Mutex::new(RateLimiter::new(5, 1.0, 4096)),
            pong_targets: Mutex::new(RateLimiter::new(5, 1.0, 4096)),
        }))
    }

    /// The address clients reach this node at, seen from `local` (the address a request came
    /// in on, or the interface facing the asker).
    fn node_addr(&self, local: IpAddr) -> String {
        self.node
            .cfg
            .ext_host
            .clone()
            .unwrap_or_else(|| local.to_string())
    }

    /// The node's announcement to dispy clients (UDP to their port 9700).
    pub fn announcement(&self, ip: IpAddr) -> Vec<u8> {
        let msg = dict([
            ("ip_addr", self.node_addr(ip).into()),
            ("port", Value::Int(self.node.cfg.port as i64)),
            ("sign", self.sign.clone().into()),
            ("version", self.version.clone().into()),
            ("scheduler_ip_addr", Value::None),
        ]);
        [&b"PING:"[..], &serialize(&msg)].concat()
    }

    /// Whether `token` is this node's auth token (in constant time).
    fn is_token(&self, token: &[u8]) -> bool {
        dispy_core::auth::constant_time_eq(token, self.auth.as_bytes())
    }

    /// A `PING:` (UDP, or TCP without auth) from a client looking for nodes.
    pub fn udp_ping(self: &Arc<Self>, data: &[u8], peer: SocketAddr, local: IpAddr) {
        let now = Instant::now();
        let permit = match self.pongs.clone().try_acquire_owned() {
            Ok(p) if self.pong_sources.lock().unwrap().allow(peer.ip(), now) => p,
            _ => {
                if let Some(suppressed) = PONGS_LIMITED.check(now) {
                    tracing::warn!(%peer, suppressed, "dispy ping not answered: over the pong rate limit");
                }
                return;
            }
        };
        let info = match deserialize("PING", data, PREAUTH_BUDGET) {
            Ok(info) => info,
            Err(e) => {
                self.node.metrics.bad_requests.inc();
                tracing::warn!(%peer, "dispy client: {e}");
                return;
            }
        };
        let dispy = self.clone();
        tokio::spawn(async move {
            dispy.pong(&info, peer.ip(), local).await;
            drop(permit);
        });
    }

    /// Answers a client's `PING:` with a `PONG:` on a connection to the client, at the first
    /// of its addresses that takes one.
    async fn pong(&self, info: &Value, peer: IpAddr, local: IpAddr) {
        let version = info.attr("version").and_then(|v| v.as_str());
        if version != Some(self.version.as_str()) {
            tracing::warn!(
                %peer,
                "dispy client version {:?} is not this node's --dispy-version {:?}; ignoring its ping",
                version.unwrap_or("?"),
                self.version
            );
            return;
        }
        let Some(port) = info
            .attr("port")
            .and_then(Value::as_int)
            .and_then(|p| u16::try_from(p).ok())
        else {
            tracing::warn!(%peer, "dispy ping without a port; ignored");
            return;
        };
        let mut targets: Vec<String> = info
            .attr("ip_addrs")
            .and_then(Value::as_seq)
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        if info.attr("relay").is_none_or(Value::is_none) {
            targets.push(peer.to_string());
        }
        targets.dedup();
        targets.truncate(PONG_TARGETS);
        if let Some((ip, p)) = &self.state.lock().unwrap().client {
            if *p != port || !targets.contains(ip) {
                tracing::info!(%peer, "busy with the dispy client at {ip}:{p}; ignoring a ping");
                return;
            }
        }
        let node_ip = info
            .attr("node_ip_addr")
            .and_then(Value::as_str)
            .filter(|a| a.parse::<IpAddr>().is_ok_and(|a| a == local))
            .map(str::to_owned)
            .unwrap_or_else(|| self.node_addr(local));
        let sign = info.attr("sign").and_then(Value::as_str).unwrap_or("");
        if dispy_core::auth::constant_time_eq(sign.as_bytes(), self.sign.as_bytes()) {
            // Signing it would hand out `sha1(secret + node sign)`: this node's token.
            self.node.metrics.auth_failures.inc();
            if let Some(suppressed) = SIGN_REPLAYED.check(Instant::now()) {
                tracing::warn!(%peer, suppressed, "a dispy ping carrying this node's own sign (an attempt to obtain its auth token); not answered");
            }
            return;
        }
        let (_, cpus, _) = self.node.load();
        if cpus == 0 {
            // dispy's rule: a node that serves no cpus now (stopped, or outside its service
            // window) is not there for new clients.
            tracing::debug!(%peer, "not serving now; a dispy ping not answered");
            return;
        }
        let cpus = cpus as i64;
        for target in targets {
            let allowed = match target.parse::<IpAddr>() {
                Ok(ip) => self.pong_targets.lock().unwrap().allow(ip, Instant::now()),
                Err(_) => false,
            };
            if !allowed {
                tracing::debug!(client = %target, "no pong to {target}: not an address, or over its rate limit");
                continue;
            }
            let msg = if sign.is_empty() {
                // A relay's ping (no sign): dispy's node answers with its own ping.
                [&b"PING:"[..], &self.announcement(local)[5..]].concat()
            } else {
                let pong = dict([
                    ("port", Value::Int(self.node.cfg.port as i64)),
                    ("sign", self.sign.clone().into()),
                    ("version", self.version.clone().into()),
                    ("name", self.node.cfg.name.clone().into()),
                    ("cpus", Value::Int(cpus)),
                    ("platform", platform().into()),
                    (
                        "auth",
                        Value::bytes(auth::auth_code(&self.node.cfg.secret, sign).into_bytes()),
                    ),
                    ("avail_info", messages::avail_info(self.node.avail())),
                    ("ip_addr", node_ip.clone().into()),
                    ("scheduler_ip_addr", target.clone().into()),
                    // Not dispy's: tells our dispyscheduler that a connection may carry job
                    // after job (kept::PEER_WAITS); dispy's clients ignore the key.
                    ("job_keepalive", Value::Bool(true)),
                ]);
                [&b"PONG:"[..], &serialize(&pong)].concat()
            };
            match self.send(&target, port, &msg, false).await {
                Ok(_) => {
                    tracing::info!(client = %target, port, "answered a dispy client's ping");
                    return;
                }
                Err(e) => tracing::debug!(client = %target, port, "cannot answer a ping: {e}"),
            }
        }
        tracing::warn!(%peer, "could not reach the dispy client at any of its addresses");
    }

    /// A new connection to a client (TLS with `--certfile`).
    async fn connect(&self, host: &str, port: u16) -> Result<Box<dyn Stream>, String> {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        tcp.set_nodelay(true).ok();
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let name = dispy_core::tls::server_name(host)?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
                Ok(Box::new(stream))
            }
        }
    }

    /// Sends one message to a client on a new connection; with `reply`, reads one frame back.
    async fn send(
        &self,
        host: &str,
        port: u16,
        msg: &[u8],
        reply: bool,
    ) -> Result<Option<Vec<u8>>, String> {
        let work = async {
            let mut stream = self.connect(host, port).await?;
            let answer = exchange(&mut stream, msg, reply, self.node.cfg.max_frame).await?;
            let _ = stream.shutdown().await;
            Ok(answer)
        };
        let within = self.node.cfg.msg_timeout;
        tokio::time::timeout(within, work).await.map_err(|_| {
            format!("{host}:{port} did not answer within {within:?} (--msg_timeout)")
        })?
    }

    /// Sends a message the client answers with `ACK` and after which it keeps the connection
    /// (a JOB_REPLY to our dispyscheduler), on a connection kept from an earlier one when
    /// there is one ([`crate::kept::Kept::request`] says when it goes once more on a new one).
    async fn send_kept(&self, host: &str, port: u16, msg: &[u8]) -> Result<Vec<u8>, String> {
        let max = self.node.cfg.max_frame;
        let work = self.kept_replies.request(
            (host.to_owned(), port),
            || self.connect(host, port),
            |mut stream| async move {
                let answer = exchange(&mut stream, msg, true, max).await?;
                Ok((stream, answer.unwrap_or_default()))
            },
        );
        let within = self.node.cfg.msg_timeout;
        let (answer, _) = tokio::time::timeout(within, work).await.map_err(|_| {
            format!("{host}:{port} did not answer within {within:?} (--msg_timeout)")
        })??;
        Ok(answer)
    }

    /// Registers a computation's delivery: the node's job events for it become `JOB_REPLY`s.
    fn subscribe(self: &Arc<Self>, compute_id: i64) -> (SessionId, crate::node::Outbox) {
        let session = {
            let mut st = self.state.lock().unwrap();
            st.next_session += 1;
            st.next_session
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let dispy = self.clone();
        tokio::spawn(async move {
            while let Some(framed) = rx.recv().await {
                let Some(body) = framed.get(4..) else {
                    continue;
                };
                let Ok(NodeMsg::Event(event)) = dispy_core::protocol::decode("event", body) else {
                    continue;
                };
                if let JobEventKind::Done(result) = event.kind {
                    let permit = dispy.deliveries.clone().acquire_owned().await;
                    let dispy = dispy.clone();
                    tokio::spawn(async move {
                        dispy.deliver(compute_id, event.job, result).await;
                        drop(permit);
                    });
                }
            }
        });
        (session, tx)
    }

    /// Sends a job's result to its client. Acknowledged results leave the node; the others
    /// stay for `RETRIEVE_JOB` / `RESEND_JOB_RESULTS`.
    async fn deliver(&self, compute_id: i64, uid: JobId, result: JobResult) {
        let Some((reply, (host, port), node_id, hash, keep)) =
            self.reply_for(compute_id, uid, &result)
        else {
            tracing::warn!(compute_id, uid, "result of an unknown dispy job dropped");
            return;
        };
        let msg = [&b"JOB_REPLY:"[..], &reply].concat();
        let sent = if keep {
            self.send_kept(&host, port, &msg).await.map(Some)
        } else {
            self.send(&host, port, &msg, true).await
        };
        match sent {
            Ok(Some(ack)) if ack == b"ACK" => {
                let mut st = self.state.lock().unwrap();
                if let Some(comp) = st.comps.get_mut(&compute_id) {
                    comp.last_contact = Instant::now();
                    // A uid the client has already reused names a newer job: leave it be.
                    if comp.hashes.get(&uid) == Some(&hash) {
                        comp.hashes.remove(&uid);
                        let _ = self.node.ack(&node_id, &[uid]);
                    }
                }
            }
            Ok(other) => tracing::warn!(
                compute_id,
                uid,
                "the dispy client refused the result ({:?}); kept for RETRIEVE_JOB",
                other.map(|b| String::from_utf8_lossy(&b).into_owned())
            ),
            Err(e) => tracing::warn!(
                compute_id,
                uid,
                "cannot deliver the result: {e}; kept for RETRIEVE_JOB"
            ),
        }
    }

    /// A job's pickled `_JobReply`, where it goes, the node computation and the job's hash.
    fn reply_for(&self, compute_id: i64, uid: JobId, result: &JobResult) -> Option<Outgoing> {
        let st = self.state.lock().unwrap();
        let comp = st.comps.get(&compute_id)?;
        let hash = comp.hashes.get(&uid)?.clone();
        let reply = JobReply {
            uid,
            hash: &hash,
            ip_addr: &comp.compute.node_ip_addr,
            program: comp.compute.program,
            result,
        }
        .encode();
        Some((
            reply,
            comp.compute.reply_addr(),
            comp.node_id.clone(),
            hash,
            comp.compute.reply_keepalive,
        ))
    }

    /// Node shutdown: tells the clients (TCP) and the network (UDP broadcast) it is gone.
    pub async fn shut_down(&self, udp: &[(Arc<UdpSocket>, IpAddr)]) {
        let clients: Vec<(String, u16, String)> = {
            let st = self.state.lock().unwrap();
            st.comps
                .values()
                .map(|c| {
                    (
                        c.compute.scheduler_ip_addr.clone(),
                        c.compute.scheduler_port,
                        c.compute.node_ip_addr.clone(),
                    )
                })
                .collect()
        };
        let terminated = |ip: String| {
            let msg = dict([
                ("ip_addr", ip.into()),
                ("port", Value::Int(self.node.cfg.port as i64)),
                ("sign", self.sign.clone().into()),
            ]);
            [&b"TERMINATED:"[..], &serialize(&msg)].concat()
        };
        let mut told = Vec::new();
        for (host, port, node_ip) in clients {
            if told.contains(&(host.clone(), port)) {
                continue;
            }
            match self.send(&host, port, &terminated(node_ip), false).await {
                Ok(_) => {
                    tracing::info!(client = %host, port, "told the dispy client the node stops")
                }
                Err(e) => {
                    tracing::warn!(client = %host, port, "cannot tell the client the node stops: {e}")
                }
            }
            told.push((host, port));
        }
        for (socket, bound) in udp {
            for (ip, bcast) in dispy_core::discovery::interface_broadcasts(*bound) {
                let to = SocketAddr::from((bcast, self.node.cfg.client_port));
                let _ = socket
                    .send_to(&terminated(self.node_addr(IpAddr::V4(ip))), to)
                    .await;
            }
        }
    }

    /// Sends `PULSE:` to each client that asked for pulses (`pulse_interval`), so it can tell
    /// a live node with long jobs from a dead one; closes computations whose client has been
    /// unreachable for the zombie interval, and idle ones (no job queued, running or
    /// undelivered) whose client has said nothing for that long.
    pub async fn pulses(self: Arc<Self>) {
        let tick = Duration::from_millis(500);
        let mut last_pulse: HashMap<i64, Instant> = HashMap::new();
        loop {
            tokio::time::sleep(tick).await;
            let idle: Vec<i64> = {
                let mut st = self.state.lock().unwrap();
                let zombie = self.node.cfg.zombie_interval;
                st.comps
                    .iter_mut()
                    .filter(|(_, c)| c.hashes.is_empty() && c.last_contact.elapsed() >= zombie)
                    .map(|(&id, c)| {
                        // Once: the close takes a while (cleanup runs).
                        c.last_contact = Instant::now();
                        id
                    })
                    .collect()
            };
            for id in idle {
                tracing::warn!(compute_id = id, "idle dispy computation without word from its client for the zombie interval; closing it");
                let dispy = self.clone();
                tokio::spawn(async move { dispy.close(id, true).await });
            }
            let (busy, _, _) = self.node.load();
            let due: Vec<(i64, String, u16, String, bool)> = {
                let st = self.state.lock().unwrap();
                st.comps
                    .iter()
                    .filter_map(|(&id, c)| {
                        let every = c.compute.pulse_interval.filter(|p| *p > 0.0)?;
                        let last = last_pulse.get(&id).copied();
                        let due = last.is_none_or(|t| t.elapsed().as_secs_f64() >= every);
                        due.then(|| {
                            let zombie = c.last_contact.elapsed() >= self.node.cfg.zombie_interval;
                            (
                                id,
                                c.compute.scheduler_ip_addr.clone(),
                                c.compute.scheduler_port,
                                c.compute.node_ip_addr.clone(),
                                zombie,
                            )
                        })
                    })
                    .collect()
            };
            last_pulse.retain(|id, _| self.state.lock().unwrap().comps.contains_key(id));
            for (id, host, port, node_ip, zombie) in due {
                last_pulse.insert(id, Instant::now());
                let msg = dict([
                    ("ip_addr", node_ip.into()),
                    ("port", Value::Int(self.node.cfg.port as i64)),
                    ("cpus", Value::Int(busy as i64)),
                    ("scheduler_ip_addr", host.clone().into()),
                    ("avail_info", messages::avail_info(self.node.avail())),
                ]);
                let msg = [&b"PULSE:"[..], &serialize(&msg)].concat();
                let dispy = self.clone();
                tokio::spawn(async move {
                    match dispy.send(&host, port, &msg, true).await {
                        Ok(Some(r)) if r == b"PULSE" => dispy.touch(id),
                        Ok(_) | Err(_) if zombie => {
                            tracing::warn!(compute_id = id, "dispy client gone for the zombie interval; closing its computation");
                            dispy.close(id, true).await;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(compute_id = id, "pulse not delivered: {e}"),
                    }
                });
            }
        }
    }

    /// `resetup_node`: the computation's jobs end and its cleanup runs, it stays for a new
    /// SETUP, and the client hears `NODE_CLOSED` (it waits for that before setting up again).
    async fn reset(
        self: &Arc<Self>,
        compute_id: i64,
        terminate_pending: bool,
    ) -> Result<(), String> {
        let node_id = self
            .state
            .lock()
            .unwrap()
            .comps
            .get_mut(&compute_id)
            .map(|c| {
                c.resetting = true;
                c.node_id.clone()
            })
            .ok_or_else(|| format!("dispy CLOSE: unknown computation {compute_id}"))?;
        self.node
            .reset(&node_id, terminate_pending)
            .await
            .map_err(|e| format!("dispy resetup of computation {compute_id}: {}", e.message))?;
        let told = {
            let mut st = self.state.lock().unwrap();
            st.comps.get_mut(&compute_id).map(|c| {
                c.set_up = false;
                c.last_contact = Instant::now();
                let msg = dict([
                    ("node_addr", c.compute.node_ip_addr.clone().into()),
                    // The client keeps the node token as bytes (auth_code() encodes it).
                    ("node_auth", Value::bytes(self.auth.as_bytes().to_vec())),
                    ("compute_id", Value::Int(compute_id)),
                    ("auth", c.compute.auth.clone().into()),
                ]);
                (
                    (
                        c.compute.scheduler_ip_addr.clone(),
                        c.compute.scheduler_port,
                    ),
                    [&b"NODE_CLOSED:"[..], &serialize(&msg)].concat(),
                )
            })
        };
        if let Some(((host, port), msg)) = told {
            self.send(&host, port, &msg, false).await.map_err(|e| {
                format!("dispy resetup of computation {compute_id}: cannot tell the client: {e}")
            })?;
            tracing::info!(
                compute_id,
                "dispy computation closed for its client's new setup"
            );
        }
        Ok(())
    }

    /// The console's `release`: closes the computations that have no job queued, running or
    /// undelivered, so the node is free for another client; how many were closed.
    pub async fn release(self: &Arc<Self>) -> usize {
        let idle: Vec<i64> = {
            let st = self.state.lock().unwrap();
            st.comps
                .iter()
                .filter(|(_, c)| c.hashes.is_empty())
                .map(|(&id, _)| id)
                .collect()
        };
        for &id in &idle {
            self.close(id, true).await;
        }
        idle.len()
    }

    /// Whether `token` is the admin token: `sha1(admin secret + sign)` with `--admin_secret`.
    fn is_admin_token(&self, token: &[u8]) -> bool {
        !self.node.cfg.admin_secret.is_empty()
            && dispy_core::auth::constant_time_eq(
                token,
                auth::auth_code(&self.node.cfg.admin_secret, &self.sign).as_bytes(),
            )
    }

    fn touch(&self, compute_id: i64) {
        if let Some(c) = self.state.lock().unwrap().comps.get_mut(&compute_id) {
            c.last_contact = Instant::now();
        }
    }

    /// Closes a computation on the node (its jobs finish or are terminated, cleanup runs).
    async fn close(&self, compute_id: i64, terminate_pending: bool) {
        let node_id = {
            let st = self.state.lock().unwrap();
            match st.comps.get(&compute_id) {
                Some(c) => c.node_id.clone(),
                None => return,
            }
        };
        if let Err(e) = self.node.close(&node_id, terminate_pending).await {
            tracing::warn!(compute_id, "closing the computation: {}", e.message);
        }
        let mut st = self.state.lock().unwrap();
        st.comps.remove(&compute_id);
        if st.comps.is_empty() {
            st.client = None;
        }
        drop(st);
        self.node.check_serve_limit();
    }
}

/// Writes one frame; with `reply`, reads one back (an empty frame or EOF reads as empty).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
    reply: bool,
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    stream
        .write_all(&frame_within(msg, MAX_LEN).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    if !reply {
        return Ok(None);
    }
    // Closed without an answer: an empty one.
    let answer = read_frame(stream, max)
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    Ok(Some(answer.unwrap_or_default()))
}

fn platform() -> String {
    format!(
        "{}-{}-dispynode-rs-{}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        env!("CARGO_PKG_VERSION")
    )
}

pub use handler::serve;
