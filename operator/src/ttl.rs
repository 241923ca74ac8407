//! `ttlSecondsAfterFinished`: when an object that has ended is due for deletion. A DispyJob ends
//! at its `endTime`, or, when it has none (it ended without reaching a node), when its
//! `Complete` or `Failed` condition turned true. Pure: the DispyJob controller requeues the
//! job until it is due and then deletes it.

use std::time::Duration;

use dispy_core::manifest::DispyJobStatus;
use k8s_openapi::jiff::Timestamp;

/// When an object is due for deletion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    Now,
    In(Duration),
}

/// When an object that `ended` (Unix seconds; `None`: it has not, or no time is known) is due
/// for deletion at `now`, with `ttl` seconds to live after that: `None` without a ttl or an
/// end (it is kept).
pub fn expiry(ended: Option<f64>, ttl: Option<u64>, now: f64) -> Option<Expiry> {
    let left = ended? + ttl? as f64 - now;
    Some(if left <= 0.0 {
        Expiry::Now
    } else {
        Expiry::In(Duration::from_secs_f64(left))
    })
}

/// When the DispyJob whose status is `status` ended, in Unix seconds: its `endTime`, else when
/// its `Complete` or `Failed` condition turned true; `None` while it has not ended.
pub fn job_ended(status: &DispyJobStatus) -> Option<f64> {
    unix_seconds(status.ended_at()?)
}

/// An RFC 3339 time as Unix seconds.
pub fn unix_seconds(time: &str) -> Option<f64> {
    let t: Timestamp = time.parse().ok()?;
    Some(t.as_nanosecond() as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::job::JobStatus;
    use dispy_core::manifest::Condition;

    /// 2026-01-01T00:00:00Z
    const END: f64 = 1_767_225_600.0;

    fn job_expiry(status: Option<&DispyJobStatus>, ttl: Option<u64>, now: f64) -> Option<Expiry> {
        expiry(status.and_then(job_ended), ttl, now)
    }

    fn ended(status: JobStatus) -> DispyJobStatus {
        DispyJobStatus {
            status,
            end_time: Some("2026-01-01T00:00:00Z".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_finished_job_is_due_ttl_seconds_after_its_end_time() {
        let s = ended(JobStatus::Finished);
        assert_eq!(
            job_expiry(Some(&s), Some(60), END + 15.0),
            Some(Expiry::In(Duration::from_secs(45)))
        );
        assert_eq!(
            job_expiry(Some(&s), Some(60), END + 60.0),
            Some(Expiry::Now)
        );
        assert_eq!(
            job_expiry(Some(&s), Some(60), END + 3600.0),
            Some(Expiry::Now)
        );
        assert_eq!(job_expiry(Some(&s), Some(0), END), Some(Expiry::Now));
        for failed in [
            JobStatus::Terminated,
            JobStatus::Cancelled,
            JobStatus::Abandoned,
        ] {
            assert_eq!(
                job_expiry(Some(&ended(failed)), Some(1), END + 1.0),
                Some(Expiry::Now),
                "{failed:?}"
            );
        }
    }

    #[test]
    fn a_job_that_has_not_ended_or_has_no_ttl_is_kept() {
        assert_eq!(
            job_expiry(Some(&ended(JobStatus::Finished)), None, END + 1e6),
            None
        );
        for going in [JobStatus::Created, JobStatus::Running] {
            let s = ended(going);
            assert_eq!(job_expiry(Some(&s), Some(0), END + 1e6), None, "{going:?}");
        }
        assert_eq!(job_expiry(None, Some(0), END), None, "no status yet");
    }

    #[test]
    fn without_an_end_time_the_terminal_condition_dates_the_end() {
        let mut s = DispyJobStatus {
            status: JobStatus::Cancelled,
            ..Default::default()
        };
        assert_eq!(
            job_expiry(Some(&s), Some(10), END + 1e6),
            None,
            "no time known"
        );
        let condition = |type_: &str, status: &str, at: &str| Condition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: Some(at.into()),
            ..Default::default()
        };
        s.conditions = vec![
            condition("Complete", "False", "2025-01-01T00:00:00Z"),
            condition("Failed", "True", "2026-01-01T00:00:00Z"),
        ];
        assert_eq!(
            job_expiry(Some(&s), Some(10), END + 4.0),
            Some(Expiry::In(Duration::from_secs(6)))
        );
    }
}
