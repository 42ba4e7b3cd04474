//! Recovery of transactions whose engine died (DESIGN §7): a running transaction whose lease
//! expired is rolled back from its logged rollback data; a two-phase transaction is resolved
//! from its logged state (`committing` → commit what is prepared, anything else → roll back);
//! prepared transactions nobody owns are resolved the same way. A rollback that cannot
//! complete leaves the transaction `in_doubt` for an operator.
//!
//! The auditor runs [`Recovery::run_once`] periodically; an engine that receives a redelivered
//! request whose previous attempt is unfinished recovers that attempt first
//! ([`Recovery::recover_tx`]), so two attempts never overlap.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use provisio_shared::provider::{ProviderError, Rollback};
use provisio_shared::retry::{Attempt, Backoff, retry};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::providers::Registry;
use crate::providers::sql::SqlProvider;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub rolled_back: usize,
    pub committed: usize,
    pub in_doubt: usize,
    pub prepared_resolved: usize,
}

pub struct Recovery {
    pub pool: Pool,
    pub registry: Registry,
    pub sql: Option<Arc<SqlProvider>>,
    pub owner: String,
    pub lease_seconds: f64,
}

/// What recovering one transaction ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    RolledBack,
    Committed,
    InDoubt,
    /// Someone else holds a valid lease on it, or it is already finished.
    NotMine,
}

impl Recovery {
    /// One pass: expired transactions, then orphaned prepared transactions.
    pub async fn run_once(&self) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let client = self.pool.get().await.context("database")?;
        let rows = client
            .query(
                "SELECT id FROM transactions WHERE status IN ('running', 'prepared', 'committing', 'rolling_back') \
                 AND lease_until < now() ORDER BY lease_until LIMIT 100",
                &[],
            )
            .await?;
        drop(client);
        for row in rows {
            match self.recover_tx(row.get(0)).await? {
                Resolved::RolledBack => report.rolled_back += 1,
                Resolved::Committed => report.committed += 1,
                Resolved::InDoubt => report.in_doubt += 1,
                Resolved::NotMine => {}
            }
        }
        report.prepared_resolved = self.resolve_prepared().await?;
        let client = self.pool.get().await.context("database")?;
        let in_doubt: i64 = client
            .query_one(
                "SELECT count(*) FROM transactions WHERE status = 'in_doubt'",
                &[],
            )
            .await?
            .get(0);
        metrics::gauge!(provisio_shared::metrics::IN_DOUBT).set(in_doubt as f64);
        Ok(report)
    }

    /// Claims transaction `tx_id` if its lease expired, then resolves it.
    pub async fn recover_tx(&self, tx_id: Uuid) -> anyhow::Result<Resolved> {
        let client = self.pool.get().await.context("database")?;
        let claimed = client
            .query_opt(
                "UPDATE transactions SET engine_id = $2, lease_until = now() + make_interval(secs => $3) \
                 WHERE id = $1 AND status IN ('running', 'prepared', 'committing', 'rolling_back') AND lease_until < now() \
                 RETURNING request_id, status",
                &[&tx_id, &self.owner, &self.lease_seconds],
            )
            .await?;
        let Some(row) = claimed else {
            return Ok(Resolved::NotMine);
        };
        let (request_id, status): (String, String) = (row.get(0), row.get(1));
        tracing::warn!(%tx_id, %request_id, %status, "recovering a transaction whose engine stopped");
        if status == "committing" {
            // The decision was logged: finish the commit.
            let ok = self.commit_two_phase(tx_id).await;
            let (tx_status, req_status) = if ok {
                ("committed", "succeeded")
            } else {
                ("in_doubt", "in_doubt")
            };
            let error = (!ok).then(|| json!({"code": "commit_failed", "message": "recovery could not commit every participant"}));
            self.finish(&request_id, tx_id, tx_status, req_status, error.as_ref())
                .await?;
            return Ok(if ok {
                Resolved::Committed
            } else {
                Resolved::InDoubt
            });
        }
        client
            .execute(
                "UPDATE transactions SET status = 'rolling_back' WHERE id = $1",
                &[&tx_id],
            )
            .await?;
        drop(client);
        let ok = self.roll_back_logged(tx_id).await? && self.abort_two_phase(tx_id).await;
        let error = if ok {
            json!({"code": "engine_lost", "message": "the engine running this request stopped; its transaction was rolled back by recovery"})
        } else {
            json!({"code": "rollback_failed", "message": "recovery could not roll back every step; an operator must look"})
        };
        // The request's message comes back to an engine (it was never acked), which runs
        // the request again: so the request is queued again, not finished. Its error field
        // says what happened to the lost attempt until the next one finishes.
        let (tx_status, req_status) = if ok {
            ("rolled_back", "queued")
        } else {
            ("in_doubt", "in_doubt")
        };
        self.finish(&request_id, tx_id, tx_status, req_status, Some(&error))
            .await?;
        metrics::counter!(provisio_shared::metrics::ROLLBACKS, "namespace" => "recovery", "procedure" => "recovery").increment(1);
        Ok(if ok {
            Resolved::RolledBack
        } else {
            Resolved::InDoubt
        })
    }

    /// Rolls back logged executes that have no logged rollback yet, newest first, logging each.
    async fn roll_back_logged(&self, tx_id: Uuid) -> anyhow::Result<bool> {
        let client = self.pool.get().await.context("database")?;
        let rows = client
            .query("SELECT seq, kind, path, provider, action, rollback_data, error FROM tx_steps WHERE tx_id = $1 ORDER BY seq", &[&tx_id])
            .await?;
        let first_seq = rows.iter().map(|r| r.get::<_, i32>(0)).max().unwrap_or(0) + 1;
        let done: Vec<String> = rows
            .iter()
            .filter(|r| {
                r.get::<_, String>(1) == "rollback" && r.get::<_, Option<Value>>(6).is_none()
            })
            .map(|r| r.get(2))
            .collect();
        let todo: Vec<_> = rows
            .iter()
            .rev()
            .filter(|r| r.get::<_, String>(1) == "execute")
            .filter(|r| !done.contains(&r.get::<_, String>(2)))
            .filter_map(|r| {
                let data: Option<Value> = r.get(5);
                let data = data.filter(|d| d.get("two_phase").is_none())?;
                Some((
                    r.get::<_, String>(2),
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4).unwrap_or_default(),
                    data,
                ))
            })
            .collect();
        for (next_seq, (path, provider_name, action, data)) in (first_seq..).zip(todo) {
            let Some(provider) = self.registry.get(&provider_name).cloned() else {
                tracing::error!(%tx_id, provider = %provider_name, "cannot roll back: provider not configured here");
                return Ok(false);
            };
            let rb = Rollback {
                tx_id,
                idempotency_key: format!("{tx_id}:{path}"),
                step_path: path.clone(),
                action: action.clone(),
                data: data.clone(),
            };
            let r: Result<(), ProviderError> = retry(
                &Backoff::attempts(5, Duration::from_millis(100), Duration::from_secs(2)),
                |_| {
                    let (p, rb) = (provider.clone(), &rb);
                    async move { p.rollback(rb).await.map_err(Attempt::Retry) }
                },
            )
            .await;
            let error = r
                .as_ref()
                .err()
                .map(|e| json!({"code": e.code, "message": e.message}));
            client
                .execute(
                    "INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action, input, error) VALUES ($1, $2, 'rollback', $3, $4, $5, $6, $7)",
                    &[&tx_id, &next_seq, &path, &provider_name, &action, &data, &error],
                )
                .await?;
            if r.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn abort_two_phase(&self, tx_id: Uuid) -> bool {
        match &self.sql {
            Some(sql) => {
                use provisio_shared::provider::Provider;
                sql.abort(tx_id).await.is_ok()
            }
            None => true,
        }
    }

    async fn commit_two_phase(&self, tx_id: Uuid) -> bool {
        match &self.sql {
            Some(sql) => {
                use provisio_shared::provider::Provider;
                sql.commit(tx_id).await.is_ok()
            }
            None => true,
        }
    }

    async fn finish(
        &self,
        request_id: &str,
        tx_id: Uuid,
        tx_status: &str,
        req_status: &str,
        error: Option<&Value>,
    ) -> anyhow::Result<()> {
        let mut client = self.pool.get().await.context("database")?;
        let t = client.transaction().await?;
        t.execute(
            "UPDATE transactions SET status = $2, error = coalesce($3, error), finished_at = now(), lease_until = NULL WHERE id = $1",
            &[&tx_id, &tx_status, &error],
        )
        .await?;
        // The request follows its latest attempt only.
        t.execute(
            "UPDATE requests SET status = $2, error = $3, \
             finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END WHERE id = $1 \
             AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.request_id = $1 AND t.id <> $4 AND t.started_at > (SELECT started_at FROM transactions WHERE id = $4))",
            &[&request_id, &req_status, &error, &tx_id],
        )
        .await?;
        t.commit().await?;
        if tx_status == "in_doubt" {
            tracing::error!(%tx_id, %request_id, "transaction is in doubt");
        }
        Ok(())
    }

    /// Prepared transactions whose transaction is not running under a valid lease.
    async fn resolve_prepared(&self) -> anyhow::Result<usize> {
        let Some(sql) = &self.sql else { return Ok(0) };
        let prepared = sql.prepared().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let client = self.pool.get().await.context("database")?;
        let mut n = 0;
        for (tx_id, target) in prepared {
            let row = client
                .query_opt(
                    "SELECT status, lease_until > now(), error->>'code' FROM transactions WHERE id = $1",
                    &[&tx_id],
                )
                .await?;
            let commit = match &row {
                Some(r) => {
                    let status: String = r.get(0);
                    let live: Option<bool> = r.get(1);
                    let code: Option<String> = r.get(2);
                    if matches!(status.as_str(), "running" | "prepared" | "committing")
                        && live == Some(true)
                    {
                        continue; // its engine is alive and will finish it
                    }
                    status == "committing"
                        || status == "committed"
                        || (status == "in_doubt" && code.as_deref() == Some("commit_failed"))
                }
                // A prepared transaction with no log row was never decided: roll it back.
                None => false,
            };
            if sql.finish_prepared(tx_id, &target, commit).await.is_ok() {
                tracing::warn!(%tx_id, %target, commit, "resolved a prepared transaction");
                n += 1;
            }
        }
        Ok(n)
    }
}
