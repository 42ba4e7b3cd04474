//! Helpers shared by the worker's tests. The database and call helpers are the providers'
//! crate's (its `testing` feature); the proxy is the worker's own.
#![allow(
    clippy::expect_used,
    reason = "test code (cfg(test)): a failed expectation is the test failing"
)]

pub use provisio_providers::testing::{TempDb, pg_base};

/// A TCP proxy a test can cut (every connection dropped, new ones refused) and restore, to
/// take a server away from the code under test only. (The end-to-end harness has its own;
/// the worker does not depend on the tests crate.)
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let p = Self {
            addr: listener.local_addr().expect("address"),
            upstream,
            task: std::sync::Mutex::new(None),
        };
        p.serve(listener);
        p
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let upstream = self.upstream;
        let handle = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) cuts every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        *self.task.lock().expect("lock") = Some(handle);
    }

    pub async fn cut(&self) {
        let task = self.task.lock().expect("lock").take();
        if let Some(h) = task {
            h.abort();
            let _ = h.await;
        }
    }

    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind");
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(mut t) = self.task.lock()
            && let Some(h) = t.take()
        {
            h.abort();
        }
    }
}
