//! The audit sweep (docs/design.md §7.2): finished transactions move from the transaction log
//! into the audit tables per the configured audit level, in bounded batches; transactions not
//! selected are deleted from the log. Each batch is one PostgreSQL transaction (audit rows
//! inserted, log rows deleted), so a crash mid-sweep neither loses nor duplicates a row.
//! In-doubt transactions stay in the log until an operator resolves them.

use anyhow::Context;
use deadpool_postgres::Pool;

use crate::logservers::LogServers;
use provisio_shared::config::{AuditLevel, AuditorConfig};
use serde_json::{Value, json};
use uuid::Uuid;

/// What the sweep knows about one finished transaction.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: String,
    pub marked: bool,
    pub error_code: Option<String>,
    /// It was in doubt before an operator (or a retried rollback) settled it.
    pub doubted: bool,
}

impl Finished {
    /// From a transaction's final status, audit mark and error.
    pub fn new(status: String, marked: bool, error: Option<&Value>) -> Self {
        let error_code = error
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let doubted = error.is_some_and(|e| {
            e.get("not_undone").is_some()
                || e.get("resolution").is_some()
                || matches!(
                    e.get("code").and_then(Value::as_str),
                    Some("rollback_failed" | "commit_failed")
                )
        });
        Self {
            status,
            marked,
            error_code,
            doubted,
        }
    }
}

impl Finished {
    fn aborted(&self) -> bool {
        matches!(self.status.as_str(), "rolled_back" | "failed")
    }
    fn was_in_doubt(&self) -> bool {
        self.doubted
    }
}

/// Whether the transaction gets an audit row at all.
pub fn selected(level: &AuditLevel, t: &Finished) -> bool {
    level.all
        || (level.with_errors && t.error_code.is_some())
        || (level.marked_for_audit && t.marked)
        || (level.aborted && t.aborted())
        || (level.in_doubt && t.was_in_doubt())
        || (level.successful && t.status == "committed")
}

/// Whether its steps get procedure rows.
pub fn procedures_selected(level: &AuditLevel, t: &Finished) -> bool {
    level.procedures_all
        || (level.procedures_marked && t.marked)
        || (level.procedures_aborted && t.aborted())
        || (level.procedures_in_doubt && t.was_in_doubt())
        || (level.procedures_successful && t.status == "committed")
        || (level.procedures_failed && t.error_code.is_some())
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub swept: usize,
    pub audited: usize,
    pub expired: u64,
}

/// Sweeps until the log holds no more sweepable transactions (or `max_batches` batches).
/// `pool` holds the audit tables (the configuration database); `logs` are the transaction-log
/// servers, swept one after the other (a server that does not answer is skipped this time).
pub async fn sweep(
    pool: &Pool,
    logs: &LogServers,
    separate: bool,
    cfg: &AuditorConfig,
    max_batches: usize,
) -> anyhow::Result<SweepReport> {
    let mut report = SweepReport::default();
    for server in logs.servers() {
        if server.is_bad() {
            continue;
        }
        let audit = separate.then_some(pool);
        if let Err(e) = sweep_server(server.pool(), audit, cfg, max_batches, &mut report).await {
            tracing::warn!(server = server.name(), error = %e, "audit sweep of a log server failed");
        }
    }
    expire(pool, cfg, &mut report).await?;
    let total = report.swept as u64;
    metrics::counter!(provisio_shared::metrics::AUDIT_ROWS_SWEPT).increment(total);
    Ok(report)
}

async fn sweep_server(
    log: &Pool,
    audit: Option<&Pool>,
    cfg: &AuditorConfig,
    max_batches: usize,
    report: &mut SweepReport,
) -> anyhow::Result<()> {
    for _ in 0..max_batches.max(1) {
        let (selected, swept, audited) = sweep_batch(log, audit, cfg).await?;
        report.swept += swept;
        report.audited += audited;
        if selected < usize::try_from(cfg.sweep_batch).unwrap_or(usize::MAX) {
            break;
        }
    }
    Ok(())
}

/// Retention: audit rows older than the period go.
async fn expire(pool: &Pool, cfg: &AuditorConfig, report: &mut SweepReport) -> anyhow::Result<()> {
    if cfg.retention_days > 0 {
        let client = pool.get().await.context("database")?;
        report.expired = client
            .execute(
                "WITH gone AS (DELETE FROM audit_transactions \
                   WHERE swept_at < now() - make_interval(days => $1) RETURNING tx_id), \
                 p AS (DELETE FROM audit_procedures WHERE tx_id IN (SELECT tx_id FROM gone)), \
                 e AS (DELETE FROM audit_errors WHERE tx_id IN (SELECT tx_id FROM gone)) \
                 SELECT 1 FROM gone",
                &[&i32::try_from(cfg.retention_days).unwrap_or(i32::MAX)],
            )
            .await?;
    }
    Ok(())
}

/// One batch of one log server. When the audit tables live elsewhere (`audit`), the audit rows
/// commit there before the log rows are deleted: a crash in between sweeps the batch again,
/// and the audit inserts ignore rows already there.
async fn sweep_batch(
    pool: &Pool,
    audit: Option<&Pool>,
    cfg: &AuditorConfig,
) -> anyhow::Result<(usize, usize, usize)> {
    let level = &cfg.audit_level;
    let mut client = pool.get().await.context("database")?;
    let tx = client.transaction().await?;
    let mut audit_client = match audit {
        Some(p) => Some(p.get().await.context("audit database")?),
        None => None,
    };
    let atx = match audit_client.as_mut() {
        Some(c) => Some(c.transaction().await?),
        None => None,
    };
    let w = atx.as_ref().unwrap_or(&tx);
    let rows = tx
        .query(
            "SELECT id, request_id, namespace, procedure, status, audit, error, output, started_at, finished_at, audit_data \
             FROM transactions \
             WHERE status IN ('committed', 'rolled_back', 'failed') \
               AND finished_at < now() - make_interval(secs => $1) \
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&(cfg.sweep_min_age_seconds as f64), &cfg.sweep_batch],
        )
        .await?;
    if rows.is_empty() {
        return Ok((0, 0, 0));
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let steps = tx
        .query(
            "SELECT tx_id, seq, kind, path, provider, action, error, procedure FROM tx_steps WHERE tx_id = ANY($1) ORDER BY tx_id, seq",
            &[&ids],
        )
        .await?;
    let mut audited = 0;
    // Swept: audited, or not selected; the others stay in the log.
    let mut settled: Vec<Uuid> = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: Uuid = r.get(0);
        let error: Option<Value> = r.get(6);
        let t = Finished::new(r.get(4), r.get(5), error.as_ref());
        if !selected(level, &t) {
            settled.push(id);
            continue;
        }
        // One transaction's audit rows under a savepoint: if they cannot be written (MPF's
        // "bad audit command"), the failure is kept in `audit_failures`, the transaction stays
        // in the log, and the next sweep tries again; its neighbours are swept as usual.
        w.batch_execute("SAVEPOINT audit_one").await?;
        let written = write_audit(w, level, r, &t, &steps).await;
        match written {
            Ok(()) => {
                w.batch_execute("RELEASE SAVEPOINT audit_one").await?;
                audited += 1;
                settled.push(id);
            }
            Err(e) => {
                w.batch_execute("ROLLBACK TO SAVEPOINT audit_one").await?;
                tracing::warn!(tx_id = %id, error = %e, "cannot write the audit of a transaction; it stays in the log and is retried");
                w.execute(
                    "INSERT INTO audit_failures (tx_id, error) VALUES ($1, $2) \
                     ON CONFLICT (tx_id) DO UPDATE SET error = EXCLUDED.error, attempts = audit_failures.attempts + 1, last_at = now()",
                    &[&id, &e.to_string()],
                )
                .await?;
            }
        }
    }
    w.execute(
        "DELETE FROM audit_failures WHERE tx_id = ANY($1)",
        &[&settled],
    )
    .await?;
    if let Some(a) = atx {
        a.commit().await?;
    }
    tx.execute("DELETE FROM transactions WHERE id = ANY($1)", &[&settled])
        .await?;
    tx.commit().await?;
    // Counted against the batch size as selected, so that a failing transaction never makes
    // the sweep stop early or loop.
    Ok((ids.len(), settled.len(), audited))
}

/// One transaction's audit rows, per the audit level: the transaction (with its data as the
/// level asks), the procedures its steps ran in, and every error.
async fn write_audit(
    w: &deadpool_postgres::Transaction<'_>,
    level: &AuditLevel,
    r: &tokio_postgres::Row,
    t: &Finished,
    steps: &[tokio_postgres::Row],
) -> Result<(), tokio_postgres::Error> {
    let id: Uuid = r.get(0);
    let error: Option<Value> = r.get(6);
    let (namespace, procedure): (String, String) = (r.get(2), r.get(3));
    let my_steps: Vec<&tokio_postgres::Row> =
        steps.iter().filter(|s| s.get::<_, Uuid>(0) == id).collect();
    let output: Option<Value> = r.get(7);
    // What the procedures' `audit:` expressions gave (nested procedures included).
    let audit_data: Option<Value> = r.get(10);
    let data = if level.all_transaction_data {
        let list: Vec<Value> = my_steps
            .iter()
            .filter(|s| s.get::<_, String>(2) != "intent")
            .map(|s| json!({"seq": s.get::<_, i32>(1), "kind": s.get::<_, String>(2), "path": s.get::<_, String>(3),
                            "provider": s.get::<_, Option<String>>(4), "action": s.get::<_, Option<String>>(5)}))
            .collect();
        Some(json!({"output": output, "error": error, "steps": list, "audit": audit_data}))
    } else if level.audit_data && t.marked {
        Some(json!({"output": output, "audit": audit_data}))
    } else {
        None
    };
    w.execute(
        "INSERT INTO audit_transactions (tx_id, request_id, namespace, procedure, status, started_at, finished_at, data) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tx_id) DO NOTHING",
        &[&id, &r.get::<_, String>(1), &namespace, &procedure, &t.status,
          &r.get::<_, chrono::DateTime<chrono::Utc>>(8), &r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(9), &data],
    )
    .await?;
    if procedures_selected(level, t) {
        for s in my_steps
            .iter()
            .filter(|s| s.get::<_, String>(2) == "execute")
        {
            // The procedure the step ran in (a nested one names itself), else the
            // transaction's own.
            let ran: Option<String> = s.get(7);
            let (step_ns, step_proc) = ran
                .as_deref()
                .and_then(|q| q.split_once('.'))
                .map_or((namespace.as_str(), procedure.as_str()), |(n, p)| (n, p));
            w.execute(
                "INSERT INTO audit_procedures (tx_id, step_number, namespace, procedure) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
                &[&id, &s.get::<_, i32>(1), &step_ns, &step_proc],
            )
            .await?;
        }
    }
    if level.errors {
        if let Some(e) = &error {
            insert_error(w, id, 0, "transaction", e).await?;
        }
        for s in &my_steps {
            if let Some(e) = s.get::<_, Option<Value>>(6) {
                let source = format!(
                    "{}:{}",
                    s.get::<_, Option<String>>(4).unwrap_or_default(),
                    s.get::<_, String>(3)
                );
                insert_error(w, id, s.get::<_, i32>(1), &source, &e).await?;
            }
        }
    }
    Ok(())
}

async fn insert_error(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    seq: i32,
    source: &str,
    e: &Value,
) -> Result<u64, tokio_postgres::Error> {
    let code = e.get("code").and_then(Value::as_str).unwrap_or("unknown");
    // A sensitive procedure's messages are sealed: kept sealed (as their JSON text), shown
    // redacted by the audit API.
    let message = match e.get("message") {
        Some(Value::String(m)) => m.clone(),
        Some(m) if provisio_shared::sealing::is_sealed(m) => m.to_string(),
        _ => String::new(),
    };
    tx.execute(
        "INSERT INTO audit_errors (tx_id, seq, source, code, description) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[&id, &seq, &source, &code, &message],
    )
    .await
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;

/// Every audit-level option against a real database: exactly the rows it selects, nothing
/// else, the log emptied of what was swept; and retention.
#[cfg(test)]
#[path = "audit_levels_tests.rs"]
mod levels;

/// A transaction whose audit cannot be written is kept (in the log, with the reason in
/// `audit_failures`) and retried; its neighbours are swept; once writable, it is audited.
#[cfg(test)]
#[path = "audit_bad_audit_tests.rs"]
mod bad_audit;
