//! One native-protocol client connection: handshake, then requests until the client leaves.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dispy_core::auth::{self, Role, Sha256};
use dispy_core::client::Stream;
use dispy_core::frame::{frame, read_frame, write_frame, FrameError};
use dispy_core::protocol::*;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::limits::{Permit, PREAUTH_MAX};
use crate::node::{Node, Outbox, Owner, SessionId};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A file being received in chunks.
struct Partial {
    file: std::fs::File,
    tmp: PathBuf,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
}

/// Serves a connection whose magic prefix has been read. `permit` is its place among the
/// connections waiting to authenticate, given back once the handshake is done.
pub async fn serve(node: Arc<Node>, mut stream: Box<dyn Stream>, peer: SocketAddr, permit: Permit) {
    let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&node, &mut stream, peer));
    let (pulse, owner) = match handshake.await {
        Ok(Ok(authenticated)) => authenticated,
        Ok(Err(e)) => {
            tracing::warn!(%peer, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    drop(permit);
    tracing::info!(%peer, session, "client connected");
    let (read_half, write_half) = tokio::io::split(stream);
    let (outbox, out_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(writer(write_half, out_rx, node.clone()));
    let pulser = tokio::spawn(pulser(node.clone(), outbox.clone(), pulse));
    let caller = Caller { session, owner };
    let reason = read_loop(&node, &caller, &outbox, read_half).await;
    tracing::info!(%peer, session, "client disconnected: {reason}");
    pulser.abort();
    node.detach_session(session);
    drop(outbox);
    let _ = writer.await;
}

/// Who sent a request: the connection and the owner it authenticated as.
struct Caller {
    session: SessionId,
    owner: Owner,
}

/// The handshake; on success the pulse interval and the client's owner. Nothing read before
/// the client's proof is checked may be larger than [`PREAUTH_MAX`], and nothing the node
/// sends before it is of use to a peer without the secret (the node's proof is over nonces
/// the node chose fresh, with a label no client proof carries).
async fn handshake(
    node: &Node,
    stream: &mut Box<dyn Stream>,
    peer: SocketAddr,
) -> Result<(Duration, Owner), String> {
    let hello: Hello = read_msg(stream, PREAUTH_MAX, "hello").await?;
    if hello.min_version > PROTOCOL_VERSION || hello.max_version < PROTOCOL_VERSION {
        let reason = format!(
            "no common protocol version: the client speaks {}..={}, this node {PROTOCOL_VERSION}",
            hello.min_version, hello.max_version
        );
        send(stream, &ServerHello::Rejected(reason.clone())).await?;
        return Err(reason);
    }
    let node_nonce = auth::nonce();
    let challenge = Challenge {
        version: PROTOCOL_VERSION,
        node_proof: auth::proof(
            &node.cfg.secret,
            Role::Node,
            &hello.client_nonce,
            &node_nonce,
        ),
        node_nonce: node_nonce.clone(),
    };
    send(stream, &ServerHello::Challenge(challenge)).await?;
    let auth: Auth = read_msg(stream, PREAUTH_MAX, "auth").await?;
    if !auth::verify(
        &node.cfg.secret,
        Role::Client,
        &hello.client_nonce,
        &node_nonce,
        &auth.client_proof,
    ) {
        node.metrics.auth_failures.inc();
        let reason =
            "authentication failed: the client's secret does not match this node's --secret";
        send(stream, &Welcome::Rejected(reason.into())).await?;
        return Err(format!(
            "client {:?} from {peer}: {reason}",
            hello.client_name
        ));
    }
    let owner = match &auth.owner {
        Some(credential) if !credential.is_empty() => Owner::of_credential(credential),
        _ => Owner::unique(),
    };
    send(stream, &Welcome::Accepted(node.info(Some(&owner)))).await?;
    let asked = Duration::from_millis(auth.pulse_interval_ms.unwrap_or(10_000).max(100));
    let pulse = match node.cfg.ping_interval {
        d if d.is_zero() => asked,
        d => d.min(asked),
    };
    Ok((pulse, owner))
}

async fn read_msg<T: serde::de::DeserializeOwned>(
    stream: &mut Box<dyn Stream>,
    max: usize,
    what: &str,
) -> Result<T, String> {
    let frame = read_frame(stream, max)
        .await
        .map_err(|e| format!("{what} message before authentication: {e}"))?
        .ok_or_else(|| format!("connection closed before the {what} message"))?;
    decode(what, &frame).map_err(|e| e.to_string())
}

async fn send<T: serde::Serialize>(stream: &mut Box<dyn Stream>, msg: &T) -> Result<(), String> {
    write_frame(stream, &encode(msg))
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())
}

async fn writer<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    node: Arc<Node>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    while let Some(bytes) = rx.recv().await {
        let mut n = bytes.len();
        if w.write_all(&bytes).await.is_err() {
            return;
        }
        while let Ok(bytes) = rx.try_recv() {
            n += bytes.len();
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        node.metrics.bytes_sent.inc_by(n as u64);
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn pulser(node: Arc<Node>, outbox: Outbox, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let (busy, cpus, queued) = node.load();
        if outbox
            .send(frame(&encode(&NodeMsg::Pulse { busy, cpus, queued })))
            .is_err()
        {
            return;
        }
    }
}

fn reply(outbox: &Outbox, id: u64, result: Result<Reply, NodeError>) {
    let _ = outbox.send(frame(&encode(&NodeMsg::Reply { id, result })));
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    node: &Arc<Node>,
    caller: &Caller,
    outbox: &Outbox,
    mut r: R,
) -> String {
    let mut partials: HashMap<(ComputationId, String), Partial> = HashMap::new();
    let silence = node.cfg.zombie_interval.max(Duration::from_secs(1));
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(silence, read_frame(&mut r, node.cfg.max_frame)) => f,
            _ = shutdown.wait_for(|s| *s) => {
                let _ = outbox.send(frame(&encode(&NodeMsg::Shutdown { reason: "the node is shutting down".into() })));
                return "node shutting down".into();
            }
        };
        let frame = match frame {
            Err(_) => return format!("silent for {silence:?}"),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return "connection closed".into(),
            Ok(Err(e @ FrameError::TooLarge { .. })) => {
                node.metrics.bad_requests.inc();
                tracing::warn!(session = caller.session, "{e}; closing the connection");
                reply(
                    outbox,
                    0,
                    Err(NodeError::new(ErrorCode::TooLarge, e.to_string())),
                );
                return e.to_string();
            }
            Ok(Err(e)) => return e.to_string(),
        };
        node.metrics.bytes_received.inc_by(frame.len() as u64 + 4);
        let req: Request = match decode("request", &frame) {
            Ok(r) => r,
            Err(e) => {
                node.metrics.bad_requests.inc();
                tracing::warn!(session = caller.session, "{e}");
                reply(
                    outbox,
                    0,
                    Err(NodeError::new(ErrorCode::BadRequest, e.to_string())),
                );
                continue;
            }
        };
        handle(node, caller, outbox, &mut partials, req).await;
    }
}

/// The computation a request acts on, when it names one that must already exist.
fn target(msg: &ClientMsg) -> Option<&str> {
    match msg {
        ClientMsg::Pulse | ClientMsg::NodeInfo | ClientMsg::Compute(_) => None,
        ClientMsg::FileCheck { computation, .. }
        | ClientMsg::Setup { computation }
        | ClientMsg::Submit { computation, .. }
        | ClientMsg::Cancel { computation, .. }
        | ClientMsg::Ack { computation, .. }
        | ClientMsg::Attach { computation }
        | ClientMsg::Close { computation, .. } => Some(computation),
        ClientMsg::FileChunk(chunk) => Some(&chunk.computation),
    }
}

async fn handle(
    node: &Arc<Node>,
    caller: &Caller,
    outbox: &Outbox,
    partials: &mut HashMap<(ComputationId, String), Partial>,
    req: Request,
) {
    let (id, session) = (req.id, caller.session);
    if let Some(Err(e)) = target(&req.body).map(|c| node.check_owner(c, &caller.owner)) {
        tracing::warn!(session, "request {id} refused: {e}");
        reply(outbox, id, Err(e));
        return;
    }
    let result = match req.body {
        ClientMsg::Pulse => return,
        ClientMsg::NodeInfo => Ok(Reply::NodeInfo(node.info(Some(&caller.owner)))),
        ClientMsg::Compute(c) => node
            .compute(session, outbox, caller.owner.clone(), c, None)
            .map(|_| Reply::Ok),
        ClientMsg::FileCheck { computation, meta } => node
            .check_file(&computation, &meta)
            .map(|(_, present)| Reply::FileCheck { present }),
        ClientMsg::FileChunk(chunk) => receive_chunk(node, partials, chunk).map(|_| Reply::Ok),
        ClientMsg::Setup { computation } => {
            let (node, outbox) = (node.clone(), outbox.clone());
            tokio::spawn(async move {
                let result = node
                    .setup(&computation)
                    .await
                    .map(|cpus| Reply::Setup { cpus });
                reply(&outbox, id, result);
            });
            return;
        }
        ClientMsg::Submit { computation, jobs } => node
            .submit(&computation, jobs)
            .map(|rejected| Reply::Submitted { rejected }),
        ClientMsg::Cancel { computation, job } => node.cancel(&computation, job).map(|_| Reply::Ok),
        ClientMsg::Ack { computation, jobs } => node.ack(&computation, &jobs).map(|_| Reply::Ok),
        ClientMsg::Attach { computation } => {
            let result = node
                .attach(session, outbox, &computation)
                .map(|jobs| Reply::Attached { jobs });
            let ok = result.is_ok();
            reply(outbox, id, result);
            if ok {
                node.resend_results(&computation);
            }
            return;
        }
        ClientMsg::Close {
            computation,
            terminate_pending,
        } => {
            let (node, outbox) = (node.clone(), outbox.clone());
            tokio::spawn(async move {
                let result = node
                    .close(&computation, terminate_pending)
                    .await
                    .map(|_| Reply::Ok);
                reply(&outbox, id, result);
                node.check_serve_limit();
            });
            return;
        }
    };
    if let Err(e) = &result {
        tracing::warn!(session, "request {id} refused: {e}");
    }
    reply(outbox, id, result);
}

fn receive_chunk(
    node: &Node,
    partials: &mut HashMap<(ComputationId, String), Partial>,
    chunk: FileChunk,
) -> Result<(), NodeError> {
    let key = (chunk.computation.clone(), chunk.meta.name.clone());
    let result = write_chunk(node, partials, &key, &chunk);
    if result.is_err() {
        if let Some(p) = partials.remove(&key) {
            let _ = std::fs::remove_file(&p.tmp);
        }
    }
    result
}

fn write_chunk(
    node: &Node,
    partials: &mut HashMap<(ComputationId, String), Partial>,
    key: &(ComputationId, String),
    chunk: &FileChunk,
) -> Result<(), NodeError> {
    let meta = &chunk.meta;
    let io = |what: &str, e: std::io::Error| {
        NodeError::new(
            ErrorCode::Internal,
            format!("file {:?}: cannot {what}: {e}", meta.name),
        )
    };
    node.check_size(&meta.name, meta.size)?;
    let end = chunk.offset + chunk.data.len() as u64;
    if end > meta.size {
        return Err(NodeError::new(
            ErrorCode::BadRequest,
            format!(
                "file {:?}: chunk ends at byte {end}, past the announced size {}",
                meta.name, meta.size
            ),
        ));
    }
    if chunk.offset == 0 {
        if let Some(old) = partials.remove(key) {
            let _ = std::fs::remove_file(&old.tmp);
        }
        let path = node
            .comp_dir(&chunk.computation)?
            .join(crate::node::safe_relative(&meta.name)?);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create its directory", e))?;
        }
        let tmp = path.with_file_name(format!(
            ".{}.partial",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let file = std::fs::File::create(&tmp).map_err(|e| io("create it", e))?;
        partials.insert(
            key.clone(),
            Partial {
                file,
                tmp,
                path,
                hasher: Sha256::default(),
                written: 0,
            },
        );
    }
    let p = partials.get_mut(key).ok_or_else(|| {
        NodeError::new(
            ErrorCode::BadRequest,
            format!(
                "file {:?}: chunk at offset {} without its start",
                meta.name, chunk.offset
            ),
        )
    })?;
    if p.written != chunk.offset {
        return Err(NodeError::new(
            ErrorCode::BadRequest,
            format!(
                "file {:?}: chunk at offset {} but {} bytes were received",
                meta.name, chunk.offset, p.written
            ),
        ));
    }
    p.file
        .write_all(&chunk.data)
        .map_err(|e| io("write it", e))?;
    p.hasher.update(&chunk.data);
    p.written = end;
    if !chunk.last {
        return Ok(());
    }
    let p = partials.remove(key).expect("present above");
    if p.written != meta.size {
        let _ = std::fs::remove_file(&p.tmp);
        return Err(NodeError::new(
            ErrorCode::BadRequest,
            format!(
                "file {:?}: {} bytes received, {} announced",
                meta.name, p.written, meta.size
            ),
        ));
    }
    let sum = p.hasher.hex();
    if sum != meta.sha256 {
        let _ = std::fs::remove_file(&p.tmp);
        return Err(NodeError::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "file {:?}: SHA-256 {sum} does not match the announced {}",
                meta.name, meta.sha256
            ),
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = if meta.mode & 0o777 == 0 {
        0o644
    } else {
        meta.mode & 0o777
    };
    std::fs::set_permissions(&p.tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("set its mode", e))?;
    std::fs::rename(&p.tmp, &p.path).map_err(|e| io("move it into place", e))?;
    if meta.job.is_some() {
        node.note_job_file(&chunk.computation, &meta.name);
    }
    tracing::debug!(computation = %chunk.computation, file = %meta.name, bytes = meta.size, "file received");
    Ok(())
}
