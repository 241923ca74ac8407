//! dispy's transport as the scheduler uses it: one request per TCP connection (optionally
//! TLS), an optional 40-byte auth prefix, length-prefixed frames, every step bounded in time
//! and size.

use std::time::{Duration, Instant};

use crate::kept::Kept;

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
