//! Random event sequences against the scheduler. A model beside it follows only the actions it
//! returns (what a caller sees) and checks the rules that must hold whatever happens:
//! a job is on at most one node, a node never holds more jobs than its cpus, a job gets at
//! most one terminal status, a cluster that is not reentrant never requeues, a deadline gives
//! exactly one Terminate; once every node is lost, every job is terminal or queued, and a
//! queued job is then unpinned or pinned to a node never seen; with nodes available, jobs
//! completed by their nodes all end terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dispy_core::job::JobStatus;
use dispy_core::scheduler::{
    Action, ClusterPolicy, Event, JobKey, JobSpec, JobState, NodeId, Scheduler,
};
use proptest::prelude::*;

const NODES: usize = 4;
const CLUSTERS: usize = 2;

fn node(i: usize) -> NodeId {
    format!("n{i}:9701")
}
fn cluster(i: usize) -> String {
    format!("default/c{i}")
}

#[derive(Clone, Debug)]
enum Op {
    Up {
        node: usize,
        cpus: u32,
    },
    Ready {
        cluster: usize,
        node: usize,
    },
    Lost {
        node: usize,
    },
    /// `pin` up to NODES: node NODES is never up.
    Submit {
        cluster: usize,
        pin: Option<usize>,
        deadline: Option<u64>,
    },
    /// The `pick`-th job in flight (by key) says Running / gives a result / is refused.
    Start {
        pick: usize,
    },
    Done {
        pick: usize,
        status: JobStatus,
    },
    Refuse {
        pick: usize,
    },
    Cancel {
        job: usize,
    },
    Suspend {
        cluster: usize,
        on: bool,
    },
    Tick {
        secs: u64,
    },
    /// A start or result from an arbitrary node, usually stale.
    Stray {
        job: usize,
        node: usize,
        done: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let terminal = prop_oneof![
        Just(JobStatus::Finished),
        Just(JobStatus::Terminated),
        Just(JobStatus::Cancelled)
    ];
    let n = 0..NODES;
    let c = 0..CLUSTERS;
    prop_oneof![
        2 => (n.clone(), 0..4u32).prop_map(|(node, cpus)| Op::Up { node, cpus }),
        3 => (c.clone(), n.clone()).prop_map(|(cluster, node)| Op::Ready { cluster, node }),
        1 => n.clone().prop_map(|node| Op::Lost { node }),
        6 => (c.clone(), proptest::option::weighted(0.2, 0..=NODES), proptest::option::of(1..20u64))
            .prop_map(|(cluster, pin, deadline)| Op::Submit { cluster, pin, deadline }),
        3 => any::<usize>().prop_map(|pick| Op::Start { pick }),
        4 => (any::<usize>(), terminal).prop_map(|(pick, status)| Op::Done { pick, status }),
        1 => any::<usize>().prop_map(|pick| Op::Refuse { pick }),
        1 => any::<usize>().prop_map(|job| Op::Cancel { job }),
        1 => (c, any::<bool>()).prop_map(|(cluster, on)| Op::Suspend { cluster, on }),
        2 => (0..10u64).prop_map(|secs| Op::Tick { secs }),
        1 => (any::<usize>(), n, any::<bool>()).prop_map(|(job, node, done)| Op::Stray { job, node, done }),
    ]
}

fn policies() -> impl Strategy<Value = Vec<ClusterPolicy>> {
    proptest::collection::vec(
        (any::<bool>(), 0..3u32).prop_map(|(reentrant, backoff_limit)| ClusterPolicy {
            reentrant,
            backoff_limit,
        }),
        CLUSTERS,
    )
}

/// The scheduler and what a caller has learnt from its actions.
struct Harness {
    s: Scheduler,
    now: Duration,
    policies: Vec<ClusterPolicy>,
    specs: Vec<JobSpec>,
    /// Nodes up, with their cpus.
    up: BTreeMap<NodeId, u32>,
    ever_up: BTreeSet<NodeId>,
    in_flight: BTreeMap<JobKey, NodeId>,
    attempts: BTreeMap<JobKey, u32>,
    terminal: BTreeMap<JobKey, JobStatus>,
    terminated: BTreeSet<(JobKey, u32)>,
}

impl Harness {
    fn new(policies: Vec<ClusterPolicy>) -> Self {
        let mut h = Harness {
            s: Scheduler::new(),
            now: Duration::ZERO,
            policies: policies.clone(),
            specs: vec![],
            up: BTreeMap::new(),
            ever_up: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            attempts: BTreeMap::new(),
            terminal: BTreeMap::new(),
            terminated: BTreeSet::new(),
        };
        for (i, policy) in policies.into_iter().enumerate() {
            h.event(Event::ClusterAdded {
                cluster: cluster(i),
                policy,
            });
        }
        h
    }

    fn nth_in_flight(&self, pick: usize) -> Option<(JobKey, NodeId)> {
        let n = self.in_flight.len();
        (n > 0).then(|| {
            let (k, v) = self.in_flight.iter().nth(pick % n).unwrap();
            (k.clone(), v.clone())
        })
    }

    fn apply(&mut self, op: Op) {
        let ev = match op {
            Op::Up { node: i, cpus } => Event::NodeUp {
                node: node(i),
                cpus,
            },
            Op::Ready {
                cluster: c,
                node: i,
            } => Event::ClusterReady {
                cluster: cluster(c),
                node: node(i),
            },
            Op::Lost { node: i } => Event::NodeLost {
                node: node(i),
                reason: "closed connection".into(),
            },
            Op::Submit {
                cluster: c,
                pin,
                deadline,
            } => {
                let spec = JobSpec {
                    key: JobKey::new(cluster(c), self.specs.len() as u64),
                    node: pin.map(node),
                    active_deadline: deadline.map(Duration::from_secs),
                    policy: None,
                };
                self.specs.push(spec.clone());
                Event::JobSubmitted(spec)
            }
            Op::Start { pick } => match self.nth_in_flight(pick) {
                Some((key, node)) => Event::JobStarted { key, node },
                None => Event::Tick,
            },
            Op::Done { pick, status } => match self.nth_in_flight(pick) {
                Some((key, node)) => Event::JobDone { key, node, status },
                None => Event::Tick,
            },
            Op::Refuse { pick } => match self.nth_in_flight(pick) {
                Some((key, node)) if self.s.job(&key).unwrap().status() == JobStatus::Created => {
                    let reason = "no such computation".into();
                    Event::DispatchFailed { key, node, reason }
                }
                _ => Event::Tick,
            },
            Op::Cancel { job } if !self.specs.is_empty() => Event::CancelRequested {
                key: self.specs[job % self.specs.len()].key.clone(),
            },
            Op::Cancel { .. } => Event::Tick,
            Op::Suspend { cluster: c, on } => Event::SuspendCluster {
                cluster: cluster(c),
                suspended: on,
            },
            Op::Tick { secs } => {
                self.now += Duration::from_secs(secs);
                Event::Tick
            }
            Op::Stray { job, node: i, done } if !self.specs.is_empty() => {
                let key = self.specs[job % self.specs.len()].key.clone();
                let node = node(i);
                if self.in_flight.get(&key) == Some(&node) {
                    Event::Tick // not stray
                } else if done {
                    let status = JobStatus::Finished;
                    Event::JobDone { key, node, status }
                } else {
                    Event::JobStarted { key, node }
                }
            }
            Op::Stray { .. } => Event::Tick,
        };
        self.event(ev);
    }

    fn event(&mut self, ev: Event) {
        // What the caller expects to learn from the event itself.
        match &ev {
            Event::NodeUp { node, cpus } => {
                self.up.insert(node.clone(), *cpus);
                self.ever_up.insert(node.clone());
            }
            Event::JobDone { key, node, status } if self.in_flight.get(key) == Some(node) => {
                self.in_flight.remove(key);
                assert!(self.terminal.insert(key.clone(), *status).is_none());
            }
            _ => {}
        }
        let actions = self.s.handle(self.now, ev.clone());
        for action in actions {
            self.check(action);
        }
        if let Event::NodeLost { node, .. } = &ev {
            assert!(
                self.in_flight.values().all(|n| n != node),
                "jobs left on lost node {node}"
            );
            self.up.remove(node);
        }
        self.agrees();
    }

    fn check(&mut self, action: Action) {
        match action {
            Action::Dispatch { key, node, attempt } => {
                assert!(
                    !self.terminal.contains_key(&key),
                    "{key} dispatched after its end"
                );
                assert!(
                    !self.in_flight.contains_key(&key),
                    "{key} on two nodes at once"
                );
                let busy = self.in_flight.values().filter(|n| **n == node).count();
                let cpus = *self
                    .up
                    .get(&node)
                    .expect("dispatch to a node that is not up");
                assert!(busy < cpus as usize, "{node} over its {cpus} cpus");
                let attempts = self.attempts.entry(key.clone()).or_default();
                *attempts += 1;
                assert_eq!(attempt, *attempts);
                if let Some(pin) = &self.spec(&key).node {
                    assert_eq!(*pin, node, "{key} dispatched away from its pinned node");
                }
                self.in_flight.insert(key, node);
            }
            Action::Terminate { key, node, .. } => {
                assert_eq!(self.in_flight.get(&key), Some(&node));
                let attempt = self.attempts[&key];
                assert!(self.terminated.insert((key, attempt)), "Terminate repeated");
            }
            Action::Requeued { key, attempt, .. } => {
                let index = key
                    .cluster
                    .trim_start_matches("default/c")
                    .parse::<usize>()
                    .unwrap();
                let policy = &self.policies[index];
                assert!(
                    policy.reentrant,
                    "{key} requeued in a cluster that is not reentrant"
                );
                assert!(attempt <= policy.backoff_limit);
                assert!(self.spec(&key).node.is_none(), "pinned {key} requeued");
                assert!(self.in_flight.remove(&key).is_some());
            }
            Action::Finalize {
                key,
                status,
                reason,
            } => {
                assert!(status.is_terminal() && !reason.is_empty());
                self.in_flight.remove(&key);
                let earlier = self.terminal.insert(key.clone(), status);
                assert!(earlier.is_none(), "{key} got a second terminal status");
            }
        }
    }

    fn spec(&self, key: &JobKey) -> &JobSpec {
        &self.specs[key.job as usize]
    }

    /// The scheduler's queries say what its actions said.
    fn agrees(&self) {
        for spec in &self.specs {
            let rec = self.s.job(&spec.key).unwrap();
            match (&rec.state, self.terminal.get(&spec.key)) {
                (JobState::Terminal { status, .. }, Some(seen)) => assert_eq!(status, seen),
                (state, None) => {
                    assert!(!matches!(state, JobState::Terminal { .. }));
                    assert_eq!(rec.node(), self.in_flight.get(&spec.key));
                }
                (state, Some(_)) => panic!("{} is {state:?} after its end", spec.key),
            }
            if let (JobState::Running { since, .. }, Some(d)) = (&rec.state, spec.active_deadline) {
                if *since + d <= self.now {
                    assert!(self.terminated.contains(&(spec.key.clone(), rec.attempts)));
                }
            }
        }
        for (node, load) in self.s.nodes() {
            let busy = self.in_flight.values().filter(|n| *n == node).count();
            assert_eq!(load.busy as usize, busy);
        }
        assert_eq!(
            self.s.all_terminal(),
            self.terminal.len() == self.specs.len()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Anything goes, then every node is lost.
    #[test]
    fn invariants_hold_and_nothing_is_left_running_when_all_nodes_are_lost(
        policies in policies(),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut h = Harness::new(policies);
        for op in ops {
            h.apply(op);
        }
        let up: Vec<NodeId> = h.up.keys().cloned().collect();
        for node in up {
            h.event(Event::NodeLost { node, reason: "pod deleted".into() });
        }
        prop_assert!(h.s.is_idle() && h.in_flight.is_empty());
        for rec in h.s.jobs() {
            match &rec.state {
                JobState::Terminal { .. } => {}
                JobState::Queued => prop_assert!(
                    rec.spec.node.as_ref().is_none_or(|n| !h.ever_up.contains(n)),
                    "{} waits for lost node", rec.spec.key
                ),
                other => prop_assert!(false, "{} is {other:?} with no node up", rec.spec.key),
            }
        }
    }

    /// With nodes available (node 0 is never lost; the others come back) and every dispatched
    /// job completed by its node, every job ends terminal.
    #[test]
    fn jobs_completed_by_their_nodes_all_end_terminal(
        policies in policies(),
        cpus in proptest::collection::vec(1..4u32, NODES),
        ops in proptest::collection::vec(op(), 0..120),
        losses in proptest::collection::vec((1..NODES, 0..120usize), 0..4),
    ) {
        let mut h = Harness::new(policies);
        let everywhere = |h: &mut Harness| {
            for (i, &cpus) in cpus.iter().enumerate() {
                h.event(Event::NodeUp { node: node(i), cpus });
                for c in 0..CLUSTERS {
                    h.event(Event::ClusterReady { cluster: cluster(c), node: node(i) });
                    h.event(Event::SuspendCluster { cluster: cluster(c), suspended: false });
                }
            }
        };
        everywhere(&mut h);
        for (i, op) in ops.into_iter().enumerate() {
            for &(n, at) in &losses {
                if at == i {
                    h.apply(Op::Lost { node: n });
                }
            }
            if !matches!(op, Op::Up { .. } | Op::Lost { .. }) {
                h.apply(op);
            }
        }
        everywhere(&mut h);
        // Jobs pinned to the never-up node wait for it; the caller gives up on them.
        for spec in h.specs.clone() {
            if spec.node == Some(node(NODES)) {
                h.event(Event::CancelRequested { key: spec.key });
            }
        }
        let mut rounds = 0;
        while let Some((key, node)) = h.nth_in_flight(0) {
            h.event(Event::JobStarted { key: key.clone(), node: node.clone() });
            h.event(Event::JobDone { key, node, status: JobStatus::Finished });
            rounds += 1;
            prop_assert!(rounds <= 10 * h.specs.len());
        }
        prop_assert!(h.s.all_terminal(), "{} queued", h.s.queued());
        prop_assert_eq!(h.terminal.len(), h.specs.len());
    }
}
