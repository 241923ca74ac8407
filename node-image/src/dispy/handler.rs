//! One dispy request: a connection that opened with 40 bytes of auth and carries one
//! `PREFIX:` + pickle frame. Each handler answers as dispy 4.15's node does, with a clear
//! error where the client expects an answer and the request was wrong.
//!
//! One extension: after an authorized `JOB` the connection stays open for the next request
//! (its own auth prefix again, checked again), for [`PEER_WAITS`]. Our dispyscheduler
//! sends its jobs so to a node whose PONG says `job_keepalive`, saving a connection per job;
//! dispy's clients close the connection after the `ACK`, which ends it here as before.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispy_core::client::Stream;
use dispy_core::frame::{frame_within, read_frame, FrameError, MAX_LEN};
use dispy_core::pickle::Value;
use dispy_core::protocol::{
    Computation, ComputeRequest, JobRequest, ProgramComputation, PythonComputation,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::AUTH_LEN;
use super::messages::{
    avail_info, deserialize, dict, serialize, split, uid, Compute, Job, JobReply, XferFile,
};
use super::{Dispy, DispyComp};
use crate::kept::PEER_WAITS;
use crate::limits::{Permit, PREAUTH_MAX};
use crate::node::{safe_relative, Codec};

/// dispy's file transfer chunk.
const CHUNK: u64 = 1_024_000;
/// A transfer whose client sends nothing for this long is abandoned.
const TRANSFER_IDLE: Duration = Duration::from_secs(60);

struct Conn {
    stream: Box<dyn Stream>,
    peer: SocketAddr,
}

impl Conn {
    async fn reply(&mut self, msg: &[u8]) {
        let framed = match frame_within(msg, MAX_LEN) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(peer = %self.peer, "answer not sent: {e}");
                return;
            }
        };
        // Flushed: on a kept connection (and under TLS) nothing else would send it.
        let sent = match self.stream.write_all(&framed).await {
            Ok(()) => self.stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::debug!(peer = %self.peer, "cannot answer the dispy client: {e}");
        }
    }

    async fn reply_value(&mut self, v: &Value) {
        self.reply(&serialize(v)).await
    }
}

/// Serves one connection whose first 4 bytes (of the auth prefix) were read by the sniffer.
/// Reading the auth prefix and the request is bounded in time and size (`--msg_timeout`, and
/// [`PREAUTH_MAX`] unless the prefix is this node's token); serving it is not, so a setup,
/// a cleanup or a transfer takes as long as it takes.
pub async fn serve(
    dispy: Arc<Dispy>,
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    local: IpAddr,
    first: [u8; 4],
    permit: Permit,
) -> Result<(), String> {
    let mut conn = Conn { stream, peer };
    let mut first = first;
    let mut permit = Some(permit);
    let mut kept = None;
    loop {
        let (keep, result) = serve_one(&dispy, &mut conn, local, first, &mut permit).await;
        if keep && kept.is_none() {
            kept = dispy.kept.clone().try_acquire_owned().ok();
        }
        if !keep || kept.is_none() {
            let _ = conn.stream.shutdown().await;
            return result;
        }
        match tokio::time::timeout(PEER_WAITS, conn.stream.read_exact(&mut first)).await {
            Ok(Ok(_)) => {}
            // Closed by the client (dispy's close after the ACK), or idle.
            _ => return result,
        }
    }
}

/// Serves one request on `conn`; whether the connection stays open for another (after an
/// authorized JOB that was taken).
async fn serve_one(
    dispy: &Arc<Dispy>,
    conn: &mut Conn,
    local: IpAddr,
    first: [u8; 4],
    permit: &mut Option<Permit>,
) -> (bool, Result<(), String>) {
    let peer = conn.peer;
    let within = dispy.node.cfg.msg_timeout;
    let request = tokio::time::timeout(within, read_request(dispy, &mut conn.stream, first))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "dispy client: no whole request within {within:?} (--msg_timeout)"
            ))
        });
    let (authorized, admin, msg) = match request {
        Ok(r) => r,
        Err(e) => {
            dispy.node.metrics.bad_requests.inc();
            tracing::warn!(%peer, "{e}");
            return (false, Err(e));
        }
    };
    // An authenticated client no longer counts against the pre-auth limits.
    if authorized {
        permit.take();
    }
    let (command, body) = split(&msg);
    let result = match (command, authorized) {
        ("PING", _) => {
            dispy.udp_ping(body, peer, local);
            Ok(())
        }
        ("NODE_STATUS", _) => {
            let status = if authorized || admin {
                dispy.status()
            } else {
                Value::Int(-1)
            };
            conn.reply_value(&status).await;
            Ok(())
        }
        // dispyadmin asks for the sign first (it is public: in every PING), then proves
        // `--admin_secret` over it.
        ("NODE_INFO", _) if !(authorized || admin) => {
            conn.reply(dispy.sign.as_bytes()).await;
            Ok(())
        }
        ("NODE_INFO", _) => {
            conn.reply_value(&dispy.node_info()).await;
            Ok(())
        }
        ("SET_CPUS" | "SERVICE_TIME" | "SERVE_CLIENTS", _) if admin => {
            let answer = match deserialize(command, body, dispy.node.cfg.max_frame) {
                Ok(info) => dispy.admin(command, &info),
                Err(e) => Err(e),
            };
            let reply = answer.clone().unwrap_or(Value::Int(-1));
            conn.reply_value(&reply).await;
            answer.map(|_| ())
        }
        ("SET_CPUS" | "SERVICE_TIME" | "SERVE_CLIENTS", _) => {
            dispy.node.metrics.auth_failures.inc();
            conn.reply_value(&Value::Int(-1)).await;
            Err(format!(
                "dispy admin request {command} refused: it needs this node's --admin_secret"
            ))
        }
        (_, false) => {
            dispy.node.metrics.auth_failures.inc();
            conn.reply(
                b"NAK (authentication failed: the client's secret is not this node's --secret)",
            )
            .await;
            Err(format!(
                "dispy client refused: {command}: authentication failed (wrong secret?)"
            ))
        }
        ("COMPUTE", true) => dispy.compute(conn, body).await,
        ("FILEXFER", true) => dispy.file(conn, body).await,
        ("SETUP", true) => dispy.setup(conn, body).await,
        ("JOB", true) => dispy.job(conn, body).await,
        ("TERMINATE_JOB", true) => dispy.terminate(body),
        ("CLOSE", true) => dispy.close_request(conn, body).await,
        ("JOBS" | "PENDING_JOBS" | "RETRIEVE_JOB" | "RESEND_JOB_RESULTS", true) => {
            dispy.results_request(conn, command, body).await
        }
        (other, true) => {
            let error = format!("NAK (invalid command: {other:?})");
            conn.reply(error.as_bytes()).await;
            Err(format!("dispy client: {error}"))
        }
    };
    if let Err(e) = &result {
        dispy.node.metrics.bad_requests.inc();
        tracing::warn!(%peer, "{e}");
    }
    (command == "JOB" && authorized && result.is_ok(), result)
}

/// The auth prefix and the request frame; whether the prefix is this node's token.
async fn read_request(
    dispy: &Dispy,
    stream: &mut Box<dyn Stream>,
    first: [u8; 4],
) -> Result<(bool, bool, Vec<u8>), String> {
    let mut auth = [0u8; AUTH_LEN];
    auth[..4].copy_from_slice(&first);
    stream
        .read_exact(&mut auth[4..])
        .await
        .map_err(|e| format!("dispy client: connection closed inside the auth prefix: {e}"))?;
    let authorized = dispy.is_token(&auth);
    let admin = dispy.is_admin_token(&auth);
    let max = if authorized {
        dispy.node.cfg.max_frame
    } else {
        PREAUTH_MAX
    };
    let msg = read_frame(stream, max).await.map_err(|e| match e {
        FrameError::TooLarge { len, max } if !authorized => format!(
            "dispy client: a request of {len} bytes without this node's auth (at most {max} bytes are read before a client has proven the secret)"
        ),
        e => format!("dispy client: {e}"),
    })?;
    Ok((authorized, admin, msg.unwrap_or_default()))
}

fn compute_id_of(info: &Value) -> Result<i64, String> {
    info.attr("compute_id")
        .and_then(Value::as_int)
        .ok_or_else(|| "the request names no compute_id".to_string())
}

impl Dispy {
    fn status(&self) -> Value {
        let (busy, _, _) = self.node.load();
        let st = self.state.lock().unwrap();
        dict([
            ("busy", Value::Int(busy as i64)),
            (
                "serve",
                Value::Int(self.node.serve_limit().map_or(-1, |n| n as i64)),
            ),
            ("clients_done", Value::Int(0)),
            ("jobs_done", Value::Int(0)),
            ("cpu_time", Value::Float(0.0)),
            (
                "scheduler_ip",
                st.client.as_ref().map(|c| c.0.clone()).into(),
            ),
            ("avail_info", avail_info(self.node.avail())),
        ])
    }

    /// `NODE_INFO` for dispy's admin: the status, the node's name, cpus and service times.
    fn node_info(&self) -> Value {
        let Value::Dict(mut info) = self.status() else {
            unreachable!("status() is a dict")
        };
        let (start, stop, end) = self.node.window().times();
        let at = |t: Option<u32>| t.map(crate::service::today_at).into();
        let (busy, cpus, _) = self.node.load();
        for (k, v) in [
            ("name", self.node.cfg.name.clone().into()),
            ("service_start", at(start)),
            ("service_stop", at(stop)),
            ("service_end", at(end)),
            ("cpus", Value::Int(cpus.saturating_sub(busy) as i64)),
            ("max_cpus", Value::Int(self.node.cfg.cpus as i64)),
        ] {
            info.push((k.into(), v));
        }
        Value::Dict(info)
    }

    /// dispy's admin requests that change the node, answered as dispynode.py answers them.
    fn admin(self: &Arc<Self>, command: &str, info: &Value) -> Result<Value, String> {
        match command {
            "SET_CPUS" => {
                let n = info
                    .attr("cpus")
                    .and_then(Value::as_int)
                    .ok_or("SET_CPUS names no cpus")?;
                let all = self.node.cfg.cpus as i64;
                let cpus = if n < 0 { all + n } else { n };
                let cpus = u32::try_from(cpus)
                    .ok()
                    .filter(|c| *c as i64 <= all)
                    .ok_or_else(|| {
                        format!("SET_CPUS {n}: give a number from -{} to {all}", all - 1)
                    })?;
                self.node.set_cpus(cpus)?;
                Ok(dict([("cpus", Value::Int(cpus as i64))]))
            }
            "SERVE_CLIENTS" => {
                let serve = info
                    .attr("serve")
                    .and_then(Value::as_int)
                    .ok_or("SERVE_CLIENTS names no serve count")?;
                self.node.set_serve_limit(u64::try_from(serve).ok());
                Ok(dict([("serve", Value::Int(serve))]))
            }
            _ => {
                // {control: start_time | stop_time | end_time, time: "HH:MM", or "0" for none}
                let control = info.attr("control").and_then(Value::as_str).unwrap_or("");
                let minute = match info.attr("time").and_then(Value::as_str) {
                    None => Some(crate::service::local_minute()),
                    Some("0") => None,
                    Some(t) => Some(crate::config::parse_time_of_day(t)?),
                };
                let (mut start, mut stop, mut end) = self.node.window().times();
                match control {
                    "start_time" => start = minute,
                    "stop_time" => stop = minute,
                    "end_time" => end = minute,
                    other => return Err(format!("SERVICE_TIME: unknown control {other:?}")),
                }
                let window = crate::service::Window::new(start, stop, end)?;
                self.node.set_window(window);
                let at = |t: Option<u32>| t.map(crate::service::today_at).into();
                Ok(dict([
                    ("service_start", at(start)),
                    ("service_stop", at(stop)),
                    ("service_end", at(end)),
                ]))
            }
        }
    }

    /// The node computation of a dispy computation, checking its `auth` when given.
    fn node_id(&self, compute_id: i64, auth: Option<&Value>) -> Result<String, String> {
        let st = self.state.lock().unwrap();
        let comp = st
            .comps
            .get(&compute_id)
            .ok_or_else(|| format!("unknown computation {compute_id} (closed, or never sent)"))?;
        if let Some(auth) = auth {
            if auth.as_str() != Some(comp.compute.auth.as_str()) {
                return Err(format!(
                    "request for computation {compute_id} with the wrong computation auth"
                ));
            }
        }
        Ok(comp.node_id.clone())
    }

    async fn compute(self: &Arc<Self>, conn: &mut Conn, body: &[u8]) -> Result<(), String> {
        let compute = match deserialize("COMPUTE", body, self.node.cfg.max_frame)
            .and_then(|v| Compute::from_value(&v))
        {
            Ok(c) => c,
            Err(e) => {
                conn.reply(format!("Invalid computation request: {e}").as_bytes())
                    .await;
                return Err(format!("dispy COMPUTE refused: {e}"));
            }
        };
        let client = (compute.scheduler_ip_addr.clone(), compute.scheduler_port);
        let conflict = {
            let st = self.state.lock().unwrap();
            match st.client.clone() {
                Some(serving) if serving != client => Some((
                    Value::from("Node busy"),
                    format!(
                        "dispy COMPUTE from {}:{} refused: the node serves the client at {}:{}",
                        client.0, client.1, serving.0, serving.1
                    ),
                )),
                _ if st.comps.contains_key(&compute.id) => Some((
                    Value::from("Computation already exists on this node"),
                    format!("dispy COMPUTE {} sent twice", compute.id),
                )),
                _ => None,
            }
        };
        if let Some((answer, error)) = conflict {
            conn.reply_value(&answer).await;
            return Err(error);
        }
        for xf in &compute.xfer_files {
            if let Err(e) = self.node.check_size(&xf.name, xf.size) {
                conn.reply(e.message.as_bytes()).await;
                return Err(format!("dispy COMPUTE refused: {}", e.message));
            }
        }
        let node_id = format!("dispy_{}", compute.id);
        let (session, outbox) = self.subscribe(compute.id);
        let req = ComputeRequest {
            computation: node_id.clone(),
            spec: spec(&compute, None, &self.node.cfg.python),
            keep_files: compute.keep_files,
        };
        if let Err(e) = self.node.compute(
            session,
            &outbox,
            self.owner.clone(),
            req,
            compute.dir().as_deref(),
        ) {
            conn.reply(e.message.as_bytes()).await;
            return Err(format!("dispy COMPUTE refused: {}", e.message));
        }
        tracing::info!(
            computation = %node_id,
            name = %compute.name,
            client = %format!("{}:{}", client.0, client.1),
            "dispy computation registered"
        );
        {
            let mut st = self.state.lock().unwrap();
            st.client = Some(client);
            st.comps.insert(
                compute.id,
                DispyComp {
                    compute,
                    node_id,
                    hashes: Default::default(),
                    last_contact: Instant::now(),
                    set_up: false,
                    resetting: false,
                    held: Vec::new(),
                },
            );
        }
        conn.reply_value(&Value::Int(self.node.load().1.max(1) as i64))
            .await;
        Ok(())
    }

    /// `FILEXFER:`: the receiver drives — it says how much it has (a pickled int), the sender
    /// sends up to 1,024,000 raw bytes, until all is there. A file already present with the
    /// same size and an mtime within a second is not sent again.
    async fn file(self: &Arc<Self>, conn: &mut Conn, body: &[u8]) -> Result<(), String> {
        let refuse = |e: String| format!("dispy FILEXFER refused: {e}");
        let xf = match deserialize("FILEXFER", body, self.node.cfg.max_frame)
            .and_then(|v| XferFile::from_value(&v))
        {
            Ok(xf) => xf,
            Err(e) => {
                conn.reply_value(&Value::Int(-1)).await;
                return Err(refuse(e));
            }
        };
        let target = self.node_id(xf.compute_id, None).and_then(|id| {
            self.node
                .check_size(&xf.name, xf.size)
                .map_err(|e| e.message)?;
            let rel = safe_relative(&xf.relative_path()).map_err(|e| e.message)?;
            Ok(self.node.comp_dir(&id).map_err(|e| e.message)?.join(rel))
        });
        let path = match target {
            Ok(p) => p,
            Err(e) => {
                conn.reply_value(&Value::Int(-1)).await;
                return Err(refuse(e));
            }
        };
        if same_file(&path, &xf) {
            conn.reply_value(&Value::Int(xf.size as i64)).await;
            return Ok(());
        }
        let partial = path.with_file_name(format!(
            ".{}.partial",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let received = self.receive(conn, &partial, &xf).await;
        match received.and_then(|()| std::fs::rename(&partial, &path).map_err(|e| e.to_string())) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                self.abandon_unset(xf.compute_id, "its file transfer broke");
                Err(format!("dispy FILEXFER of {:?} failed: {e}", xf.name))
            }
        }
    }

    /// A computation whose client went away before its setup was done is closed, so the node
    /// is free for the next client: that client will not come back to it.
    fn abandon_unset(self: &Arc<Self>, compute_id: i64, why: &str) {
        let unset = {
            let st = self.state.lock().unwrap();
            st.comps.get(&compute_id).is_some_and(|c| !c.set_up)
        };
        if unset {
            tracing::warn!(
                compute_id,
                "dispy computation closed before its setup: {why}"
            );
            let dispy = self.clone();
            tokio::spawn(async move { dispy.close(compute_id, true).await });
        }
    }

    async fn receive(
        &self,
        conn: &mut Conn,
        path: &std::path::Path,
        xf: &XferFile,
    ) -> Result<(), String> {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
        let mut received = 0u64;
        let mut buf = vec![0u8; CHUNK.min(xf.size) as usize];
        while received < xf.size {
            conn.reply_value(&Value::Int(received as i64)).await;
            let n = CHUNK.min(xf.size - received) as usize;
            tokio::time::timeout(TRANSFER_IDLE, conn.stream.read_exact(&mut buf[..n]))
                .await
                .map_err(|_| format!("after {received} of {} bytes: the client sent nothing for {TRANSFER_IDLE:?}", xf.size))?
                .map_err(|e| format!("after {received} of {} bytes: {e}", xf.size))?;
            file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            received += n as u64;
        }
        conn.reply_value(&Value::Int(received as i64)).await;
        let time = |t: f64| std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t.max(0.0));
        let times = std::fs::FileTimes::new()
            .set_accessed(time(xf.atime))
            .set_modified(time(xf.mtime));
        file.set_times(times).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        let mode = (xf.mode & 0o7777) | 0o600;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn setup(self: &Arc<Self>, conn: &mut Conn, body: &[u8]) -> Result<(), String> {
        let info = deserialize("SETUP", body, self.node.cfg.max_frame)?;
        let compute_id = compute_id_of(&info)?;
        let setup_args = info
            .attr("setup_args")
            .cloned()
            .unwrap_or(Value::Tuple(vec![]));
        let prepared = {
            let st = self.state.lock().unwrap();
            st.comps.get(&compute_id).map(|c| {
                let compute = &c.compute;
                let env = serde_json::json!({
                    "dispy_node_ip_addr": compute.node_ip_addr,
                    "_dispy_client_reply_addr": compute.client_reply_addr.clone().unwrap_or_else(|| compute.reply_addr()),
                    "_dispy_certfile": self.node.cfg.certfile,
                    "_dispy_compute_id": compute.id,
                });
                let args = hex(&serialize(&setup_args));
                (c.node_id.clone(), spec(compute, Some(args), &self.node.cfg.python), env)
            })
        };
        let Some((node_id, spec, env)) = prepared else {
            conn.reply(format!("unknown computation {compute_id}").as_bytes())
                .await;
            return Err(format!("dispy SETUP for unknown computation {compute_id}"));
        };
        let env = match env {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        };
        let outcome = match self.node.configure(&node_id, spec, Codec::Pickle, env) {
            Ok(()) => self.node.setup(&node_id).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) if client_gone(&mut conn.stream).await => {
                let dispy = self.clone();
                tokio::spawn(async move { dispy.close(compute_id, true).await });
                Err(format!(
                    "dispy SETUP of computation {compute_id}: the client hung up before its setup finished; computation closed"
                ))
            }
            Ok(()) => {
                let held = match self.state.lock().unwrap().comps.get_mut(&compute_id) {
                    Some(c) => {
                        c.set_up = true;
                        c.resetting = false;
                        c.last_contact = Instant::now();
                        std::mem::take(&mut c.held)
                    }
                    None => Vec::new(),
                };
                if !held.is_empty() {
                    let rejected = self.node.submit_calls(&node_id, held);
                    match rejected {
                        Ok(r) if r.is_empty() => {}
                        Ok(r) => tracing::warn!(
                            compute_id,
                            "{} job(s) held during the resetup refused: {:?}",
                            r.len(),
                            r
                        ),
                        Err(e) => tracing::warn!(
                            compute_id,
                            "jobs held during the resetup refused: {}",
                            e.message
                        ),
                    }
                }
                conn.reply(b"ACK").await;
                Ok(())
            }
            Err(e) => {
                conn.reply(e.message.as_bytes()).await;
                let dispy = self.clone();
                tokio::spawn(async move { dispy.close(compute_id, true).await });
                Err(format!("dispy SETUP failed: {}", e.message))
            }
        }
    }

    async fn job(&self, conn: &mut Conn, body: &[u8]) -> Result<(), String> {
        let job = match deserialize("JOB", body, self.node.cfg.max_frame)
            .and_then(|v| Job::from_value(&v))
        {
            Ok(j) => j,
            Err(e) => {
                conn.reply(format!("Invalid job ({e})").as_bytes()).await;
                return Err(format!("dispy JOB refused: {e}"));
            }
        };
        let prepared = {
            let mut st = self.state.lock().unwrap();
            st.comps.get_mut(&job.compute_id).map(|c| {
                c.last_contact = Instant::now();
                // Before the job is queued: a fast job's reply needs it.
                c.hashes.insert(job.uid, job.hash.clone());
                (c.node_id.clone(), c.compute.program)
            })
        };
        let Some((node_id, program)) = prepared else {
            let error = format!(
                "Invalid computation (node may have closed computation {})",
                job.compute_id
            );
            conn.reply(error.as_bytes()).await;
            return Err(format!("dispy JOB refused: {error}"));
        };
        let depends: Vec<String> = job.xfer_files.iter().map(XferFile::relative_path).collect();
        let (args, call) = if program {
            match job.program_args(self.node.cfg.max_frame) {
                Ok(a) => (serde_json::to_string(&a).unwrap_or_default(), None),
                Err(e) => {
                    self.forget(job.compute_id, job.uid, &job.hash);
                    conn.reply(format!("Invalid job ({e})").as_bytes()).await;
                    return Err(format!("dispy JOB refused: {e}"));
                }
            }
        } else {
            ("[]".to_string(), Some(job.host_call()))
        };
        let req = JobRequest {
            id: job.uid,
            args,
            kwargs: "{}".into(),
            depends,
        };
        let held = {
            let mut st = self.state.lock().unwrap();
            match st.comps.get_mut(&job.compute_id) {
                Some(c) if c.resetting => {
                    c.held.push((req.clone(), call.clone()));
                    true
                }
                _ => false,
            }
        };
        if held {
            conn.reply(b"ACK").await;
            return Ok(());
        }
        let refused = match self.node.submit_calls(&node_id, vec![(req, call)]) {
            Ok(rejected) => rejected.into_iter().next().map(|r| r.error.message),
            Err(e) => Some(e.message),
        };
        match refused {
            None => {
                conn.reply(b"ACK").await;
                Ok(())
            }
            Some(error) => {
                self.forget(job.compute_id, job.uid, &job.hash);
                conn.reply(format!("Invalid job ({error})").as_bytes())
                    .await;
                Err(format!("dispy JOB refused: {error}"))
            }
        }
    }

    fn forget(&self, compute_id: i64, uid: u64, hash: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(c) = st.comps.get_mut(&compute_id) {
            if c.hashes.get(&uid).is_some_and(|h| h == hash) {
                c.hashes.remove(&uid);
            }
        }
    }

    /// `TERMINATE_JOB:` (no answer): the job is terminated and its reply says Terminated.
    fn terminate(&self, body: &[u8]) -> Result<(), String> {
        let job = deserialize("TERMINATE_JOB", body, self.node.cfg.max_frame)
            .and_then(|v| Job::from_value(&v))?;
        let node_id = {
            let st = self.state.lock().unwrap();
            st.comps
                .get(&job.compute_id)
                .filter(|c| c.hashes.get(&job.uid) == Some(&job.hash))
                .map(|c| c.node_id.clone())
        };
        let node_id =
            node_id.ok_or_else(|| format!("dispy TERMINATE_JOB for an unknown job {}", job.uid))?;
        tracing::info!(computation = %node_id, job = job.uid, "terminating a job at the client's request");
        self.node
            .cancel(&node_id, job.uid)
            .map_err(|e| format!("dispy TERMINATE_JOB: {}", e.message))
    }

    /// `CLOSE:`: answered with `ACK` once the jobs are done (or terminated, with
    /// `terminate_pending`) and cleanup has run.
    async fn close_request(self: &Arc<Self>, conn: &mut Conn, body: &[u8]) -> Result<(), String> {
        let info = deserialize("CLOSE", body, self.node.cfg.max_frame)?;
        let compute_id = compute_id_of(&info)?;
        let checked = self.node_id(compute_id, Some(info.attr("auth").unwrap_or(&Value::None)));
        let result = match checked {
            Ok(_) => {
                let terminate = info
                    .attr("terminate_pending")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                // `close: False` is dispy's resetup_node: set up again afterwards.
                if info.attr("close").and_then(Value::as_bool) == Some(false) {
                    self.reset(compute_id, terminate).await
                } else {
                    self.close(compute_id, terminate).await;
                    tracing::info!(compute_id, "dispy computation closed by its client");
                    Ok(())
                }
            }
            Err(e) => Err(format!("dispy CLOSE ignored: {e}")),
        };
        // dispy's node acknowledges every close.
        conn.reply(b"ACK").await;
        result
    }

    /// `JOBS:`, `PENDING_JOBS:`, `RETRIEVE_JOB:` and `RESEND_JOB_RESULTS:`, all authorized by
    /// the computation's own auth.
    async fn results_request(
        &self,
        conn: &mut Conn,
        command: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let info = deserialize(command, body, self.node.cfg.max_frame)?;
        let compute_id = compute_id_of(&info)?;
        let node_id =
            match self.node_id(compute_id, Some(info.attr("auth").unwrap_or(&Value::None))) {
                Ok(id) => id,
                Err(e) => {
                    let empty = match command {
                        "JOBS" => Value::List(vec![]),
                        "RESEND_JOB_RESULTS" => Value::Int(0),
                        "PENDING_JOBS" => {
                            dict([("done", Value::List(vec![])), ("pending", Value::Int(0))])
                        }
                        _ => Value::None,
                    };
                    conn.reply_value(&empty).await;
                    return Err(format!("dispy {command}: {e}"));
                }
            };
        self.touch(compute_id);
        let uids =
            |ids: Vec<u64>| Value::List(ids.into_iter().map(|u| Value::Int(u as i64)).collect());
        let err = |e: dispy_core::protocol::NodeError| format!("dispy {command}: {}", e.message);
        match command {
            "JOBS" => {
                let ids = self.node.job_ids(&node_id).map_err(err)?;
                conn.reply_value(&uids(ids)).await;
            }
            "PENDING_JOBS" => {
                let done = self.node.done_ids(&node_id).map_err(err)?;
                let pending = self.node.job_ids(&node_id).map_err(err)?.len();
                conn.reply_value(&dict([
                    ("done", uids(done)),
                    ("pending", Value::Int(pending as i64)),
                ]))
                .await;
            }
            "RESEND_JOB_RESULTS" => {
                let count = self.node.done_ids(&node_id).map_err(err)?.len()
                    + self.node.job_ids(&node_id).map_err(err)?.len();
                conn.reply_value(&Value::Int(count as i64)).await;
                self.node.resend_results(&node_id);
            }
            _ => return self.retrieve(conn, compute_id, &node_id, &info).await,
        }
        Ok(())
    }

    /// `RETRIEVE_JOB:`: a saved result, then the client's `ACK` lets it go.
    async fn retrieve(
        &self,
        conn: &mut Conn,
        compute_id: i64,
        node_id: &str,
        info: &Value,
    ) -> Result<(), String> {
        let job = info.attr("uid").and_then(uid);
        let hash = info.attr("hash").and_then(Value::as_str).unwrap_or("");
        let found = job.and_then(|job| {
            let st = self.state.lock().unwrap();
            let comp = st.comps.get(&compute_id)?;
            (comp.hashes.get(&job).map(String::as_str) == Some(hash)).then_some(())?;
            let result = self.node.done_result(node_id, job).ok()??;
            let reply = JobReply {
                uid: job,
                hash,
                ip_addr: &comp.compute.node_ip_addr,
                program: comp.compute.program,
                result: &result,
            };
            Some((job, reply.encode()))
        });
        let Some((job, reply)) = found else {
            conn.reply_value(&Value::None).await;
            return Ok(());
        };
        conn.reply(&reply).await;
        let ack = read_frame(&mut conn.stream, 64).await.ok().flatten();
        if ack.as_deref() == Some(b"ACK") {
            self.forget(compute_id, job, hash);
            let _ = self.node.ack(node_id, &[job]);
        }
        Ok(())
    }
}

/// Whether the client has closed its end while its request was served (EOF already there).
async fn client_gone(stream: &mut Box<dyn Stream>) -> bool {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await;
    matches!(read, Ok(Ok(0)) | Ok(Err(_)))
}

/// dispy's `_same_file`: same size and an mtime within a second.
fn same_file(path: &std::path::Path, xf: &XferFile) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    meta.is_file() && meta.len() == xf.size && mtime.is_some_and(|m| (m - xf.mtime).abs() <= 1.0)
}

/// The node's spec of a dispy computation. A program is the file the client sent along with
/// the computation; a `.py` program runs under the node's Python, as on dispy's node.
fn spec(compute: &Compute, setup_args: Option<String>, python: &std::path::Path) -> Computation {
    if compute.program {
        let program = compute
            .xfer_files
            .iter()
            .find(|xf| xf.name == compute.name)
            .map(XferFile::relative_path)
            .unwrap_or_else(|| {
                compute
                    .name
                    .rsplit('/')
                    .next()
                    .unwrap_or(&compute.name)
                    .to_string()
            });
        let program = format!("./{program}");
        let command = if program.ends_with(".py") {
            vec![python.display().to_string(), program]
        } else {
            vec![program]
        };
        return Computation::Program(ProgramComputation {
            command,
            env: vec![],
        });
    }
    Computation::Python(PythonComputation {
        source: compute.code.clone(),
        function: compute.name.clone(),
        setup: compute.setup.clone(),
        setup_args: setup_args.map(|hex| serde_json::Value::String(hex).to_string()),
        cleanup: compute.cleanup.clone(),
        reuse_workers: false,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
