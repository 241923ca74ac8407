//! What job processes and Python hosts report to the node (which [`crate::node`] takes in
//! order; the processes' and hosts' readers send it).

use dispy_core::job::JobResult;
use dispy_core::protocol::JobEventKind;

/// What job processes and Python hosts report.
#[derive(Debug)]
pub enum Outcome {
    Job {
        run: u64,
        result: JobResult,
    },
    /// A running job's news for its client: a provisional result or a file it sent.
    News {
        run: u64,
        news: JobEventKind,
    },
    /// A Python host ended; `host` (its pid) tells it from the computation's next host.
    HostExited {
        computation: String,
        host: Option<u32>,
        reason: String,
    },
}
