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
}

impl Finished {
    fn aborted(&self) -> bool {
        matches!(self.status.as_str(), "rolled_back" | "failed")
    }
    fn was_in_doubt(&self) -> bool {
        matches!(
            self.error_code.as_deref(),
            Some("rollback_failed" | "commit_failed")
        )
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
        let (swept, audited) = sweep_batch(log, audit, cfg).await?;
        report.swept += swept;
        report.audited += audited;
        if swept < usize::try_from(cfg.sweep_batch).unwrap_or(usize::MAX) {
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
) -> anyhow::Result<(usize, usize)> {
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
            "SELECT id, request_id, namespace, procedure, status, audit, error, output, started_at, finished_at \
             FROM transactions \
             WHERE status IN ('committed', 'rolled_back', 'failed') \
               AND finished_at < now() - make_interval(secs => $1) \
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&(cfg.sweep_min_age_seconds as f64), &cfg.sweep_batch],
        )
        .await?;
    if rows.is_empty() {
        return Ok((0, 0));
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let steps = tx
        .query(
            "SELECT tx_id, seq, kind, path, provider, action, error FROM tx_steps WHERE tx_id = ANY($1) ORDER BY tx_id, seq",
            &[&ids],
        )
        .await?;
    let mut audited = 0;
    for r in &rows {
        let id: Uuid = r.get(0);
        let error: Option<Value> = r.get(6);
        let t = Finished {
            status: r.get(4),
            marked: r.get(5),
            error_code: error
                .as_ref()
                .and_then(|e| e.get("code"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        if !selected(level, &t) {
            continue;
        }
        audited += 1;
        let (namespace, procedure): (String, String) = (r.get(2), r.get(3));
        let my_steps: Vec<&tokio_postgres::Row> =
            steps.iter().filter(|s| s.get::<_, Uuid>(0) == id).collect();
        let output: Option<Value> = r.get(7);
        let data = if level.all_transaction_data {
            let list: Vec<Value> = my_steps
                .iter()
                .filter(|s| s.get::<_, String>(2) != "intent")
                .map(|s| json!({"seq": s.get::<_, i32>(1), "kind": s.get::<_, String>(2), "path": s.get::<_, String>(3),
                                "provider": s.get::<_, Option<String>>(4), "action": s.get::<_, Option<String>>(5)}))
                .collect();
            Some(json!({"output": output, "error": error, "steps": list}))
        } else if level.audit_data && t.marked {
            Some(json!({"output": output}))
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
        if procedures_selected(level, &t) {
            for s in my_steps
                .iter()
                .filter(|s| s.get::<_, String>(2) == "execute")
            {
                w.execute(
                    "INSERT INTO audit_procedures (tx_id, step_number, namespace, procedure) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                    &[&id, &s.get::<_, i32>(1), &namespace, &procedure],
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
    }
    if let Some(a) = atx {
        a.commit().await?;
    }
    tx.execute("DELETE FROM transactions WHERE id = ANY($1)", &[&ids])
        .await?;
    tx.commit().await?;
    Ok((ids.len(), audited))
}

async fn insert_error(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    seq: i32,
    source: &str,
    e: &Value,
) -> Result<u64, tokio_postgres::Error> {
    let code = e.get("code").and_then(Value::as_str).unwrap_or("unknown");
    let message = e.get("message").and_then(Value::as_str).unwrap_or("");
    tx.execute(
        "INSERT INTO audit_errors (tx_id, seq, source, code, description) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[&id, &seq, &source, &code, &message],
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(status: &str, marked: bool, code: Option<&str>) -> Finished {
        Finished {
            status: status.into(),
            marked,
            error_code: code.map(str::to_owned),
        }
    }

    #[test]
    fn the_default_level_audits_errors_marked_aborted_and_doubt_but_not_plain_success() {
        let l = AuditLevel::default();
        assert!(!selected(&l, &t("committed", false, None)));
        assert!(selected(&l, &t("committed", true, None)));
        assert!(selected(&l, &t("rolled_back", false, Some("boom"))));
        assert!(selected(
            &l,
            &t("rolled_back", false, Some("rollback_failed"))
        ));
        assert!(!procedures_selected(&l, &t("committed", false, None)));
        assert!(procedures_selected(&l, &t("rolled_back", false, Some("x"))));
    }

    #[test]
    fn all_overrides_everything_and_successful_adds_successes() {
        let mut l = AuditLevel {
            with_errors: false,
            marked_for_audit: false,
            aborted: false,
            in_doubt: false,
            ..AuditLevel::default()
        };
        assert!(!selected(&l, &t("rolled_back", true, Some("x"))));
        l.successful = true;
        assert!(selected(&l, &t("committed", false, None)));
        let all = AuditLevel { all: true, ..l };
        assert!(selected(&all, &t("rolled_back", false, None)));
    }
}
