//! DispyJobArrays in the engine: many indexed jobs of one JobCluster's computation behind one
//! object, their results written in batches to ConfigMaps the array owns.
//!
//! An array's jobs enter the scheduler a window at a time ([`WINDOW`]): only those have a
//! [`Job`](super::state::Job) entry (the same entry a DispyJob has, so nodes, requeues, node
//! loss and adoption work alike), and the rest are one byte each. A job's node-side id is the
//! array's 32-bit prefix (from its uid) and the index, so a restarted operator knows the jobs
//! its nodes hold.
//!
//! Rules that hold (tested in state_tests.rs):
//! - no index is started twice unless requeued: indexes whose row is stored (read back from
//!   the ConfigMaps at start) are never started, and none starts before every node of the
//!   cluster was asked what it holds (held ones are adopted where they are);
//! - a result is acknowledged to its node only after the ConfigMap write carrying its row
//!   succeeded, so a result no instance stored is resent to the next;
//! - one write per array at a time; rows and status changes wait [`ARRAY_WRITE_DELAY`] to be
//!   batched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispy_core::array::{self, Chunks};
use dispy_core::job::{JobResult, JobStatus};
use dispy_core::manifest::{rfc3339, ArrayResult, DispyJobArrayStatus};
use dispy_core::protocol::JobRequest;
use dispy_core::scheduler::{ClusterId, ClusterPolicy, JobKey, NodeId};

/// Most jobs of one array in the scheduler at once.
pub const WINDOW: usize = 512;
/// How long rows and status changes wait to be written together.
pub const ARRAY_WRITE_DELAY: Duration = Duration::from_secs(1);

/// An array's key: `namespace/name`.
pub type ArrayKey = String;

/// A DispyJobArray as the engine needs it, read by its controller (once).
#[derive(Debug)]
pub struct ArrayInfo {
    pub key: ArrayKey,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub cluster: ClusterId,
    /// Every job's request, by index.
    pub jobs: Vec<JobRequest>,
    pub suspended: bool,
    /// Its own `reentrant`/`backoffLimit` where they differ from its cluster's.
    pub policy: Option<ClusterPolicy>,
    /// What the result ConfigMaps already hold: each stored index's status.
    pub stored: BTreeMap<u32, JobStatus>,
    /// The chunk to go on filling.
    pub chunks: Chunks,
    /// The status stored (its times and conditions go on).
    pub status: DispyJobArrayStatus,
}

/// The node-side job id of index `index` of the array whose prefix is `prefix`.
pub fn job_id(prefix: u32, index: u32) -> u64 {
    ((prefix as u64) << 32) | index as u64
}

/// The array prefix of a uid: the first 32 bits of its node-side id.
pub fn prefix(uid: &str) -> u32 {
    (crate::status::job_id(uid) >> 32) as u32
}

/// Where one index stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Todo,
    /// Has a job entry (in the scheduler or waiting for it).
    InFlight,
    /// Its row is written or on its way.
    Ended(JobStatus),
}

/// All the engine knows of one array.
#[derive(Debug)]
pub struct Array {
    pub info: Arc<ArrayInfo>,
    pub prefix: u32,
    pub slots: Vec<Slot>,
    /// The next index to look at when the window has room.
    pub next: usize,
    pub in_flight: BTreeSet<u32>,
    /// Indexes a node holds (adopted first).
    pub held: BTreeSet<u32>,
    /// Rows not yet in a write, with the node to acknowledge each result to.
    pub pending: Vec<(ArrayResult, Option<(NodeId, JobKey)>)>,
    /// Indexes whose rows are in the write in flight, with the node to acknowledge each to
    /// when it succeeds.
    pub writing: Vec<(u32, Option<(NodeId, JobKey)>)>,
    pub chunks: Chunks,
    /// The current chunk has rows not stored yet.
    pub current_dirty: bool,
    /// The status last stored.
    pub written_status: Option<DispyJobArrayStatus>,
    pub suspended: bool,
    /// Full chunks not stored yet.
    pub full: Vec<(u32, String)>,
    pub status: DispyJobArrayStatus,
    pub write_due: Option<Instant>,
    pub write_in_flight: bool,
    /// The array is being deleted: these wait for its running jobs to stop.
    pub deleted: Option<Vec<super::state::ReplyTo>>,
}

impl Array {
    pub fn new(info: Arc<ArrayInfo>) -> Array {
        let mut slots = vec![Slot::Todo; info.jobs.len()];
        for (i, s) in &info.stored {
            if let Some(slot) = slots.get_mut(*i as usize) {
                *slot = Slot::Ended(*s);
            }
        }
        Array {
            prefix: prefix(&info.uid),
            slots,
            next: 0,
            in_flight: BTreeSet::new(),
            held: BTreeSet::new(),
            pending: Vec::new(),
            writing: Vec::new(),
            chunks: info.chunks.clone(),
            current_dirty: false,
            written_status: None,
            suspended: info.suspended,
            full: Vec::new(),
            status: info.status.clone(),
            write_due: None,
            write_in_flight: false,
            deleted: None,
            info,
        }
    }

    pub fn index_of(&self, key: &JobKey) -> Option<u32> {
        let id = key.job;
        ((id >> 32) as u32 == self.prefix
            && key.cluster == self.info.cluster
            && ((id & 0xffff_ffff) as usize) < self.slots.len())
        .then_some((id & 0xffff_ffff) as u32)
    }

    pub fn key_of(&self, index: u32) -> JobKey {
        JobKey::new(self.info.cluster.clone(), job_id(self.prefix, index))
    }

    /// The next indexes to start, at most enough to fill the window: held ones first.
    pub fn to_start(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        if self.deleted.is_some() {
            return out;
        }
        for i in std::mem::take(&mut self.held) {
            if self.slots[i as usize] == Slot::Todo {
                self.slots[i as usize] = Slot::InFlight;
                out.push(i);
            }
        }
        if self.suspended {
            return out;
        }
        while self.in_flight.len() + out.len() < WINDOW && self.next < self.slots.len() {
            let i = self.next;
            self.next += 1;
            if self.slots[i] == Slot::Todo {
                self.slots[i] = Slot::InFlight;
                out.push(i as u32);
            }
        }
        out
    }

    /// Every index ended and every row stored.
    pub fn done(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Slot::Ended(_)))
            && self.pending.is_empty()
            && self.writing.is_empty()
    }

    /// The status with the counts as they are now, `unix` the wall clock.
    pub fn current_status(&self, running: u32, unix: f64) -> DispyJobArrayStatus {
        let ended = self.slots.iter().filter_map(|s| match s {
            Slot::Ended(st) => Some(st),
            _ => None,
        });
        let (finished, failed) = array::counts(ended);
        let mut s = self.status.clone();
        s.total = self.slots.len() as u32;
        s.finished = finished;
        s.failed = failed;
        s.running = running;
        s.observed_generation = self.info.generation;
        s.result_config_maps = if self.chunks.text.is_empty() {
            self.chunks.current
        } else {
            self.chunks.current + 1
        };
        let all_ended = finished + failed == s.total;
        let now = rfc3339(unix);
        if all_ended && s.completion_time.is_none() {
            s.completion_time = Some(now.clone());
        }
        s.message = if self.suspended && !all_ended {
            Some("spec.suspend is true: no more of its jobs start".into())
        } else {
            None
        };
        let complete = all_ended && failed == 0;
        let failed_all = all_ended && failed > 0;
        let generation = self.info.generation;
        s.conditions = vec![
            crate::status::condition(
                &self.status.conditions,
                &now,
                generation,
                "Complete",
                complete,
                if complete {
                    "AllFinished"
                } else {
                    "NotAllFinished"
                },
                format!("{finished} of {} job(s) finished", s.total),
            ),
            crate::status::condition(
                &self.status.conditions,
                &now,
                generation,
                "Failed",
                failed_all,
                if failed_all {
                    "JobsFailed"
                } else {
                    "NoneFailed"
                },
                if failed > 0 {
                    format!("{failed} of {} job(s) did not finish", s.total)
                } else {
                    String::new()
                },
            ),
        ];
        s
    }
}

/// The row of an index that ended without a node's result (cancelled, abandoned).
pub fn row_without_result(
    index: u32,
    status: JobStatus,
    node: Option<String>,
    message: Option<String>,
    unix: f64,
) -> ArrayResult {
    ArrayResult {
        index,
        status,
        node,
        end_time: Some(rfc3339(unix)),
        message,
        ..Default::default()
    }
}

/// The row of an index from its node's result.
pub fn row_of(index: u32, result: &JobResult, node: Option<String>) -> ArrayResult {
    array::row(index, result, node)
}

/// What an array write carries to the API server.
#[derive(Debug, Clone)]
pub struct ArrayWrite {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Result ConfigMaps to write whole, by number.
    pub chunks: Vec<(u32, String)>,
    pub status: DispyJobArrayStatus,
}
