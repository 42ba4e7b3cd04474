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
