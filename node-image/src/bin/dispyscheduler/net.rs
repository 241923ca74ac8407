//! dispy's transport as the scheduler uses it: one request per TCP connection (optionally
//! TLS), an optional 40-byte auth prefix, length-prefixed frames, every step bounded in time
//! and size.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dispy_core::frame::{frame_within, read_frame, MAX_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Stream = Box<dyn Io>;

/// A connection with its reads and writes buffered: a frame's length, its body and the auth
/// before it go out in one write and come in with one read, where each of them was a system
/// call (most of the scheduler's cpu is the kernel's). Whoever writes must flush before
/// waiting for an answer; [`send`] does.
pub fn buffered(s: impl Io + 'static) -> Stream {
    Box::new(tokio::io::BufStream::new(s))
}

/// Why a request to a peer failed: it could not be reached at all, or it answered wrongly.
#[derive(Debug)]
pub enum Failure {
    Unreachable(String),
    Protocol(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(e) | Failure::Protocol(e) => f.write_str(e),
        }
    }
}

pub async fn connect(
    host: &str,
    port: u16,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Stream, Failure> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| Failure::Unreachable(format!("cannot connect to {host}:{port}: {e}")))?;
    tcp.set_nodelay(true).ok();
    match tls {
        None => Ok(buffered(tcp)),
        Some(tls) => {
            let name = dispy_core::tls::server_name(host).map_err(Failure::Protocol)?;
            let s = tls
                .connect(name, tcp)
                .await
                .map_err(|e| Failure::Unreachable(format!("TLS with {host}:{port} failed: {e}")))?;
            Ok(buffered(s))
        }
    }
}

pub async fn send(s: &mut Stream, msg: &[u8]) -> Result<(), String> {
    let framed = frame_within(msg, MAX_LEN).map_err(|e| e.to_string())?;
    s.write_all(&framed).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())
}

pub async fn recv(s: &mut Stream, max: usize) -> Result<Vec<u8>, String> {
    match read_frame(s, max).await {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err("the peer closed the connection without an answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// One request: connect, send `auth` (if any) and `msg`, and with `reply` read one frame of
/// at most `max` bytes back. The whole exchange has `timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn request(
    host: &str,
    port: u16,
    tls: Option<&tokio_rustls::TlsConnector>,
    auth: Option<&[u8]>,
    msg: &[u8],
    reply: bool,
    max: usize,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, Failure> {
    let work = async {
        let mut s = connect(host, port, tls).await?;
        if let Some(auth) = auth {
            s.write_all(auth)
                .await
                .map_err(|e| Failure::Unreachable(format!("{host}:{port}: {e}")))?;
        }
        send(&mut s, msg)
            .await
            .map_err(|e| Failure::Unreachable(format!("{host}:{port}: {e}")))?;
        let answer = if reply {
            Some(
                recv(&mut s, max)
                    .await
                    .map_err(|e| Failure::Protocol(format!("{host}:{port}: {e}")))?,
            )
        } else {
            None
        };
        // Dropping the stream closes it, which sends the FIN a shutdown would (one system
        // call fewer per request).
        Ok(answer)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Unreachable(format!(
                "{host}:{port}: no answer within {timeout:?}"
            )))
        })
}

/// How long a kept connection may wait for its next request here: well within the node's
/// own wait (`JOB_KEEPALIVE`, 30 s), so that a request never meets the node's close of an
/// idle connection on the way.
pub const KEPT_IDLE: Duration = Duration::from_secs(10);
/// Kept connections per node: more than the jobs a node has in flight at once.
const KEPT_PER_PEER: usize = 32;

/// Idle connections to peers that keep them, by peer: each taken for one request at a time,
/// given back after its answer, dropped once idle for [`KEPT_IDLE`].
pub struct Kept<T> {
    inner: Mutex<KeptInner<T>>,
}

struct KeptInner<T> {
    idle: HashMap<(String, u16), Vec<(T, Instant)>>,
    swept: Instant,
}

impl<T> Kept<T> {
    pub fn new(now: Instant) -> Kept<T> {
        Kept {
            inner: Mutex::new(KeptInner {
                idle: HashMap::new(),
                swept: now,
            }),
        }
    }

    /// The most recently used idle connection to `peer` that has not expired.
    pub fn take(&self, peer: &(String, u16), now: Instant) -> Option<T> {
        let mut inner = self.inner.lock().unwrap();
        let list = inner.idle.get_mut(peer)?;
        while let Some((conn, since)) = list.pop() {
            if now.duration_since(since) < KEPT_IDLE {
                return Some(conn);
            }
        }
        None
    }

    /// Gives a connection back once its answer is read. Expired connections (those of peers
    /// no longer used too) are dropped, at most every [`KEPT_IDLE`].
    pub fn put(&self, peer: (String, u16), conn: T, now: Instant) {
        let mut inner = self.inner.lock().unwrap();
        if now.duration_since(inner.swept) >= KEPT_IDLE {
            inner.swept = now;
            inner.idle.retain(|_, list| {
                list.retain(|(_, since)| now.duration_since(*since) < KEPT_IDLE);
                !list.is_empty()
            });
        }
        let list = inner.idle.entry(peer).or_default();
        if list.len() < KEPT_PER_PEER {
            list.push((conn, now));
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.lock().unwrap().idle.values().map(Vec::len).sum()
    }
}

async fn exchange(s: &mut Stream, auth: &[u8], msg: &[u8], max: usize) -> Result<Vec<u8>, Failure> {
    s.write_all(auth)
        .await
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    send(s, msg).await.map_err(Failure::Unreachable)?;
    recv(s, max).await.map_err(Failure::Protocol)
}

/// A request to a node that keeps the connection after answering `ACK` (a `JOB` to ours),
/// on one of `kept`'s connections to it when there is one, else on a new one, which is kept
/// after an `ACK`. A kept connection that fails before the answer was closed by the node
/// meanwhile (it restarted, say) without reading the request: it is sent once more on a new
/// connection, whose failure says the node is gone. The whole exchange has `timeout`.
/// Returns the answer, and whether it came on a kept connection.
#[allow(clippy::too_many_arguments)]
pub async fn request_kept(
    kept: &Kept<Stream>,
    host: &str,
    port: u16,
    tls: Option<&tokio_rustls::TlsConnector>,
    auth: &[u8],
    msg: &[u8],
    max: usize,
    timeout: Duration,
) -> Result<(Vec<u8>, bool), Failure> {
    let peer = (host.to_owned(), port);
    let late = || Failure::Unreachable(format!("{host}:{port}: no answer within {timeout:?}"));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut conn = kept.take(&peer, Instant::now());
    let (s, answer, reused) = loop {
        let reused = conn.is_some();
        let work = async {
            let mut s = match conn.take() {
                Some(s) => s,
                None => connect(host, port, tls).await?,
            };
            let answer = exchange(&mut s, auth, msg, max)
                .await
                .map_err(|e| match e {
                    Failure::Unreachable(e) => Failure::Unreachable(format!("{host}:{port}: {e}")),
                    Failure::Protocol(e) => Failure::Protocol(format!("{host}:{port}: {e}")),
                })?;
            Ok::<_, Failure>((s, answer, reused))
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(done)) => break done,
            Ok(Err(_)) if reused => continue,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(late()),
        }
    };
    if answer == b"ACK" {
        kept.put(peer, s, Instant::now());
    }
    Ok((answer, reused))
}

/// The head of a frame from a peer not yet trusted: its declared length and at most `max`
/// bytes of it (the rest is left unread).
pub async fn read_head(s: &mut Stream, max: usize) -> Result<(usize, Vec<u8>), String> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header)
        .await
        .map_err(|e| format!("no frame: {e}"))?;
    let len = u32::from_be_bytes(header) as usize;
    let mut buf = vec![0u8; len.min(max)];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| format!("frame cut short: {e}"))?;
    Ok((len, buf))
}

/// Reads the rest of a frame whose head [`read_head`] read.
pub async fn read_rest(s: &mut Stream, len: usize, head: Vec<u8>) -> Result<Vec<u8>, String> {
    let mut buf = head;
    let have = buf.len();
    buf.resize(len, 0);
    s.read_exact(&mut buf[have..])
        .await
        .map_err(|e| format!("frame cut short: {e}"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> (String, u16) {
        (ip.to_owned(), 9701)
    }

    #[test]
    fn a_kept_connection_is_reused_until_it_has_been_idle_too_long() {
        let t0 = Instant::now();
        let kept = Kept::new(t0);
        kept.put(peer("10.0.0.1"), 1, t0);
        kept.put(peer("10.0.0.1"), 2, t0 + Duration::from_secs(1));
        assert_eq!(kept.take(&peer("10.0.0.2"), t0), None, "another node's");
        // The freshest first; one taken is not given to anyone else.
        assert_eq!(
            kept.take(&peer("10.0.0.1"), t0 + Duration::from_secs(2)),
            Some(2)
        );
        // Idle for KEPT_IDLE: the node may be about to close it.
        assert_eq!(kept.take(&peer("10.0.0.1"), t0 + KEPT_IDLE), None);
        assert_eq!(kept.idle(), 0, "the expired one was dropped on the way");
    }

    #[test]
    fn kept_connections_are_bounded_per_node_and_those_of_nodes_gone_quiet_are_swept() {
        let t0 = Instant::now();
        let kept = Kept::new(t0);
        for i in 0..100 {
            kept.put(peer("10.0.0.1"), i, t0);
        }
        assert_eq!(kept.idle(), KEPT_PER_PEER);
        // Nothing asks for 10.0.0.1's again; a later put elsewhere drops them.
        kept.put(peer("10.0.0.2"), 0, t0 + KEPT_IDLE);
        assert_eq!(kept.idle(), 1);
    }
}
