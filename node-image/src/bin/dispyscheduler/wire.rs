//! The messages of dispy 4.15's shared scheduler as data: what `SharedJobCluster` clients and
//! nodes send it, read from decoded pickles, and what it sends them, built as [`Value`]s.
//! Pure: values in, values out; a malformed message is an error naming what was wrong.

use dispy_core::pickle::Value;

use crate::messages::{dict, uid_value};
use crate::sched::{set_attr, ClientReply, NodeAlloc, ToClient, Uid};

/// Text that dispy sends as `str` or (hashes, auth codes) as `bytes`.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        Value::Bytes(b) | Value::ByteArray(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

fn get<'a>(v: &'a Value, what: &str, key: &str) -> Result<&'a Value, String> {
    v.attr(key).ok_or_else(|| format!("{what} has no {key:?}"))
}

pub fn get_text(v: &Value, what: &str, key: &str) -> Result<String, String> {
    let f = get(v, what, key)?;
    text(f).ok_or_else(|| format!("{what}.{key} is a {}, not text", f.kind()))
}

pub fn get_int(v: &Value, what: &str, key: &str) -> Result<i64, String> {
    let f = get(v, what, key)?;
    f.as_int()
        .ok_or_else(|| format!("{what}.{key} is a {}, not an int", f.kind()))
}

/// `CLIENT:` — the first request of a SharedJobCluster, before it knows our sign.
#[derive(Debug, PartialEq)]
pub struct ClientHello {
    pub version: String,
    /// The address the client wants results at (`ext_host`), if it named one.
    pub ip_addr: Option<String>,
}

impl ClientHello {
    pub fn from_value(v: &Value) -> Result<ClientHello, String> {
        Ok(ClientHello {
            version: get_text(v, "CLIENT", "version")?,
            ip_addr: v.attr("ip_addr").and_then(text).filter(|s| !s.is_empty()),
        })
    }
}

/// `COMPUTE:` — a computation, the nodes it wants and whether it wants them alone.
#[derive(Debug)]
pub struct ComputeReq {
    pub compute: Value,
    pub name: String,
    /// The client's `auth` for this computation, as it sent it (str or bytes).
    pub auth: Value,
    pub client_ip: String,
    pub client_port: u16,
    pub reentrant: bool,
    pub exclusive: bool,
    pub allocs: Vec<NodeAlloc>,
    pub cleanup_set: bool,
}

impl ComputeReq {
    pub fn from_value(v: &Value) -> Result<ComputeReq, String> {
        const W: &str = "COMPUTE";
        let compute = get(v, W, "compute")?.clone();
        if compute.class_path() != Some(("dispy", "_Compute")) {
            return Err("COMPUTE.compute is not a dispy._Compute".into());
        }
        const C: &str = "_Compute";
        let port = get_int(&compute, C, "job_result_port")?;
        let client_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("_Compute.job_result_port {port} is not a port"))?;
        let allocs = match v.attr("node_allocs") {
            None | Some(Value::None) => vec![],
            Some(list) => list
                .as_seq()
                .ok_or("COMPUTE.node_allocs is not a list")?
                .iter()
                .map(alloc_from_value)
                .collect::<Result<_, _>>()?,
        };
        let cleanup_set = compute
            .attr("cleanup")
            .is_some_and(|c| !matches!(c, Value::None | Value::Bool(false)));
        Ok(ComputeReq {
            name: get_text(&compute, C, "name")?,
            auth: get(&compute, C, "auth")?.clone(),
            client_ip: get_text(&compute, C, "scheduler_ip_addr")?,
            client_port,
            reentrant: compute
                .attr("reentrant")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            exclusive: v
                .attr("exclusive")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            allocs,
            cleanup_set,
            compute,
        })
    }
}

/// One of `node_allocs`: `{'host', 'port', 'cpus', 'depends', 'setup_args'}`.
pub fn alloc_from_value(v: &Value) -> Result<NodeAlloc, String> {
    const W: &str = "node_allocs item";
    // A dict from COMPUTE, or a dispy.NodeAllocate from ALLOCATE_NODE.
    let host = v
        .attr("host")
        .or_else(|| v.attr("ip_addr"))
        .and_then(text)
        .unwrap_or_else(|| "*".into());
    let port = match v.attr("port") {
        None | Some(Value::None) => None,
        Some(p) => Some(
            p.as_int()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("{W}: port is not a port"))?,
        ),
    };
    let cpus = match v.attr("cpus") {
        None | Some(Value::None) => 0,
        Some(c) => c
            .as_int()
            .ok_or_else(|| format!("{W}: cpus is not an int"))?,
    };
    if v.attr("depends")
        .and_then(Value::as_seq)
        .is_some_and(|d| !d.is_empty())
    {
        return Err("NodeAllocate depends are not supported by this scheduler yet".into());
    }
    let setup_args = match v.attr("setup_args") {
        None | Some(Value::None) => Value::Tuple(vec![]),
        Some(a) => a.clone(),
    };
    Ok(NodeAlloc {
        host,
        port,
        cpus,
        setup_args,
    })
}

/// `JOB:` — `{'node', 'job': _DispyJob_, 'auth'}`.
#[derive(Debug)]
pub struct JobReq {
    pub job: Value,
    pub compute_id: i64,
    pub hash: String,
    pub auth: String,
    pub node: Option<String>,
    pub files: usize,
}

impl JobReq {
    pub fn from_value(v: &Value) -> Result<JobReq, String> {
        let job = get(v, "JOB", "job")?.clone();
        if job.class_path() != Some(("dispy", "_DispyJob_")) {
            return Err("JOB.job is not a dispy._DispyJob_".into());
        }
        for bytes in ["_args", "_kwargs"] {
            if job.attr(bytes).and_then(Value::as_bytes).is_none() {
                return Err(format!("_DispyJob_.{bytes} is not pickled bytes"));
            }
        }
        Ok(JobReq {
            compute_id: get_int(&job, "_DispyJob_", "compute_id")?,
            hash: get_text(&job, "_DispyJob_", "hash")?,
            files: job
                .attr("xfer_files")
                .and_then(Value::as_seq)
                .map_or(0, <[Value]>::len),
            auth: get_text(v, "JOB", "auth")?,
            node: v.attr("node").and_then(text).filter(|s| !s.is_empty()),
            job,
        })
    }
}

/// `{'compute_id', 'auth', ...}`: every later request of a computation.
pub fn compute_auth(v: &Value, what: &str) -> Result<(i64, String), String> {
    Ok((get_int(v, what, "compute_id")?, get_text(v, what, "auth")?))
}

/// A node's `PONG:` (or the fields of it the scheduler uses).
#[derive(Debug, PartialEq)]
pub struct Pong {
    pub ip_addr: String,
    pub port: u16,
    pub name: String,
    pub cpus: i64,
    pub sign: String,
    pub auth: String,
    pub scheduler_ip_addr: Option<String>,
    pub version: Option<String>,
    /// Ours only (dispynode.py's PONG has no such key): see `Target::keepalive`.
    pub job_keepalive: bool,
}

impl Pong {
    pub fn from_value(v: &Value) -> Result<Pong, String> {
        const W: &str = "PONG";
        let port = get_int(v, W, "port")?;
        Ok(Pong {
            ip_addr: get_text(v, W, "ip_addr")?,
            port: u16::try_from(port).map_err(|_| format!("PONG.port {port} is not a port"))?,
            name: v.attr("name").and_then(text).unwrap_or_default(),
            cpus: get_int(v, W, "cpus")?,
            sign: get_text(v, W, "sign")?,
            auth: get_text(v, W, "auth")?,
            scheduler_ip_addr: v.attr("scheduler_ip_addr").and_then(text),
            version: v.attr("version").and_then(text),
            job_keepalive: v.attr("job_keepalive").and_then(Value::as_bool) == Some(true),
        })
    }
}

/// What the scheduler reads of a `_JobReply`.
#[derive(Debug, PartialEq)]
pub struct ReplyHead {
    pub uid: Uid,
    pub hash: String,
    pub status: i64,
    pub ip_addr: String,
}

impl ReplyHead {
    pub fn from_value(v: &Value) -> Result<ReplyHead, String> {
        const W: &str = "_JobReply";
        if v.class_path() != Some(("dispy", "_JobReply")) {
            return Err("JOB_REPLY does not carry a dispy._JobReply".into());
        }
        Ok(ReplyHead {
            uid: crate::messages::uid(get(v, W, "uid")?).ok_or("_JobReply.uid is not a job id")?,
            hash: get_text(v, W, "hash")?,
            status: get_int(v, W, "status")?,
            ip_addr: get_text(v, W, "ip_addr")?,
        })
    }
}

/// Our discovery ping to a node (TCP after 40 bytes of filler, or UDP).
pub fn ping(
    version: &str,
    sign: &str,
    port: u16,
    node_ip: Option<&str>,
    ip_addrs: &[String],
) -> Value {
    let mut v = dict([
        ("version", version.into()),
        ("sign", sign.into()),
        ("port", Value::Int(port as i64)),
        (
            "ip_addrs",
            Value::List(ip_addrs.iter().map(|a| a.as_str().into()).collect()),
        ),
    ]);
    if let Some(ip) = node_ip {
        set_attr(&mut v, "node_ip_addr", ip.into());
    }
    v
}

/// The `_Compute` as one node gets it.
pub struct ForNode<'a> {
    pub node_ip: &'a str,
    pub scheduler_ip: &'a str,
    pub exclusive: bool,
    pub pulse_interval: f64,
    /// The node is ours (its PONG said `job_keepalive`): it may keep a JOB_REPLY's
    /// connection for the next, which we read (an attribute dispynode.py never gets).
    pub reply_keepalive: bool,
}

pub fn compute_for_node(compute: &Value, n: ForNode) -> Value {
    let mut c = compute.clone();
    set_attr(&mut c, "node_ip_addr", n.node_ip.into());
    set_attr(&mut c, "scheduler_ip_addr", n.scheduler_ip.into());
    set_attr(&mut c, "exclusive", Value::Bool(n.exclusive));
    set_attr(&mut c, "pulse_interval", Value::Float(n.pulse_interval));
    if n.reply_keepalive {
        set_attr(&mut c, "job_reply_keepalive", Value::Bool(true));
    }
    c
}

/// The job as a node gets it: our uid and the attempt's hash.
pub fn job_for_node(job: &Value, uid: Uid, hash: &str) -> Value {
    let mut j = job.clone();
    set_attr(&mut j, "uid", uid_value(uid));
    set_attr(&mut j, "hash", hash.into());
    j
}

/// The framed prefix + pickle of a message to a client, and whether it answers with ACK.
pub struct ClientMsg {
    pub prefix: &'static str,
    pub body: Value,
    pub acked: bool,
}

/// A client's view of a message. `compute_id` and `client_auth` identify the computation;
/// `own_ip` is the scheduler's address as the client knows it (for replies made here).
pub fn to_client(msg: &ToClient, compute_id: i64, client_auth: &Value, own_ip: &str) -> ClientMsg {
    match msg {
        ToClient::Scheduled { pulse_interval } => ClientMsg {
            prefix: "SCHEDULED:",
            body: dict([
                ("compute_id", Value::Int(compute_id)),
                ("pulse_interval", Value::Float(*pulse_interval)),
            ]),
            acked: true,
        },
        ToClient::Running {
            uid,
            hash,
            node,
            start_time,
        } => ClientMsg {
            prefix: "JOB_STATUS:",
            body: dict([
                ("uid", uid_value(*uid)),
                ("status", Value::Int(crate::sched::status::RUNNING)),
                ("node", node.as_str().into()),
                ("hash", hash.as_str().into()),
                ("start_time", Value::Float(*start_time)),
            ]),
            acked: false,
        },
        ToClient::NodeInitialized { ip, name, cpus } => {
            let node = Value::instance(
                "dispy",
                "DispyNode",
                [
                    ("ip_addr", Value::from(ip.as_str())),
                    ("name", name.as_str().into()),
                    ("cpus", Value::Int(*cpus as i64)),
                    ("avail_cpus", Value::Int(*cpus as i64)),
                    ("busy", Value::Int(0)),
                    ("jobs_done", Value::Int(0)),
                    ("cpu_time", Value::Float(0.0)),
                    ("tx", Value::Int(0)),
                    ("rx", Value::Int(0)),
                    ("update_time", Value::Float(0.0)),
                    ("avail_info", Value::None),
                ],
            );
            ClientMsg {
                prefix: "NODE_STATUS:",
                // No `node_auth`: dispy's scheduler hands clients the node's token; here
                // only the scheduler talks to nodes.
                body: dict([
                    ("compute_id", Value::Int(compute_id)),
                    ("ip_addr", ip.as_str().into()),
                    ("status", Value::Int(crate::sched::status::NODE_INITIALIZED)),
                    ("auth", client_auth.clone()),
                    ("dispy_node", node),
                ]),
                acked: false,
            }
        }
        ToClient::NodeClosed { ip } => ClientMsg {
            prefix: "NODE_STATUS:",
            body: dict([
                ("compute_id", Value::Int(compute_id)),
                ("ip_addr", ip.as_str().into()),
                ("status", Value::Int(crate::sched::status::NODE_CLOSED)),
                ("auth", client_auth.clone()),
                ("tx", Value::Int(0)),
                ("rx", Value::Int(0)),
            ]),
            acked: false,
        },
        ToClient::Result { uid, reply } => ClientMsg {
            prefix: "JOB_REPLY:",
            body: match reply {
                ClientReply::Node(v) => (**v).clone(),
                ClientReply::Made { hash, ip, status } => {
                    made_reply(*uid, hash, if ip.is_empty() { own_ip } else { ip }, *status)
                }
            },
            acked: true,
        },
    }
}

/// A `_JobReply` for a job that never reached a node, or lost it.
pub fn made_reply(uid: Uid, hash: &str, ip: &str, status: i64) -> Value {
    Value::instance(
        "dispy",
        "_JobReply",
        [
            ("uid", uid_value(uid)),
            ("hash", Value::from(hash)),
            ("ip_addr", ip.into()),
            ("status", Value::Int(status)),
            (
                "result",
                Value::bytes(crate::messages::serialize(&Value::None)),
            ),
            ("stdout", Value::None),
            ("stderr", Value::None),
            ("exception", Value::None),
            ("start_time", Value::Int(0)),
            ("end_time", Value::Int(0)),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::pickle;

    fn compute() -> Value {
        Value::instance(
            "dispy",
            "_Compute",
            [
                ("type", Value::Int(1)),
                ("name", "compute".into()),
                ("auth", "c0ffee".into()),
                ("scheduler_ip_addr", "127.0.0.1".into()),
                ("job_result_port", Value::Int(9700)),
                ("reentrant", Value::Bool(true)),
                ("xfer_files", Value::List(vec![])),
                ("cleanup", Value::Bool(true)),
            ],
        )
    }

    #[test]
    fn compute_request_reads_client_address_allocations_and_flags() {
        let req = dict([
            ("compute", compute()),
            (
                "node_allocs",
                Value::List(vec![dict([
                    ("host", "127.0.0.*".into()),
                    ("port", Value::None),
                    ("cpus", Value::Int(-1)),
                    ("depends", Value::List(vec![])),
                    ("setup_args", Value::Tuple(vec![Value::Int(3)])),
                ])]),
            ),
            ("exclusive", Value::Bool(true)),
        ]);
        let bytes = pickle::encode(&req).unwrap();
        let r = ComputeReq::from_value(&pickle::decode(&bytes).unwrap()).unwrap();
        assert_eq!((r.client_ip.as_str(), r.client_port), ("127.0.0.1", 9700));
        assert!(r.reentrant && r.exclusive && r.cleanup_set);
        assert_eq!(r.allocs[0].host, "127.0.0.*");
        assert_eq!(r.allocs[0].cpus, -1);
        assert_eq!(r.allocs[0].setup_args, Value::Tuple(vec![Value::Int(3)]));
        assert_eq!(text(&r.auth).as_deref(), Some("c0ffee"));
    }

    #[test]
    fn compute_request_without_a_compute_is_an_error_naming_it() {
        let err = ComputeReq::from_value(&dict([("compute", Value::Int(1))])).unwrap_err();
        assert!(err.contains("dispy._Compute"), "{err}");
        let err = JobReq::from_value(&dict([("job", compute())])).unwrap_err();
        assert!(err.contains("_DispyJob_"), "{err}");
    }

    #[test]
    fn job_for_node_sets_uid_and_attempt_hash_only() {
        let job = Value::instance(
            "dispy",
            "_DispyJob_",
            [
                ("uid", Value::None),
                ("hash", "abc".into()),
                ("compute_id", Value::Int(7)),
                ("_args", Value::bytes(vec![1])),
                ("_kwargs", Value::bytes(vec![2])),
            ],
        );
        let j = job_for_node(&job, 42, "abc.1");
        assert_eq!(j.attr("uid"), Some(&Value::Int(42)));
        assert_eq!(j.attr("hash"), Some(&Value::from("abc.1")));
        assert_eq!(j.attr("_args"), job.attr("_args"));
    }

    #[test]
    fn made_reply_round_trips_as_a_job_reply() {
        let v = made_reply(5, "h", "10.0.0.1", crate::sched::status::CANCELLED);
        let back = pickle::decode(&pickle::encode(&v).unwrap()).unwrap();
        let head = ReplyHead::from_value(&back).unwrap();
        assert_eq!(head.uid, 5);
        assert_eq!(head.status, 8);
        assert_eq!(head.ip_addr, "10.0.0.1");
    }

    #[test]
    fn pong_accepts_bytes_auth_as_dispy_sends_it() {
        let v = dict([
            ("ip_addr", "127.0.0.2".into()),
            ("port", Value::Int(9701)),
            ("cpus", Value::Int(2)),
            ("sign", "s".into()),
            ("auth", Value::bytes(b"abcd".to_vec())),
        ]);
        let p = Pong::from_value(&v).unwrap();
        assert_eq!(p.auth, "abcd");
        assert_eq!(p.port, 9701);
        assert!(
            !p.job_keepalive,
            "dispynode.py's PONG: one request per connection"
        );
        let Value::Dict(mut ours) = v else {
            unreachable!()
        };
        ours.push(("job_keepalive".into(), Value::Bool(true)));
        assert!(Pong::from_value(&Value::Dict(ours)).unwrap().job_keepalive);
    }
}
