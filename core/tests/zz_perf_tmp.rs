use dispy_core::job::JobStatus;
use dispy_core::scheduler::*;
use std::time::{Duration, Instant};
#[test]
fn perf() {
    let mut s = Scheduler::new();
    let t = Instant::now();
    let now = Duration::ZERO;
    for n in 0..4 {
        s.handle(
            now,
            Event::NodeUp {
                node: format!("n{n}"),
                cpus: 8,
            },
        );
        s.handle(
            now,
            Event::ClusterReady {
                cluster: "c".into(),
                node: format!("n{n}"),
            },
        );
    }
    let mut inflight = std::collections::VecDeque::new();
    for j in 0..10000u64 {
        for a in s.handle(now, Event::JobSubmitted(JobSpec::new(JobKey::new("c", j)))) {
            if let Action::Dispatch { key, node, .. } = a {
                inflight.push_back((key, node));
            }
        }
    }
    let mut done = 0;
    while let Some((key, node)) = inflight.pop_front() {
        s.handle(
            now,
            Event::JobStarted {
                key: key.clone(),
                node: node.clone(),
            },
        );
        for a in s.handle(
            now,
            Event::JobDone {
                key,
                node,
                status: JobStatus::Finished,
            },
        ) {
            if let Action::Dispatch { key, node, .. } = a {
                inflight.push_back((key, node));
            }
        }
        done += 1;
        let _ = s.all_terminal();
    }
    assert_eq!(done, 10000);
    assert!(s.all_terminal());
    eprintln!("10k jobs: {:?}", t.elapsed());
}
