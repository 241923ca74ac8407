//! A client for the native protocol: one persistent, multiplexed connection to one node.
//!
//! Requests are answered in any order, matched by id; job events arrive on the channel returned
//! by [`NodeClient::connect`]. When the connection is lost, every pending request fails and a
//! [`ClientEvent::Disconnected`] lists the jobs that were in flight, so the caller can requeue
//! or abandon them. Reconnect with a new client and [`NodeClient::attach`] to collect results
//! that finished meanwhile.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{self, Role};
use crate::frame::{read_frame, write_frame, FrameError};
use crate::job::JobId;
use crate::protocol::*;

/// A byte stream the protocol can run over: plain TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

#[derive(Clone)]
pub struct ClientConfig {
    /// The shared secret (`--secret` on the node).
    pub secret: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Shown in the node's logs.
    pub name: String,
    /// How often pulses go each way; a node silent for five intervals is taken as lost.
    pub pulse_interval: Duration,
    pub max_frame: usize,
    pub connect_timeout: Duration,
    /// The credential that makes this client the owner of the computations it creates: only
    /// a connection presenting the same one may attach to them, submit to them, cancel, ack
    /// or close them. Random by default (one per config); a client that must re-attach after
    /// a restart derives it from an identity it keeps (see [`auth::owner_credential`]).
    pub owner: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            secret: String::new(),
            tls: None,
            name: "dispy-client".into(),
            pulse_interval: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
            owner: crate::auth::random_credential(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to node {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("node {addr}: connection timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("node {addr}: TLS: {detail}")]
    Tls { addr: String, detail: String },
    #[error("node {addr} rejected the connection: {reason}")]
    Rejected { addr: String, reason: String },
    #[error("node {addr} could not prove the shared secret: the node and the client have different secrets")]
    NodeAuth { addr: String },
    #[error("node {addr}: {source}")]
    Frame { addr: String, source: FrameError },
    #[error("node {addr}: {source}")]
    Decode { addr: String, source: DecodeError },
    #[error("node {addr}: connection closed during the handshake")]
    HandshakeClosed { addr: String },
    #[error("connection to node {addr} lost: {reason}")]
    Disconnected { addr: String, reason: String },
    #[error("node {addr}: {error}")]
    Node { addr: String, error: NodeError },
    #[error("node {addr} answered {request} with an unexpected {reply}")]
    Unexpected {
        addr: String,
        request: &'static str,
        reply: String,
    },
    #[error("cannot read {path}: {source}")]
    File { path: String, source: io::Error },
}

impl ClientError {
    /// The node's own error code, when the node answered with an error.
    pub fn node_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Node { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Job(JobEvent),
    Pulse {
        busy: u32,
        cpus: u32,
        queued: u32,
    },
    /// The connection is gone; these jobs were submitted and had not finished.
    Disconnected {
        reason: String,
        in_flight: Vec<(ComputationId, JobId)>,
    },
}

type Pending = HashMap<u64, oneshot::Sender<Result<Reply, ClientError>>>;

struct Shared {
    addr: String,
    pending: Mutex<Option<Pending>>,
    in_flight: Mutex<HashSet<(ComputationId, JobId)>>,
    next_id: AtomicU64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// The largest request the node takes (its `--max-frame`, taken as equal to ours).
    max_frame: usize,
    /// Dropped with the last `NodeClient`: the reader sees its receiver end and stops, which
    /// closes the connection (the reader holds only a weak reference, so it cannot keep the
    /// connection, and the node, for a client nobody uses).
    _closed: oneshot::Sender<()>,
}

/// A connection to one node. Cheap to clone; the connection closes when the last clone drops
/// (and, while requests wait for their replies, when those are answered or fail).
#[derive(Clone)]
pub struct NodeClient {
    shared: Arc<Shared>,
    info: NodeInfo,
}

impl NodeClient {
    /// Connects to `addr` (`host:port`), runs the handshake and starts the connection's tasks.
    pub async fn connect(
        addr: &str,
        config: &ClientConfig,
    ) -> Result<(NodeClient, mpsc::UnboundedReceiver<ClientEvent>), ClientError> {
        let timeout = config.connect_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.into(),
                after: timeout,
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.into(),
                source,
            })?;
        tcp.set_nodelay(true).ok();
        let stream: Box<dyn Stream> = match &config.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = crate::tls::server_name(host).map_err(|detail| ClientError::Tls {
                    addr: addr.into(),
                    detail,
                })?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let s = tokio::time::timeout(timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| ClientError::Timeout {
                        addr: addr.into(),
                        after: timeout,
                    })?
                    .map_err(|e| ClientError::Tls {
                        addr: addr.into(),
                        detail: e.to_string(),
                    })?;
                Box::new(s)
            }
        };
        tokio::time::timeout(timeout, Self::start(addr, stream, config))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.into(),
                after: timeout,
            })?
    }

    async fn start(
        addr: &str,
        mut stream: Box<dyn Stream>,
        config: &ClientConfig,
    ) -> Result<(NodeClient, mpsc::UnboundedReceiver<ClientEvent>), ClientError> {
        let frame_err = |source| ClientError::Frame {
            addr: addr.into(),
            source,
        };
        let io_err = |e: io::Error| frame_err(FrameError::Io(e));
        let client_nonce = auth::nonce();
        let hello = Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_nonce: client_nonce.clone(),
            client_name: config.name.clone(),
        };
        stream.write_all(&MAGIC).await.map_err(io_err)?;
        write_frame(&mut stream, &encode(&hello))
            .await
            .map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;

        let challenge = match Self::read_handshake(addr, &mut stream, config).await? {
            ServerHello::Challenge(c) => c,
            ServerHello::Rejected(reason) => {
                return Err(ClientError::Rejected {
                    addr: addr.into(),
                    reason,
                })
            }
        };
        if !auth::verify(
            &config.secret,
            Role::Node,
            &client_nonce,
            &challenge.node_nonce,
            &challenge.node_proof,
        ) {
            return Err(ClientError::NodeAuth { addr: addr.into() });
        }
        let auth = Auth {
            client_proof: auth::proof(
                &config.secret,
                Role::Client,
                &client_nonce,
                &challenge.node_nonce,
            ),
            pulse_interval_ms: Some(config.pulse_interval.as_millis() as u64),
            owner: Some(config.owner.clone()),
        };
        write_frame(&mut stream, &encode(&auth))
            .await
            .map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;
        let info = match Self::read_handshake::<Welcome>(addr, &mut stream, config).await? {
            Welcome::Accepted(info) => info,
            Welcome::Rejected(reason) => {
                return Err(ClientError::Rejected {
                    addr: addr.into(),
                    reason,
                })
            }
        };

        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            addr: addr.into(),
            pending: Mutex::new(Some(HashMap::new())),
            in_flight: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            out: out_tx,
            max_frame: config.max_frame,
            _closed: closed_tx,
        });
        let (read_half, write_half) = tokio::io::split(stream);
        tokio::spawn(writer(write_half, out_rx));
        tokio::spawn(reader(
            read_half,
            Arc::downgrade(&shared),
            closed_rx,
            event_tx,
            config.max_frame,
            config.pulse_interval * 5,
        ));
        tokio::spawn(pulser(shared.out.downgrade(), config.pulse_interval));
        Ok((NodeClient { shared, info }, event_rx))
    }

    async fn read_handshake<T: serde::de::DeserializeOwned>(
        addr: &str,
        stream: &mut Box<dyn Stream>,
        config: &ClientConfig,
    ) -> Result<T, ClientError> {
        let frame = read_frame(stream, config.max_frame)
            .await
            .map_err(|source| ClientError::Frame {
                addr: addr.into(),
                source,
            })?
            .ok_or_else(|| ClientError::HandshakeClosed { addr: addr.into() })?;
        decode("handshake", &frame).map_err(|source| ClientError::Decode {
            addr: addr.into(),
            source,
        })
    }

    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// What the node said about itself at connect time.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// Jobs submitted on this connection that have not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.lock().unwrap().len()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.pending.lock().unwrap().is_some()
    }

    async fn request(&self, body: ClientMsg) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Refused here rather than sent: the node would close the connection on it.
        let frame =
            crate::frame::frame_within(&encode(&Request { id, body }), self.shared.max_frame)
                .map_err(|source| ClientError::Frame {
                    addr: self.shared.addr.clone(),
                    source,
                })?;
        {
            let mut pending = self.shared.pending.lock().unwrap();
            let Some(pending) = pending.as_mut() else {
                return Err(self.disconnected("connection already closed"));
            };
            pending.insert(id, tx);
        }
        if self.shared.out.send(frame).is_err() {
            return Err(self.disconnected("connection already closed"));
        }
        rx.await
            .unwrap_or_else(|_| Err(self.disconnected("connection closed")))
    }

    fn disconnected(&self, reason: &str) -> ClientError {
        ClientError::Disconnected {
            addr: self.shared.addr.clone(),
            reason: reason.into(),
        }
    }

    fn unexpected(&self, request: &'static str, reply: Reply) -> ClientError {
        ClientError::Unexpected {
            addr: self.shared.addr.clone(),
            request,
            reply: format!("{reply:?}"),
        }
    }

    async fn expect_ok(&self, request: &'static str, body: ClientMsg) -> Result<(), ClientError> {
        match self.request(body).await? {
            Reply::Ok => Ok(()),
            other => Err(self.unexpected(request, other)),
        }
    }

    /// Current node status.
    pub async fn node_info(&self) -> Result<NodeInfo, ClientError> {
        match self.request(ClientMsg::NodeInfo).await? {
            Reply::NodeInfo(info) => Ok(info),
            other => Err(self.unexpected("NodeInfo", other)),
        }
    }

    /// Registers a computation; send its files next, then [`NodeClient::setup`].
    pub async fn compute(&self, req: ComputeRequest) -> Result<(), ClientError> {
        self.expect_ok("Compute", ClientMsg::Compute(req)).await
    }

    /// Sends a file unless the node already has the same one; returns whether it was sent.
    pub async fn send_file(
        &self,
        computation: &str,
        name: &str,
        data: &[u8],
        mode: u32,
        job: Option<JobId>,
    ) -> Result<bool, ClientError> {
        let meta = FileMeta {
            name: name.into(),
            size: data.len() as u64,
            sha256: auth::sha256_hex(data),
            mode,
            job,
        };
        let check = ClientMsg::FileCheck {
            computation: computation.into(),
            meta: meta.clone(),
        };
        match self.request(check).await? {
            Reply::FileCheck { present: true } => return Ok(false),
            Reply::FileCheck { present: false } => {}
            other => return Err(self.unexpected("FileCheck", other)),
        }
        let mut offset = 0usize;
        let mut replies = Vec::new();
        loop {
            let end = (offset + FILE_CHUNK).min(data.len());
            let chunk = FileChunk {
                computation: computation.into(),
                meta: meta.clone(),
                offset: offset as u64,
                data: data[offset..end].to_vec(),
                last: end == data.len(),
            };
            let this = self.clone();
            replies.push(tokio::spawn(async move {
                this.expect_ok("FileChunk", ClientMsg::FileChunk(chunk))
                    .await
            }));
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
        for r in replies {
            r.await.expect("file chunk task does not panic")?;
        }
        Ok(true)
    }

    /// Starts the computation on the node (the Python host and its setup); returns its cpus.
    pub async fn setup(&self, computation: &str) -> Result<u32, ClientError> {
        let msg = ClientMsg::Setup {
            computation: computation.into(),
        };
        match self.request(msg).await? {
            Reply::Setup { cpus } => Ok(cpus),
            other => Err(self.unexpected("Setup", other)),
        }
    }

    /// Queues a job on the node. Its events arrive on the event channel.
    pub async fn submit(&self, computation: &str, job: JobRequest) -> Result<(), ClientError> {
        let mut rejected = self.submit_many(computation, vec![job]).await?;
        match rejected.pop() {
            None => Ok(()),
            Some(r) => Err(ClientError::Node {
                addr: self.shared.addr.clone(),
                error: r.error,
            }),
        }
    }

    /// Queues jobs in one request, in order; returns those the node refused (the others are
    /// queued).
    pub async fn submit_many(
        &self,
        computation: &str,
        jobs: Vec<JobRequest>,
    ) -> Result<Vec<Rejected>, ClientError> {
        let keys: Vec<_> = jobs
            .iter()
            .map(|j| (computation.to_string(), j.id))
            .collect();
        self.shared
            .in_flight
            .lock()
            .unwrap()
            .extend(keys.iter().cloned());
        let msg = ClientMsg::Submit {
            computation: computation.into(),
            jobs,
        };
        let result = match self.request(msg).await {
            Ok(Reply::Submitted { rejected }) => Ok(rejected),
            Ok(other) => Err(self.unexpected("Submit", other)),
            Err(e) => Err(e),
        };
        let mut in_flight = self.shared.in_flight.lock().unwrap();
        match &result {
            Ok(rejected) => {
                for r in rejected {
                    in_flight.remove(&(computation.to_string(), r.job));
                }
            }
            Err(_) => {
                for k in &keys {
                    in_flight.remove(k);
                }
            }
        }
        result
    }

    /// Cancels a queued job, or terminates a running one (SIGTERM, then SIGKILL).
    pub async fn cancel(&self, computation: &str, job: JobId) -> Result<(), ClientError> {
        let msg = ClientMsg::Cancel {
            computation: computation.into(),
            job,
        };
        self.expect_ok("Cancel", msg).await
    }

    /// Tells the node these results are stored and need not be resent.
    pub async fn ack(&self, computation: &str, jobs: Vec<JobId>) -> Result<(), ClientError> {
        let msg = ClientMsg::Ack {
            computation: computation.into(),
            jobs,
        };
        self.expect_ok("Ack", msg).await
    }

    /// Re-attaches to a computation after a reconnect. The node answers with the state of its
    /// jobs and resends every unacknowledged result as an event.
    pub async fn attach(&self, computation: &str) -> Result<Vec<JobState>, ClientError> {
        let msg = ClientMsg::Attach {
            computation: computation.into(),
        };
        let jobs = match self.request(msg).await? {
            Reply::Attached { jobs } => jobs,
            other => return Err(self.unexpected("Attach", other)),
        };
        let mut in_flight = self.shared.in_flight.lock().unwrap();
        for j in &jobs {
            in_flight.insert((computation.to_string(), j.id));
        }
        Ok(jobs)
    }

    /// Closes the computation on the node; returns after cleanup ran.
    pub async fn close(
        &self,
        computation: &str,
        terminate_pending: bool,
    ) -> Result<(), ClientError> {
        let msg = ClientMsg::Close {
            computation: computation.into(),
            terminate_pending,
        };
        self.expect_ok("Close", msg).await
    }
}

async fn writer<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    while let Some(frame) = rx.recv().await {
        if w.write_all(&frame).await.is_err() {
            return;
        }
        // Batch whatever is already queued into one write.
        while let Ok(frame) = rx.try_recv() {
            if w.write_all(&frame).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Reads the node's frames until the connection ends, or until every `NodeClient` is gone
/// (`closed`): then it returns at once, and with it the read half and, its sender gone, the
/// writer: the connection closes.
async fn reader<R: AsyncRead + Unpin>(
    mut r: R,
    shared: std::sync::Weak<Shared>,
    mut closed: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<ClientEvent>,
    max_frame: usize,
    silence_limit: Duration,
) {
    let reason = loop {
        let read = tokio::select! {
            _ = &mut closed => return,
            read = tokio::time::timeout(silence_limit, read_frame(&mut r, max_frame)) => read,
        };
        let frame = match read {
            Err(_) => break format!("no pulse from the node for {silence_limit:?}"),
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(None)) => break "connection closed by the node".to_string(),
            Ok(Ok(Some(frame))) => frame,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let msg: NodeMsg = match decode("node", &frame) {
            Ok(m) => m,
            Err(e) => break e.to_string(),
        };
        match msg {
            NodeMsg::Reply { id, result } => {
                let tx = shared
                    .pending
                    .lock()
                    .unwrap()
                    .as_mut()
                    .and_then(|p| p.remove(&id));
                if let Some(tx) = tx {
                    let _ = tx.send(result.map_err(|error| ClientError::Node {
                        addr: shared.addr.clone(),
                        error,
                    }));
                }
            }
            NodeMsg::Event(ev) => {
                if let JobEventKind::Done(_) = ev.kind {
                    shared
                        .in_flight
                        .lock()
                        .unwrap()
                        .remove(&(ev.computation.clone(), ev.job));
                }
                let _ = events.send(ClientEvent::Job(ev));
            }
            NodeMsg::Pulse { busy, cpus, queued } => {
                let _ = events.send(ClientEvent::Pulse { busy, cpus, queued });
            }
            NodeMsg::Shutdown { reason } => break format!("node shutting down: {reason}"),
        }
    };
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let pending = shared.pending.lock().unwrap().take().unwrap_or_default();
    for (_, tx) in pending {
        let _ = tx.send(Err(ClientError::Disconnected {
            addr: shared.addr.clone(),
            reason: reason.clone(),
        }));
    }
    let mut in_flight: Vec<_> = shared.in_flight.lock().unwrap().drain().collect();
    in_flight.sort();
    let _ = events.send(ClientEvent::Disconnected { reason, in_flight });
}

async fn pulser(out: mpsc::WeakUnboundedSender<Vec<u8>>, every: Duration) {
    let pulse = crate::frame::frame(&encode(&Request {
        id: 0,
        body: ClientMsg::Pulse,
    }));
    loop {
        tokio::time::sleep(every).await;
        match out.upgrade() {
            Some(out) if out.send(pulse.clone()).is_ok() => {}
            _ => return,
        }
    }
}
