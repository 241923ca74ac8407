//! Pure pieces of a DispyJob's status: bounding what goes into the object, its conditions,
//! and the node-side job id derived from the object's uid.

use std::collections::BTreeMap;

use dispy_core::job::{JobId, JobResult, JobStatus};
use dispy_core::manifest::{Condition, DispyJobStatus};

/// Most bytes of each of `result`, `stdout`, `stderr` and `exception` kept in the status. Four
/// of them stay far below etcd's 1.5 MiB object limit; the whole output goes to a ConfigMap.
pub const FIELD_LIMIT: usize = 8 * 1024;

/// Most bytes kept in the output ConfigMap (ConfigMaps hold at most 1 MiB).
pub const CONFIG_MAP_LIMIT: usize = 900 * 1024;

/// The job id the nodes know a DispyJob by: the first 64 bits of its uid, so every instance
/// of the operator (a restart, a new leader) derives the same id.
pub fn job_id(uid: &str) -> JobId {
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or_else(|_| {
        // Not a UUID (never from an API server): hash it.
        let digest = dispy_core::auth::sha256_hex(uid.as_bytes());
        u64::from_str_radix(&digest[..16], 16).expect("hex")
    })
}

/// The tail of `text` in at most `limit` bytes (cut at a character boundary), with a first
/// line saying how much was left out.
pub fn tail(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!(
        "[{} bytes cut; the whole text is in the output ConfigMap]\n{}",
        start,
        &text[start..]
    )
}

/// A terminal result taken into the status with every field bounded. Returns the whole
/// output, keyed as in the output ConfigMap, when something had to be cut.
pub fn record_bounded(
    status: &mut DispyJobStatus,
    result: &JobResult,
) -> Option<BTreeMap<String, String>> {
    status.record_result(result);
    let mut whole = BTreeMap::new();
    let result_text = result.result.clone().unwrap_or_default();
    if result_text.len() > FIELD_LIMIT {
        whole.insert("result".to_string(), result_text);
        status.result = None;
        status.result_summary = status.result_summary.take().map(|s| format!("{s} (cut)"));
    }
    for (key, field) in [
        ("stdout", &mut status.stdout),
        ("stderr", &mut status.stderr),
        ("exception", &mut status.exception),
    ] {
        if let Some(text) = field.as_mut() {
            if text.len() > FIELD_LIMIT {
                whole.insert(key.to_string(), std::mem::take(text));
                *text = tail(&whole[key], FIELD_LIMIT);
            }
        }
    }
    if whole.is_empty() {
        return None;
    }
    // Everything the status shows in part, and the rest too, for one place to read it all.
    for (key, value) in [
        ("result", result.result.as_deref()),
        ("stdout", Some(result.stdout.as_str())),
        ("stderr", Some(result.stderr.as_str())),
        ("exception", result.exception.as_deref()),
    ] {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            whole
                .entry(key.to_string())
                .or_insert_with(|| v.to_string());
        }
    }
    let mut budget = CONFIG_MAP_LIMIT;
    for value in whole.values_mut() {
        if value.len() > budget {
            *value = tail(value, budget);
        }
        budget = budget.saturating_sub(value.len());
    }
    Some(whole)
}

/// `Complete` and `Failed` as Kubernetes Jobs have them, so `kubectl wait
/// --for=condition=Complete` works; plus `Waiting` while the job cannot be scheduled.
pub fn conditions(
    status: &DispyJobStatus,
    previous: &[Condition],
    now: &str,
    waiting: Option<(&str, &str)>,
) -> Vec<Condition> {
    let terminal = status.status.is_terminal();
    let finished = status.status == JobStatus::Finished;
    let message = status.message.clone().unwrap_or_default();
    let mut wanted = vec![
        (
            "Complete",
            terminal && finished,
            if finished { "Finished" } else { "NotFinished" },
            message.clone(),
        ),
        (
            "Failed",
            terminal && !finished,
            dispy_name(status.status),
            message.clone(),
        ),
    ];
    if let Some((reason, why)) = waiting {
        wanted.push(("Waiting", true, reason, why.to_string()));
    }
    wanted
        .into_iter()
        .map(|(type_, on, reason, message)| {
            condition(previous, now, None, type_, on, reason, message)
        })
        .collect()
}

/// A condition whose `lastTransitionTime` moves only when its status changes from `previous`.
pub fn condition(
    previous: &[Condition],
    now: &str,
    observed_generation: Option<i64>,
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let transition = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: Some(transition),
        observed_generation,
    }
}

fn dispy_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Terminated | JobStatus::Cancelled | JobStatus::Abandoned => status.as_str(),
        _ => "NotFailed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(stdout: &str) -> JobResult {
        JobResult {
            status: JobStatus::Finished,
            result: Some("42".into()),
            stdout: stdout.into(),
            ..Default::default()
        }
    }

    #[test]
    fn job_ids_come_from_the_uid_and_are_stable() {
        let uid = "6f1c2b3a-9d8e-4f70-a1b2-c3d4e5f60718";
        assert_eq!(job_id(uid), 0x6f1c2b3a9d8e4f70);
        assert_eq!(job_id(uid), job_id(uid));
        assert_ne!(job_id("not-a-uuid"), job_id("also-not-one"));
    }

    #[test]
    fn small_output_is_kept_whole_and_no_config_map_is_needed() {
        let mut s = DispyJobStatus::default();
        assert_eq!(record_bounded(&mut s, &result("hello\n")), None);
        assert_eq!(s.stdout.as_deref(), Some("hello\n"));
        assert_eq!(s.result, Some(serde_json::json!(42)));
    }

    #[test]
    fn large_output_keeps_its_tail_and_the_whole_goes_to_the_config_map() {
        let big = format!("{}END", "x".repeat(100_000));
        let mut s = DispyJobStatus::default();
        let whole = record_bounded(&mut s, &result(&big)).expect("cut");
        let shown = s.stdout.as_deref().unwrap();
        assert!(shown.len() < FIELD_LIMIT + 100, "{}", shown.len());
        assert!(shown.ends_with("END"));
        assert!(shown.starts_with("[91811 bytes cut;"), "{}", &shown[..40]);
        assert_eq!(whole["stdout"], big);
        assert_eq!(whole["result"], "42");
        assert_eq!(s.result, Some(serde_json::json!(42)), "small fields stay");
    }

    #[test]
    fn a_huge_result_is_left_out_of_the_status() {
        let mut r = result("");
        r.result = Some(format!("\"{}\"", "é".repeat(10_000)));
        let mut s = DispyJobStatus::default();
        let whole = record_bounded(&mut s, &r).expect("cut");
        assert_eq!(s.result, None);
        assert!(s.result_summary.unwrap().ends_with("(cut)"));
        assert_eq!(whole["result"].len(), 20_002);
    }

    #[test]
    fn the_config_map_stays_under_its_limit() {
        let mut r = result(&"o".repeat(800_000));
        r.stderr = "e".repeat(800_000);
        let whole = record_bounded(&mut DispyJobStatus::default(), &r).unwrap();
        let total: usize = whole.values().map(String::len).sum();
        assert!(total <= CONFIG_MAP_LIMIT + 200, "{total}");
    }

    #[test]
    fn tail_cuts_at_a_character_boundary() {
        let t = tail("ééééé", 3);
        assert!(t.ends_with("é"), "{t}");
    }

    #[test]
    fn complete_or_failed_follow_the_status() {
        let now = "2026-11-26T00:00:00Z";
        let mut s = DispyJobStatus {
            status: JobStatus::Finished,
            ..Default::default()
        };
        let c = conditions(&s, &[], now, None);
        assert_eq!(
            (c[0].type_.as_str(), c[0].status.as_str()),
            ("Complete", "True")
        );
        assert_eq!(
            (c[1].type_.as_str(), c[1].status.as_str()),
            ("Failed", "False")
        );
        s.status = JobStatus::Abandoned;
        let c = conditions(&s, &c, "later", None);
        assert_eq!(
            (c[0].status.as_str(), c[1].status.as_str()),
            ("False", "True")
        );
        assert_eq!(c[1].reason, "Abandoned");
        assert_eq!(c[1].last_transition_time.as_deref(), Some("later"));
        s.status = JobStatus::Created;
        let c = conditions(&s, &[], now, Some(("ClusterNotFound", "no JobCluster wc")));
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[2].type_.as_str(), c[2].status.as_str()),
            ("Waiting", "True")
        );
        assert_eq!(
            (c[0].status.as_str(), c[1].status.as_str()),
            ("False", "False")
        );
    }
}
