//! The engine's rules, input by input, without a node, a socket or an API server: what the
//! end-to-end tests see only from outside (restart adoption, early results, drain, deletion,
//! node loss, requeue limits, write batching and retries), and on random input sequences the
//! invariants of the module doc.

use super::*;
use dispy_core::scheduler::ClusterPolicy;
use proptest::prelude::*;

const A: &str = "10.0.0.1:9701";
const B: &str = "10.0.0.2:9701";
const CLUSTER: &str = "default/jc/0001";

/// The state, a clock, and every effect so far.
struct T {
    s: EngineState,
    now: Now,
    log: Vec<Effect>,
}

impl T {
    fn new() -> T {
        let now = Now {
            at: Instant::now(),
            unix: 1_800_000_000.0,
        };
        T {
            s: EngineState::new(now, Arc::new(Metrics::new())),
            now,
            log: Vec::new(),
        }
    }

    /// Feeds one input; returns its effects (also kept in `log`).
    fn step(&mut self, input: Input) -> Vec<&Effect> {
        let effects = self.s.handle(self.now, input);
        let from = self.log.len();
        self.log.extend(effects);
        self.log[from..].iter().collect()
    }

    fn advance(&mut self, d: Duration) -> Vec<&Effect> {
        self.now.at += d;
        self.now.unix += d.as_secs_f64();
        self.step(Input::Tick)
    }

    /// A JobCluster on these nodes, each connected and set up, holding `held` on the first.
    fn cluster_up(&mut self, info: Arc<ClusterInfo>, held: Vec<HeldJob>) {
        let nodes: Vec<NodeId> = info.nodes.keys().cloned().collect();
        self.step(Input::Cluster(info));
        let mut held = Some(held);
        for node in nodes {
            self.node_up(&node, held.take().unwrap_or_default());
        }
    }

    fn node_up(&mut self, node: &str, held: Vec<HeldJob>) {
        self.step(Input::Connected {
            node: node.into(),
            result: Ok(Hello {
                name: format!("name-of-{node}"),
                cpus: 1,
            }),
        });
        self.step(Input::SetUp {
            cluster: CLUSTER.into(),
            node: node.into(),
            result: Ok(held),
        });
    }

    fn news(&mut self, node: &str, news: NodeNews) -> Vec<&Effect> {
        self.step(Input::FromNode {
            node: node.into(),
            news,
        })
    }

    fn done(&mut self, node: &str, id: u64, status: JobStatus) -> Vec<&Effect> {
        let result = JobResult {
            status,
            result: Some("42".into()),
            ..Default::default()
        };
        self.news(
            node,
            NodeNews::Done {
                key: key(id),
                result,
            },
        )
    }

    fn written(&mut self, id: u64, result: Result<(), StoreError>) -> Vec<&Effect> {
        self.step(Input::Written {
            key: key(id),
            files: Vec::new(),
            result,
        })
    }
}

fn key(id: u64) -> JobKey {
    JobKey::new(CLUSTER, id)
}

fn cluster(nodes: &[&str], reentrant: bool, backoff_limit: u32) -> Arc<ClusterInfo> {
    Arc::new(ClusterInfo {
        id: CLUSTER.into(),
        namespace: "default".into(),
        name: "jc".into(),
        uid: "0001".into(),
        computation: Some(dispy_core::protocol::Computation::Program(
            Default::default(),
        )),
        files: Vec::new(),
        policy: ClusterPolicy {
            reentrant,
            backoff_limit,
        },
        suspended: false,
        secret: "s".into(),
        tls_cert: None,
        pulse_interval: Duration::from_secs(2),
        nodes: nodes.iter().map(|n| (n.to_string(), None)).collect(),
    })
}

fn job(id: u64, stored: DispyJobStatus) -> Arc<JobInfo> {
    Arc::new(JobInfo {
        key: key(id),
        namespace: "default".into(),
        name: format!("job-{id}"),
        uid: format!("uid-{id}"),
        request: JobRequest {
            id,
            args: "[]".into(),
            kwargs: "{}".into(),
            depends: Vec::new(),
        },
        files: Vec::new(),
        node: None,
        deadline: None,
        policy: None,
        stored,
    })
}

use dispy_core::protocol::JobRequest;

fn stored(status: JobStatus, attempts: u32) -> DispyJobStatus {
    DispyJobStatus {
        status,
        attempts,
        ..Default::default()
    }
}

/// Keys submitted, with their node.
fn submits(effects: &[&Effect]) -> Vec<(u64, NodeId)> {
    effects
        .iter()
        .flat_map(|e| match e {
            Effect::Submit { node, jobs, .. } => {
                jobs.iter().map(|j| (j.key.job, node.clone())).collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

/// Statuses stored (in order), of any job.
fn stores(effects: &[&Effect]) -> Vec<(u64, JobStatus)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Store { key, write, .. } => Some((key.job, write.status.status)),
            _ => None,
        })
        .collect()
}

fn acks(effects: &[&Effect]) -> Vec<(u64, NodeId)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Ack { node, key } => Some((key.job, node.clone())),
            _ => None,
        })
        .collect()
}

fn replies(effects: &[&Effect]) -> usize {
    effects
        .iter()
        .filter(|e| matches!(e, Effect::Reply(_)))
        .count()
}

fn store_of(effects: &[&Effect], id: u64) -> DispyJobStatus {
    effects
        .iter()
        .rev()
        .find_map(|e| match e {
            Effect::Store { key, write, .. } if key.job == id => Some(write.status.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no status of job {id} stored in {effects:?}"))
}

#[test]
fn a_short_job_costs_one_write_and_its_result_is_acked_only_once_stored() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    let e = t.step(Input::Job(job(1, DispyJobStatus::default())));
    assert_eq!(submits(&e), vec![(1, A.to_string())]);
    let e = t.news(
        A,
        NodeNews::Started {
            key: key(1),
            start_time: 1.0,
        },
    );
    assert!(
        stores(&e).is_empty(),
        "Running waits {NOT_TERMINAL_DELAY:?}: {e:?}"
    );
    let e = t.done(A, 1, JobStatus::Finished);
    assert_eq!(
        stores(&e),
        vec![(1, JobStatus::Finished)],
        "only the end is written"
    );
    assert!(acks(&e).is_empty(), "not acked before it is stored");
    let e = t.written(1, Ok(()));
    assert_eq!(acks(&e), vec![(1, A.to_string())]);
    // Time passes: the Running status is not written after the end.
    let e = t.advance(Duration::from_secs(5));
    assert!(stores(&e).is_empty(), "{e:?}");
    // A resent result (the node did not see the ack) is acked again, not stored again.
    let e = t.done(A, 1, JobStatus::Finished);
    assert!(stores(&e).is_empty());
    assert_eq!(acks(&e), vec![(1, A.to_string())]);
}

#[test]
fn once_its_end_is_stored_the_engine_keeps_only_a_summary_of_the_job() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    let mut info = (*job(1, DispyJobStatus::default())).clone();
    info.request.args = "[\"a long argument\"]".into();
    t.step(Input::Job(Arc::new(info)));
    t.done(A, 1, JobStatus::Finished);
    let held = &t.s.jobs[&key(1)];
    assert_eq!(
        held.status.result,
        Some(serde_json::json!(42)),
        "kept until stored"
    );
    let e = t.written(1, Ok(()));
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::Knows { known: false, .. })),
        "the controller may send it again: {e:?}"
    );
    // Only its status is left: no arguments, result or output.
    assert!(!t.s.jobs.contains_key(&key(1)));
    assert_eq!(t.s.ended[&key(1)], JobStatus::Finished);
    assert!(t.s.sched.job(&key(1)).is_none());
    // Sent again (read back from the API server): nothing changes.
    let e = t.step(Input::Job(job(1, stored(JobStatus::Finished, 1))));
    assert!(stores(&e).is_empty() && submits(&e).is_empty(), "{e:?}");
    // Nothing of it is written again: a resend is acked, never stored over the result.
    let e = t.done(A, 1, JobStatus::Finished);
    assert!(stores(&e).is_empty(), "{e:?}");
    assert_eq!(acks(&e), vec![(1, A.to_string())]);
    let e = t.advance(Duration::from_secs(5));
    assert!(stores(&e).is_empty(), "{e:?}");
    t.step(Input::Job(job(2, DispyJobStatus::default())));
    let e = t.advance(Duration::from_millis(1));
    let stats = e
        .iter()
        .rev()
        .find_map(|e| match e {
            Effect::Stats { stats: Some(s), .. } => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    let n = stats.counts;
    assert_eq!((n.finished, n.created + n.running), (1, 1), "still counted");
}

#[test]
fn a_job_stored_terminal_is_never_written_even_when_deleted_or_resent() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    // As the controller's cache holds it: a summary only.
    let summary = DispyJobStatus {
        end_time: Some("2026-12-01T00:00:00Z".into()),
        ..stored(JobStatus::Finished, 1)
    };
    t.step(Input::Job(job(4, summary)));
    assert_eq!(t.s.ended.get(&key(4)), Some(&JobStatus::Finished));
    let e = t.done(A, 4, JobStatus::Finished);
    assert!(stores(&e).is_empty());
    let e = t.advance(Duration::from_secs(5));
    assert!(stores(&e).is_empty());
    // Its DispyJob deleted (no finalizer: seen by the watch): forgotten at once.
    let e = t.step(Input::JobGone {
        key: key(4),
        reply: ReplyTo(1),
    });
    assert!(stores(&e).is_empty());
    assert_eq!(replies(&e), 1);
    assert!(!t.s.jobs.contains_key(&key(4)) && !t.s.ended.contains_key(&key(4)));
}

#[test]
fn after_a_restart_a_job_a_node_holds_is_adopted_there_and_never_submitted_again() {
    let mut t = T::new();
    // The DispyJob was read first (stored Running by the previous instance) ...
    t.step(Input::Cluster(cluster(&[A], false, 6)));
    let e = t.step(Input::Job(job(7, stored(JobStatus::Running, 1))));
    assert!(submits(&e).is_empty(), "the node was not asked yet");
    // ... then the node, asked at setup, says it holds it, running.
    t.step(Input::Connected {
        node: A.into(),
        result: Ok(Hello {
            name: "a".into(),
            cpus: 1,
        }),
    });
    let e = t.step(Input::SetUp {
        cluster: CLUSTER.into(),
        node: A.into(),
        result: Ok(vec![HeldJob {
            id: 7,
            status: JobStatus::Running,
        }]),
    });
    assert!(submits(&e).is_empty(), "adopted, not sent again: {e:?}");
    let e = t.done(A, 7, JobStatus::Finished);
    let s = store_of(&e, 7);
    assert_eq!((s.status, s.attempts), (JobStatus::Finished, 1));
    assert_eq!(acks(&t.written(7, Ok(()))), vec![(7, A.to_string())]);
    assert!(submits(&t.log.iter().collect::<Vec<_>>()).is_empty());
}

#[test]
fn a_result_resent_before_its_dispyjob_is_read_is_stored_once_the_job_is() {
    let mut t = T::new();
    t.cluster_up(
        cluster(&[A], false, 6),
        vec![HeldJob {
            id: 3,
            status: JobStatus::Finished,
        }],
    );
    // The node resends the result it kept: no DispyJob read yet.
    let e = t.done(A, 3, JobStatus::Finished);
    assert!(stores(&e).is_empty() && acks(&e).is_empty(), "{e:?}");
    let e = t.step(Input::Job(job(3, stored(JobStatus::Running, 1))));
    assert!(submits(&e).is_empty(), "{e:?}");
    assert_eq!(store_of(&e, 3).status, JobStatus::Finished);
    assert_eq!(acks(&t.written(3, Ok(()))), vec![(3, A.to_string())]);
}

#[test]
fn a_result_for_a_job_stored_terminal_is_a_stale_resend_and_acked_at_once() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Job(job(4, stored(JobStatus::Finished, 1))));
    let e = t.done(A, 4, JobStatus::Finished);
    assert!(stores(&e).is_empty());
    assert_eq!(acks(&e), vec![(4, A.to_string())]);
}

#[test]
fn jobs_wait_until_every_node_was_asked_what_it_holds() {
    let mut t = T::new();
    t.step(Input::Cluster(cluster(&[A, B], false, 6)));
    t.node_up(A, Vec::new());
    let e = t.step(Input::Job(job(1, DispyJobStatus::default())));
    assert!(submits(&e).is_empty(), "B may hold it: {e:?}");
    // B cannot be reached: it holds nothing we could adopt.
    let e = t.step(Input::Connected {
        node: B.into(),
        result: Err("connection refused".into()),
    });
    assert_eq!(submits(&e), vec![(1, A.to_string())]);
}

#[test]
fn jobs_of_a_cluster_not_yet_known_wait_for_it_and_go_in_order() {
    let mut t = T::new();
    for id in [5, 2, 9] {
        t.step(Input::Job(job(id, DispyJobStatus::default())));
    }
    let info = cluster(&[A], false, 6);
    t.step(Input::Cluster(info));
    t.step(Input::Connected {
        node: A.into(),
        result: Ok(Hello {
            name: "a".into(),
            cpus: 3,
        }),
    });
    let e = t.step(Input::SetUp {
        cluster: CLUSTER.into(),
        node: A.into(),
        result: Ok(Vec::new()),
    });
    let order: Vec<u64> = submits(&e).into_iter().map(|(id, _)| id).collect();
    assert_eq!(order, vec![5, 2, 9], "in the order they came");
}

#[test]
fn deleting_a_running_job_terminates_it_and_replies_once_it_stopped() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    t.news(
        A,
        NodeNews::Started {
            key: key(1),
            start_time: 1.0,
        },
    );
    let e = t.step(Input::JobGone {
        key: key(1),
        reply: ReplyTo(77),
    });
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::Cancel { key, .. } if key.job == 1)),
        "{e:?}"
    );
    assert_eq!(replies(&e), 0, "not before it stopped");
    let e = t.done(A, 1, JobStatus::Terminated);
    assert!(
        e.iter().any(|e| matches!(e, Effect::Reply(ReplyTo(77)))),
        "{e:?}"
    );
    let s = store_of(&e, 1);
    assert_eq!(
        s.message.as_deref(),
        Some("the DispyJob was deleted; Terminated")
    );
}

#[test]
fn a_deleted_job_is_forgotten_once_its_end_is_stored_and_a_vanished_one_once_its_node_answers() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A, B], false, 6), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    t.step(Input::Job(job(2, DispyJobStatus::default())));
    let nodes: BTreeMap<u64, NodeId> = submits(&t.log.iter().collect::<Vec<_>>())
        .into_iter()
        .collect();
    // Deleted while running: its end is stored, then nothing of it is left.
    t.step(Input::JobGone {
        key: key(1),
        reply: ReplyTo(1),
    });
    t.done(&nodes[&1], 1, JobStatus::Terminated);
    assert_eq!(acks(&t.written(1, Ok(()))), vec![(1, nodes[&1].clone())]);
    assert!(t.s.job_entry(&key(1)).is_none());
    // Its DispyJob vanished while it ran (a write found it gone): the node's answer to the
    // cancel is acked and the job forgotten.
    t.news(
        &nodes[&2],
        NodeNews::Started {
            key: key(2),
            start_time: 1.0,
        },
    );
    t.advance(NOT_TERMINAL_DELAY);
    let e = t.written(2, Err(StoreError::Gone));
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::Cancel { key, .. } if key.job == 2)),
        "{e:?}"
    );
    let e = t.done(&nodes[&2], 2, JobStatus::Terminated);
    assert_eq!(acks(&e), vec![(2, nodes[&2].clone())]);
    assert!(t.s.job_entry(&key(2)).is_none());
}

#[test]
fn deleting_a_job_that_never_reached_a_node_replies_at_once_and_forgets_it() {
    let mut t = T::new();
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    let e = t.step(Input::JobGone {
        key: key(1),
        reply: ReplyTo(5),
    });
    assert_eq!(replies(&e), 1);
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Knows { known: false, .. })));
    assert!(t.s.job_entry(&key(1)).is_none());
}

#[test]
fn a_lost_node_requeues_a_reentrant_job_on_the_other_node() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A, B], true, 6), Vec::new());
    let e = t.step(Input::Job(job(1, DispyJobStatus::default())));
    let (_, first) = submits(&e)[0].clone();
    let other = if first == A { B } else { A };
    t.news(
        &first,
        NodeNews::Started {
            key: key(1),
            start_time: 1.0,
        },
    );
    let e = t.news(
        &first,
        NodeNews::Lost {
            reason: "pulses missed".into(),
        },
    );
    assert_eq!(submits(&e), vec![(1, other.to_string())]);
    let e = t.done(other, 1, JobStatus::Finished);
    let s = store_of(&e, 1);
    assert_eq!((s.status, s.attempts), (JobStatus::Finished, 2));
    // The lost node's late result of the first attempt is stale: acked, not recorded.
    t.node_up(&first, Vec::new());
    let e = t.done(&first, 1, JobStatus::Finished);
    assert!(stores(&e).is_empty());
    assert_eq!(acks(&e), vec![(1, first.clone())]);
}

#[test]
fn without_reentrant_a_lost_node_abandons_its_running_job() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A, B], false, 6), Vec::new());
    let e = t.step(Input::Job(job(1, DispyJobStatus::default())));
    let (_, first) = submits(&e)[0].clone();
    t.news(
        &first,
        NodeNews::Started {
            key: key(1),
            start_time: 1.0,
        },
    );
    let e = t.news(
        &first,
        NodeNews::Lost {
            reason: "pulses missed".into(),
        },
    );
    assert!(submits(&e).is_empty());
    let s = store_of(&e, 1);
    assert_eq!(s.status, JobStatus::Abandoned);
    assert!(s.message.unwrap().contains("pulses missed"));
}

#[test]
fn requeues_stop_at_the_backoff_limit() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], true, 1), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    for attempt in 1..=2 {
        t.news(
            A,
            NodeNews::Started {
                key: key(1),
                start_time: 1.0,
            },
        );
        let e = t.news(
            A,
            NodeNews::Lost {
                reason: format!("lost {attempt}"),
            },
        );
        if attempt == 2 {
            let s = store_of(&e, 1);
            assert_eq!((s.status, s.attempts), (JobStatus::Abandoned, 2), "{s:?}");
            return;
        }
        // Back after the retry delay: the job goes there again.
        let e = t.advance(RETRY);
        assert!(
            e.iter().any(|e| matches!(e, Effect::Connect { .. })),
            "{e:?}"
        );
        assert_eq!(stores(&e), vec![(1, JobStatus::Created)], "requeued");
        t.written(1, Ok(()));
        t.node_up(A, Vec::new());
        assert_eq!(submits(&t.log.iter().collect::<Vec<_>>()).len(), 2);
    }
}

#[test]
fn a_write_in_flight_holds_the_next_and_a_failed_write_is_retried() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    t.news(
        A,
        NodeNews::Started {
            key: key(1),
            start_time: 1.0,
        },
    );
    let e = t.advance(NOT_TERMINAL_DELAY);
    assert_eq!(stores(&e), vec![(1, JobStatus::Running)]);
    let e = t.done(A, 1, JobStatus::Finished);
    assert!(stores(&e).is_empty(), "one write per job at a time: {e:?}");
    let e = t.written(1, Ok(()));
    assert_eq!(
        stores(&e),
        vec![(1, JobStatus::Finished)],
        "the newest, at once"
    );
    assert!(
        acks(&e).is_empty(),
        "the Running write succeeded, not the end's"
    );
    let e = t.written(1, Err(StoreError::Failed("etcd is slow".into())));
    assert!(stores(&e).is_empty() && acks(&e).is_empty());
    let e = t.advance(RETRY);
    assert_eq!(stores(&e), vec![(1, JobStatus::Finished)], "retried");
    assert_eq!(acks(&t.written(1, Ok(()))), vec![(1, A.to_string())]);
}

#[test]
fn a_dispyjob_deleted_behind_the_engine_has_its_result_acked_and_is_forgotten() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    t.done(A, 1, JobStatus::Finished);
    let e = t.written(1, Err(StoreError::Gone));
    assert_eq!(acks(&e), vec![(1, A.to_string())]);
    assert!(t.s.job_entry(&key(1)).is_none());
}

#[test]
fn drain_answers_once_no_write_is_waiting_or_in_flight() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    t.done(A, 1, JobStatus::Finished);
    let e = t.step(Input::Drain { reply: ReplyTo(9) });
    assert_eq!(replies(&e), 0, "a write is in flight");
    let e = t.written(1, Ok(()));
    assert_eq!(replies(&e), 1);
}

#[test]
fn a_pinned_job_waits_for_a_node_the_cluster_lacks_and_says_so() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    let mut info = (*job(1, DispyJobStatus::default())).clone();
    info.node = Some("name-of-nowhere".into());
    let e = t.step(Input::Job(Arc::new(info)));
    assert!(submits(&e).is_empty());
    let e = t.advance(NOT_TERMINAL_DELAY);
    let s = store_of(&e, 1);
    let waiting = s.conditions.iter().find(|c| c.type_ == "Waiting").unwrap();
    assert_eq!(waiting.reason, "NodeNotFound");
    assert!(s.message.unwrap().contains(&format!("name-of-{A} at {A}")));
    // By its node's name it runs.
    let mut info = (*job(2, DispyJobStatus::default())).clone();
    info.node = Some(format!("name-of-{A}"));
    assert_eq!(
        submits(&t.step(Input::Job(Arc::new(info)))),
        vec![(2, A.to_string())]
    );
}

#[test]
fn the_cluster_stats_count_jobs_and_ready_cpus() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A, B], false, 6), Vec::new());
    t.step(Input::Job(job(1, DispyJobStatus::default())));
    t.step(Input::Job(job(2, stored(JobStatus::Finished, 1))));
    t.advance(Duration::from_millis(1));
    let stats = t
        .log
        .iter()
        .rev()
        .find_map(|e| match e {
            Effect::Stats { stats: Some(s), .. } => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((stats.cpus, stats.busy), (2, 1));
    assert_eq!((stats.counts.created, stats.counts.finished), (1, 1));
    assert_eq!(stats.nodes.len(), 2);
}

// --- random sequences -------------------------------------------------------------------------

const JOBS: u64 = 3;
const NODES: [&str; 2] = [A, B];

#[derive(Clone, Debug)]
enum Op {
    Started {
        job: u64,
        node: usize,
    },
    Done {
        job: u64,
        node: usize,
        finished: bool,
    },
    Lost {
        node: usize,
    },
    Back {
        node: usize,
    },
    /// Completes the `pick`-th write in flight.
    Written {
        pick: usize,
        ok: bool,
        gone: bool,
    },
    Refused {
        job: u64,
        node: usize,
    },
    Deleted {
        job: u64,
    },
    Tick {
        millis: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let job = 0..JOBS;
    let node = 0..NODES.len();
    prop_oneof![
        (job.clone(), node.clone()).prop_map(|(job, node)| Op::Started { job, node }),
        (job.clone(), node.clone(), any::<bool>()).prop_map(|(job, node, finished)| Op::Done {
            job,
            node,
            finished
        }),
        node.clone().prop_map(|node| Op::Lost { node }),
        node.clone().prop_map(|node| Op::Back { node }),
        (0..4usize, any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(pick, ok, gone)| Op::Written { pick, ok, gone }),
        (job.clone(), node.clone()).prop_map(|(job, node)| Op::Refused { job, node }),
        job.prop_map(|job| Op::Deleted { job })
            .prop_filter("rare", |_| true),
        (0..3000u64).prop_map(|millis| Op::Tick { millis }),
    ]
}

/// What the effects have shown so far, to check each new one against.
#[derive(Default)]
struct Seen {
    /// Writes in flight: (job, terminal).
    in_flight: Vec<(u64, bool)>,
    /// Jobs whose terminal status was stored.
    sealed: BTreeSet<u64>,
    /// Where each job was last submitted, until that attempt ended.
    placed: BTreeMap<u64, NodeId>,
    /// The node whose result each job's status records.
    recorded: BTreeMap<u64, NodeId>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn stored_terminal_once_acked_only_after_stored_never_in_two_places(
        reentrant in any::<bool>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut t = T::new();
        t.cluster_up(cluster(&NODES, reentrant, 2), Vec::new());
        let mut seen = Seen::default();
        let mut up = [true, true];
        let mut effects: Vec<Effect> = Vec::new();
        for id in 0..JOBS {
            effects.extend(t.s.handle(t.now, Input::Job(job(id, DispyJobStatus::default()))));
        }
        for op in ops {
            check(&mut seen, &effects, None)?;
            let (input, live) = match op {
                Op::Started { job, node } => (Input::FromNode { node: NODES[node].into(), news: NodeNews::Started { key: key(job), start_time: 1.0 } }, None),
                Op::Done { job, node, finished } => {
                    let live = t.s.is_live(&key(job), NODES[node]).then_some((job, NODES[node].to_string()));
                    if live.is_some() {
                        seen.placed.remove(&job);
                    }
                    let status = if finished { JobStatus::Finished } else { JobStatus::Terminated };
                    let result = JobResult { status, ..Default::default() };
                    (Input::FromNode { node: NODES[node].into(), news: NodeNews::Done { key: key(job), result } }, live)
                }
                Op::Lost { node } if up[node] => {
                    up[node] = false;
                    seen.placed.retain(|_, n| n != NODES[node]);
                    (Input::FromNode { node: NODES[node].into(), news: NodeNews::Lost { reason: "lost".into() } }, None)
                }
                Op::Back { node } if !up[node] => {
                    up[node] = true;
                    t.now.at += RETRY;
                    effects.extend(t.s.handle(t.now, Input::Tick));
                    effects.extend(t.s.handle(t.now, Input::Connected { node: NODES[node].into(), result: Ok(Hello { name: "n".into(), cpus: 1 }) }));
                    (Input::SetUp { cluster: CLUSTER.into(), node: NODES[node].into(), result: Ok(Vec::new()) }, None)
                }
                Op::Written { pick, ok, gone } if !seen.in_flight.is_empty() => {
                    let (job, terminal) = seen.in_flight.remove(pick % seen.in_flight.len());
                    let result = match (ok, gone) {
                        (_, true) => Err(StoreError::Gone),
                        (true, _) => Ok(()),
                        (false, _) => Err(StoreError::Failed("x".into())),
                    };
                    if result.is_ok() && terminal {
                        prop_assert!(seen.sealed.insert(job), "job {} stored terminal twice", job);
                    }
                    if result == Err(StoreError::Gone) {
                        seen.sealed.insert(job);
                    }
                    (Input::Written { key: key(job), files: Vec::new(), result }, None)
                }
                Op::Refused { job, node } => {
                    if seen.placed.get(&job).map(String::as_str) == Some(NODES[node]) {
                        seen.placed.remove(&job);
                    }
                    (Input::SubmitFailed { key: key(job), node: NODES[node].into(), reason: "no".into() }, None)
                }
                Op::Deleted { job } => {
                    // Its result goes with the DispyJob: acking it then loses nothing.
                    seen.recorded.remove(&job);
                    (Input::JobGone { key: key(job), reply: ReplyTo(job) }, None)
                }
                Op::Tick { millis } => {
                    t.now.at += Duration::from_millis(millis);
                    (Input::Tick, None)
                }
                _ => continue,
            };
            effects = t.s.handle(t.now, input);
            check(&mut seen, &effects, live)?;
            effects.clear();
        }
    }
}

/// Checks one step's effects. `live`: the step delivered the result of the job's current
/// attempt from that node, which must not be acknowledged before it is stored.
fn check(
    seen: &mut Seen,
    effects: &[Effect],
    live: Option<(u64, NodeId)>,
) -> Result<(), TestCaseError> {
    if let Some((job, node)) = &live {
        seen.recorded.insert(*job, node.clone());
    }
    for e in effects {
        match e {
            Effect::Store { key, write, .. } => {
                prop_assert!(
                    !seen.sealed.contains(&key.job),
                    "job {} written after its terminal status was stored",
                    key.job
                );
                prop_assert!(
                    !seen.in_flight.iter().any(|(j, _)| *j == key.job),
                    "two writes of job {} at once",
                    key.job
                );
                seen.in_flight
                    .push((key.job, write.status.status.is_terminal()));
            }
            Effect::Ack { node, key } => {
                // (A job whose DispyJob is gone has nothing left to store its result in.)
                let early = live.as_ref() == Some(&(key.job, node.clone()))
                    && !seen.sealed.contains(&key.job);
                prop_assert!(
                    !early,
                    "job {}'s live result acked before it was stored",
                    key.job
                );
                let recorded = seen.recorded.get(&key.job) == Some(node);
                prop_assert!(
                    !recorded || seen.sealed.contains(&key.job),
                    "job {}'s recorded result acked to {} before it was stored",
                    key.job,
                    node
                );
            }
            Effect::Submit { node, jobs, .. } => {
                for j in jobs {
                    if let Some(other) = seen.placed.get(&j.key.job) {
                        prop_assert!(
                            other == node,
                            "job {} submitted to {} while on {}",
                            j.key.job,
                            node,
                            other
                        );
                    }
                    seen.placed.insert(j.key.job, node.clone());
                }
            }
            _ => {}
        }
    }
    Ok(())
}
#[test]
fn zz_sizes() {
    eprintln!(
        "Job {} JobInfo {} Status {} DJR {} Meta {} JobKey {}",
        std::mem::size_of::<Job>(),
        std::mem::size_of::<JobInfo>(),
        std::mem::size_of::<DispyJobStatus>(),
        std::mem::size_of::<dispy_core::manifest::DispyJobResource>(),
        std::mem::size_of::<kube::api::ObjectMeta>(),
        std::mem::size_of::<JobKey>()
    );
}

// --- DispyJobArrays -----------------------------------------------------------------------

const ARRAY_UID: &str = "uid-of-the-array";

fn array(n: u32, policy: Option<ClusterPolicy>) -> Arc<ArrayInfo> {
    let p = crate::engine::arrays::prefix(ARRAY_UID);
    Arc::new(ArrayInfo {
        key: "default/arr".into(),
        namespace: "default".into(),
        name: "arr".into(),
        uid: ARRAY_UID.into(),
        generation: Some(1),
        cluster: CLUSTER.into(),
        jobs: (0..n)
            .map(|i| JobRequest {
                id: crate::engine::arrays::job_id(p, i),
                args: format!("[{i}]"),
                kwargs: "{}".into(),
                depends: Vec::new(),
            })
            .collect(),
        suspended: false,
        policy,
        stored: BTreeMap::new(),
        chunks: dispy_core::array::Chunks::resume(&BTreeMap::new()),
        status: Default::default(),
    })
}

/// The node-side key of index `i` of the test array.
fn index_key(i: u32) -> JobKey {
    JobKey::new(
        CLUSTER,
        crate::engine::arrays::job_id(crate::engine::arrays::prefix(ARRAY_UID), i),
    )
}

fn index_news<'a>(t: &'a mut T, node: &str, i: u32, status: Option<JobStatus>) -> Vec<&'a Effect> {
    let news = match status {
        None => NodeNews::Started {
            key: index_key(i),
            start_time: 1.0,
        },
        Some(status) => NodeNews::Done {
            key: index_key(i),
            result: JobResult {
                status,
                result: Some(i.to_string()),
                ..Default::default()
            },
        },
    };
    t.news(node, news)
}

fn array_writes<'a>(effects: &[&'a Effect]) -> Vec<&'a ArrayWrite> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::StoreArray { write, .. } => Some(&**write),
            _ => None,
        })
        .collect()
}

#[test]
fn an_array_index_is_acked_to_its_node_only_once_its_row_is_stored() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    let e = t.step(Input::Array(array(2, None)));
    assert_eq!(submits(&e).len(), 1, "one cpu: one index at a time");
    let e = index_news(&mut t, A, 0, Some(JobStatus::Finished));
    assert!(acks(&e).is_empty(), "{e:?}");
    // Rows go in a batch, a second later.
    let e = t.advance(Duration::from_secs(2));
    let writes = array_writes(&e);
    let rows: String = writes
        .iter()
        .flat_map(|w| w.chunks.iter().map(|(_, t)| t.clone()))
        .collect();
    assert!(rows.contains(r#""index":0"#), "{rows}");
    assert!(acks(&e).is_empty(), "not before it is stored");
    let e = t.step(Input::ArrayWritten {
        key: "default/arr".into(),
        result: Ok(()),
    });
    assert_eq!(acks(&e), vec![(index_key(0).job, A.to_string())]);
}

#[test]
fn deleting_an_array_terminates_its_running_job_starts_no_other_and_replies_once_it_stopped() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Array(array(3, None)));
    index_news(&mut t, A, 0, None);
    let e = t.step(Input::ArrayGone {
        key: "default/arr".into(),
        reply: ReplyTo(9),
    });
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::Cancel { key, .. } if *key == index_key(0))),
        "{e:?}"
    );
    assert_eq!(replies(&e), 0, "not before it stopped");
    let e = index_news(&mut t, A, 0, Some(JobStatus::Terminated));
    assert!(
        e.iter().any(|e| matches!(e, Effect::Reply(ReplyTo(9)))),
        "{e:?}"
    );
    assert!(
        submits(&e).is_empty(),
        "no index starts after the deletion: {e:?}"
    );
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::ArrayKnows { known: false, .. })));
}

#[test]
fn an_arrays_own_reentrant_requeues_its_jobs_of_a_lost_node_in_a_cluster_that_is_not() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A, B], false, 6), Vec::new());
    let own = ClusterPolicy {
        reentrant: true,
        backoff_limit: 6,
    };
    let e = t.step(Input::Array(array(1, Some(own))));
    let (_, first) = submits(&e)[0].clone();
    let other = if first == A { B } else { A };
    index_news(&mut t, &first, 0, None);
    let e = t.news(
        &first,
        NodeNews::Lost {
            reason: "pulses missed".into(),
        },
    );
    assert_eq!(submits(&e), vec![(index_key(0).job, other.to_string())]);
}

#[test]
fn a_deleted_cluster_takes_its_ended_jobs_with_it_and_keeps_none_that_end_later() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    t.step(Input::Job(job(1, stored(JobStatus::Finished, 1))));
    t.step(Input::Job(job(2, DispyJobStatus::default())));
    t.news(
        A,
        NodeNews::Started {
            key: key(2),
            start_time: 1.0,
        },
    );
    assert_eq!(t.s.ended.len(), 1);
    t.step(Input::ClusterGone {
        id: CLUSTER.into(),
        reply: ReplyTo(3),
    });
    assert!(t.s.ended.is_empty() && t.s.ended_counts.is_empty());
    // Its running job is cancelled; once that is stored it is not kept either.
    t.done(A, 2, JobStatus::Cancelled);
    t.written(2, Ok(()));
    assert!(t.s.ended.is_empty(), "{:?}", t.s.ended);
    assert!(!t.s.jobs.contains_key(&key(2)));
}

#[test]
fn a_failed_set_up_is_told_and_tried_again_until_it_works() {
    let mut t = T::new();
    t.step(Input::Cluster(cluster(&[A], false, 6)));
    t.step(Input::Connected {
        node: A.into(),
        result: Ok(Hello {
            name: "a".into(),
            cpus: 1,
        }),
    });
    let e = t.step(Input::SetUp {
        cluster: CLUSTER.into(),
        node: A.into(),
        result: Err("setup raised OSError: disk not mounted yet".into()),
    });
    assert!(
        e.iter().any(
            |e| matches!(e, Effect::Event { reason, warning: true, note, .. }
            if reason == "SetupFailed" && note.contains("disk not mounted yet"))
        ),
        "{e:?}"
    );
    let set_ups = |e: &[&Effect]| {
        e.iter()
            .filter(|e| matches!(e, Effect::SetUp { node, .. } if node == A))
            .count()
    };
    let e = t.advance(Duration::from_secs(5));
    assert_eq!(set_ups(&e), 0, "not before {SETUP_RETRY:?}");
    let e = t.advance(SETUP_RETRY);
    assert_eq!(set_ups(&e), 1, "{e:?}");
    t.step(Input::SetUp {
        cluster: CLUSTER.into(),
        node: A.into(),
        result: Ok(Vec::new()),
    });
    let e = t.step(Input::Job(job(1, DispyJobStatus::default())));
    assert_eq!(
        submits(&e),
        vec![(1, A.to_string())],
        "set up at last: it runs jobs"
    );
    let e = t.advance(SETUP_RETRY * 2);
    assert_eq!(set_ups(&e), 0, "nothing more to set up");
}

fn waiting_of(s: &DispyJobStatus) -> Option<&dispy_core::manifest::Condition> {
    s.conditions.iter().find(|c| c.type_ == "Waiting")
}

#[test]
fn a_job_pinned_to_a_pod_that_is_not_ready_yet_runs_there_once_it_is() {
    let mut t = T::new();
    t.cluster_up(cluster(&[A], false, 6), Vec::new());
    let mut info = (*job(1, DispyJobStatus::default())).clone();
    info.node = Some("jc-node-1".into());
    let e = t.step(Input::Job(Arc::new(info)));
    assert!(submits(&e).is_empty());
    let e = t.advance(NOT_TERMINAL_DELAY);
    assert_eq!(
        waiting_of(&store_of(&e, 1)).map(|c| c.reason.clone()),
        Some("NodeNotFound".into())
    );
    t.written(1, Ok(()));
    // The pod becomes ready at B: the cluster's nodes change, B is set up.
    let mut grown = (*cluster(&[A, B], false, 6)).clone();
    grown.nodes.insert(B.into(), Some("jc-node-1".into()));
    t.step(Input::Cluster(Arc::new(grown)));
    let e = t.step(Input::Connected {
        node: B.into(),
        result: Ok(Hello {
            name: "jc-node-1".into(),
            cpus: 1,
        }),
    });
    assert!(submits(&e).is_empty(), "not before B is set up");
    let e = t.step(Input::SetUp {
        cluster: CLUSTER.into(),
        node: B.into(),
        result: Ok(Vec::new()),
    });
    assert_eq!(submits(&e), vec![(1, B.to_string())]);
    let e = t.advance(NOT_TERMINAL_DELAY);
    let s = store_of(&e, 1);
    assert_eq!(s.message, None, "{s:?}");
    assert_ne!(
        waiting_of(&s).map(|c| c.status.as_str()),
        Some("True"),
        "{:?}",
        s.conditions
    );
}
