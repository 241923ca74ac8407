//! Pure pieces of a DispyJob's status: bounding what goes into the object, its conditions,
//! and the node-side job id derived from the object's uid.

use std::collections::BTreeMap;

use dispy_core::job::{JobId, JobResult, JobStatus};
use dispy_core::manifest::{summary, Condition, DispyJobStatus, SentFileStatus};
use dispy_core::protocol::SentFile;

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

/// A provisional result (JSON text) taken into the status, cut to a summary when it is over
/// [`FIELD_LIMIT`].
pub fn record_provisional_bounded(status: &mut DispyJobStatus, text: &str) {
    status.record_provisional(text);
    if text.len() > FIELD_LIMIT {
        if let Some(value) = status.provisional_result.as_mut() {
            *value = serde_json::Value::String(format!("{} (cut)", summary(value)));
        }
    }
}

/// Takes a sent file into the status. Returns the key to store it under in the job's files
/// ConfigMap, or None when it does not fit there (all the job's files together stay within
/// [`CONFIG_MAP_LIMIT`]; its entry then says so). A file sent again under the same name
/// replaces the earlier one and keeps its key.
pub fn record_sent_file(status: &mut DispyJobStatus, file: &SentFile) -> Option<String> {
    let earlier = status.sent_files.iter().find(|f| f.name == file.name);
    // The list itself stays bounded too: names count against the budget, and so does each
    // entry (a job may send any number of empty files).
    if earlier.is_none() && status.sent_files.len() >= SENT_FILES_LISTED {
        return None;
    }
    let key = earlier
        .and_then(|f| f.saved_as.clone())
        .unwrap_or_else(|| file_key(&file.name, status));
    let kept: usize = status
        .sent_files
        .iter()
        .filter(|f| f.name != file.name && f.saved_as.is_some())
        .map(|f| f.size as usize + f.saved_as.as_ref().map_or(0, String::len))
        .sum();
    let listed: usize = status
        .sent_files
        .iter()
        .map(|f| f.name.len() + ENTRY_COST)
        .sum();
    let size = file.data.len();
    let fits = kept + listed + size + key.len() + file.name.len() <= CONFIG_MAP_LIMIT;
    status.record_sent_file(SentFileStatus {
        name: file.name.clone(),
        size: size as u64,
        saved_as: fits.then(|| key.clone()),
        message: (!fits).then(|| {
            format!(
                "not kept: {size} bytes over what is left of the {CONFIG_MAP_LIMIT} bytes the job's files ConfigMap holds ({} bytes)",
                CONFIG_MAP_LIMIT.saturating_sub(kept)
            )
        }),
    });
    fits.then_some(key)
}

/// Most sent files listed in a job's status; later ones (of new names) are neither listed nor
/// kept.
pub const SENT_FILES_LISTED: usize = 100;
/// What a sent file's entry costs in the status besides its name, for the budget.
const ENTRY_COST: usize = 64;

/// A ConfigMap key (`[-._a-zA-Z0-9]+`, at most 253 characters) for a sent file's name, not
/// used yet by another of the job's files.
fn file_key(name: &str, status: &DispyJobStatus) -> String {
    let base: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(240)
        .collect();
    let base = if base.chars().all(|c| c == '.') {
        format!("file{base}")
    } else {
        base
    };
    let taken = |k: &str| {
        status
            .sent_files
            .iter()
            .any(|f| f.saved_as.as_deref() == Some(k))
    };
    let mut key = base.clone();
    let mut n = 1;
    while taken(&key) {
        n += 1;
        key = format!("{base}-{n}");
    }
    key
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

    fn sent(name: &str, size: usize) -> SentFile {
        SentFile {
            name: name.into(),
            data: vec![b'x'; size],
        }
    }

    #[test]
    fn sent_files_get_config_map_keys_that_do_not_collide() {
        let mut s = DispyJobStatus::default();
        assert_eq!(
            record_sent_file(&mut s, &sent("out/a.txt", 3)).as_deref(),
            Some("out_a.txt")
        );
        assert_eq!(
            record_sent_file(&mut s, &sent("out_a.txt", 3)).as_deref(),
            Some("out_a.txt-2")
        );
        assert_eq!(
            record_sent_file(&mut s, &sent("..", 1)).as_deref(),
            Some("file..")
        );
        assert_eq!(s.sent_files.len(), 3);
    }

    #[test]
    fn a_file_sent_again_replaces_the_earlier_one_under_its_key() {
        let mut s = DispyJobStatus::default();
        record_sent_file(&mut s, &sent("progress.log", 10));
        assert_eq!(
            record_sent_file(&mut s, &sent("progress.log", 20)).as_deref(),
            Some("progress.log")
        );
        assert_eq!(s.sent_files.len(), 1);
        assert_eq!(s.sent_files[0].size, 20);
    }

    #[test]
    fn sent_files_over_the_config_map_budget_are_listed_but_not_kept() {
        let mut s = DispyJobStatus::default();
        assert!(record_sent_file(&mut s, &sent("a", CONFIG_MAP_LIMIT / 2)).is_some());
        assert!(record_sent_file(&mut s, &sent("b", CONFIG_MAP_LIMIT / 2)).is_none());
        let b = &s.sent_files[1];
        assert_eq!((b.name.as_str(), b.saved_as.as_deref()), ("b", None));
        assert!(
            b.message.as_deref().unwrap().starts_with("not kept:"),
            "{b:?}"
        );
        // What was not kept takes no room: a small one still fits.
        assert!(record_sent_file(&mut s, &sent("c", 100)).is_some());
    }

    #[test]
    fn the_list_of_sent_files_stays_bounded_however_many_empty_files_a_job_sends() {
        let mut s = DispyJobStatus::default();
        for i in 0..1000 {
            record_sent_file(&mut s, &sent(&format!("{i:0>1000}"), 0));
        }
        assert_eq!(s.sent_files.len(), SENT_FILES_LISTED);
        let listed: usize = s.sent_files.iter().map(|f| f.name.len()).sum();
        assert!(listed <= CONFIG_MAP_LIMIT, "{listed}");
    }

    #[test]
    fn a_provisional_result_is_shown_until_the_job_ends_and_cut_when_large() {
        let mut s = DispyJobStatus {
            status: JobStatus::Running,
            ..Default::default()
        };
        record_provisional_bounded(&mut s, "[1, 2]");
        assert_eq!(s.status, JobStatus::ProvisionalResult);
        assert_eq!(s.provisional_result, Some(serde_json::json!([1, 2])));
        record_provisional_bounded(&mut s, &format!("\"{}\"", "p".repeat(FIELD_LIMIT)));
        let shown = s.provisional_result.as_ref().unwrap().as_str().unwrap();
        assert!(shown.ends_with("(cut)") && shown.len() < 100, "{shown}");
        s.status = JobStatus::Finished;
        record_provisional_bounded(&mut s, "3");
        assert_eq!(
            s.status,
            JobStatus::Finished,
            "a late provisional result changes nothing"
        );
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
