//! Helpers shared by the worker's tests: a throw-away migrated database, and calls as the
//! engine would make them.

use deadpool_postgres::Pool;
use provisio_shared::config::Secret;
use provisio_shared::provider::{Call, Executed, Participation, Rollback};
use serde_json::Value;
use uuid::Uuid;

/// A fresh, migrated database on the test PostgreSQL, dropped when this is dropped (even when
/// the test panics).
pub struct TempDb {
    pub url: Secret,
    pub pool: Pool,
}

/// The test PostgreSQL server, without a database name.
pub fn pg_base() -> String {
    std::env::var("PROVISIO_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TempDb {
    pub async fn new(connections: usize) -> Self {
        let db = Self::empty(connections).await;
        provisio_shared::db::migrate(&db.url)
            .await
            .expect("migrations");
        db
    }

    /// A fresh database without the schema, for tests that only need a server to talk to.
    pub async fn empty(connections: usize) -> Self {
        let url = Secret::new(format!("{}/pvunit_{}", pg_base(), Uuid::new_v4().simple()));
        provisio_shared::db::create_database_if_missing(&url)
            .await
            .expect("test database");
        let pool = provisio_shared::db::pool(&url, connections).expect("pool");
        Self { url, pool }
    }

    /// This database's name.
    pub fn name(&self) -> String {
        provisio_shared::db::pg_config(&self.url)
            .ok()
            .and_then(|c| c.get_dbname().map(str::to_owned))
            .unwrap_or_default()
    }

    pub async fn scalar_i64(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        let client = self.pool.get().await.expect("connection");
        client.query_one(sql, params).await.expect("query").get(0)
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let url = self.url.clone();
        // A runtime of its own: this may run while the test's runtime is shutting down.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(provisio_shared::db::drop_database(&url));
            }
        })
        .join();
    }
}

/// A compensating call of `action` with a fresh transaction id.
pub fn call(action: &str, input: Value) -> Call {
    let tx_id = Uuid::new_v4();
    Call {
        tx_id,
        idempotency_key: format!("{tx_id}:steps.0"),
        step_path: "steps.0".into(),
        action: action.into(),
        input,
        caller: None,
        credentials: None,
        participation: Participation::Compensating,
    }
}

/// The rollback the engine would send for the completed call `c`.
pub fn rollback_of(c: &Call, e: &Executed) -> Rollback {
    Rollback {
        tx_id: c.tx_id,
        idempotency_key: c.idempotency_key.clone(),
        step_path: c.step_path.clone(),
        action: c.action.clone(),
        data: e.rollback.clone().expect("rollback data"),
    }
}

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
