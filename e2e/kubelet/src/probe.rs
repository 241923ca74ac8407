//! Readiness and liveness probes: exec, httpGet (plain HTTP) and tcpSocket.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::spec::Launch;

pub fn timeout(p: &Probe) -> Duration {
    Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64)
}

fn port(c: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16)
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Runs one probe; Err carries the reason it failed.
pub async fn run(p: &Probe, c: &Container, launch: &Launch, pod_ip: &str) -> Result<(), String> {
    let limit = timeout(p);
    let fut = async {
        if let Some(e) = &p.exec {
            let argv = e.command.clone().unwrap_or_default();
            let (prog, rest) = argv.split_first().ok_or("exec probe without command")?;
            let mut cmd = tokio::process::Command::new(prog);
            cmd.args(rest)
                .env_clear()
                .envs(launch.env.iter().cloned())
                .current_dir(&launch.cwd)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            let st = cmd
                .status()
                .await
                .map_err(|e| format!("exec {prog}: {e}"))?;
            return if st.success() {
                Ok(())
            } else {
                Err(format!("exec {prog}: {st}"))
            };
        }
        if let Some(h) = &p.http_get {
            if h.scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            {
                return Err(
                    "httpGet with scheme HTTPS is not supported by the process kubelet".into(),
                );
            }
            let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let port = port(c, &h.port)?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            let mut s = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("GET http://{host}:{port}{path}: {e}"))?;
            let mut req = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\n"
            );
            for hdr in h.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", hdr.name, hdr.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let r = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("GET http://{host}:{port}{path}: bad response {line:?}"))?;
            return if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("GET http://{host}:{port}{path}: status {code}"))
            };
        }
        if let Some(t) = &p.tcp_socket {
            let host = t.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let port = port(c, &t.port)?;
            TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("tcp {host}:{port}: {e}"))?;
            return Ok(());
        }
        Err("probe has no exec, httpGet or tcpSocket (grpc is not supported)".into())
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {limit:?}")),
    }
}
