//! What `provisio-bench` measures besides throughput: latency percentiles and what each
//! process of the system costs (CPU time and peak memory), read from Linux's `/proc`.
//!
//! CPU is counted per process group over the measured window: a fleet process by its pid;
//! PostgreSQL and RabbitMQ by command name (`postgres`, `beam.smp`), summed over every process
//! of that name, so backends that come and go during the window are counted too (an exited
//! backend's time moves into the postmaster's children times, which are summed as well).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

/// The value below which a fraction `p` of `sorted` lies: nearest rank (the `ceil(p·n)`-th
/// smallest), so p99.9 of 1,000 samples is the largest, never an interpolation between
/// samples that did not happen.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// When the tail happened: for each whole second of the run (by when a request was submitted,
/// or due in open loop), how many requests took at least `threshold`. A tail spread evenly
/// over the seconds is queueing; one piled into a few seconds is a stall (a checkpoint, a
/// sweep, a broker pause), and the two call for different cures.
pub fn tail_by_second(samples: &[(Duration, Duration)], threshold: Duration) -> Vec<usize> {
    let mut by_second = Vec::new();
    for &(at, took) in samples {
        let second = at.as_secs() as usize;
        if by_second.len() <= second {
            by_second.resize(second + 1, 0);
        }
        if took >= threshold {
            by_second[second] += 1;
        }
    }
    by_second
}

/// The latencies of the requests submitted (or due) at or after `from`: the run without its
/// start, when 64 clients or the first second's arrivals meet a fleet whose connections,
/// caches and keys are cold. Printed beside the whole run's figures, never instead of them.
pub fn latencies_from(samples: &[(Duration, Duration)], from: Duration) -> Vec<Duration> {
    samples
        .iter()
        .filter(|&&(at, _)| at >= from)
        .map(|&(_, took)| took)
        .collect()
}

/// Latency percentiles in milliseconds, as printed and as written with `--json`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self::of_sorted(&samples)
    }

    /// For samples the caller has sorted already (it needs them sorted for more than this).
    pub fn of_sorted(samples: &[Duration]) -> Self {
        let ms = |p: f64| percentile(samples, p).as_secs_f64() * 1e3;
        Self {
            count: samples.len(),
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
            p99_9: ms(0.999),
            max: ms(1.0),
        }
    }
}

/// The fields of `/proc/<pid>/stat` the bench needs, in clock ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub utime: u64,
    pub stime: u64,
    /// CPU of children the process has waited for (the postmaster's exited backends).
    pub cutime: u64,
    pub cstime: u64,
}

impl ProcStat {
    pub fn ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses `/proc/<pid>/stat`. The command name is between the first `(` and the *last* `)`,
/// since it may itself contain spaces and parentheses; the numbered fields follow it.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // After the name: state (field 3), ppid (4), … utime (14), stime (15), cutime (16), cstime (17).
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        comm,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// Resident set size in KiB from `/proc/<pid>/status` (the `VmRSS:` line; absent for kernel
/// threads and zombies).
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Busy ticks of all CPUs together from `/proc/stat` (everything but idle and iowait): what
/// the whole machine spent, to see how much of the window went to processes outside the run.
pub fn parse_cpu_busy(proc_stat: &str) -> Option<u64> {
    let mut fields = proc_stat.lines().next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let (idle, iowait) = (*ticks.get(3)?, *ticks.get(4)?);
    Some(ticks.iter().take(8).sum::<u64>() - idle - iowait)
}

/// Clock ticks per second for the stat fields (`getconf CLK_TCK`; 100 on every Linux the
/// bench runs on, which is the fallback).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Every process whose command name is `comm`, with its stat.
fn processes_named(comm: &str) -> Vec<(u32, ProcStat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid)?)))
        .filter(|(_, s)| s.comm == comm)
        .collect()
}

fn cmdline_contains(pid: u32, needle: &str) -> bool {
    std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline"))
        .is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle))
}

/// Which processes make up one measured group.
#[derive(Debug, Clone)]
pub enum Who {
    /// One process (a fleet binary the bench started, or the bench itself).
    Pid(u32),
    /// Every process with this command name.
    Named(&'static str),
    /// Processes with this command name whose command line contains the text (PostgreSQL puts
    /// the database name in each backend's process title).
    NamedWith(&'static str, String),
    /// All CPUs' busy time (no RSS).
    Machine,
}

impl Who {
    fn processes(&self) -> Vec<(u32, ProcStat)> {
        match self {
            Self::Pid(pid) => read_stat(*pid).map(|s| (*pid, s)).into_iter().collect(),
            Self::Named(comm) => processes_named(comm),
            Self::NamedWith(comm, text) => processes_named(comm)
                .into_iter()
                .filter(|(pid, _)| cmdline_contains(*pid, text))
                .collect(),
            Self::Machine => Vec::new(),
        }
    }

    fn ticks(&self) -> u64 {
        if matches!(self, Self::Machine) {
            return std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| parse_cpu_busy(&s))
                .unwrap_or(0);
        }
        self.processes().iter().map(|(_, s)| s.ticks()).sum()
    }

    /// The largest single process's RSS now.
    fn rss_kib(&self) -> u64 {
        self.processes()
            .iter()
            .filter_map(|(pid, _)| read_rss_kib(*pid))
            .max()
            .unwrap_or(0)
    }
}

/// What one group cost over the window.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCost {
    pub process: String,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_1000_requests: f64,
    /// Peak RSS of the largest single process of the group, sampled every 200 ms (none for
    /// the machine).
    pub peak_rss_mib: Option<f64>,
}

/// Measures CPU (at start and finish) and peak RSS (sampled on its own thread, so the load
/// generator's runtime does not delay the samples) of named process groups.
pub struct CostMeter {
    groups: Vec<(String, Who)>,
    start_ticks: Vec<u64>,
    peaks: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(200);

impl CostMeter {
    pub fn start(groups: Vec<(String, Who)>) -> Self {
        let start_ticks = groups.iter().map(|(_, w)| w.ticks()).collect();
        let peaks = Arc::new(Mutex::new(vec![0; groups.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (whos, peaks, stop) = (
                groups.iter().map(|(_, w)| w.clone()).collect::<Vec<_>>(),
                peaks.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let now: Vec<u64> = whos.iter().map(Who::rss_kib).collect();
                    {
                        let mut peaks = peaks.lock().unwrap_or_else(PoisonError::into_inner);
                        for (p, n) in peaks.iter_mut().zip(now) {
                            *p = (*p).max(n);
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        Self {
            groups,
            start_ticks,
            peaks,
            stop,
            sampler: Some(sampler),
        }
    }

    /// Ends the window; `requests` is what the CPU is divided by (requests finished in it).
    pub fn finish(mut self, requests: usize) -> Vec<ProcessCost> {
        let end_ticks: Vec<u64> = self.groups.iter().map(|(_, w)| w.ticks()).collect();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
        let hz = clock_ticks_per_second() as f64;
        let machine: Vec<bool> = self
            .groups
            .iter()
            .map(|(_, w)| matches!(w, Who::Machine))
            .collect();
        let peaks = self
            .peaks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.groups
            .iter()
            .zip(self.start_ticks.iter().zip(end_ticks))
            .zip(peaks.into_iter().zip(machine))
            .map(|(((name, _), (start, end)), (peak, machine))| {
                let cpu_seconds = end.saturating_sub(*start) as f64 / hz;
                ProcessCost {
                    process: name.clone(),
                    cpu_seconds,
                    cpu_seconds_per_1000_requests: if requests == 0 {
                        0.0
                    } else {
                        cpu_seconds * 1000.0 / requests as f64
                    },
                    peak_rss_mib: (!machine).then(|| peak as f64 / 1024.0),
                }
            })
            .collect()
    }
}

impl Drop for CostMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[path = "measure_tests.rs"]
mod tests;
