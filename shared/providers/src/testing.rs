//! Helpers for tests of providers, here and in the crates that depend on this one (feature
//! `testing`): a throw-away migrated database, and calls as the engine would make them.
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use deadpool_postgres::Pool;
use provisio_provider::{Call, Executed, Participation, Rollback};
use provisio_shared::config::Secret;
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
