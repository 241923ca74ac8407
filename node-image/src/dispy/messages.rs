//! dispy 4.15's messages as data: a request's `PREFIX:` + pickle, the records a client sends
//! (`dispy._Compute`, `dispy._XferFile`, `dispy._DispyJob_`) read from pickles within a
//! budget, and the dicts and `_JobReply` records the node sends back. Pure: bytes in, values
//! out; whatever the bytes, an error and never a panic (the proptests below are the fuzz
//! target).

use dispy_core::job::{JobResult, JobStatus};
use dispy_core::pickle::{self, Value};
use dispy_core::protocol::AvailInfo;

/// A pickle as `pycos.serialize` would write it (protocol 4 here; every client reads it).
pub fn serialize(value: &Value) -> Vec<u8> {
    pickle::encode(value).expect("node-built values are always picklable")
}

/// `PREFIX:pickle` → (`PREFIX`, pickle); a message without a colon is all command.
pub fn split(msg: &[u8]) -> (&str, &[u8]) {
    let at = msg
        .iter()
        .take(32)
        .position(|&b| b == b':')
        .unwrap_or(msg.len());
    let command = std::str::from_utf8(&msg[..at]).unwrap_or("?");
    (command, msg.get(at + 1..).unwrap_or_default())
}

/// The pickle of a message → the decoded value, with an error naming the message. `budget`
/// bounds the bytes decoding may materialize ([`pickle::Limits::budget`]): the peer chooses
/// how much a few bytes of pickle expand to, so the node chooses the most it will hold.
pub fn deserialize(what: &str, bytes: &[u8], budget: usize) -> Result<Value, String> {
    pickle::decode_within(bytes, budget).map_err(|e| format!("unreadable {what} message: {e}"))
}

fn field<'a>(v: &'a Value, what: &str, name: &str) -> Result<&'a Value, String> {
    v.attr(name)
        .ok_or_else(|| format!("{what} has no {name:?} attribute"))
}

fn str_field(v: &Value, what: &str, name: &str) -> Result<String, String> {
    match field(v, what, name)? {
        Value::Str(s) => Ok(s.clone()),
        other => Err(format!("{what}.{name} is a {}, not a str", other.kind())),
    }
}

fn opt_str(v: &Value, name: &str) -> Option<String> {
    v.attr(name).and_then(Value::as_str).map(str::to_owned)
}

fn int_field(v: &Value, what: &str, name: &str) -> Result<i64, String> {
    let f = field(v, what, name)?;
    f.as_int()
        .ok_or_else(|| format!("{what}.{name} is a {}, not an int", f.kind()))
}

/// A dispy job uid: `id(_job)` on the client, a positive 64-bit int.
pub fn uid(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) if *n >= 0 => Some(*n as u64),
        Value::BigInt(b) if b.len() <= 9 && b.last().is_some_and(|x| x & 0x80 == 0) => {
            let mut buf = [0u8; 8];
            let n = b.len().min(8);
            buf[..n].copy_from_slice(&b[..n]);
            Some(u64::from_le_bytes(buf))
        }
        _ => None,
    }
}

pub fn uid_value(uid: u64) -> Value {
    match i64::try_from(uid) {
        Ok(n) => Value::Int(n),
        Err(_) => Value::int_from_le_bytes(&[&uid.to_le_bytes()[..], &[0]].concat()),
    }
}

/// `dispy._Compute`: a computation as a client sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Compute {
    pub program: bool,
    /// The function's name, or the program's path on the client.
    pub name: String,
    pub id: i64,
    /// Python source of the function and its depends.
    pub code: String,
    pub xfer_files: Vec<XferFile>,
    pub setup: Option<String>,
    /// A cleanup function's name; `cleanup=True/False` keeps or removes files only.
    pub cleanup: Option<String>,
    pub keep_files: bool,
    pub scheduler_ip_addr: String,
    pub scheduler_port: u16,
    pub node_ip_addr: String,
    pub auth: String,
    pub job_result_port: u16,
    pub pulse_interval: Option<f64>,
    pub client_reply_addr: Option<(String, u16)>,
    /// The client's `dest_path=`: a directory (relative) that outlives the computation when
    /// its files are kept, so a later run finds them and skips sending them again.
    pub dest_path: Option<String>,
    /// Not dispy's: set by our dispyscheduler, which keeps a `JOB_REPLY`'s connection open
    /// for the next reply (see `crate::kept`).
    pub reply_keepalive: bool,
}

impl Compute {
    pub fn from_value(v: &Value) -> Result<Compute, String> {
        const W: &str = "_Compute";
        if v.class_path() != Some(("dispy", "_Compute")) {
            return Err(format!(
                "COMPUTE carries a {}, not a dispy._Compute",
                describe(v)
            ));
        }
        let program = match int_field(v, W, "type")? {
            1 => false,
            2 => true,
            t => {
                return Err(format!(
                    "_Compute.type {t} is neither 1 (function) nor 2 (program)"
                ))
            }
        };
        let xfer_files = match v.attr("xfer_files") {
            Some(files) => seq(files, "_Compute.xfer_files")?
                .iter()
                .map(XferFile::from_value)
                .collect::<Result<_, _>>()?,
            None => vec![],
        };
        let (cleanup, keep_files) = match v.attr("cleanup") {
            Some(Value::Str(name)) => (Some(name.clone()), false),
            Some(Value::Bool(false)) => (None, true),
            _ => (None, false),
        };
        let port = |name: &str| -> Result<u16, String> {
            u16::try_from(int_field(v, W, name)?)
                .map_err(|_| format!("_Compute.{name} is not a port"))
        };
        let client_reply_addr = v.attr("client_reply_addr").and_then(|a| {
            let a = a.as_seq()?;
            Some((
                a.first()?.as_str()?.to_owned(),
                u16::try_from(a.get(1)?.as_int()?).ok()?,
            ))
        });
        Ok(Compute {
            program,
            name: str_field(v, W, "name")?,
            id: int_field(v, W, "id")?,
            code: opt_str(v, "code").unwrap_or_default(),
            xfer_files,
            setup: opt_str(v, "setup"),
            cleanup,
            keep_files,
            scheduler_ip_addr: str_field(v, W, "scheduler_ip_addr")?,
            scheduler_port: port("scheduler_port")?,
            node_ip_addr: str_field(v, W, "node_ip_addr")?,
            auth: str_field(v, W, "auth")?,
            job_result_port: port("job_result_port")?,
            pulse_interval: v.attr("pulse_interval").and_then(Value::as_float),
            client_reply_addr,
            dest_path: opt_str(v, "dest_path").filter(|d| !d.trim().is_empty()),
            reply_keepalive: v.attr("job_reply_keepalive").and_then(Value::as_bool) == Some(true),
        })
    }

    /// The computation's directory under the node's prefix, as dispynode.py lays it out:
    /// `<client address>/<dest_path>`; `None` without a `dest_path` (a directory of its own).
    pub fn dir(&self) -> Option<String> {
        let dest = self.dest_path.as_deref()?;
        let parts: Vec<&str> = dest
            .split(['/', '\\'])
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        let client = self.scheduler_ip_addr.replace([':', '/', '\\'], "_");
        Some(format!("{client}/{}", parts.join("/")))
    }

    /// Where job replies go.
    pub fn reply_addr(&self) -> (String, u16) {
        (self.scheduler_ip_addr.clone(), self.job_result_port)
    }
}

/// `dispy._XferFile`: a file the client is about to send.
#[derive(Debug, Clone, PartialEq)]
pub struct XferFile {
    /// The file's absolute path on the client.
    pub name: String,
    /// Directory relative to the computation's, where the file goes.
    pub dest_path: String,
    pub compute_id: i64,
    pub size: u64,
    pub mtime: f64,
    pub atime: f64,
    pub mode: u32,
    pub sep: String,
}

impl XferFile {
    pub fn from_value(v: &Value) -> Result<XferFile, String> {
        const W: &str = "_XferFile";
        if v.class_path() != Some(("dispy", "_XferFile")) {
            return Err(format!("expected a dispy._XferFile, got {}", describe(v)));
        }
        let stat = StatResult::from_value(field(v, W, "stat_buf")?)?;
        Ok(XferFile {
            name: str_field(v, W, "name")?,
            dest_path: opt_str(v, "dest_path").unwrap_or_default(),
            compute_id: v.attr("compute_id").and_then(Value::as_int).unwrap_or(0),
            size: stat.size,
            mtime: stat.mtime,
            atime: stat.atime,
            mode: stat.mode,
            sep: opt_str(v, "sep").unwrap_or_else(|| "/".into()),
        })
    }

    /// The file's place inside the computation's directory, as a relative path.
    pub fn relative_path(&self) -> String {
        let sep = if self.sep.is_empty() { "/" } else { &self.sep };
        let base = self.name.rsplit(sep).next().unwrap_or(&self.name);
        let dir: Vec<&str> = self
            .dest_path
            .split(sep)
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if dir.is_empty() {
            base.to_string()
        } else {
            format!("{}/{base}", dir.join("/"))
        }
    }
}

/// The fields of an `os.stat_result` the node uses (it travels as `REDUCE` of a 10-tuple and a
/// dict of the float times).
struct StatResult {
    mode: u32,
    size: u64,
    atime: f64,
    mtime: f64,
}

impl StatResult {
    fn from_value(v: &Value) -> Result<StatResult, String> {
        let bad = || {
            format!(
                "_XferFile.stat_buf is {}, not an os.stat_result",
                describe(v)
            )
        };
        let obj = v.as_object().ok_or_else(bad)?;
        let items = obj.args.first().and_then(Value::as_seq).ok_or_else(bad)?;
        let extra = obj.args.get(1);
        let int = |i: usize| items.get(i).and_then(Value::as_int).ok_or_else(bad);
        let time = |i: usize, name: &str| {
            extra
                .and_then(|d| d.as_dict_get(name))
                .and_then(Value::as_float)
                .or_else(|| items.get(i).and_then(Value::as_float))
                .ok_or_else(bad)
        };
        Ok(StatResult {
            mode: int(0)? as u32,
            size: u64::try_from(int(6)?).map_err(|_| bad())?,
            atime: time(7, "st_atime")?,
            mtime: time(8, "st_mtime")?,
        })
    }
}

/// `dispy._DispyJob_`, from its `__getstate__`.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub uid: u64,
    pub hash: String,
    pub compute_id: i64,
    /// Pickled positional arguments (a tuple), opened only by the Python host.
    pub args: Vec<u8>,
    /// Pickled keyword arguments (a dict).
    pub kwargs: Vec<u8>,
    pub xfer_files: Vec<XferFile>,
    /// Source of the job's `dispy_job_depends` functions and classes.
    pub code: String,
}

impl Job {
    pub fn from_value(v: &Value) -> Result<Job, String> {
        const W: &str = "_DispyJob_";
        if v.class_path() != Some(("dispy", "_DispyJob_")) {
            return Err(format!("expected a dispy._DispyJob_, got {}", describe(v)));
        }
        let bytes = |name: &str| -> Result<Vec<u8>, String> {
            field(v, W, name)?
                .as_bytes()
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("_DispyJob_.{name} is not pickled bytes"))
        };
        let xfer_files = match v.attr("xfer_files") {
            Some(files) => seq(files, "_DispyJob_.xfer_files")?
                .iter()
                .map(XferFile::from_value)
                .collect::<Result<_, _>>()?,
            None => vec![],
        };
        Ok(Job {
            uid: uid(field(v, W, "uid")?).ok_or("_DispyJob_.uid is not a job id")?,
            hash: str_field(v, W, "hash")?,
            compute_id: int_field(v, W, "compute_id")?,
            args: bytes("_args")?,
            kwargs: bytes("_kwargs")?,
            xfer_files,
            code: opt_str(v, "code").unwrap_or_default(),
        })
    }

    /// The call as the Python host's pickle codec reads it.
    pub fn host_call(&self) -> Vec<u8> {
        serialize(&Value::Dict(vec![
            ("a".into(), Value::bytes(self.args.clone())),
            ("k".into(), Value::bytes(self.kwargs.clone())),
            ("c".into(), self.code.clone().into()),
            ("u".into(), uid_value(self.uid)),
            ("h".into(), self.hash.clone().into()),
        ]))
    }

    /// A program job's arguments: the client has made each one a str. `budget` as for
    /// [`deserialize`].
    pub fn program_args(&self, budget: usize) -> Result<Vec<String>, String> {
        let args = deserialize("job arguments", &self.args, budget)?;
        let items = args.as_seq().ok_or_else(|| {
            format!(
                "a program job's arguments are a {}, not a tuple",
                args.kind()
            )
        })?;
        items
            .iter()
            .map(|a| match a {
                Value::Str(s) => Ok(s.clone()),
                Value::Int(n) => Ok(n.to_string()),
                Value::Float(f) => Ok(f.to_string()),
                other => Err(format!(
                    "a program job's argument is a {}, not a str",
                    other.kind()
                )),
            })
            .collect()
    }
}

fn seq<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], String> {
    match v {
        Value::List(items) | Value::Tuple(items) | Value::Set(items) => Ok(items),
        other => Err(format!("{what} is a {}, not a list", other.kind())),
    }
}

fn describe(v: &Value) -> String {
    match v.class_path() {
        Some((m, n)) => format!("{m}.{n}"),
        None => v.kind().to_string(),
    }
}

/// A dict with str keys.
pub fn dict<const N: usize>(items: [(&str, Value); N]) -> Value {
    Value::Dict(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// What a `_JobReply` says about one job.
pub struct JobReply<'a> {
    pub uid: u64,
    pub hash: &'a str,
    pub ip_addr: &'a str,
    pub program: bool,
    pub result: &'a JobResult,
}

impl JobReply<'_> {
    /// `dispy._JobReply`, pickled. Function results arrive from the Python host as the hex of
    /// their pickle; a program's result is its exit code, its output bytes. dispy's
    /// JobCluster knows only Finished and Terminated from a node, so a job cancelled before it
    /// ran reads as Terminated.
    pub fn encode(&self) -> Vec<u8> {
        let r = self.result;
        let status = match r.status {
            JobStatus::Finished => JobStatus::Finished,
            JobStatus::ProvisionalResult => JobStatus::ProvisionalResult,
            _ => JobStatus::Terminated,
        };
        let none = || serialize(&Value::None);
        let result = match (&r.result, self.program) {
            (None, _) => none(),
            (Some(code), true) => code
                .parse::<i64>()
                .map(|c| serialize(&Value::Int(c)))
                .unwrap_or_else(|_| none()),
            (Some(hex), false) => from_hex(hex).unwrap_or_else(none),
        };
        let output = |s: &str| {
            if self.program {
                Value::bytes(s.as_bytes())
            } else {
                Value::Str(s.to_owned())
            }
        };
        let reply = Value::instance(
            "dispy",
            "_JobReply",
            [
                ("uid", uid_value(self.uid)),
                ("hash", self.hash.into()),
                ("ip_addr", self.ip_addr.into()),
                ("status", Value::Int(status.dispy_value())),
                ("result", Value::bytes(result)),
                ("stdout", output(&r.stdout)),
                ("stderr", output(&r.stderr)),
                ("exception", r.exception.clone().into()),
                ("start_time", Value::Float(r.start_time.unwrap_or(0.0))),
                (
                    "end_time",
                    Value::Float(r.end_time.or(r.start_time).unwrap_or(0.0)),
                ),
            ],
        );
        serialize(&reply)
    }
}

/// The `avail_info` of a PONG, PULSE or NODE_STATUS: a `dispy.DispyNodeAvailInfo` with the
/// types psutil gives it on dispy's node (cpu and swap floats, memory and disk ints), which
/// the client hands to `NodeAllocate.allocate` and sets as `DispyNode.avail_info`. None when
/// the node cannot tell, as dispy's node without psutil sends.
pub fn avail_info(avail: Option<AvailInfo>) -> Value {
    let Some(a) = avail else {
        return Value::None;
    };
    let bytes = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
    Value::instance(
        "dispy",
        "DispyNodeAvailInfo",
        [
            ("cpu", Value::Float(a.cpu)),
            ("memory", bytes(a.memory)),
            ("disk", bytes(a.disk)),
            ("swap", Value::Float(a.swap)),
        ],
    )
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(size: i64) -> Value {
        Value::Object(Box::new(pickle::Object {
            module: "os".into(),
            name: "stat_result".into(),
            construct: pickle::Construct::Reduce,
            args: vec![
                Value::Tuple(
                    [0o100644, 1, 2, 1, 0, 0, size, 10, 20, 30]
                        .into_iter()
                        .map(Value::Int)
                        .collect(),
                ),
                dict([("st_mtime", Value::Float(20.5))]),
            ],
            list_items: vec![],
            dict_items: vec![],
            state: None,
        }))
    }

    fn xfer(name: &str, dest: &str) -> Value {
        Value::instance(
            "dispy",
            "_XferFile",
            [
                ("name", name.into()),
                ("dest_path", dest.into()),
                ("compute_id", Value::Int(7)),
                ("stat_buf", stat(42)),
                ("sep", "/".into()),
            ],
        )
    }

    #[test]
    fn xfer_file_reads_stat_and_places_the_file() {
        let xf = XferFile::from_value(&xfer("/home/u/data/a.txt", "data")).unwrap();
        assert_eq!((xf.size, xf.mode, xf.compute_id), (42, 0o100644, 7));
        assert_eq!((xf.mtime, xf.atime), (20.5, 10.0));
        assert_eq!(xf.relative_path(), "data/a.txt");
        let xf = XferFile::from_value(&xfer("/x/b.py", ".")).unwrap();
        assert_eq!(xf.relative_path(), "b.py");
    }

    fn compute() -> Value {
        Value::instance(
            "dispy",
            "_Compute",
            [
                ("type", Value::Int(1)),
                ("name", "compute".into()),
                ("id", Value::Int(1700000000000)),
                ("code", "def compute(n): return n\n".into()),
                ("xfer_files", Value::List(vec![xfer("/a/b", ".")])),
                ("cleanup", Value::Bool(true)),
                ("setup", Value::None),
                ("scheduler_ip_addr", "127.0.0.1".into()),
                ("scheduler_port", Value::Int(9700)),
                ("node_ip_addr", "127.0.0.1".into()),
                ("auth", "ab".into()),
                ("job_result_port", Value::Int(9700)),
                ("pulse_interval", Value::None),
            ],
        )
    }

    fn job() -> Value {
        let args = Value::Tuple(vec!["-n".into(), Value::Int(3), Value::Float(0.5)]);
        Value::instance(
            "dispy",
            "_DispyJob_",
            [
                ("uid", Value::Int(140_000_000_000_000)),
                ("hash", "9f3a1c".into()),
                ("compute_id", Value::Int(1700000000000)),
                ("_args", Value::bytes(serialize(&args))),
                ("_kwargs", Value::bytes(serialize(&Value::Dict(vec![])))),
                ("xfer_files", Value::List(vec![xfer("/a/in.txt", "data")])),
                ("code", "".into()),
            ],
        )
    }

    #[test]
    fn avail_info_is_a_dispy_node_avail_info_with_psutils_types() {
        let a = AvailInfo {
            cpu: 91.5,
            memory: 3 << 30,
            disk: 5 << 40,
            swap: 100.0,
        };
        let v = pickle::decode(&serialize(&avail_info(Some(a)))).unwrap();
        assert_eq!(v.class_path(), Some(("dispy", "DispyNodeAvailInfo")));
        assert_eq!(v.attr("cpu"), Some(&Value::Float(91.5)));
        assert_eq!(v.attr("memory"), Some(&Value::Int(3 << 30)));
        assert_eq!(v.attr("disk"), Some(&Value::Int(5 << 40)));
        assert_eq!(v.attr("swap"), Some(&Value::Float(100.0)));
        assert_eq!(avail_info(None), Value::None);
    }

    #[test]
    fn commands_split_at_the_first_colon() {
        assert_eq!(split(b"JOB:\x80\x05:"), ("JOB", &b"\x80\x05:"[..]));
        assert_eq!(split(b"NODE_STATUS:"), ("NODE_STATUS", &b""[..]));
        assert_eq!(split(b"PULSE"), ("PULSE", &b""[..]));
        assert_eq!(split(b""), ("", &b""[..]));
    }

    #[test]
    fn compute_needs_dispy_class_and_fields() {
        let err = Compute::from_value(&dict([("type", Value::Int(1))])).unwrap_err();
        assert!(err.contains("not a dispy._Compute"), "{err}");
        let c = compute();
        let compute = Compute::from_value(&c).unwrap();
        assert!(!compute.program && !compute.keep_files);
        assert_eq!(compute.xfer_files.len(), 1);
        assert_eq!(compute.setup, None);
        assert_eq!(compute.reply_addr(), ("127.0.0.1".to_string(), 9700));
        let mut broken = c.clone();
        if let Value::Object(o) = &mut broken {
            if let Some(Value::Dict(d)) = &mut o.state {
                d.retain(|(k, _)| k.as_str() != Some("auth"));
            }
        }
        let err = Compute::from_value(&broken).unwrap_err();
        assert!(err.contains("no \"auth\""), "{err}");
    }

    #[test]
    fn job_reply_round_trips_through_the_codec() {
        let result = JobResult {
            status: JobStatus::Cancelled,
            result: None,
            stdout: "out".into(),
            exception: Some("cancelled".into()),
            start_time: Some(1.5),
            ..Default::default()
        };
        let bytes = JobReply {
            uid: 140_000_000_000_000,
            hash: "abc",
            ip_addr: "127.0.0.1",
            program: true,
            result: &result,
        }
        .encode();
        let v = pickle::decode(&bytes).unwrap();
        assert_eq!(v.class_path(), Some(("dispy", "_JobReply")));
        assert_eq!(v.attr("status").unwrap().as_int(), Some(9));
        assert_eq!(uid(v.attr("uid").unwrap()), Some(140_000_000_000_000));
        assert_eq!(v.attr("stdout").unwrap().as_bytes(), Some(&b"out"[..]));
        assert_eq!(v.attr("end_time").unwrap().as_float(), Some(1.5));
        let inner = pickle::decode(v.attr("result").unwrap().as_bytes().unwrap()).unwrap();
        assert!(inner.is_none());
    }

    #[test]
    fn job_reads_its_pickled_arguments_within_the_budget() {
        let j = Job::from_value(&job()).unwrap();
        assert_eq!(j.program_args(1 << 10).unwrap(), ["-n", "3", "0.5"]);
        let err = j.program_args(100).unwrap_err();
        assert!(
            err.starts_with("unreadable job arguments message: pickle too large"),
            "{err}"
        );
    }

    #[test]
    fn a_memo_bomb_in_a_job_is_refused_as_too_large() {
        // A 64 KiB str memoized once and fetched 20,000 times: 1.3 GB once expanded.
        let bomb = dispy_core::pickle::memo_bomb(64 << 10, 20_000);
        let msg = [&b"JOB:"[..], &bomb].concat();
        let (command, body) = split(&msg);
        let err = deserialize(command, body, 16 << 20).unwrap_err();
        assert_eq!(
            err,
            "unreadable JOB message: pickle too large: it would materialize more than \
             16777216 bytes (the decode budget)"
        );
    }

    #[test]
    fn hex_results_and_big_uids() {
        assert_eq!(from_hex("80044b022e"), Some(vec![0x80, 4, 0x4b, 2, 0x2e]));
        assert_eq!(from_hex("8"), None);
        assert_eq!(uid(&uid_value(u64::MAX)), Some(u64::MAX));
        assert_eq!(uid(&Value::Int(-1)), None);
    }

    /// The parser as a fuzz target: every step a request goes through before a handler acts
    /// on it, under a budget that real records fit and one that they exceed.
    mod props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const BUDGETS: [usize; 2] = [1 << 10, 64 << 10];
        const PREFIXES: [&str; 8] = [
            "COMPUTE",
            "JOB",
            "FILEXFER",
            "SETUP",
            "TERMINATE_JOB",
            "CLOSE",
            "PING",
            "RETRIEVE_JOB",
        ];

        /// Splits, decodes and reads `msg` as every record; whatever decodes fits the budget.
        fn parse(msg: &[u8]) -> Result<(), TestCaseError> {
            let (command, body) = split(msg);
            for budget in BUDGETS {
                let Ok(v) = deserialize(command, body, budget) else {
                    continue;
                };
                let size = v.materialized_size();
                prop_assert!(
                    size <= budget,
                    "read {size} bytes over a budget of {budget}"
                );
                if let Ok(c) = Compute::from_value(&v) {
                    let _ = c.reply_addr();
                    c.xfer_files.iter().for_each(|xf| drop(xf.relative_path()));
                }
                if let Ok(xf) = XferFile::from_value(&v) {
                    let _ = xf.relative_path();
                }
                if let Ok(job) = Job::from_value(&v) {
                    let _ = job.program_args(budget);
                    let _ = job.host_call();
                }
                let _ = v.attr("compute_id").map(uid);
            }
            Ok(())
        }

        /// A valid request of each kind, as a client would send it.
        fn valid_record() -> impl Strategy<Value = (&'static str, Value)> {
            prop_oneof![
                Just(("COMPUTE", compute())),
                Just(("JOB", job())),
                Just(("FILEXFER", xfer("/home/u/data/a.txt", "data"))),
                Just((
                    "CLOSE",
                    dict([("compute_id", Value::Int(7)), ("auth", "ab".into())])
                )),
            ]
        }

        fn valid_message() -> impl Strategy<Value = Vec<u8>> {
            valid_record()
                .prop_map(|(prefix, v)| [prefix.as_bytes(), b":", &serialize(&v)].concat())
        }

        /// What a confused or hostile client might put where a field belongs.
        fn stray_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::None),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::Int),
                Just(Value::Int(i64::MIN)),
                Just(Value::int_from_le_bytes(&[0xff; 12])),
                Just(Value::int_from_le_bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 0x7f])),
                any::<f64>().prop_map(Value::Float),
                "[./a-z]{0,8}".prop_map(Value::Str),
                "\\PC{0,8}".prop_map(Value::Str),
                vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
                Just(stat(-1)),
                Just(Value::instance(
                    "dispy",
                    "_XferFile",
                    [("name", Value::None)]
                )),
            ];
            leaf.prop_recursive(2, 12, 4, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..4).prop_map(Value::List),
                    vec(inner, 0..4).prop_map(Value::Tuple),
                ]
            })
        }

        /// Replaces the `n`th value of `v` in pre-order (dict keys excepted, so that it stays
        /// picklable) with `with`; false when `v` has fewer values.
        fn replace_nth(v: &mut Value, n: &mut usize, with: &Value) -> bool {
            if *n == 0 {
                *v = with.clone();
                return true;
            }
            *n -= 1;
            match v {
                Value::Tuple(items) | Value::List(items) => {
                    items.iter_mut().any(|i| replace_nth(i, n, with))
                }
                Value::Dict(pairs) => pairs.iter_mut().any(|(_, i)| replace_nth(i, n, with)),
                Value::Object(o) => {
                    o.args.iter_mut().any(|i| replace_nth(i, n, with))
                        || o.state.iter_mut().any(|i| replace_nth(i, n, with))
                }
                _ => false,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn arbitrary_bytes_never_panic(msg in vec(any::<u8>(), 0..512)) {
                parse(&msg)?;
            }

            #[test]
            fn arbitrary_pickles_after_a_prefix_never_panic(
                prefix in proptest::sample::select(&PREFIXES[..]),
                proto in 0u8..7,
                body in vec(any::<u8>(), 0..512),
            ) {
                let msg = [prefix.as_bytes(), b":", &[0x80, proto], &body].concat();
                parse(&msg)?;
            }

            #[test]
            fn damaged_messages_never_panic(
                mut msg in valid_message(),
                edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..10), 1..5),
            ) {
                for (at, byte, how) in edits {
                    let i = at.index(msg.len());
                    match how {
                        0..=6 => msg[i] = byte,
                        7 | 8 => msg.insert(i, byte),
                        _ => msg.truncate(i),
                    }
                    if msg.is_empty() {
                        break;
                    }
                }
                parse(&msg)?;
            }

            #[test]
            fn records_with_a_stray_field_never_panic(
                (prefix, mut record) in valid_record(),
                at in 0usize..64,
                with in stray_value(),
            ) {
                let mut n = at;
                replace_nth(&mut record, &mut n, &with);
                let msg = [prefix.as_bytes(), b":", &serialize(&record)].concat();
                parse(&msg)?;
            }
        }

        #[test]
        fn valid_messages_read_back() {
            let (command, body) = split(b"JOB:");
            assert_eq!((command, body), ("JOB", &b""[..]));
            for (prefix, v) in [("COMPUTE", compute()), ("JOB", job())] {
                let msg = [prefix.as_bytes(), b":", &serialize(&v)].concat();
                let (command, body) = split(&msg);
                assert_eq!(command, prefix);
                assert_eq!(deserialize(command, body, 64 << 10).unwrap(), v);
            }
        }
    }
}
