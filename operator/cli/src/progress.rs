//! Progress while jobs run: a live bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;

use dispy_core::manifest::{ArrayResult, DispyJobStatus};
use indicatif::{ProgressBar, ProgressStyle};

/// Failed indexes of arrays told on stderr as they end; the rest are only in the results.
const FAILED_INDEXES_TOLD: u32 = 20;

pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    failed_indexes: u32,
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {pos}/{len} jobs done  {msg}  [{elapsed}]",
                )
                .expect("valid template"),
            );
            bar
        });
        Progress {
            bar,
            quiet,
            failed_indexes: 0,
        }
    }

    /// Jobs (and arrays' indexes) running, ended Finished, and ended.
    pub fn update(&mut self, running: usize, finished: usize, done: usize) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(done as u64);
        bar.set_message(format!(
            "running {running}  finished {finished}  failed {}",
            done - finished,
        ));
    }

    pub fn job_done(&mut self, name: &str, status: &DispyJobStatus) {
        if self.bar.is_some() || self.quiet {
            return;
        }
        let on = status
            .node
            .as_deref()
            .map(|n| format!(" on {n}"))
            .unwrap_or_default();
        let why = status
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        eprintln!("dispy: job {name} {}{on}{why}", status.status);
    }

    /// An array's index ended other than Finished: the first few are told.
    pub fn index_failed(&mut self, array: &str, row: &ArrayResult) {
        self.failed_indexes += 1;
        let text = match self.failed_indexes {
            n if n > FAILED_INDEXES_TOLD + 1 => return,
            n if n == FAILED_INDEXES_TOLD + 1 => {
                "further failed indexes are only in the results".to_string()
            }
            _ => {
                let on = row
                    .node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default();
                // The exception's last line says what was raised.
                let why = row
                    .message
                    .as_deref()
                    .or(row.exception.as_deref().and_then(|e| e.lines().last()))
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                format!(
                    "DispyJobArray {array} index {} {}{on}{why}",
                    row.index, row.status
                )
            }
        };
        self.note(&text);
    }

    pub fn note(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("dispy: {text}")),
            None if !self.quiet => eprintln!("dispy: {text}"),
            None => {}
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
