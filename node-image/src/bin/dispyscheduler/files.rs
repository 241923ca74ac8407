//! Files on their way from a client to nodes: a computation's `depends` and a job's
//! `dispy_job_depends` are sent to the scheduler first (dispy's `FILEXFER:`), kept under
//! `<dest_path_prefix>/<compute id>/`, and sent on to each node that needs them.
//!
//! dispy's transfer: the receiver says how much it has (a pickled int), the sender sends up
//! to 1,024,000 raw bytes, until all is there. Names come from clients: only relative paths
//! that stay inside the computation's directory are accepted, and sizes are bounded by
//! `--max_file_size`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dispy_core::pickle::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::messages::{deserialize, serialize, XferFile};
use crate::net::{self, Stream};
use crate::sched::set_attr;

/// dispy's chunk.
pub const CHUNK: u64 = 1_024_000;
/// How long a sender may send nothing in the middle of a file.
const IDLE: Duration = Duration::from_secs(30);

/// The file's place under a computation's directory, refused when it would leave it.
pub fn relative(xf: &XferFile) -> Result<PathBuf, String> {
    let rel = xf.relative_path();
    let mut out = PathBuf::new();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("file {:?}: a path with '..' is refused", xf.name)),
            p if p.contains('\\') || p.contains('\0') => {
                return Err(format!("file {:?}: not a plain file name", xf.name))
            }
            p => out.push(p),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("file {:?}: no file name", xf.name));
    }
    Ok(out)
}

/// The computation's directory under the prefix.
pub fn dir(prefix: &Path, compute_id: i64) -> PathBuf {
    prefix.join(compute_id.to_string())
}

/// The `_XferFile` as nodes get it: its name is our copy's path.
pub fn for_nodes(xf: &Value, local: &Path) -> Value {
    let mut v = xf.clone();
    set_attr(
        &mut v,
        "name",
        Value::Str(local.to_string_lossy().into_owned()),
    );
    set_attr(&mut v, "sep", Value::from("/"));
    v
}

fn same_file(path: &Path, xf: &XferFile) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    meta.len() == xf.size && (mtime - xf.mtime).abs() <= 1.0
}

/// Receives a file from a client into `path`; the answer to send last is what was received
/// (-1 on failure).
pub async fn receive(s: &mut Stream, path: &Path, xf: &XferFile) -> Result<u64, String> {
    use std::io::Write;
    if same_file(path, xf) {
        return Ok(xf.size);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let partial = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut file =
        std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut received = 0u64;
    let mut buf = vec![0u8; CHUNK.min(xf.size) as usize];
    let result = async {
        while received < xf.size {
            net::send(s, &serialize(&Value::Int(received as i64))).await?;
            let n = CHUNK.min(xf.size - received) as usize;
            tokio::time::timeout(IDLE, s.read_exact(&mut buf[..n]))
                .await
                .map_err(|_| {
                    format!(
                        "after {received} of {} bytes: nothing for {IDLE:?}",
                        xf.size
                    )
                })?
                .map_err(|e| format!("after {received} of {} bytes: {e}", xf.size))?;
            file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            received += n as u64;
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    let time = |t: f64| std::time::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0));
    let times = std::fs::FileTimes::new()
        .set_accessed(time(xf.atime))
        .set_modified(time(xf.mtime));
    file.set_times(times).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &partial,
        std::fs::Permissions::from_mode((xf.mode & 0o777) | 0o600),
    )
    .map_err(|e| e.to_string())?;
    std::fs::rename(&partial, path).map_err(|e| e.to_string())?;
    Ok(received)
}

/// Sends our copy of a file (`xf` already names it, see [`for_nodes`]) to a node.
pub async fn send(mut s: Stream, auth: &[u8], xf: &Value, max: usize) -> Result<(), String> {
    let info = XferFile::from_value(xf)?;
    s.write_all(auth).await.map_err(|e| e.to_string())?;
    net::send(&mut s, &[&b"FILEXFER:"[..], &serialize(xf)].concat()).await?;
    let answer = |bytes: Vec<u8>| -> Result<i64, String> {
        match deserialize("FILEXFER answer", &bytes, max)? {
            Value::Int(n) => Ok(n),
            other => Err(format!("the node answered a {}", other.kind())),
        }
    };
    let mut recvd = answer(net::recv(&mut s, 4096).await?)?;
    let mut file = tokio::fs::File::open(&info.name)
        .await
        .map_err(|e| format!("{}: {e}", info.name))?;
    let mut sent = 0i64;
    let mut buf = vec![0u8; CHUNK as usize];
    while sent == recvd && (recvd as u64) < info.size {
        let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        sent += n as i64;
        recvd = answer(net::recv(&mut s, 4096).await?)?;
    }
    if recvd as u64 == info.size {
        Ok(())
    } else {
        Err(format!(
            "the node took {recvd} of {} bytes of {:?}",
            info.size, info.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xf(name: &str, dest: &str) -> XferFile {
        XferFile {
            name: name.into(),
            dest_path: dest.into(),
            compute_id: 1,
            size: 3,
            mtime: 0.0,
            atime: 0.0,
            mode: 0o644,
            sep: "/".into(),
        }
    }

    #[test]
    fn a_client_file_stays_inside_the_computation_directory() {
        assert_eq!(
            relative(&xf("/home/u/data.txt", ".")).unwrap(),
            PathBuf::from("data.txt")
        );
        assert_eq!(
            relative(&xf("/home/u/sub/d.txt", "sub")).unwrap(),
            PathBuf::from("sub/d.txt")
        );
        assert!(relative(&xf("/x/d.txt", "../../etc"))
            .unwrap_err()
            .contains(".."));
        assert!(relative(&xf("/x/..", ".")).is_err());
    }
}
