//! Recovery when an engine dies (docs/design.md §7.1): a running transaction whose lease
//! expired is rolled back from its logged rollback data; a two-phase transaction is resolved
//! from its logged state (`committing` → commit what is prepared, anything else → roll back);
//! prepared transactions nobody owns are resolved the same way. A rollback that cannot
//! complete leaves the transaction `in_doubt` for an operator.
//!
//! The auditor runs [`Recovery::run_once`] periodically; an engine that receives a redelivered
//! request whose previous attempt is unfinished recovers that attempt first
//! ([`Recovery::recover_tx`]), so two attempts never overlap.

use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use provisio_shared::domain::{Status, TxStatus};
use provisio_shared::provider::{ProviderError, Rollback};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::logservers::LogServers;
use provisio_providers::Registry;
use provisio_providers::sql::SqlProvider;

const SQL_FINISH_TX: &str = "UPDATE transactions SET status = $2, error = coalesce($3, error), finished_at = now(), lease_until = NULL \
     WHERE id = $1 AND engine_id = $4 AND finished_at IS NULL";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub rolled_back: usize,
    pub committed: usize,
    pub in_doubt: usize,
    pub prepared_resolved: usize,
}

pub struct Recovery {
    /// The configuration database (requests).
    pub pool: Pool,
    /// The transaction-log servers (in the combined layout, the configuration database alone).
    pub servers: Arc<LogServers>,
    /// Whether the log servers are separate from the configuration database.
    pub separate: bool,
    pub registry: Registry,
    pub sql: Option<Arc<SqlProvider>>,
    pub owner: String,
    pub lease_seconds: f64,
    /// Opens the sealed records of a sensitive procedure's steps (their rollback data) for
    /// the undo, and seals the records recovery adds to them.
    pub keyring: provisio_shared::sealing::Keyring,
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
    pub(crate) fn server_pool(&self, server: usize) -> anyhow::Result<&Pool> {
        self.servers
            .server(server)
            .map(crate::logservers::Server::pool)
            .with_context(|| format!("no transaction-log server #{server}"))
    }

    /// One pass over every log server that answers: expired transactions, then orphaned
    /// prepared transactions; the in-doubt gauge is set from what the servers hold.
    pub async fn run_once(&self) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let mut in_doubt = 0;
        for server in 0..self.servers.len() {
            if self.servers.is_bad(server) {
                continue;
            }
            match self.run_on(server, &mut report).await {
                Ok(n) => in_doubt += n,
                Err(e) => {
                    let name = self.servers.server(server).map_or("", |s| s.name());
                    tracing::warn!(server = name, error = %e, "recovery pass on a log server failed");
                }
            }
        }
        report.prepared_resolved = self.resolve_prepared().await?;
        metrics::gauge!(provisio_shared::metrics::IN_DOUBT).set(in_doubt as f64);
        Ok(report)
    }

    async fn run_on(&self, server: usize, report: &mut Report) -> anyhow::Result<i64> {
        let client = self.server_pool(server)?.get().await.context("database")?;
        let rows = client
            .query(
                "SELECT id FROM transactions WHERE finished_at IS NULL \
                 AND lease_until < now() ORDER BY lease_until LIMIT 100",
                &[],
            )
            .await?;
        drop(client);
        for row in rows {
            match self.recover_tx(server, row.get(0)).await? {
                Resolved::RolledBack => report.rolled_back += 1,
                Resolved::Committed => report.committed += 1,
                Resolved::InDoubt => report.in_doubt += 1,
                Resolved::NotMine => {}
            }
        }
        let client = self.server_pool(server)?.get().await.context("database")?;
        Ok(client
            .query_one(
                "SELECT count(*) FROM transactions WHERE status = 'in_doubt'",
                &[],
            )
            .await?
            .get(0))
    }

    /// Claims transaction `tx_id` on log server `server` if its lease expired, then resolves it.
    pub async fn recover_tx(&self, server: usize, tx_id: Uuid) -> anyhow::Result<Resolved> {
        let client = self.server_pool(server)?.get().await.context("database")?;
        // The claim is the fence: from here on, the stalled engine's writes (conditional on
        // `engine_id`) fail, and so do those of any other recoverer.
        let claimed = client
            .query_opt(
                "UPDATE transactions SET engine_id = $2, lease_until = now() + make_interval(secs => $3) \
                 WHERE id = $1 AND finished_at IS NULL AND lease_until < now() \
                 RETURNING request_id, status",
                &[&tx_id, &self.owner, &self.lease_seconds],
            )
            .await?;
        let Some(row) = claimed else {
            return Ok(Resolved::NotMine);
        };
        let (request_id, status): (String, String) = (row.get(0), row.get(1));
        tracing::warn!(%tx_id, %request_id, %status, "recovering a transaction whose engine stopped");
        if self.separate
            && let Some(decided) = self.take_request(&request_id, tx_id).await?
        {
            // The engine decided the outcome in the request row before it could finish the
            // transaction on its server: complete the transaction from that decision.
            let tx_status = match decided.as_str() {
                "succeeded" => TxStatus::Committed,
                "in_doubt" => TxStatus::InDoubt,
                _ => TxStatus::RolledBack,
            };
            self.finish_tx(server, tx_id, tx_status, None).await?;
            tracing::info!(%tx_id, %request_id, %decided, "completed a transaction from its recorded outcome");
            return Ok(if tx_status == TxStatus::Committed {
                Resolved::Committed
            } else {
                Resolved::RolledBack
            });
        }
        if status == "committing" {
            // The decision was logged: finish the commit.
            let ok = self.commit_two_phase(tx_id).await;
            let (tx_status, req_status) = if ok {
                (TxStatus::Committed, Status::Succeeded)
            } else {
                (TxStatus::InDoubt, Status::InDoubt)
            };
            let error = (!ok).then(|| json!({"code": "commit_failed", "message": "recovery could not commit every participant"}));
            self.finish(
                server,
                &request_id,
                tx_id,
                tx_status,
                req_status,
                error.as_ref(),
            )
            .await?;
            return Ok(if ok {
                Resolved::Committed
            } else {
                Resolved::InDoubt
            });
        }
        client
            .execute(
                "UPDATE transactions SET status = 'rolling_back' WHERE id = $1 AND engine_id = $2",
                &[&tx_id, &self.owner],
            )
            .await?;
        drop(client);
        let not_undone = self.roll_back_logged(server, tx_id).await?;
        let ok = not_undone.is_empty() && self.abort_two_phase(tx_id).await;
        let error = if ok {
            json!({"code": "engine_lost", "message": "the engine running this request stopped; its transaction was rolled back by recovery"})
        } else {
            json!({"code": "rollback_failed", "message": "recovery could not roll back every step; an operator must look", "not_undone": not_undone})
        };
        // The request's message comes back to an engine (it was never acked), which runs
        // the request again: so the request is queued again, not finished. Its error field
        // says what happened to the lost attempt until the next one finishes.
        let (tx_status, req_status) = if ok {
            (TxStatus::RolledBack, Status::Queued)
        } else {
            (TxStatus::InDoubt, Status::InDoubt)
        };
        self.finish(
            server,
            &request_id,
            tx_id,
            tx_status,
            req_status,
            Some(&error),
        )
        .await?;
        metrics::counter!(provisio_shared::metrics::ROLLBACKS, "namespace" => "recovery", "procedure" => "recovery").increment(1);
        metrics::counter!(provisio_shared::metrics::RECOVERED).increment(1);
        Ok(if ok {
            Resolved::RolledBack
        } else {
            Resolved::InDoubt
        })
    }

    /// Separate layout: takes the request's decision away from the engine of attempt `tx_id`
    /// (`tx_owner` = this recoverer), unless that engine already decided: then returns the
    /// status it recorded. A request whose current attempt is another one is left alone.
    async fn take_request(&self, request_id: &str, tx_id: Uuid) -> anyhow::Result<Option<String>> {
        let client = self.pool.get().await.context("database")?;
        let taken = client
            .execute(
                "UPDATE requests SET tx_owner = $3 WHERE id = $1 AND current_tx = $2 AND status = 'running'",
                &[&request_id, &tx_id, &self.owner],
            )
            .await?;
        if taken == 1 {
            return Ok(None);
        }
        let row = client
            .query_opt(
                "SELECT status FROM requests WHERE id = $1 AND current_tx = $2",
                &[&request_id, &tx_id],
            )
            .await?;
        // `queued`: released after the engine undid everything itself; rolling back again
        // is harmless (rollbacks are idempotent) and covers an engine that died doing it.
        Ok(row
            .map(|r| r.get::<_, String>(0))
            .filter(|s| s != "queued" && s != "running"))
    }

    /// Makes a request whose current attempt `tx` never finished runnable again: recovers the
    /// attempt if its lease expired, or, when there is no unfinished attempt to recover (it was
    /// finished meanwhile, or never logged), puts a request still marked `running` by it back
    /// to `queued`.
    pub async fn settle_request(
        &self,
        request_id: &str,
        tx: Option<Uuid>,
        server: usize,
    ) -> anyhow::Result<Resolved> {
        if let Some(tx_id) = tx {
            let r = self.recover_tx(server, tx_id).await?;
            if r != Resolved::NotMine {
                return Ok(r);
            }
        }
        let unfinished = match tx {
            Some(tx_id) => {
                let client = self.server_pool(server)?.get().await.context("database")?;
                client
                    .query_opt(
                        "SELECT 1 FROM transactions WHERE id = $1 AND finished_at IS NULL",
                        &[&tx_id],
                    )
                    .await?
                    .is_some()
            }
            None => false,
        };
        if !unfinished {
            let client = self.pool.get().await.context("database")?;
            client
                .execute(
                    "UPDATE requests SET status = 'queued' WHERE id = $1 AND status = 'running' \
                     AND current_tx IS NOT DISTINCT FROM $2",
                    &[&request_id, &tx],
                )
                .await?;
        }
        Ok(Resolved::NotMine)
    }

    /// Rolls back, newest first, every logged call that has no successful logged rollback yet
    /// (so a rollback interrupted by a crash resumes where it stopped, and nothing is undone
    /// twice): completed calls from their rollback data, and calls whose outcome was never
    /// logged (an intent without completion: the engine died during the call) through the
    /// provider's `rollback_unknown`. A failed rollback does not stop the walk. Each rollback
    /// is logged, and renews the claim, while recovery still owns the transaction. Returns
    /// what could not be undone.
    pub(crate) async fn roll_back_logged(
        &self,
        server: usize,
        tx_id: Uuid,
    ) -> anyhow::Result<Vec<Value>> {
        let client = self.server_pool(server)?.get().await.context("database")?;
        let rows = client
            .query("SELECT s.seq, s.kind, s.path, s.provider, s.action, s.input, s.rollback_data, s.error, t.request_id \
                    FROM tx_steps s JOIN transactions t ON t.id = s.tx_id WHERE s.tx_id = $1 ORDER BY s.seq", &[&tx_id])
            .await?;
        let first_seq = rows.iter().map(|r| r.get::<_, i32>(0)).max().unwrap_or(0) + 1;
        let request_id: String = rows.first().map(|r| r.get(8)).unwrap_or_default();
        let mut steps: Vec<StepRow> = rows.iter().map(StepRow::from).collect();
        // A sensitive procedure's records are sealed: opened for planning and the undo (one
        // that does not open stays sealed and fails its undo), and what recovery logs about
        // them is sealed again.
        let sealed = steps.iter().any(StepRow::sealed);
        for s in &mut steps {
            for v in [&mut s.input, &mut s.rollback_data].into_iter().flatten() {
                if let Ok(clear) = self.keyring.open_all(v, &request_id) {
                    *v = clear;
                }
            }
        }
        let todo = rollback_plan(&steps);
        let mut not_undone = Vec::new();
        for (next_seq, (path, provider_name, action, data, unknown)) in (first_seq..).zip(todo) {
            let r = match self.keyring.open_all(&data, &request_id) {
                Ok(clear) => {
                    self.undo(tx_id, &path, &provider_name, &action, &clear, unknown)
                        .await
                }
                Err(e) => Err(ProviderError::permanent(
                    "sensitive_unreadable",
                    format!("the step's sealed rollback data do not open: {e}"),
                )),
            };
            let mut error = r
                .as_ref()
                .err()
                .map(|e| json!({"code": e.code, "message": e.message}));
            let mut data = data;
            if sealed {
                error = error.map(|e| self.keyring.seal_messages(&e, &request_id));
                data = self.keyring.seal(&data, &request_id);
            }
            // Fenced like the engine's writes: only while this recoverer still owns it.
            let written = client
                .query_opt(
                    "WITH t AS (UPDATE transactions SET lease_until = now() + make_interval(secs => $8) \
                       WHERE id = $1 AND engine_id = $9 AND finished_at IS NULL RETURNING id) \
                     INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action, input, error) \
                     SELECT t.id, $2, 'rollback', $3, $4, $5, $6, $7 FROM t RETURNING seq",
                    &[&tx_id, &next_seq, &path, &provider_name, &action, &data, &error, &self.lease_seconds, &self.owner],
                )
                .await?;
            if written.is_none() {
                anyhow::bail!("transaction {tx_id} was taken over during its recovery");
            }
            if let Err(e) = r {
                // A sensitive procedure's provider messages may quote its values: the code only.
                let shown = if sealed {
                    e.code.clone()
                } else {
                    e.to_string()
                };
                tracing::error!(%tx_id, %path, error = %shown, "recovery could not undo a step; going on with the older ones");
                not_undone.push(json!({"path": path, "provider": provider_name, "action": action, "error": error}));
            }
        }
        Ok(not_undone)
    }

    /// One undo, retried with back-off: `rollback`, or `rollback_unknown` for a call whose
    /// completion was never logged.
    async fn undo(
        &self,
        tx_id: Uuid,
        path: &str,
        provider_name: &str,
        action: &str,
        data: &Value,
        unknown: bool,
    ) -> Result<(), ProviderError> {
        let Some(provider) = self.registry.get(provider_name).cloned() else {
            return Err(ProviderError::permanent(
                "unknown_provider",
                format!("provider `{provider_name}` is not configured on this recoverer"),
            ));
        };
        let rb = Rollback {
            tx_id,
            idempotency_key: format!("{tx_id}:{path}"),
            step_path: path.to_owned(),
            action: action.to_owned(),
            data: data.clone(),
        };
        crate::engine::interpreter::undo_with_retry(&provider, &rb, unknown).await
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

    /// Writes recovery's outcome: the transaction, and the request while this attempt is
    /// its current one (and, with separate log servers, while recovery holds its decision).
    pub(crate) async fn finish(
        &self,
        server: usize,
        request_id: &str,
        tx_id: Uuid,
        tx_status: TxStatus,
        req_status: Status,
        error: Option<&Value>,
    ) -> anyhow::Result<()> {
        const REQUEST: &str = "UPDATE requests SET status = $2, error = $3, \
             finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END \
             WHERE id = $1 AND current_tx = $4 AND ($5::text IS NULL OR tx_owner = $5)";
        if self.separate {
            // The request first: it is where the outcome is decided.
            let client = self.pool.get().await.context("database")?;
            client
                .execute(
                    REQUEST,
                    &[
                        &request_id,
                        &req_status.as_str(),
                        &error,
                        &tx_id,
                        &Some(self.owner.as_str()),
                    ],
                )
                .await?;
            self.finish_tx(server, tx_id, tx_status, error).await?;
        } else {
            let mut client = self.server_pool(server)?.get().await.context("database")?;
            let t = client.transaction().await?;
            let n = t
                .execute(
                    SQL_FINISH_TX,
                    &[&tx_id, &tx_status.as_str(), &error, &self.owner],
                )
                .await?;
            if n == 0 {
                anyhow::bail!("transaction {tx_id} was taken over during its recovery");
            }
            t.execute(
                REQUEST,
                &[
                    &request_id,
                    &req_status.as_str(),
                    &error,
                    &tx_id,
                    &None::<&str>,
                ],
            )
            .await?;
            t.commit().await?;
        }
        if tx_status == TxStatus::InDoubt {
            tracing::error!(%tx_id, %request_id, "transaction is in doubt");
        }
        Ok(())
    }

    /// Finishes the transaction row on its server while recovery still owns it.
    async fn finish_tx(
        &self,
        server: usize,
        tx_id: Uuid,
        tx_status: TxStatus,
        error: Option<&Value>,
    ) -> anyhow::Result<()> {
        let tx_status = tx_status.as_str();
        let client = self.server_pool(server)?.get().await.context("database")?;
        let n = client
            .execute(SQL_FINISH_TX, &[&tx_id, &tx_status, &error, &self.owner])
            .await?;
        if n == 0 {
            anyhow::bail!("transaction {tx_id} was taken over during its recovery");
        }
        Ok(())
    }

    /// Prepared transactions whose transaction is not running under a valid lease.
    async fn resolve_prepared(&self) -> anyhow::Result<usize> {
        let Some(sql) = &self.sql else { return Ok(0) };
        let prepared = sql.prepared().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut n = 0;
        'prepared: for (tx_id, target) in prepared {
            // The transaction may be on any log server; one that does not answer might hold it.
            let mut row = None;
            for server in 0..self.servers.len() {
                let found = async {
                    let client = self.server_pool(server)?.get().await.context("database")?;
                    Ok::<_, anyhow::Error>(client
                        .query_opt(
                            "SELECT status, lease_until > now(), error->>'code' FROM transactions WHERE id = $1",
                            &[&tx_id],
                        )
                        .await?)
                }
                .await;
                match found {
                    Ok(Some(r)) => {
                        row = Some(r);
                        break;
                    }
                    Ok(None) => {}
                    Err(_) => continue 'prepared,
                }
            }
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

/// One row of `tx_steps`, as recovery reads it.
struct StepRow {
    kind: String,
    path: String,
    provider: Option<String>,
    action: Option<String>,
    input: Option<Value>,
    rollback_data: Option<Value>,
    error: Option<Value>,
}

impl From<&tokio_postgres::Row> for StepRow {
    /// From (seq, kind, path, provider, action, input, rollback_data, error, …).
    fn from(r: &tokio_postgres::Row) -> Self {
        Self {
            kind: r.get(1),
            path: r.get(2),
            provider: r.get(3),
            action: r.get(4),
            input: r.get(5),
            rollback_data: r.get(6),
            error: r.get(7),
        }
    }
}

impl StepRow {
    /// A sensitive procedure's record: something in it is sealed.
    fn sealed(&self) -> bool {
        [&self.input, &self.rollback_data, &self.error]
            .into_iter()
            .flatten()
            .any(provisio_shared::sealing::contains_sealed)
    }
}

/// What recovery must undo, newest first, from a transaction's step rows: completed calls with
/// rollback data (not two-phase ones, which abort undoes), and intents never settled (the
/// engine died during the call); steps already rolled back without error are skipped. Sealed
/// data are opened before the plan is made (a two-phase mark must be readable).
fn rollback_plan(rows: &[StepRow]) -> Vec<(String, String, String, Value, bool)> {
    let undone: Vec<&str> = rows
        .iter()
        .filter(|r| r.kind == "rollback" && r.error.is_none())
        .map(|r| r.path.as_str())
        .collect();
    let settled: Vec<&str> = rows
        .iter()
        .filter(|r| matches!(r.kind.as_str(), "execute" | "error"))
        .map(|r| r.path.as_str())
        .collect();
    let mut todo = Vec::new();
    for r in rows.iter().rev() {
        let p = r.path.clone();
        if undone.contains(&p.as_str()) {
            continue;
        }
        let Some(provider) = r.provider.clone() else {
            continue;
        };
        let action = r.action.clone().unwrap_or_default();
        match r.kind.as_str() {
            "execute" => {
                let Some(data) = r.rollback_data.clone() else {
                    continue; // nothing to undo
                };
                if data.get("two_phase").is_some() {
                    continue; // undone by the participant's abort
                }
                todo.push((p, provider, action, data, false));
            }
            "intent" if !settled.contains(&p.as_str()) => {
                let input = r.input.clone().unwrap_or(Value::Null);
                todo.push((p, provider, action, json!({"input": input}), true));
            }
            _ => {}
        }
    }
    todo
}
