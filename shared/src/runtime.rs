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
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::*;

    fn flavor_and_threads(threads: usize) -> (RuntimeFlavor, usize) {
        let rt = build(&RuntimeConfig { threads }).expect("runtime");
        rt.block_on(async {
            // A task spawned and awaited proves the runtime runs tasks, not only the root.
            let spawned = tokio::spawn(async { super::threads() })
                .await
                .expect("task");
            (tokio::runtime::Handle::current().runtime_flavor(), spawned)
        })
    }

    #[test]
    fn one_thread_is_the_current_thread_runtime() {
        assert_eq!(flavor_and_threads(1), (RuntimeFlavor::CurrentThread, 1));
    }

    #[test]
    fn several_threads_are_as_many_workers() {
        assert_eq!(flavor_and_threads(3), (RuntimeFlavor::MultiThread, 3));
    }

    #[test]
    fn zero_is_one_thread_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let flavor = if cpus == 1 {
            RuntimeFlavor::CurrentThread
        } else {
            RuntimeFlavor::MultiThread
        };
        assert_eq!(flavor_and_threads(0), (flavor, cpus));
    }

    #[test]
    fn timers_and_io_work_on_one_thread() {
        let rt = build(&RuntimeConfig { threads: 1 }).expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::net::TcpStream::connect(addr).await.expect("connect");
            accept.await.expect("task").expect("accept");
        });
    }
}
