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
        let end = ending(status.node.as_deref(), status.message.as_deref());
        eprintln!("dispy: job {name} {}{end}", status.status);
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
                // The exception's last line says what was raised.
                let raised = row.exception.as_deref().and_then(|e| e.lines().last());
                let end = ending(row.node.as_deref(), row.message.as_deref().or(raised));
                format!(
                    "DispyJobArray {array} index {} {}{end}",
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

/// ` on NODE: WHY`, of what there is.
fn ending(node: Option<&str>, why: Option<&str>) -> String {
    let on = node.map(|n| format!(" on {n}")).unwrap_or_default();
    let why = why.map(|m| format!(": {m}")).unwrap_or_default();
    on + &why
}
