//! The idempotency ledger of the providers that keep state in the configuration database
//! (`directory`, `resource`): each records the calls it performed in its own schema's
//! `idempotency` table (schemas/migrations/V2__directory_resource.sql), in the same
//! PostgreSQL transaction as the effect, so a repeated call or rollback acts once.
//!
//! A row's `key` is a call's idempotency key, its `result` the call's action, output and
//! rollback data; or `rollback:{key}` once that call has been rolled back.

use deadpool_postgres::Transaction;
use provisio_provider::{Executed, ProviderError, Rollback};
use serde_json::{Value, json};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::input::invalid;

/// Refuses an empty idempotency key of a `what` ("call" or "rollback"): the ledger could not
/// tell its calls apart. Checked before anything touches the database.
pub fn require_key(what: &str, key: &str) -> Result<(), ProviderError> {
    if key.is_empty() {
        return Err(invalid(format!("the {what} has an empty idempotency key")));
    }
    Ok(())
}

/// One provider's ledger: `{schema}.idempotency`.
#[derive(Clone, Copy, Debug)]
pub struct Ledger {
    /// The provider's name, in messages.
    pub provider: &'static str,
    /// The schema whose `idempotency` table this is.
    pub schema: &'static str,
}

impl Ledger {
    /// A database failure, retryable, with the server's message and code (its `Display`
    /// alone is just "db error").
    pub fn db_error(&self, e: &tokio_postgres::Error) -> ProviderError {
        let detail = e.as_db_error().map_or_else(
            || e.to_string(),
            |d| format!("{} ({})", d.message(), d.code().code()),
        );
        ProviderError::retryable(
            "unavailable",
            format!("{} database: {detail}", self.provider),
        )
    }

    pub fn pool_error(&self, e: &deadpool_postgres::PoolError) -> ProviderError {
        ProviderError::retryable("unavailable", format!("{} database: {e}", self.provider))
    }

    /// Column `idx` of `row`, a failure to read it being a database failure.
    pub fn col<'r, T: FromSql<'r>>(&self, row: &'r Row, idx: usize) -> Result<T, ProviderError> {
        row.try_get(idx).map_err(|e| self.db_error(&e))
    }

    /// Claims `key` for this transaction. `Some(result)` when a committed call already holds
    /// it (a concurrent call with the same key makes this one wait for its outcome).
    pub async fn claim(
        &self,
        tx: &Transaction<'_>,
        key: &str,
    ) -> Result<Option<Value>, ProviderError> {
        let insert = format!(
            "INSERT INTO {}.idempotency (key, result) VALUES ($1, 'null'::jsonb) \
             ON CONFLICT (key) DO NOTHING",
            self.schema
        );
        let inserted = tx
            .execute(&insert, &[&key])
            .await
            .map_err(|e| self.db_error(&e))?;
        if inserted == 1 {
            return Ok(None);
        }
        let select = format!(
            "SELECT result FROM {}.idempotency WHERE key = $1",
            self.schema
        );
        let row = tx
            .query_opt(&select, &[&key])
            .await
            .map_err(|e| self.db_error(&e))?;
        match row {
            Some(row) => Ok(Some(self.col(&row, 0)?)),
            None => Err(ProviderError::retryable(
                "conflict",
                "the idempotency record changed concurrently; try again",
            )),
        }
    }

    /// The first result of a repeated call of `action`, from what [`Ledger::claim`] found.
    pub fn replay(&self, action: &str, done: &Value) -> Result<Executed, ProviderError> {
        let recorded = done.get("action").and_then(Value::as_str).unwrap_or("");
        if recorded != action {
            return Err(ProviderError::permanent(
                "idempotency_conflict",
                format!(
                    "this idempotency key was already used for {}.{recorded}, not {action}",
                    self.provider
                ),
            ));
        }
        Ok(Executed {
            output: done.get("output").cloned().unwrap_or(Value::Null),
            rollback: done.get("rollback").filter(|v| !v.is_null()).cloned(),
        })
    }

    /// Records the result of the call that claimed `key`, in its transaction.
    pub async fn record(
        &self,
        tx: &Transaction<'_>,
        key: &str,
        action: &str,
        executed: &Executed,
    ) -> Result<(), ProviderError> {
        let record = json!({
            "action": action,
            "output": executed.output,
            "rollback": executed.rollback,
        });
        let update = format!(
            "UPDATE {}.idempotency SET result = $2 WHERE key = $1",
            self.schema
        );
        tx.execute(&update, &[&key, &record])
            .await
            .map_err(|e| self.db_error(&e))?;
        Ok(())
    }

    /// Records that `rb` is being rolled back, in the rollback's transaction. False when it
    /// was rolled back already: then there is nothing left to do.
    pub async fn claim_rollback(
        &self,
        tx: &Transaction<'_>,
        rb: &Rollback,
    ) -> Result<bool, ProviderError> {
        let marker = format!("rollback:{}", rb.idempotency_key);
        let insert = format!(
            "INSERT INTO {}.idempotency (key, result) VALUES ($1, $2) \
             ON CONFLICT (key) DO NOTHING",
            self.schema
        );
        let fresh = tx
            .execute(
                &insert,
                &[&marker, &json!({"action": rb.action, "data": rb.data})],
            )
            .await
            .map_err(|e| self.db_error(&e))?;
        if fresh == 0 {
            tracing::debug!(
                key = %rb.idempotency_key,
                action = %rb.action,
                "{}: already rolled back",
                self.provider
            );
        }
        Ok(fresh == 1)
    }
}
