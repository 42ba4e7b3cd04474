//! Operator commands on in-doubt transactions, carried out by the leading auditor (it has the
//! providers and every log server; the queue manager that records them has neither):
//! - `retry_rollback`: walk the transaction's rollback again — steps already undone are
//!   skipped, the ones whose undo failed (and calls of unknown outcome) are tried again. When
//!   everything is undone the transaction ends `rolled_back` and its request `failed`; else it
//!   stays `in_doubt` with what is still not undone.
//! - `resolve`: an operator undid (or accepted) the leftovers by hand: the transaction ends
//!   `rolled_back` and the request `failed`, both carrying the operator's note, which the
//!   audit sweep then keeps with the transaction's errors.

use anyhow::Context;
use provisio_shared::domain::{Status, TxStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::recovery::Recovery;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommandsReport {
    pub done: usize,
    pub failed: usize,
}

impl Recovery {
    /// Carries out the pending operator commands, oldest first (a bounded number per pass).
    pub async fn run_commands(&self) -> anyhow::Result<CommandsReport> {
        let mut report = CommandsReport::default();
        loop {
            let mut client = self.pool.get().await.context("database")?;
            let t = client.transaction().await?;
            let Some(row) = t
                .query_opt(
                    "SELECT id, kind, request_id, tx_id, requested_by, note FROM operator_commands \
                     WHERE status = 'pending' ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
                    &[],
                )
                .await?
            else {
                return Ok(report);
            };
            let (id, kind, request_id, tx_id, by, note): (
                Uuid,
                String,
                String,
                Uuid,
                String,
                Option<String>,
            ) = (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
            );
            let outcome = self
                .command(&kind, &request_id, tx_id, &by, note.as_deref())
                .await;
            let (status, result) = match outcome {
                Ok(v) => {
                    report.done += 1;
                    ("done", v)
                }
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(command = %id, %kind, %tx_id, error = %e, "operator command failed");
                    ("failed", json!({"error": e.to_string()}))
                }
            };
            t.execute(
                "UPDATE operator_commands SET status = $2, result = $3, done_at = now() WHERE id = $1",
                &[&id, &status, &result],
            )
            .await?;
            t.commit().await?;
            if report.done + report.failed >= 50 {
                return Ok(report);
            }
        }
    }

    async fn command(
        &self,
        kind: &str,
        request_id: &str,
        tx_id: Uuid,
        by: &str,
        note: Option<&str>,
    ) -> anyhow::Result<Value> {
        let server = self.server_of(request_id).await?;
        // Recovery owns the transaction again for as long as the command takes.
        let client = self.server_pool(server)?.get().await.context("database")?;
        let reopened = client
            .query_opt(
                "UPDATE transactions SET status = 'rolling_back', finished_at = NULL, engine_id = $2, \
                   lease_until = now() + make_interval(secs => $3) \
                 WHERE id = $1 AND status = 'in_doubt' RETURNING error",
                &[&tx_id, &self.owner, &self.lease_seconds],
            )
            .await?;
        let Some(row) = reopened else {
            anyhow::bail!("transaction {tx_id} is not in doubt");
        };
        drop(client);
        let mut error: Value = row.get::<_, Option<Value>>(0).unwrap_or_else(|| json!({}));
        if self.separate {
            let c = self.pool.get().await.context("database")?;
            c.execute(
                "UPDATE requests SET tx_owner = $3 WHERE id = $1 AND current_tx = $2",
                &[&request_id, &tx_id, &self.owner],
            )
            .await?;
        }
        let resolution = json!({"by": by, "note": note, "command": kind, "at": chrono::Utc::now()});
        let (tx_status, req_status) = if kind == "retry_rollback" {
            let not_undone = self.roll_back_logged(server, tx_id).await?;
            if not_undone.is_empty() {
                (TxStatus::RolledBack, Status::Failed)
            } else {
                error["not_undone"] = Value::Array(not_undone);
                (TxStatus::InDoubt, Status::InDoubt)
            }
        } else {
            (TxStatus::RolledBack, Status::Failed)
        };
        if tx_status == TxStatus::RolledBack {
            error["resolution"] = resolution;
        }
        self.finish(
            server,
            request_id,
            tx_id,
            tx_status,
            req_status,
            Some(&error),
        )
        .await?;
        tracing::info!(%tx_id, %request_id, %kind, %by, %tx_status, "operator command carried out");
        Ok(json!({"transaction_status": tx_status, "request_status": req_status, "error": error}))
    }

    /// The log server holding `request_id`'s current attempt.
    async fn server_of(&self, request_id: &str) -> anyhow::Result<usize> {
        if !self.separate {
            return Ok(0);
        }
        let c = self.pool.get().await.context("database")?;
        let name: Option<String> = c
            .query_opt(
                "SELECT tx_server FROM requests WHERE id = $1",
                &[&request_id],
            )
            .await?
            .and_then(|r| r.get(0));
        name.as_deref()
            .and_then(|n| self.servers.servers().iter().position(|s| s.name() == n))
            .with_context(|| format!("request {request_id} names no known log server"))
    }
}
