//! The native wire protocol between clients (the `dispy` CLI, the operator) and `dispynode`.
//!
//! A connection opens with [`MAGIC`], so the node can tell it from a dispy (Python) client on
//! the same port, then carries length-prefixed frames (see [`crate::frame`]) of MessagePack
//! messages. The handshake is [`Hello`] → [`ServerHello`] → [`Auth`] → [`Welcome`]; after it the
//! client sends [`Request`]s and the node answers each with a [`NodeMsg::Reply`] carrying the
//! same id, interleaved with unsolicited [`NodeMsg::Event`]s and [`NodeMsg::Pulse`]s. Many
//! jobs are in flight on one connection.

use serde::{Deserialize, Serialize};

use crate::job::{JobId, JobResult, JobStatus};

/// First bytes of every native TCP connection and UDP datagram. Not a lowercase hex digit, so
/// it can never be the start of dispy's 40-hex-char auth prefix, nor a TLS record (0x16).
pub const MAGIC: [u8; 4] = *b"NDSP";
/// Protocol versions this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// dispy's node port, TCP and UDP.
pub const DEFAULT_NODE_PORT: u16 = 9701;
/// dispy's client port: nodes announce themselves to it over UDP.
pub const DEFAULT_CLIENT_PORT: u16 = 9700;
/// Upper bound for one frame unless configured otherwise.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// File contents travel in chunks of at most this many bytes.
pub const FILE_CHUNK: usize = 1 << 20;

/// Name of a computation on a node. Chosen by the client (a JobCluster's name, usually
/// qualified by its namespace); a node runs many computations side by side.
pub type ComputationId = String;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    #[serde(with = "serde_bytes")]
    pub client_nonce: Vec<u8>,
    /// Shown in the node's logs.
    pub client_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Challenge {
    pub version: u16,
    #[serde(with = "serde_bytes")]
    pub node_nonce: Vec<u8>,
    /// HMAC proving the node knows the secret too (mutual authentication).
    #[serde(with = "serde_bytes")]
    pub node_proof: Vec<u8>,
}

/// The node's answer to [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ServerHello {
    Challenge(Challenge),
    /// No common protocol version, or the node is not accepting clients.
    Rejected(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Auth {
    #[serde(with = "serde_bytes")]
    pub client_proof: Vec<u8>,
    /// How often the client wants node pulses; the node may send them more often.
    pub pulse_interval_ms: Option<u64>,
    /// The client's owner credential (`ClientConfig::owner`): computations created on this
    /// connection belong to it. Without one, they belong to this connection alone.
    #[serde(default)]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Welcome {
    Accepted(NodeInfo),
    Rejected(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// Address clients should use to reach the node (`--ext-host` or the bound address).
    pub addr: String,
    pub port: u16,
    pub cpus: u32,
    pub busy: u32,
    /// Jobs waiting on the node for a free cpu.
    pub queued: u32,
    pub platform: String,
    pub version: String,
    pub protocol: u16,
    pub computations: Vec<ComputationId>,
    pub max_file_size: u64,
    /// What the node has free now; `None` from a node that cannot tell (or predates it).
    #[serde(default)]
    pub avail: Option<AvailInfo>,
}

/// What a node has free, in the units of dispy's `DispyNodeAvailInfo` (which psutil fills on
/// dispy's node), so a scheduler can weigh nodes by it: the machine's figures as the node's
/// `/proc` shows them, not a cgroup's share.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct AvailInfo {
    /// Idle cpu time over the last sampling period, in percent (0–100) of all cpus.
    pub cpu: f64,
    /// Memory available to new processes without swapping (`MemAvailable`), in bytes.
    pub memory: u64,
    /// Free space an unprivileged user may use under `--dest-path-prefix`, in bytes.
    pub disk: u64,
    /// Free swap in percent of the swap space; 100 on a machine without swap, as psutil says.
    pub swap: f64,
}

/// What a computation runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Computation {
    Python(PythonComputation),
    Program(ProgramComputation),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct PythonComputation {
    /// Module source, run as `__main__` with `os` and `sys` imported.
    pub source: String,
    /// Function each job calls.
    pub function: String,
    /// Function run once before any job, with `setup_args`.
    pub setup: Option<String>,
    /// JSON list of arguments for `setup` (and `cleanup`).
    pub setup_args: Option<String>,
    /// Function run when the computation closes.
    pub cleanup: Option<String>,
    /// Run jobs in long-lived workers forked once after setup instead of a fresh fork per
    /// job. Much faster; a job's changes to globals are seen by later jobs of its worker.
    pub reuse_workers: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProgramComputation {
    /// argv prefix; a job's arguments are appended. Run without a shell. A relative
    /// `command[0]` is looked up among the computation's files, then on `PATH`.
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ComputeRequest {
    pub computation: ComputationId,
    pub spec: Computation,
    /// Keep transferred files when the computation closes (later runs skip the transfer).
    pub keep_files: bool,
}

/// Describes a file before it is sent, so the node can skip one it already has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileMeta {
    /// Relative path under the computation's directory.
    pub name: String,
    pub size: u64,
    /// Hex SHA-256 of the contents.
    pub sha256: String,
    /// Unix permission bits.
    pub mode: u32,
    /// `Some(job)`: a per-job depend, removed after the last job that uses it.
    pub job: Option<JobId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileChunk {
    pub computation: ComputationId,
    pub meta: FileMeta,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub last: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRequest {
    pub id: JobId,
    /// JSON list of positional arguments.
    pub args: String,
    /// JSON object of keyword arguments (Python computations only).
    pub kwargs: String,
    /// Names of per-job files (sent before with `FileMeta::job`) the job uses.
    pub depends: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    pub body: ClientMsg,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ClientMsg {
    NodeInfo,
    Compute(ComputeRequest),
    /// Answered with [`Reply::FileCheck`].
    FileCheck {
        computation: ComputationId,
        meta: FileMeta,
    },
    /// Chunks of one file go in order; only the last is answered (or the first that fails).
    FileChunk(FileChunk),
    /// Starts the computation (the Python host and its setup) once its files are there.
    Setup {
        computation: ComputationId,
    },
    /// Queues jobs, in order. Answered with [`Reply::Submitted`], naming any job refused.
    Submit {
        computation: ComputationId,
        jobs: Vec<JobRequest>,
    },
    /// Cancels a queued job or terminates a running one.
    Cancel {
        computation: ComputationId,
        job: JobId,
    },
    /// The client has stored these results; the node may forget them.
    Ack {
        computation: ComputationId,
        jobs: Vec<JobId>,
    },
    /// Re-attach after a reconnect: the node resends every result not yet acknowledged.
    Attach {
        computation: ComputationId,
    },
    /// Closes the computation: waits for running jobs (or terminates them and every queued
    /// one with `terminate_pending`), runs cleanup, removes its files.
    Close {
        computation: ComputationId,
        terminate_pending: bool,
    },
    Pulse,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum NodeMsg {
    Reply {
        id: u64,
        result: Result<Reply, NodeError>,
    },
    Event(JobEvent),
    Pulse {
        busy: u32,
        cpus: u32,
        queued: u32,
    },
    /// The node is shutting down; it will close the connection.
    Shutdown {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Reply {
    Ok,
    NodeInfo(NodeInfo),
    FileCheck { present: bool },
    Setup { cpus: u32 },
    Attached { jobs: Vec<JobState> },
    Submitted { rejected: Vec<Rejected> },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rejected {
    pub job: JobId,
    pub error: NodeError,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobState {
    pub id: JobId,
    pub status: JobStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobEvent {
    pub computation: ComputationId,
    pub job: JobId,
    pub kind: JobEventKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum JobEventKind {
    Running {
        start_time: f64,
    },
    /// Terminal: Finished, Terminated or Cancelled. Resent until acknowledged.
    Done(JobResult),
    /// The running job called `dispy_provisional_result(value)`: JSON text of the value. Sent
    /// to the connected client only (not resent); the job goes on.
    Provisional {
        result: String,
    },
    /// The running job called `dispy_send_file(path)`. Sent before the job's `Done`, to the
    /// connected client only (not resent); one frame, so at most `--max-frame` less headers.
    File(SentFile),
}

/// `name` as a relative path that stays inside the directory it is joined to: not empty, no
/// NUL, no root, no `.` or `..` component. Names from the network go through this.
pub fn relative_path(name: &str) -> Option<&std::path::Path> {
    let path = std::path::Path::new(name);
    let inside = !name.is_empty()
        && !name.contains('\0')
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    inside.then_some(path)
}

/// A file a job sent to its client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SentFile {
    /// Relative path: under the job's working directory when the file was there, else its
    /// base name. Never absolute, never with `..` (the node checks).
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Copy)]
pub enum ErrorCode {
    BadRequest,
    UnknownComputation,
    UnknownJob,
    AlreadyExists,
    TooLarge,
    ChecksumMismatch,
    SetupFailed,
    Closing,
    Internal,
    /// The computation belongs to another client.
    NotOwner,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub code: ErrorCode,
    pub message: String,
}

impl NodeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        NodeError {
            code,
            message: message.into(),
        }
    }
}

/// UDP discovery, on the node port (ping) and the client port (announcement).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Discovery {
    /// Sent by a client; nodes answer with `Pong` to the sender's address.
    Ping { protocol: u16 },
    /// A node's answer to a ping, and its announcement at start.
    Pong(NodeAnnouncement),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeAnnouncement {
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub cpus: u32,
    pub version: String,
    pub protocol: u16,
    pub tls: bool,
}

/// Encodes a message body (without the frame header).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(msg).expect("protocol messages always serialize")
}

/// Decodes a message body, naming what was expected when it does not fit.
pub fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|e| DecodeError {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("malformed {what} message: {detail}")]
pub struct DecodeError {
    pub what: String,
    pub detail: String,
}

/// Encodes a UDP discovery datagram.
pub fn encode_datagram(msg: &Discovery) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(encode(msg));
    out
}

/// Decodes a UDP discovery datagram; `None` when it is not a native one.
pub fn decode_datagram(bytes: &[u8]) -> Option<Result<Discovery, DecodeError>> {
    let body = bytes.strip_prefix(&MAGIC[..])?;
    Some(decode("discovery", body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let req = Request {
            id: 7,
            body: ClientMsg::Submit {
                computation: "default/wc".into(),
                jobs: vec![JobRequest {
                    id: 3,
                    args: "[\"beta\"]".into(),
                    kwargs: "{}".into(),
                    depends: vec!["a.txt".into()],
                }],
            },
        };
        let back: Request = decode("request", &encode(&req)).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn datagram_roundtrip_and_foreign_bytes() {
        let ping = Discovery::Ping { protocol: 1 };
        let bytes = encode_datagram(&ping);
        assert_eq!(decode_datagram(&bytes).unwrap().unwrap(), ping);
        assert!(decode_datagram(b"PING:\x80\x05").is_none());
        let err = decode_datagram(b"NDSP\xc1garbage").unwrap().unwrap_err();
        assert!(err.to_string().contains("malformed discovery message"));
    }

    /// A node info as a node without `avail` wrote it (before the field existed).
    #[derive(Serialize)]
    struct NodeInfoWithoutAvail {
        name: String,
        addr: String,
        port: u16,
        cpus: u32,
        busy: u32,
        queued: u32,
        platform: String,
        version: String,
        protocol: u16,
        computations: Vec<ComputationId>,
        max_file_size: u64,
    }

    #[test]
    fn node_info_from_a_node_without_avail_reads_as_none() {
        let old = NodeInfoWithoutAvail {
            name: "n1".into(),
            addr: "10.0.0.1".into(),
            port: 9701,
            cpus: 4,
            busy: 1,
            queued: 0,
            platform: "linux x86_64".into(),
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            computations: vec!["default/wc".into()],
            max_file_size: 0,
        };
        let info: NodeInfo = decode("node info", &encode(&old)).unwrap();
        assert_eq!((info.name.as_str(), info.cpus, info.avail), ("n1", 4, None));

        let avail = AvailInfo {
            cpu: 87.5,
            memory: 3 << 30,
            disk: 40 << 30,
            swap: 100.0,
        };
        let info = NodeInfo {
            avail: Some(avail),
            ..info
        };
        let back: NodeInfo = decode("node info", &encode(&info)).unwrap();
        assert_eq!(back.avail, Some(avail));
    }

    #[test]
    fn magic_is_not_hex_nor_tls() {
        assert!(!MAGIC[0].is_ascii_hexdigit());
        assert_ne!(MAGIC[0], 0x16);
    }
}
