//! dispy's daily service window (`--service_start`, `--service_stop`, `--service_end`): when
//! the node takes jobs. As data: which phase a minute of the day falls in.
//!
//! - From start to stop the node is open: it starts jobs and answers pings.
//! - From stop to end it takes no new jobs; running ones go on.
//! - From end to the next start running jobs are terminated too.
//!
//! Times are minutes after local midnight; a window may run past midnight (22:00 to 06:00).
//! Without a stop, the node is open from start until end; without an end, it stops at stop
//! and running jobs go on until they finish; without a start, it opens at midnight.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// No new jobs; running ones go on.
    Stopped,
    /// No jobs at all: running ones are terminated.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    start: Option<u32>,
    stop: Option<u32>,
    end: Option<u32>,
}

const DAY: u32 = 24 * 60;

/// Minutes from `from` forward to `to`, around midnight.
fn ahead(from: u32, to: u32) -> u32 {
    (to + DAY - from) % DAY
}

impl Window {
    pub fn new(start: Option<u32>, stop: Option<u32>, end: Option<u32>) -> Result<Window, String> {
        let w = Window { start, stop, end };
        if w.is_always_open() {
            return Ok(w);
        }
        let open = w.start.unwrap_or(0);
        if let (Some(stop), Some(end)) = (stop, end) {
            if ahead(open, stop) > ahead(open, end) || stop == end {
                return Err(format!(
                    "--service_stop {} must come before --service_end {} (after --service_start {})",
                    hhmm(stop),
                    hhmm(end),
                    hhmm(open)
                ));
            }
        }
        if w.stop.or(w.end) == Some(open) {
            return Err(format!(
                "--service_start {} leaves no service time",
                hhmm(open)
            ));
        }
        Ok(w)
    }

    pub fn times(&self) -> (Option<u32>, Option<u32>, Option<u32>) {
        (self.start, self.stop, self.end)
    }

    pub fn is_always_open(&self) -> bool {
        self.stop.is_none() && self.end.is_none()
    }

    /// The phase at `minute` (after local midnight).
    pub fn phase(&self, minute: u32) -> Phase {
        let open = self.start.unwrap_or(0);
        let since = ahead(open, minute % DAY);
        let until = |t: Option<u32>| t.map(|t| ahead(open, t));
        match (until(self.stop), until(self.end)) {
            (None, None) => Phase::Open,
            (Some(stop), _) if since < stop => Phase::Open,
            (None, Some(end)) if since < end => Phase::Open,
            (Some(_), Some(end)) if since < end => Phase::Stopped,
            (Some(_), None) => Phase::Stopped,
            _ => Phase::Ended,
        }
    }

    /// `from 08:00 to 18:00`, for logs and status.
    pub fn describe(&self) -> String {
        if self.is_always_open() && self.start.is_none() {
            return "always".into();
        }
        let mut s = format!("from {}", hhmm(self.start.unwrap_or(0)));
        if let Some(stop) = self.stop {
            s += &format!(", no new jobs from {}", hhmm(stop));
        }
        if let Some(end) = self.end {
            s += &format!(", ended at {}", hhmm(end));
        }
        s
    }
}

fn hhmm(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// `minute` of today as Unix time, as dispy's admin shows service times.
pub fn today_at(minute: u32) -> f64 {
    let now = local_minute();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let midnight = secs - secs % 60 - now as u64 * 60;
    (midnight + minute as u64 * 60) as f64
}

/// Minutes after local midnight now.
pub fn local_minute() -> u32 {
    // SAFETY: time and localtime_r with valid pointers to locals.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        (tm.tm_hour * 60 + tm.tm_min) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32, m: u32) -> u32 {
        h * 60 + m
    }

    #[test]
    fn no_times_is_always_open() {
        let w = Window::new(None, None, None).unwrap();
        assert!((0..DAY).all(|m| w.phase(m) == Phase::Open));
    }

    #[test]
    fn a_day_window_opens_stops_and_ends() {
        let w = Window::new(Some(at(8, 0)), Some(at(17, 0)), Some(at(18, 30))).unwrap();
        assert_eq!(w.phase(at(7, 59)), Phase::Ended);
        assert_eq!(w.phase(at(8, 0)), Phase::Open);
        assert_eq!(w.phase(at(16, 59)), Phase::Open);
        assert_eq!(w.phase(at(17, 0)), Phase::Stopped);
        assert_eq!(w.phase(at(18, 29)), Phase::Stopped);
        assert_eq!(w.phase(at(18, 30)), Phase::Ended);
        assert_eq!(w.phase(at(23, 59)), Phase::Ended);
    }

    #[test]
    fn a_night_window_runs_past_midnight() {
        let w = Window::new(Some(at(22, 0)), None, Some(at(6, 0))).unwrap();
        assert_eq!(w.phase(at(23, 0)), Phase::Open);
        assert_eq!(w.phase(at(5, 59)), Phase::Open);
        assert_eq!(w.phase(at(6, 0)), Phase::Ended);
        assert_eq!(w.phase(at(21, 59)), Phase::Ended);
    }

    #[test]
    fn a_stop_without_an_end_lets_running_jobs_go_on_until_the_next_start() {
        let w = Window::new(Some(at(9, 0)), Some(at(12, 0)), None).unwrap();
        assert_eq!(w.phase(at(11, 0)), Phase::Open);
        assert_eq!(w.phase(at(12, 0)), Phase::Stopped);
        assert_eq!(w.phase(at(8, 59)), Phase::Stopped);
    }

    #[test]
    fn a_stop_after_the_end_or_no_time_at_all_is_refused() {
        let e = Window::new(Some(at(8, 0)), Some(at(19, 0)), Some(at(18, 0))).unwrap_err();
        assert!(e.contains("must come before --service_end 18:00"), "{e}");
        let e = Window::new(Some(at(8, 0)), Some(at(8, 0)), None).unwrap_err();
        assert!(e.contains("leaves no service time"), "{e}");
    }
}
