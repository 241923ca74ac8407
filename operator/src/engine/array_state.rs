//! The engine's handling of DispyJobArrays (rules in `arrays.rs`): a child of `state` so that
//! an array's jobs use the same job entries, scheduler and node handling as DispyJobs.

use std::sync::Arc;

use dispy_core::job::JobStatus;
use dispy_core::scheduler::{Event, JobKey};

use super::super::arrays::{self, Array, ArrayInfo, ArrayKey, ArrayWrite, Slot};
use super::super::JobInfo;
use super::{Effect, EngineState, ReplyTo, Stage, RETRY};
use crate::writer::StoreError;

impl EngineState {
    /// The array and index a job key belongs to.
    pub(super) fn array_index(&self, key: &JobKey) -> Option<(ArrayKey, u32)> {
        self.arrays
            .iter()
            .find_map(|(k, a)| a.index_of(key).map(|i| (k.clone(), i)))
    }

    pub(super) fn array(&mut self, info: Arc<ArrayInfo>) {
        let key = info.key.clone();
        if self
            .arrays
            .get(&key)
            .is_some_and(|a| a.info.uid == info.uid)
        {
            return; // known: suspend changes come as ArraySuspend
        }
        let a = Array::new(info);
        tracing::info!(array = %key, jobs = a.slots.len(), stored = a.info.stored.len(), "job array known");
        let cluster = a.info.cluster.clone();
        self.arrays.insert(key.clone(), a);
        self.claim_array_reports(&cluster);
        self.out.push(Effect::ArrayKnows {
            key: key.clone(),
            known: true,
        });
        self.array_write_soon(&key);
        self.feed_later.insert(key);
    }

    /// What nodes of the cluster reported of array jobs that have no entry in the scheduler
    /// yet: held or with a result, they are adopted where they are; ended (their row is
    /// stored), the node may forget them.
    pub(super) fn claim_array_reports(&mut self, cluster: &str) {
        let reported: Vec<(JobKey, ArrayKey, u32)> = self
            .jobs
            .iter()
            .filter(|(k, j)| j.stage == Stage::NodeOnly && k.cluster == cluster)
            .filter_map(|(k, _)| self.array_index(k).map(|(a, i)| (k.clone(), a, i)))
            .collect();
        for (k, akey, i) in reported {
            let a = self.arrays.get_mut(&akey).expect("listed");
            match a.slots[i as usize] {
                Slot::Ended(_) => {
                    let job = self.jobs.remove(&k).expect("listed");
                    let node = job.early.map(|(n, _)| n).or(job.held.map(|(n, _)| n));
                    if let Some(node) = node {
                        self.out.push(Effect::Ack { node, key: k });
                    }
                }
                Slot::Todo => {
                    a.held.insert(i);
                    self.feed_later.insert(akey);
                }
                Slot::InFlight => {}
            }
        }
    }

    pub(super) fn array_suspend(&mut self, key: ArrayKey, suspended: bool) {
        if let Some(a) = self.arrays.get_mut(&key) {
            if a.suspended != suspended {
                a.suspended = suspended;
                self.array_write_soon(&key);
                self.feed_later.insert(key);
            }
        }
    }

    /// Starts the array's next jobs, once its cluster's nodes were all asked what they hold.
    pub(super) fn feed(&mut self, key: &ArrayKey) {
        let Some(a) = self.arrays.get(key) else {
            return;
        };
        let synced = self
            .clusters
            .get(&a.info.cluster)
            .is_some_and(|c| c.unsynced.is_empty() && c.has_computation());
        if !synced {
            return;
        }
        let a = self.arrays.get_mut(key).expect("present");
        let start = a.to_start();
        let infos: Vec<Arc<JobInfo>> = start
            .iter()
            .map(|&i| {
                a.in_flight.insert(i);
                Arc::new(JobInfo {
                    key: a.key_of(i),
                    namespace: a.info.namespace.clone(),
                    name: format!("{}[{i}]", a.info.name),
                    uid: a.info.uid.clone(),
                    request: a.info.jobs[i as usize].clone(),
                    files: Vec::new(),
                    node: None,
                    deadline: None,
                    policy: a.info.policy.clone(),
                    stored: Default::default(),
                })
            })
            .collect();
        for (info, i) in infos.into_iter().zip(start) {
            let jk = info.key.clone();
            let job = self.entry(&jk, Stage::Parked);
            job.stage = Stage::Parked;
            job.info = Some(info);
            job.array = Some((key.clone(), i));
            self.admit(jk);
        }
    }

    /// An array job's status changed: its end becomes a row, anything else a count.
    pub(super) fn array_job_changed(&mut self, key: &JobKey, akey: &ArrayKey, index: u32) {
        let unix = self.now.unix;
        let Some(job) = self.jobs.get_mut(key) else {
            return;
        };
        if job.sealed {
            return;
        }
        if !job.status.status.is_terminal() {
            self.array_write_soon(akey);
            return;
        }
        job.sealed = true;
        let status = job.status.status;
        let row = job.row.take().unwrap_or_else(|| {
            arrays::row_without_result(
                index,
                status,
                job.status.node.clone(),
                job.status.message.clone(),
                unix,
            )
        });
        let ack = job.ack.take().map(|n| (n, key.clone()));
        self.forget_later.push(key.clone());
        let Some(a) = self.arrays.get_mut(akey) else {
            if let Some((node, key)) = ack {
                self.out.push(Effect::Ack { node, key });
            }
            return;
        };
        a.in_flight.remove(&index);
        a.slots[index as usize] = Slot::Ended(status);
        if a.deleted.is_some() {
            if let Some((node, key)) = ack {
                self.out.push(Effect::Ack { node, key });
            }
            self.array_gone_maybe_done(akey);
            return;
        }
        a.pending.push((row, ack));
        self.array_write_soon(akey);
        self.feed_later.insert(akey.clone());
    }

    /// A result for an array job the engine has no entry for: resent after its row (acked
    /// once stored), or from a node that ran it for an earlier instance (adopted).
    pub(super) fn array_result_without_entry(
        &mut self,
        node: &str,
        key: &JobKey,
        akey: &ArrayKey,
        index: u32,
    ) -> bool {
        let a = &self.arrays[akey];
        match a.slots[index as usize] {
            Slot::Ended(_) => {
                let in_write = a
                    .pending
                    .iter()
                    .map(|(r, _)| r.index)
                    .chain(a.writing.iter().map(|(i, _)| *i))
                    .any(|i| i == index);
                if !in_write {
                    self.out.push(Effect::Ack {
                        node: node.to_string(),
                        key: key.clone(),
                    });
                }
                true
            }
            Slot::Todo => {
                self.arrays.get_mut(akey).unwrap().held.insert(index);
                self.feed_later.insert(akey.clone());
                false // the caller keeps the result as an early one
            }
            Slot::InFlight => false,
        }
    }

    pub(super) fn array_gone(&mut self, key: ArrayKey, reply: ReplyTo) {
        let Some(a) = self.arrays.get_mut(&key) else {
            self.out.push(Effect::Reply(reply));
            return;
        };
        a.deleted.get_or_insert_with(Vec::new).push(reply);
        let keys: Vec<JobKey> = a.in_flight.iter().map(|i| a.key_of(*i)).collect();
        tracing::info!(array = %key, running = keys.len(), "job array deleted: terminating its jobs");
        for k in keys {
            let open = self
                .sched
                .job(&k)
                .is_some_and(|r| !r.status().is_terminal());
            let admitted = self
                .jobs
                .get(&k)
                .is_some_and(|j| j.stage == Stage::Admitted);
            if open && admitted {
                if let Some(j) = self.jobs.get_mut(&k) {
                    j.status.message = Some("the DispyJobArray was deleted".into());
                }
                self.schedule(Event::CancelRequested { key: k });
            } else {
                if let Some(a) = self.arrays.get_mut(&key) {
                    a.in_flight.remove(&((k.job & 0xffff_ffff) as u32));
                }
                self.forget_later.push(k);
            }
        }
        self.array_gone_maybe_done(&key);
    }

    fn array_gone_maybe_done(&mut self, key: &ArrayKey) {
        let Some(a) = self.arrays.get(key) else {
            return;
        };
        if a.deleted.is_none() || !a.in_flight.is_empty() {
            return;
        }
        let a = self.arrays.remove(key).expect("present");
        let acks = (a.pending.into_iter().map(|(_, ack)| ack))
            .chain(a.writing.into_iter().map(|(_, ack)| ack));
        for (node, key) in acks.flatten() {
            self.out.push(Effect::Ack { node, key });
        }
        for reply in a.deleted.into_iter().flatten() {
            self.out.push(Effect::Reply(reply));
        }
        self.out.push(Effect::ArrayKnows {
            key: key.clone(),
            known: false,
        });
    }

    pub(super) fn array_write_soon(&mut self, key: &ArrayKey) {
        let now = self.now.at;
        if let Some(a) = self.arrays.get_mut(key) {
            let due = if a.done() || !a.pending.is_empty() && a.pending.len() >= 2000 {
                now
            } else {
                now + arrays::ARRAY_WRITE_DELAY
            };
            a.write_due = Some(a.write_due.map_or(due, |d| d.min(due)));
        }
    }

    /// Sends the array's new rows and status to the API server now.
    pub(super) fn flush_array(&mut self, key: &ArrayKey) {
        let unix = self.now.unix;
        let running = {
            let Some(a) = self.arrays.get(key) else {
                return;
            };
            a.in_flight
                .iter()
                .filter(|i| {
                    self.jobs
                        .get(&a.key_of(**i))
                        .is_some_and(|j| j.status.status == JobStatus::Running)
                })
                .count() as u32
        };
        let a = self.arrays.get_mut(key).expect("present");
        a.write_due = None;
        // Every new row lands in the current chunk (the one it filled, if any, is in `full`).
        a.current_dirty |= !a.pending.is_empty();
        for (row, ack) in a.pending.drain(..) {
            if let Some(full) = a.chunks.push(&row) {
                a.full.push(full);
            }
            a.writing.push((row.index, ack));
        }
        let mut chunks = a.full.clone();
        if a.current_dirty && !a.chunks.text.is_empty() {
            chunks.push((a.chunks.current, a.chunks.text.clone()));
        }
        let status = a.current_status(running, unix);
        if chunks.is_empty() && a.written_status.as_ref() == Some(&status) && a.writing.is_empty() {
            return;
        }
        a.status = status.clone();
        a.write_in_flight = true;
        let write = ArrayWrite {
            namespace: a.info.namespace.clone(),
            name: a.info.name.clone(),
            uid: a.info.uid.clone(),
            chunks,
            status,
        };
        self.out.push(Effect::StoreArray {
            key: key.clone(),
            write: Box::new(write),
        });
    }

    pub(super) fn array_written(&mut self, key: ArrayKey, result: Result<(), StoreError>) {
        let now = self.now.at;
        let Some(a) = self.arrays.get_mut(&key) else {
            return;
        };
        a.write_in_flight = false;
        match result {
            Ok(()) => {
                a.full.clear();
                a.current_dirty = false;
                a.written_status = Some(a.status.clone());
                for (_, ack) in a.writing.drain(..) {
                    if let Some((node, key)) = ack {
                        self.out.push(Effect::Ack { node, key });
                    }
                }
                if a.write_due.is_some_and(|d| d <= now) {
                    self.flush_array(&key);
                }
            }
            Err(StoreError::Gone) => {
                // Deleted behind the engine: its jobs are terminated, its results let go.
                let reply_less = a.deleted.is_none();
                if reply_less {
                    a.deleted = Some(Vec::new());
                }
                a.write_due = None;
                let keys: Vec<JobKey> = a.in_flight.iter().map(|i| a.key_of(*i)).collect();
                for k in keys {
                    if self
                        .sched
                        .job(&k)
                        .is_some_and(|r| !r.status().is_terminal())
                    {
                        self.schedule(Event::CancelRequested { key: k });
                    }
                }
                self.array_gone_maybe_done(&key);
            }
            Err(StoreError::Failed(e)) => {
                tracing::warn!(array = %key, "storing the array's results failed (retrying): {e}");
                let due = now + RETRY;
                a.write_due = Some(a.write_due.map_or(due, |d| d.max(due)));
            }
        }
    }

    /// Deferred work of one input: job entries of ended array jobs leave (after the
    /// scheduler heard of their end), and arrays with room start their next jobs.
    pub(super) fn array_housekeeping(&mut self) {
        for key in std::mem::take(&mut self.forget_later) {
            self.forget(&key);
        }
        for key in std::mem::take(&mut self.feed_later) {
            self.feed(&key);
        }
    }

    pub(super) fn arrays_due(&mut self) {
        let now = self.now.at;
        let due: Vec<ArrayKey> = self
            .arrays
            .iter()
            .filter(|(_, a)| !a.write_in_flight && a.write_due.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.flush_array(&key);
        }
    }

    pub(super) fn arrays_writing(&self) -> bool {
        self.arrays
            .values()
            .any(|a| a.write_in_flight || a.write_due.is_some())
    }
}
