//! The one piece of the kubelet API served here: container logs, so that
//! `kubectl logs [-f] [--tail N]` works through the API server. HTTPS on the
//! node's loopback address; no authentication (only local users can reach it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::NodeInfo;

pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

pub async fn serve(node: Arc<NodeInfo>, port: u16, root: PathBuf, tls: Arc<rustls::ServerConfig>) {
    let listener = match TcpListener::bind((node.ip, port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(node = %node.name, "kubelet API on {}:{port}: {e}; kubectl logs will not work", node.ip);
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let root = root.clone();
        tokio::spawn(async move {
            if let Ok(stream) = acceptor.accept(tcp).await {
                if let Err(e) = handle(stream, &root).await {
                    tracing::debug!("kubelet API request: {e}");
                }
            }
        });
    }
}

/// Request target -> (path segments, query pairs).
fn parse_target(target: &str) -> (Vec<String>, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segs = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let q = query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (segs, q)
}

/// The last `n` lines of `data`.
pub fn tail(data: &[u8], n: usize) -> &[u8] {
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut count = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            count += 1;
            if count == n {
                return &data[i + 1..];
            }
        }
    }
    if n == 0 {
        &data[data.len()..]
    } else {
        data
    }
}

fn find_log(root: &Path, ns: &str, pod: &str, container: &str) -> Option<PathBuf> {
    let prefix = format!("{ns}_{pod}_");
    std::fs::read_dir(root.join("pods"))
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| {
            e.path()
                .join("containers")
                .join(container)
                .join("output.log")
        })
        .filter(|p| p.exists())
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, root: &Path) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0 && head.len() < 16384, "bad request");
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let (segs, query) = parse_target(target);
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let log = match segs.as_slice() {
        ["healthz"] => {
            s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok",
            )
            .await?;
            return Ok(s.shutdown().await?);
        }
        ["containerLogs", ns, pod, container] => find_log(root, ns, pod, container),
        _ => None,
    };
    let Some(log) = log else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nnot found: this process kubelet serves only /containerLogs of its running pods\n").await?;
        return Ok(s.shutdown().await?);
    };
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        .await?;
    let data = tokio::fs::read(&log).await.unwrap_or_default();
    let mut sent = data.len() as u64;
    let mut out: &[u8] = &data;
    if let Some(n) = q("tailLines").and_then(|v| v.parse().ok()) {
        out = tail(out, n);
    }
    if let Some(n) = q("limitBytes").and_then(|v| v.parse::<usize>().ok()) {
        out = &out[..out.len().min(n)];
    }
    s.write_all(out).await?;
    if q("follow") == Some("true") {
        // stream what is appended until the client leaves or the pod is gone
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(mut f) = tokio::fs::File::open(&log).await else {
                break;
            };
            let len = f.metadata().await?.len();
            if len > sent {
                f.seek(std::io::SeekFrom::Start(sent)).await?;
                let mut more = Vec::new();
                (&mut f).take(len - sent).read_to_end(&mut more).await?;
                s.write_all(&more).await?;
                s.flush().await?;
                sent = len;
            }
        }
    }
    Ok(s.shutdown().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
    }

    #[test]
    fn targets() {
        let (segs, q) = parse_target("/containerLogs/ns/p/c?follow=true&tailLines=3");
        assert_eq!(segs, ["containerLogs", "ns", "p", "c"]);
        assert_eq!(q[1], ("tailLines".to_string(), "3".to_string()));
    }
}
