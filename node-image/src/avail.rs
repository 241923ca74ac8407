//! What the machine has free — idle cpu, available memory, free disk under
//! `--dest-path-prefix`, free swap — computed as psutil computes it for dispy's node, without
//! psutil: from `/proc/stat`, `/proc/meminfo` and statvfs(3). The parsers and the arithmetic
//! take text and numbers and return numbers, so they are tested from fixtures; [`Sampler`]
//! reads the real files, and [`keep_sampling`] keeps the node's latest [`AvailInfo`] and its
//! gauges fresh.
//!
//! Idle cpu needs two samples. As psutil's `cpu_percent()` compares with its previous call,
//! each sample is compared with the one before it (the first with the machine's boot), so a
//! figure covers the last [`PERIOD`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dispy_core::protocol::AvailInfo;

use crate::node::Node;

/// How often the node samples; a figure's idle cpu covers this long.
pub const PERIOD: Duration = Duration::from_secs(1);

/// The aggregate `cpu` line of `/proc/stat`: clock ticks all cpus spent in each state, in
/// proc(5)'s order: user nice system idle iowait irq softirq steal guest guest_nice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes([u64; 10]);

const IDLE: usize = 3;
const IOWAIT: usize = 4;
/// Fields before guest and guest_nice: the kernel already counts guest time in user and nice,
/// so (as psutil does) it is not added a second time.
const COUNTED: usize = 8;

/// The `cpu` line (all cpus) of a `/proc/stat`. Older kernels write fewer fields (at least
/// user nice system idle); the missing ones count as 0.
pub fn parse_cpu_times(stat: &str) -> Result<CpuTimes, String> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or("no aggregate \"cpu\" line")?;
    let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
    if fields.len() <= IDLE {
        return Err(format!(
            "the \"cpu\" line has {} fields, fewer than proc(5)'s user nice system idle",
            fields.len()
        ));
    }
    let mut times = [0u64; 10];
    for (slot, field) in times.iter_mut().zip(fields) {
        *slot = field
            .parse()
            .map_err(|_| format!("the \"cpu\" line's {field:?} is not a tick count"))?;
    }
    Ok(CpuTimes(times))
}

/// Percent rounded to 0.1, as psutil rounds its percentages.
fn round1(percent: f64) -> f64 {
    (percent * 10.0).round() / 10.0
}

/// Idle cpu (idle and iowait) between two samples, in percent: dispy's `100 - cpu_percent()`.
/// A counter that went backwards (some hypervisors do) counts as no time; no tick at all in
/// between reads as all idle, as psutil then reports 0% busy.
pub fn idle_percent(before: &CpuTimes, after: &CpuTimes) -> f64 {
    let delta: [u64; COUNTED] = std::array::from_fn(|i| after.0[i].saturating_sub(before.0[i]));
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return 100.0;
    }
    let busy = total - delta[IDLE] - delta[IOWAIT];
    100.0 - round1(busy as f64 * 100.0 / total as f64)
}

/// The figures of `/proc/meminfo` the node reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

/// A `/proc/meminfo`. Kernels before 3.14 have no `MemAvailable`; there the old estimate,
/// `MemFree + Buffers + Cached`, stands in. A machine without swap support may omit the swap
/// lines: that is no swap.
pub fn parse_meminfo(text: &str) -> Result<Memory, String> {
    let field = |name: &str| -> Result<Option<u64>, String> {
        let Some(line) = text.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == name).then_some(value)
        }) else {
            return Ok(None);
        };
        let mut words = line.split_whitespace();
        let amount: u64 = words
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{name} {:?} is not an amount", line.trim()))?;
        match words.next() {
            None => Ok(Some(amount)),
            Some("kB") => Ok(Some(amount.saturating_mul(1024))),
            Some(unit) => Err(format!("{name} is in {unit:?}, not kB")),
        }
    };
    let available = match field("MemAvailable")? {
        Some(available) => available,
        None => {
            let mut estimate = 0u64;
            for name in ["MemFree", "Buffers", "Cached"] {
                let amount = field(name)?.ok_or_else(|| {
                    format!("neither MemAvailable nor {name} (for the pre-3.14 estimate) is there")
                })?;
                estimate = estimate.saturating_add(amount);
            }
            estimate
        }
    };
    Ok(Memory {
        available,
        swap_total: field("SwapTotal")?.unwrap_or(0),
        swap_free: field("SwapFree")?.unwrap_or(0),
    })
}

/// Free swap in percent: dispy's `100 - swap_memory().percent`. Without swap psutil says 0%
/// used, so this says 100.
pub fn swap_free_percent(memory: &Memory) -> f64 {
    if memory.swap_total == 0 {
        return 100.0;
    }
    let used = memory.swap_total.saturating_sub(memory.swap_free);
    100.0 - round1(used as f64 * 100.0 / memory.swap_total as f64)
}

/// The four figures dispy's node sends, from two cpu samples, the memory figures and the free
/// bytes of the prefix's filesystem.
pub fn avail_info(before: &CpuTimes, after: &CpuTimes, memory: &Memory, disk: u64) -> AvailInfo {
    AvailInfo {
        cpu: idle_percent(before, after),
        memory: memory.available,
        disk,
        swap: swap_free_percent(memory),
    }
}

/// Bytes an unprivileged user may still write on `path`'s filesystem (`f_bavail * f_frsize`,
/// psutil's `disk_usage().free`).
pub fn disk_free(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte")
    })?;
    // SAFETY: statvfs(3) reads a NUL-terminated path and fills the struct it is given.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fs.f_bavail as u64).saturating_mul(fs.f_frsize as u64))
}

/// Samples the real machine. Holds the previous cpu sample, which the next figure is
/// measured from.
pub struct Sampler {
    prefix: PathBuf,
    last_cpu: CpuTimes,
    /// The error of the last sample, so a lasting failure is logged once.
    failing: Option<String>,
}

impl Sampler {
    /// The first sample is measured from the machine's boot (all counters 0 then).
    pub fn new(prefix: &Path) -> Sampler {
        Sampler {
            prefix: prefix.to_path_buf(),
            last_cpu: CpuTimes::default(),
            failing: None,
        }
    }

    /// Reads `/proc/stat`, `/proc/meminfo` and statvfs of the prefix; the figures since the
    /// previous sample.
    pub fn sample(&mut self) -> Result<AvailInfo, String> {
        let cpu = read("/proc/stat", parse_cpu_times)?;
        let memory = read("/proc/meminfo", parse_meminfo)?;
        let disk = disk_free(&self.prefix).map_err(|e| {
            format!(
                "statvfs of --dest-path-prefix {}: {e}",
                self.prefix.display()
            )
        })?;
        let info = avail_info(&self.last_cpu, &cpu, &memory, disk);
        self.last_cpu = cpu;
        Ok(info)
    }

    /// Samples and records the figures in the node and its gauges. Without figures the node
    /// says `avail_info` None, as dispy's node without psutil does; the gauges keep their last
    /// values.
    pub fn sample_into(&mut self, node: &Node) {
        match self.sample() {
            Ok(info) => {
                if self.failing.take().is_some() {
                    tracing::info!("what the machine has free is known again");
                }
                node.metrics.set_avail(&info);
                node.set_avail(Some(info));
            }
            Err(e) => {
                if self.failing.as_ref() != Some(&e) {
                    tracing::warn!("clients are not told what the machine has free: {e}");
                }
                self.failing = Some(e);
                node.set_avail(None);
            }
        }
    }
}

fn read<T>(path: &str, parse: fn(&str) -> Result<T, String>) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse(&text).map_err(|e| format!("{path}: {e}"))
}

/// Samples every [`PERIOD`] until the runtime ends. Sampling runs on a blocking thread: a
/// filesystem under the prefix that hangs statvfs delays the figures, never the node.
pub async fn keep_sampling(node: Arc<Node>, mut sampler: Sampler) {
    loop {
        tokio::time::sleep(PERIOD).await;
        let n = node.clone();
        sampler = match tokio::task::spawn_blocking(move || {
            sampler.sample_into(&n);
            sampler
        })
        .await
        {
            Ok(sampler) => sampler,
            Err(e) => {
                tracing::error!("sampling what the machine has free stopped: {e}");
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-cpu machine's `/proc/stat` (Linux 6.x): the aggregate line first, then per cpu.
    const STAT: &str = "\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0
cpu0 1393280 32966 572056 13203172 3966 0 14006 0 61294 0
cpu1 1335302 40159 536394 13273542 4131 0 4585 0 57391 0
intr 1462898 124 0 0 0 0 0 0 0 1 0 0 0
ctxt 3175232
btime 1700000000
processes 26342
procs_running 1
";

    fn times(fields: [u64; 10]) -> CpuTimes {
        CpuTimes(fields)
    }

    #[test]
    fn the_aggregate_cpu_line_is_read_not_a_single_cpus() {
        let t = parse_cpu_times(STAT).unwrap();
        assert_eq!(
            t,
            times([10132153, 290696, 3084719, 46828483, 16683, 0, 25195, 0, 175628, 0])
        );
    }

    #[test]
    fn an_old_kernels_short_cpu_line_is_read_with_zeros() {
        let t = parse_cpu_times("cpu 10 20 30 400\n").unwrap();
        assert_eq!(t, times([10, 20, 30, 400, 0, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn a_malformed_stat_is_an_error_naming_what_is_wrong() {
        let e = parse_cpu_times("cpu0 1 2 3 4\n").unwrap_err();
        assert!(e.contains("no aggregate \"cpu\" line"), "{e}");
        let e = parse_cpu_times("cpu 1 2 3\n").unwrap_err();
        assert!(e.contains("3 fields"), "{e}");
        let e = parse_cpu_times("cpu 1 2 x 4\n").unwrap_err();
        assert!(e.contains("\"x\" is not a tick count"), "{e}");
    }

    #[test]
    fn idle_is_idle_and_iowait_over_all_ticks_between_samples() {
        //                  user nice sys idle iowait irq soft steal guest guest_nice
        let before = times([100, 0, 50, 800, 50, 0, 0, 0, 30, 0]);
        // 1000 ticks: 150 user (100 of them guest), 50 system, 700 idle, 100 iowait.
        let after = times([250, 0, 100, 1500, 150, 0, 0, 0, 130, 0]);
        assert_eq!(idle_percent(&before, &after), 80.0);
    }

    #[test]
    fn guest_time_is_not_counted_twice() {
        // All 100 ticks in a guest, which the kernel counts in user too: 100% busy, not 50%.
        let before = times([0; 10]);
        let after = times([100, 0, 0, 0, 0, 0, 0, 0, 100, 0]);
        assert_eq!(idle_percent(&before, &after), 0.0);
        let after = times([0, 100, 0, 100, 0, 0, 0, 0, 0, 100]);
        assert_eq!(idle_percent(&before, &after), 50.0);
    }

    #[test]
    fn idle_is_rounded_to_a_tenth_as_psutil_rounds() {
        let before = times([0; 10]);
        let after = times([2, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(idle_percent(&before, &after), 100.0 - 66.7);
    }

    #[test]
    fn no_ticks_between_samples_is_all_idle_and_backward_counters_count_nothing() {
        let t = parse_cpu_times(STAT).unwrap();
        assert_eq!(idle_percent(&t, &t), 100.0);
        let before = times([500, 0, 0, 100, 0, 0, 0, 0, 0, 0]);
        // user went backwards (a migrated VM); the 100 idle ticks are all there is.
        let after = times([400, 0, 0, 200, 0, 0, 0, 0, 0, 0]);
        assert_eq!(idle_percent(&before, &after), 100.0);
    }

    #[test]
    fn the_first_sample_measures_from_boot() {
        let t = parse_cpu_times(STAT).unwrap();
        let idle = idle_percent(&CpuTimes::default(), &t);
        // 13532763 of 60377929 ticks busy since boot: 22.4%.
        assert_eq!(idle, 100.0 - 22.4);
    }

    const MEMINFO: &str = "\
MemTotal:        8024380 kB
MemFree:          524288 kB
MemAvailable:    4194304 kB
Buffers:          102400 kB
Cached:          2097152 kB
SwapCached:            0 kB
SwapTotal:       2097152 kB
SwapFree:        1572864 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn meminfo_gives_mem_available_and_swap_in_bytes() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(
            m,
            Memory {
                available: 4 << 30,
                swap_total: 2 << 30,
                swap_free: 1536 << 20,
            }
        );
        assert_eq!(swap_free_percent(&m), 75.0);
    }

    #[test]
    fn without_mem_available_free_buffers_and_cached_stand_in() {
        let old = MEMINFO.replace("MemAvailable:    4194304 kB\n", "");
        let m = parse_meminfo(&old).unwrap();
        assert_eq!(m.available, (524288 + 102400 + 2097152) * 1024);
        let bare = "MemTotal: 100 kB\nMemFree: 50 kB\n";
        let e = parse_meminfo(bare).unwrap_err();
        assert!(e.contains("neither MemAvailable nor Buffers"), "{e}");
    }

    #[test]
    fn a_malformed_meminfo_is_an_error_naming_the_field() {
        let e = parse_meminfo("MemAvailable: lots kB\n").unwrap_err();
        assert!(
            e.contains("MemAvailable \"lots kB\" is not an amount"),
            "{e}"
        );
        let e = parse_meminfo("MemAvailable: 5 MB\n").unwrap_err();
        assert!(e.contains("MemAvailable is in \"MB\", not kB"), "{e}");
    }

    #[test]
    fn no_swap_is_all_free_as_psutil_says() {
        let m = parse_meminfo("MemAvailable: 1 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n").unwrap();
        assert_eq!(swap_free_percent(&m), 100.0);
        let m = parse_meminfo("MemAvailable: 1 kB\n").unwrap();
        assert_eq!((m.swap_total, swap_free_percent(&m)), (0, 100.0));
        let third = Memory {
            available: 0,
            swap_total: 3,
            swap_free: 1,
        };
        assert_eq!(swap_free_percent(&third), 100.0 - 66.7);
    }

    #[test]
    fn avail_info_holds_the_four_figures() {
        let before = times([0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let after = times([25, 0, 0, 75, 0, 0, 0, 0, 0, 0]);
        let m = parse_meminfo(MEMINFO).unwrap();
        let a = avail_info(&before, &after, &m, 10 << 30);
        assert_eq!(
            a,
            AvailInfo {
                cpu: 75.0,
                memory: 4 << 30,
                disk: 10 << 30,
                swap: 75.0,
            }
        );
    }
}
