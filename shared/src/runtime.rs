//! The async runtime each binary runs on, built from `[runtime]` before anything else starts,
//! so that the thread count is configuration rather than a compile-time attribute.

use crate::config::RuntimeConfig;

/// Builds the runtime `cfg` asks for. One thread is tokio's current-thread runtime, not a
/// multi-thread runtime with one worker, which still hands tasks woken by I/O to its worker
/// through shared queues: where the fleet shares two cores, an engine on one thread used
/// about 9 % less CPU per request than on one worker, and 12–16 % less than on two
/// (docs/decisions.md, stop 21).
/// Zero means one thread per CPU the process may use (`available_parallelism`, which honours
/// cgroup CPU limits), so a process limited to one CPU gets the one-thread runtime too.
pub fn build(cfg: &RuntimeConfig) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match cfg.threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()
}

/// Threads that run tasks on the current runtime (0 outside one), for the gauge.
pub fn threads() -> usize {
    tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_workers())
}

#[cfg(test)]
#[path = "runtime_tests.rs"]
mod tests;
