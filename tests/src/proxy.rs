//! A TCP proxy that a test can cut and restore, to take "the broker" away from one process
//! without stopping the RabbitMQ that other tests share.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let p = Self {
            addr,
            upstream,
            task: Arc::new(Mutex::new(None)),
        };
        p.serve(listener).await;
        Ok(p)
    }

    async fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let handle = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
            // Dropping the JoinSet (when this task is aborted) cuts every connection.
        });
        *self.task.lock().await = Some(handle);
    }

    /// Cuts every connection and refuses new ones.
    pub async fn cut(&self) {
        if let Some(h) = self.task.lock().await.take() {
            h.abort();
            let _ = h.await;
        }
    }

    /// Accepts connections again on the same address.
    pub async fn restore(&self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener).await;
        Ok(())
    }
}
