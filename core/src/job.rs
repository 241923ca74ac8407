//! A job's status and outcome, in dispy's own terms.

use serde::{Deserialize, Serialize};

/// A job's id within its computation, chosen by the client (dispy's `uid`).
pub type JobId = u64;

/// dispy's job statuses (`dispy.DispyJob.Created` ...), with dispy's numeric values.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    PartialOrd,
    Ord,
    Default,
    schemars::JsonSchema,
)]
pub enum JobStatus {
    #[default]
    Created,
    Running,
    ProvisionalResult,
    Cancelled,
    Terminated,
    Abandoned,
    Finished,
}

impl JobStatus {
    /// The value dispy 4.15 uses for this status on the wire.
    pub fn dispy_value(self) -> i64 {
        match self {
            JobStatus::Created => 5,
            JobStatus::Running => 6,
            JobStatus::ProvisionalResult => 7,
            JobStatus::Cancelled => 8,
            JobStatus::Terminated => 9,
            JobStatus::Abandoned => 10,
            JobStatus::Finished => 11,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Cancelled
                | JobStatus::Terminated
                | JobStatus::Abandoned
                | JobStatus::Finished
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "Created",
            JobStatus::Running => "Running",
            JobStatus::ProvisionalResult => "ProvisionalResult",
            JobStatus::Cancelled => "Cancelled",
            JobStatus::Terminated => "Terminated",
            JobStatus::Abandoned => "Abandoned",
            JobStatus::Finished => "Finished",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one job, as the node reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct JobResult {
    pub status: JobStatus,
    /// JSON text of the function's return value; a program's exit code.
    pub result: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// Traceback of a Python exception, or why the job was terminated.
    pub exception: Option<String>,
    /// Seconds since the Unix epoch.
    pub start_time: Option<f64>,
    pub end_time: Option<f64>,
    /// Bytes of stdout/stderr that were cut to keep the result bounded.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

impl JobResult {
    /// A result that carries only a status and the reason for it.
    pub fn failed(status: JobStatus, reason: impl Into<String>) -> Self {
        let now = now_secs();
        JobResult {
            status,
            exception: Some(reason.into()),
            end_time: Some(now),
            ..Default::default()
        }
    }
}

/// Wall-clock seconds since the Unix epoch, as Python's `time.time()`.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispy_values_and_terminality() {
        assert_eq!(JobStatus::Finished.dispy_value(), 11);
        assert_eq!(JobStatus::Created.dispy_value(), 5);
        assert!(JobStatus::Abandoned.is_terminal());
        assert!(!JobStatus::Running.is_terminal());
        assert!(!JobStatus::ProvisionalResult.is_terminal());
    }
}
