//! The `test` provider: fault injection for tests and demos. Every execute and rollback is
//! recorded in `provider_test.calls`, so tests can see what ran and in which order. Faults:
//! `fail`, `fail_n_times`, `panic`, `sleep`; on `echo`'s input, `fail_rollback` and
//! `rollback_sleep_ms` act on its rollback.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use provisio_provider::{Call, Executed, Provider, ProviderError, Rollback};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::{BuildContext, BuildError};

/// The actions namespaces may call.
pub const ACTIONS: &[&str] = &["echo", "sleep", "fail", "fail_n_times", "panic"];

/// The constructor of [`crate::BUILTINS`]: a pool of its own, with `synchronous_commit = off`
/// (see [`TestProvider::new`]).
pub fn build(ctx: &mut BuildContext<'_>) -> Result<Arc<dyn Provider>, BuildError> {
    let test_pool = provisio_shared::db::pool_with_options(
        &ctx.config.database.url,
        ctx.config.database.pool_size.min(8),
        Some("-c synchronous_commit=off"),
    )
    .map_err(|e| BuildError::Pool(e.to_string()))?;
    Ok(Arc::new(TestProvider::new(test_pool)))
}

pub struct TestProvider {
    pool: Pool,
    recorder: mpsc::Sender<(CallRecord, oneshot::Sender<Result<(), String>>)>,
}

struct CallRecord {
    tx_id: uuid::Uuid,
    path: String,
    action: String,
    kind: &'static str,
    input: Value,
}

/// Writes call records in batches (one multi-row insert for whatever is waiting), in the
/// order they arrive; each caller waits for the insert that carries its record.
/// Records arrive in order and are written in that order (one batch at a time).
async fn recorder(
    pool: Pool,
    rx: mpsc::Receiver<(CallRecord, oneshot::Sender<Result<(), String>>)>,
) {
    provisio_shared::batch::run(rx, 256, 1, move |batch| {
        let pool = pool.clone();
        async move { write_records(&pool, batch).await }
    })
    .await;
}

async fn write_records(pool: &Pool, batch: Vec<(CallRecord, oneshot::Sender<Result<(), String>>)>) {
    let result = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO provider_test.calls (tx_id, step_path, action, kind, input) \
                     SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[])",
                )
                .await
                .map_err(|e| e.to_string())?;
            let tx_ids: Vec<uuid::Uuid> = batch.iter().map(|(r, _)| r.tx_id).collect();
            let paths: Vec<&str> = batch.iter().map(|(r, _)| r.path.as_str()).collect();
            let actions: Vec<&str> = batch.iter().map(|(r, _)| r.action.as_str()).collect();
            let kinds: Vec<&str> = batch.iter().map(|(r, _)| r.kind).collect();
            let inputs: Vec<&Value> = batch.iter().map(|(r, _)| &r.input).collect();
            client
                .execute(&stmt, &[&tx_ids, &paths, &actions, &kinds, &inputs])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }
        .await;
    for (_, done) in batch {
        let _ = done.send(result.clone());
    }
}

impl TestProvider {
    /// `pool` should have `synchronous_commit = off`: the records are observations for tests,
    /// not state anyone depends on after a crash, and the benchmark should not pay an fsync
    /// per call for them.
    pub fn new(pool: Pool) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(recorder(pool.clone(), rx));
        Self { pool, recorder: tx }
    }

    async fn record(
        &self,
        tx_id: uuid::Uuid,
        path: &str,
        action: &str,
        kind: &'static str,
        input: &Value,
    ) -> Result<(), ProviderError> {
        let (done, wait) = oneshot::channel();
        let rec = CallRecord {
            tx_id,
            path: path.to_owned(),
            action: action.to_owned(),
            kind,
            input: input.clone(),
        };
        let gone =
            || ProviderError::retryable("unavailable", "the test provider's recorder stopped");
        self.recorder.send((rec, done)).await.map_err(|_| gone())?;
        wait.await
            .map_err(|_| gone())?
            .map_err(|e| ProviderError::retryable("unavailable", e))
    }

    /// A fault that an operator can "fix": set while `provider_test.counters` has the row.
    async fn flag_set(&self, flag: &str) -> Result<bool, ProviderError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
        Ok(client
            .query_opt(
                "SELECT 1 FROM provider_test.counters WHERE key = $1",
                &[&flag],
            )
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?
            .is_some())
    }

    /// Whether `rb` is the first rollback recorded for its step (a slow rollback is slow only
    /// once, so that the recovery resuming it after a crash is quick).
    async fn first_rollback(&self, rb: &Rollback) -> Result<bool, ProviderError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM provider_test.calls WHERE tx_id = $1 AND step_path = $2 AND kind = 'rollback'",
                &[&rb.tx_id, &rb.step_path],
            )
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?
            .get(0);
        Ok(n <= 1)
    }

    async fn run(&self, call: &Call) -> Result<Executed, ProviderError> {
        self.record(
            call.tx_id,
            &call.step_path,
            &call.action,
            "execute",
            &call.input,
        )
        .await?;
        let input = &call.input;
        match call.action.as_str() {
            "echo" => Ok(Executed {
                output: input.clone(),
                rollback: Some(json!({"action": "echo", "input": input})),
            }),
            "sleep" => {
                let ms = input.get("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
                Ok(Executed {
                    output: json!({"slept_ms": ms}),
                    rollback: Some(json!({"action": "sleep"})),
                })
            }
            "fail" => {
                let code = input
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("test_failure");
                let message = input
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("failed on purpose");
                let retryable = input
                    .get("retryable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                Err(ProviderError {
                    code: code.to_owned(),
                    message: message.to_owned(),
                    retryable,
                })
            }
            "fail_n_times" => {
                let key = input
                    .get("key")
                    .and_then(Value::as_str)
                    .unwrap_or(&call.idempotency_key)
                    .to_owned();
                let n = input.get("n").and_then(Value::as_i64).unwrap_or(1);
                let client = self
                    .pool
                    .get()
                    .await
                    .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
                let row = client
                    .query_one(
                        "INSERT INTO provider_test.counters (key, calls) VALUES ($1, 1) \
                         ON CONFLICT (key) DO UPDATE SET calls = provider_test.counters.calls + 1 RETURNING calls",
                        &[&key],
                    )
                    .await
                    .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
                let calls: i32 = row.get(0);
                if i64::from(calls) <= n {
                    Err(ProviderError::retryable(
                        "transient",
                        format!("call {calls} of {n} planned failures"),
                    ))
                } else {
                    Ok(Executed {
                        output: input.clone(),
                        rollback: Some(json!({"action": "fail_n_times"})),
                    })
                }
            }
            "panic" => panic!("test provider asked to panic"),
            other => Err(ProviderError::permanent(
                "unknown_action",
                format!("test has no action `{other}`"),
            )),
        }
    }
}

impl Provider for TestProvider {
    fn name(&self) -> &'static str {
        "test"
    }

    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(self.run(call))
    }

    /// Records the rollback, then honours the faults the call's input asked for (echo keeps
    /// its input in the rollback data): `rollback_sleep_ms` (a slow rollback, to crash an
    /// engine in the middle of one), `fail_rollback: true` (a rollback that always fails,
    /// permanently, to produce `in_doubt` transactions) and `fail_rollback_while: "flag"` (it
    /// fails while the row `flag` is in `provider_test.counters`: a provider an operator can
    /// fix, then retry the rollback).
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            self.record(rb.tx_id, &rb.step_path, &rb.action, "rollback", &rb.data)
                .await?;
            let input = rb.data.get("input").unwrap_or(&Value::Null);
            if let Some(ms) = input.get("rollback_sleep_ms").and_then(Value::as_u64)
                && self.first_rollback(rb).await?
            {
                tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
            }
            if input.get("fail_rollback").and_then(Value::as_bool) == Some(true) {
                return Err(ProviderError::permanent(
                    "rollback_refused",
                    "the test provider was asked to fail this rollback",
                ));
            }
            if let Some(flag) = input.get("fail_rollback_while").and_then(Value::as_str)
                && self.flag_set(flag).await?
            {
                return Err(ProviderError::permanent(
                    "rollback_refused",
                    format!("the test provider fails this rollback while flag `{flag}` is set"),
                ));
            }
            Ok(())
        })
    }

    /// The test provider's calls have no effect beyond their record, so undoing a call of
    /// unknown outcome is recording the rollback (kind `rollback`, data `{"input": ...}`).
    fn rollback_unknown<'a>(
        &'a self,
        rb: &'a Rollback,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        self.rollback(rb)
    }
}
