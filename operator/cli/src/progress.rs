//! Progress while jobs run: a live bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;

use dispy_core::job::JobStatus;
use dispy_core::manifest::DispyJobStatus;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
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
        Progress { bar, quiet }
    }

    /// Counts by status for the bar's message.
    pub fn update(&mut self, jobs: &[(JobStatus, bool)]) {
        let Some(bar) = &self.bar else { return };
        let count = |s: JobStatus| jobs.iter().filter(|(st, _)| *st == s).count();
        let done = jobs.iter().filter(|(_, d)| *d).count();
        bar.set_position(done as u64);
        bar.set_message(format!(
            "running {}  finished {}  failed {}",
            count(JobStatus::Running),
            count(JobStatus::Finished),
            done - count(JobStatus::Finished),
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
