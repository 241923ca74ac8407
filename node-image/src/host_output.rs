//! What a Python host writes to its stderr (its own errors, and whatever user code writes to
//! fd 1 or 2) as log lines, with bounds that hold whatever it writes:
//! - a line keeps its first [`MAX_LINE`] bytes; the rest is counted, not kept, so memory stays
//!   at one line even for hundreds of megabytes without a newline;
//! - at most [`LINES_PER_WINDOW`] lines are logged per [`WINDOW`]; the others are counted, and
//!   the count is logged when the window is over.
//!
//! Sans-IO: the caller feeds bytes with the time, calls [`HostOutput::tick`] when nothing came
//! for a while, and logs the entries that come out.

use std::time::{Duration, Instant};

pub const MAX_LINE: usize = 4096;
pub const LINES_PER_WINDOW: u32 = 100;
pub const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq)]
pub enum Entry {
    /// A line, without its newline, and how many of its bytes were cut.
    Line { text: String, cut: u64 },
    /// Lines not logged because the window's lines were used up.
    Dropped { lines: u64, bytes: u64 },
}

pub struct HostOutput {
    /// The kept start of the current line; never longer than MAX_LINE.
    line: Vec<u8>,
    cut: u64,
    window_start: Instant,
    logged: u32,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl HostOutput {
    pub fn new(now: Instant) -> HostOutput {
        HostOutput {
            line: Vec::new(),
            cut: 0,
            window_start: now,
            logged: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    pub fn feed(&mut self, now: Instant, mut bytes: &[u8], out: &mut Vec<Entry>) {
        self.tick(now, out);
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.keep(&bytes[..newline]);
            self.end_line(out);
            bytes = &bytes[newline + 1..];
        }
        self.keep(bytes);
    }

    /// Starts a new window once the current one is over, with the count of what it dropped.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Entry>) {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.logged = 0;
            self.report_dropped(out);
        }
    }

    /// The output ended: its unfinished last line, then what was dropped.
    pub fn finish(&mut self, now: Instant, out: &mut Vec<Entry>) {
        self.tick(now, out);
        if !self.line.is_empty() || self.cut > 0 {
            self.end_line(out);
        }
        self.report_dropped(out);
    }

    fn keep(&mut self, bytes: &[u8]) {
        let take = (MAX_LINE - self.line.len()).min(bytes.len());
        self.line.extend_from_slice(&bytes[..take]);
        self.cut += (bytes.len() - take) as u64;
    }

    fn end_line(&mut self, out: &mut Vec<Entry>) {
        if self.logged < LINES_PER_WINDOW {
            self.logged += 1;
            out.push(Entry::Line {
                text: String::from_utf8_lossy(&self.line).into_owned(),
                cut: self.cut,
            });
        } else {
            self.dropped_lines += 1;
            self.dropped_bytes += self.line.len() as u64 + self.cut;
        }
        self.line.clear();
        self.cut = 0;
    }

    fn report_dropped(&mut self, out: &mut Vec<Entry>) {
        if self.dropped_lines > 0 {
            out.push(Entry::Dropped {
                lines: self.dropped_lines,
                bytes: self.dropped_bytes,
            });
            self.dropped_lines = 0;
            self.dropped_bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, cut: u64) -> Entry {
        Entry::Line {
            text: text.into(),
            cut,
        }
    }

    #[test]
    fn lines_split_across_reads_are_joined_and_an_unfinished_last_line_is_kept() {
        let t = Instant::now();
        let mut output = HostOutput::new(t);
        let mut out = Vec::new();
        output.feed(t, b"Trace", &mut out);
        output.feed(t, b"back:\n\n  File", &mut out);
        assert_eq!(out, vec![line("Traceback:", 0), line("", 0)]);
        out.clear();
        output.finish(t, &mut out);
        assert_eq!(out, vec![line("  File", 0)]);
        out.clear();
        output.finish(t, &mut out);
        assert!(out.is_empty(), "nothing is logged twice");
    }

    #[test]
    fn a_line_without_end_keeps_its_first_4_kib_and_counts_the_rest_in_bounded_memory() {
        let t = Instant::now();
        let mut output = HostOutput::new(t);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            output.feed(t, &chunk, &mut out);
            assert!(output.line.capacity() <= 2 * MAX_LINE);
        }
        assert!(out.is_empty());
        output.feed(t, b"\xff end\nnext", &mut out);
        let cut = (20 << 20) + 5 - MAX_LINE as u64;
        assert_eq!(out, vec![line(&"x".repeat(MAX_LINE), cut)]);
        out.clear();
        // Invalid UTF-8 is logged as replacement characters.
        output.feed(t, b"\xffok\n", &mut out);
        assert_eq!(out, vec![line("next\u{fffd}ok", 0)]);
    }

    #[test]
    fn lines_over_the_rate_are_counted_and_the_count_logged_when_the_window_ends() {
        let t = Instant::now();
        let mut output = HostOutput::new(t);
        let mut out = Vec::new();
        let burst = "0123456789\n".repeat(LINES_PER_WINDOW as usize + 50);
        output.feed(t, burst.as_bytes(), &mut out);
        assert_eq!(out.len(), LINES_PER_WINDOW as usize);
        out.clear();
        output.tick(t + WINDOW / 2, &mut out);
        assert!(out.is_empty(), "the count waits for the window's end");
        output.tick(t + WINDOW, &mut out);
        assert_eq!(
            out,
            vec![Entry::Dropped {
                lines: 50,
                bytes: 500
            }]
        );
        out.clear();
        // A new window logs again.
        output.feed(t + WINDOW, b"after\n", &mut out);
        assert_eq!(out, vec![line("after", 0)]);
    }

    #[test]
    fn the_end_reports_what_was_dropped_in_the_last_window() {
        let t = Instant::now();
        let mut output = HostOutput::new(t);
        let mut out = Vec::new();
        let burst = "y\n".repeat(LINES_PER_WINDOW as usize + 1);
        output.feed(t, burst.as_bytes(), &mut out);
        output.feed(t, b"tail", &mut out);
        out.clear();
        output.finish(t, &mut out);
        assert_eq!(out, vec![Entry::Dropped { lines: 2, bytes: 5 }]);
    }
}
