//! The results of a DispyJobArray, as the operator writes them and `dispy` reads them: one
//! JSON line per job ([`ArrayResult`]), every field bounded, in ConfigMaps that each stay under
//! a size budget. Pure: the operator and the CLI do the IO.
//!
//! What must stay true:
//! - a row is at most [`ROW_LIMIT`] bytes, so a ConfigMap always has room for at least one;
//! - a chunk (one ConfigMap's JSON lines) never grows past [`CHUNK_LIMIT`];
//! - reading takes every row of every chunk and gives each index once (the last row written
//!   for an index wins: a row is only ever written again for a job run again).

use std::collections::BTreeMap;

use crate::job::{JobResult, JobStatus};
use crate::manifest::{rfc3339, ArrayResult};

/// Most bytes of each of stdout, stderr and the exception kept in a row: their tails.
pub const TEXT_LIMIT: usize = 4 * 1024;
/// Most bytes of a result kept in a row; a longer one is left out and the row says so.
pub const RESULT_LIMIT: usize = 64 * 1024;
/// Most bytes of one row.
pub const ROW_LIMIT: usize = RESULT_LIMIT + 3 * TEXT_LIMIT + 1024;
/// Most bytes of JSON lines in one result ConfigMap (a ConfigMap holds at most 1 MiB).
pub const CHUNK_LIMIT: usize = 900 * 1024;

/// The name of an array's result ConfigMap number `n`.
pub fn chunk_name(array: &str, n: u32) -> String {
    format!("{array}-results-{n}")
}

fn tail(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[{start} bytes cut]\n{}", &text[start..])
}

fn bounded(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| tail(text, TEXT_LIMIT))
}

/// The row of job `index` that ended with `result` on `node`.
pub fn row(index: u32, result: &JobResult, node: Option<String>) -> ArrayResult {
    let text = result.result.as_deref().unwrap_or_default();
    let (value, message) = if text.len() > RESULT_LIMIT {
        (
            None,
            Some(format!(
                "the result ({} bytes) is over {} KiB and was not kept",
                text.len(),
                RESULT_LIMIT / 1024
            )),
        )
    } else {
        let value = result.result.as_deref().map(|t| {
            serde_json::from_str(t).unwrap_or_else(|_| serde_json::Value::String(t.into()))
        });
        (value, None)
    };
    ArrayResult {
        index,
        status: result.status,
        result: value,
        exception: result.exception.as_deref().and_then(bounded),
        stdout: bounded(&result.stdout),
        stderr: bounded(&result.stderr),
        node,
        start_time: result.start_time.map(rfc3339),
        end_time: result.end_time.map(rfc3339),
        message,
    }
}

/// A row as one JSON line (with its newline).
pub fn line(row: &ArrayResult) -> String {
    let mut text = serde_json::to_string(row).expect("a row serializes");
    text.push('\n');
    text
}

/// Rows on their way into result ConfigMaps: the chunk being filled and its number. Full
/// chunks are done with: only the current one is kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunks {
    /// Number of the chunk being filled.
    pub current: u32,
    /// Its JSON lines so far.
    pub text: String,
}

impl Chunks {
    /// Continues after what is stored: `stored` is every chunk's text by number.
    pub fn resume(stored: &BTreeMap<u32, String>) -> Chunks {
        match stored.iter().next_back() {
            Some((n, text)) if text.len() < CHUNK_LIMIT => Chunks {
                current: *n,
                text: text.clone(),
            },
            Some((n, _)) => Chunks {
                current: n + 1,
                text: String::new(),
            },
            None => Chunks::default(),
        }
    }

    /// Adds a row. Returns the text of the chunk it filled when the row did not fit (that
    /// chunk is final; the row starts the next one).
    pub fn push(&mut self, row: &ArrayResult) -> Option<(u32, String)> {
        let line = line(row);
        if self.text.is_empty() || self.text.len() + line.len() <= CHUNK_LIMIT {
            self.text.push_str(&line);
            return None;
        }
        let full = (self.current, std::mem::replace(&mut self.text, line));
        self.current += 1;
        Some(full)
    }
}

/// Every index's row from chunks' texts, in index order; lines that are not rows are
/// counted, not fatal.
pub fn read_rows<'a>(
    chunks: impl IntoIterator<Item = &'a str>,
) -> (BTreeMap<u32, ArrayResult>, usize) {
    let mut rows = BTreeMap::new();
    let mut bad = 0;
    for text in chunks {
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<ArrayResult>(l) {
                Ok(r) => {
                    rows.insert(r.index, r);
                }
                Err(_) => bad += 1,
            }
        }
    }
    (rows, bad)
}

/// Counts of an array's ended jobs: (finished, failed).
pub fn counts<'a>(statuses: impl IntoIterator<Item = &'a JobStatus>) -> (u32, u32) {
    let mut finished = 0;
    let mut failed = 0;
    for s in statuses {
        match s {
            JobStatus::Finished => finished += 1,
            s if s.is_terminal() => failed += 1,
            _ => {}
        }
    }
    (finished, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: JobStatus, value: &str) -> JobResult {
        JobResult {
            status,
            result: Some(value.into()),
            stdout: "out\n".into(),
            start_time: Some(1.0),
            end_time: Some(2.0),
            ..Default::default()
        }
    }

    #[test]
    fn a_row_keeps_the_result_as_json_and_bounds_every_text() {
        let r = row(7, &result(JobStatus::Finished, "[1, 2]"), Some("n1".into()));
        assert_eq!(r.result, Some(serde_json::json!([1, 2])));
        assert_eq!(r.stdout.as_deref(), Some("out\n"));
        assert_eq!(r.start_time.as_deref(), Some("1970-01-01T00:00:01Z"));
        let long = JobResult {
            stdout: "x".repeat(100_000),
            exception: Some("e".repeat(50_000)),
            result: Some(format!("\"{}\"", "r".repeat(RESULT_LIMIT + 1))),
            ..result(JobStatus::Terminated, "0")
        };
        let r = row(1, &long, None);
        assert!(r.stdout.as_ref().unwrap().len() <= TEXT_LIMIT + 32);
        assert!(r.stdout.as_ref().unwrap().starts_with("[95904 bytes cut]"));
        assert!(r.exception.as_ref().unwrap().len() <= TEXT_LIMIT + 32);
        assert!(r.result.is_none());
        assert!(r.message.as_ref().unwrap().contains("not kept"));
        assert!(line(&r).len() <= ROW_LIMIT);
    }

    #[test]
    fn chunks_roll_over_under_the_limit_and_resume_where_they_stopped() {
        let mut chunks = Chunks::default();
        let big = JobResult {
            stdout: "y".repeat(TEXT_LIMIT),
            ..result(JobStatus::Finished, "1")
        };
        let mut full = Vec::new();
        for i in 0..400 {
            if let Some(f) = chunks.push(&row(i, &big, None)) {
                full.push(f);
            }
        }
        assert!(!full.is_empty());
        assert!(full.iter().all(|(_, t)| t.len() <= CHUNK_LIMIT));
        assert_eq!(full[0].0, 0);
        assert_eq!(chunks.current, full.len() as u32);
        let mut stored: BTreeMap<u32, String> = full.iter().cloned().collect();
        stored.insert(chunks.current, chunks.text.clone());
        let (rows, bad) = read_rows(stored.values().map(String::as_str));
        assert_eq!((rows.len(), bad), (400, 0));
        assert_eq!(
            rows.keys().copied().collect::<Vec<_>>(),
            (0..400).collect::<Vec<_>>()
        );
        assert_eq!(Chunks::resume(&stored), chunks);
    }

    #[test]
    fn reading_gives_each_index_once_the_last_row_winning_and_counts_bad_lines() {
        let a = line(&row(3, &result(JobStatus::Abandoned, "null"), None));
        let b = line(&row(3, &result(JobStatus::Finished, "9"), None));
        let text = format!("{a}not json\n{b}");
        let (rows, bad) = read_rows([text.as_str()]);
        assert_eq!(bad, 1);
        assert_eq!(rows[&3].status, JobStatus::Finished);
        let none = line(&row(4, &result(JobStatus::Finished, "null"), None));
        let (rows, _) = read_rows([none.as_str()]);
        assert_eq!(
            rows[&4].result,
            Some(serde_json::Value::Null),
            "None is a result too"
        );
        let statuses: Vec<JobStatus> = vec![
            JobStatus::Finished,
            JobStatus::Terminated,
            JobStatus::Running,
            JobStatus::Abandoned,
        ];
        assert_eq!(counts(&statuses), (1, 2));
    }
}
