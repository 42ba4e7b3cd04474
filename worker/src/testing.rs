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

impl TempDb {
    pub async fn new(connections: usize) -> Self {
        let base = std::env::var("PROVISIO_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let url = Secret::new(format!("{base}/pvunit_{}", Uuid::new_v4().simple()));
        provisio_shared::db::create_database_if_missing(&url)
            .await
            .expect("test database");
        provisio_shared::db::migrate(&url)
            .await
            .expect("migrations");
        let pool = provisio_shared::db::pool(&url, connections).expect("pool");
        Self { url, pool }
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
