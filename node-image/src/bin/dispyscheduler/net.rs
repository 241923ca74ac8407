//! dispy's transport as the scheduler uses it: one request per TCP connection (optionally
//! TLS), an optional 40-byte auth prefix, length-prefixed frames, every step bounded in time
//! and size.

use std::time::Duration;

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
        // Dropping the stream closes it, which sends the FIN a shutdown would (one system
        // call fewer per request).
        exchange(&mut s, host, port, auth, msg, reply, max).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(late(host, port, timeout)))
}

fn late(host: &str, port: u16, timeout: Duration) -> Failure {
    Failure::Unreachable(format!("{host}:{port}: no answer within {timeout:?}"))
}

/// Sends `auth` (if any) and `msg` on `s` to `host:port`; with `reply`, reads the answer.
async fn exchange(
    s: &mut Stream,
    host: &str,
    port: u16,
    auth: Option<&[u8]>,
    msg: &[u8],
    reply: bool,
    max: usize,
) -> Result<Option<Vec<u8>>, Failure> {
    let unreachable = |e: String| Failure::Unreachable(format!("{host}:{port}: {e}"));
    if let Some(auth) = auth {
        s.write_all(auth)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    }
    send(s, msg).await.map_err(unreachable)?;
    if !reply {
        return Ok(None);
    }
    recv(s, max)
        .await
        .map(Some)
        .map_err(|e| Failure::Protocol(format!("{host}:{port}: {e}")))
}

/// A request to a node that keeps the connection after answering `ACK` (a `JOB` to ours),
/// on a connection `kept` from an earlier one when there is one ([`Kept::request`] says
/// when it goes once more on a new one). The whole exchange has `timeout`. Returns the
/// answer, and whether it came on a kept connection.
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
    let work = kept.request(
        (host.to_owned(), port),
        || connect(host, port, tls),
        |mut s| async move {
            let answer = exchange(&mut s, host, port, Some(auth), msg, true, max).await?;
            Ok((s, answer.unwrap_or_default()))
        },
    );
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(late(host, port, timeout)))
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
