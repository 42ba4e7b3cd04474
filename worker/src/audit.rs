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
        let written: Result<(), tokio_postgres::Error> = async {
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
            if procedures_selected(level, &t) {
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
        .await;
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
        let error = code.map(|c| json!({"code": c}));
        Finished::new(status.into(), marked, error.as_ref())
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

/// Every audit-level option against a real database: exactly the rows it selects, nothing
/// else, the log emptied of what was swept; and retention.
#[cfg(test)]
mod levels {
    use std::collections::{BTreeMap, BTreeSet};

    use provisio_shared::config::{AuditLevel, AuditorConfig, TxLogConfig};
    use serde_json::json;

    use super::sweep;
    use crate::logservers::LogServers;
    use crate::testing::TempDb;

    /// Five finished transactions: a plain success, a marked success, a rollback with an
    /// error, a failed `read`, and one an operator settled after it was in doubt.
    const FIXTURE: [(&str, &str, bool, Option<&str>); 5] = [
        ("plain", "committed", false, None),
        ("marked", "committed", true, None),
        (
            "aborted",
            "rolled_back",
            false,
            Some(r#"{"code": "boom", "message": "b"}"#),
        ),
        (
            "readfail",
            "failed",
            false,
            Some(r#"{"code": "nope", "message": "n"}"#),
        ),
        (
            "doubted",
            "rolled_back",
            false,
            Some(
                r#"{"code": "boom", "message": "b", "not_undone": [], "resolution": {"note": "x"}}"#,
            ),
        ),
    ];

    async fn load(db: &TempDb) {
        let c = db.pool.get().await.expect("connection");
        c.batch_execute(
            "TRUNCATE transactions, tx_steps, audit_transactions, audit_procedures, audit_errors",
        )
        .await
        .expect("truncate");
        for (name, status, marked, error) in FIXTURE {
            let error: Option<serde_json::Value> =
                error.map(|e| serde_json::from_str(e).expect("json"));
            let id = uuid::Uuid::now_v7();
            c.execute(
                "INSERT INTO transactions (id, request_id, attempt, namespace, procedure, model, status, audit, \
                   engine_id, output, error, started_at, finished_at) \
                 VALUES ($1, $2, 1, 'ns', $2, 'compensating', $3, $4, 'e', $5, $6, now() - interval '2 min', now() - interval '1 min')",
                &[&id, &name, &status, &marked, &json!({"out": name}), &error],
            )
            .await
            .expect("transaction");
            for seq in 1..=2 {
                c.execute(
                    "INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action) VALUES ($1, $2, 'execute', $3, 'test', 'echo')",
                    &[&id, &seq, &(seq - 1).to_string()],
                )
                .await
                .expect("step");
            }
        }
    }

    /// (audited transactions, procedure rows per transaction, error rows per transaction,
    /// transactions with data, transactions left in the log)
    type Seen = (
        BTreeSet<String>,
        BTreeMap<String, i64>,
        BTreeMap<String, i64>,
        BTreeSet<String>,
        i64,
    );

    async fn run(db: &TempDb, logs: &LogServers, level: AuditLevel) -> Seen {
        load(db).await;
        let cfg = AuditorConfig {
            audit_level: level,
            sweep_min_age_seconds: 0,
            ..AuditorConfig::default()
        };
        sweep(&db.pool, logs, false, &cfg, 10).await.expect("sweep");
        let c = db.pool.get().await.expect("connection");
        let names = |sql: &'static str| {
            let c = &c;
            async move {
                c.query(sql, &[])
                    .await
                    .expect("query")
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                    .collect::<BTreeMap<String, i64>>()
            }
        };
        let audited = names("SELECT request_id, 0::int8 FROM audit_transactions")
            .await
            .into_keys()
            .collect();
        let procedures = names(
            "SELECT t.request_id, count(*) FROM audit_procedures p JOIN audit_transactions t USING (tx_id) GROUP BY 1",
        )
        .await;
        let errors = names(
            "SELECT t.request_id, count(*) FROM audit_errors e JOIN audit_transactions t USING (tx_id) GROUP BY 1",
        )
        .await;
        let with_data =
            names("SELECT request_id, 0::int8 FROM audit_transactions WHERE data IS NOT NULL")
                .await
                .into_keys()
                .collect();
        let left: i64 = c
            .query_one("SELECT count(*) FROM transactions", &[])
            .await
            .expect("count")
            .get(0);
        (audited, procedures, errors, with_data, left)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn nothing() -> AuditLevel {
        AuditLevel {
            with_errors: false,
            marked_for_audit: false,
            aborted: false,
            in_doubt: false,
            successful: false,
            all: false,
            errors: false,
            audit_data: false,
            all_transaction_data: false,
            procedures_marked: false,
            procedures_aborted: false,
            procedures_in_doubt: false,
            procedures_successful: false,
            procedures_failed: false,
            procedures_all: false,
        }
    }

    #[tokio::test]
    async fn each_option_selects_exactly_its_rows_and_retention_keeps_the_rest() {
        let db = TempDb::new(4).await;
        let logs = LogServers::new(std::slice::from_ref(&db.url), &TxLogConfig::default())
            .expect("log servers");
        let all_five = set(&["plain", "marked", "aborted", "readfail", "doubted"]);

        // Which transactions: each flag alone.
        let cases: [(&str, AuditLevel, &[&str]); 6] = [
            (
                "with_errors",
                AuditLevel {
                    with_errors: true,
                    ..nothing()
                },
                &["aborted", "readfail", "doubted"],
            ),
            (
                "marked_for_audit",
                AuditLevel {
                    marked_for_audit: true,
                    ..nothing()
                },
                &["marked"],
            ),
            (
                "aborted",
                AuditLevel {
                    aborted: true,
                    ..nothing()
                },
                &["aborted", "readfail", "doubted"],
            ),
            (
                "in_doubt",
                AuditLevel {
                    in_doubt: true,
                    ..nothing()
                },
                &["doubted"],
            ),
            (
                "successful",
                AuditLevel {
                    successful: true,
                    ..nothing()
                },
                &["plain", "marked"],
            ),
            (
                "all",
                AuditLevel {
                    all: true,
                    ..nothing()
                },
                &["plain", "marked", "aborted", "readfail", "doubted"],
            ),
        ];
        for (name, level, expected) in cases {
            let (audited, procedures, errors, data, left) = run(&db, &logs, level).await;
            assert_eq!(audited, set(expected), "{name}");
            assert!(
                procedures.is_empty() && errors.is_empty() && data.is_empty(),
                "{name}: no data flag"
            );
            assert_eq!(left, 0, "{name}: the log is emptied of what was swept");
        }

        // Which data: each flag alone, over every transaction (`all`).
        let every = || AuditLevel {
            all: true,
            ..nothing()
        };
        let (_, _, errors, _, _) = run(
            &db,
            &logs,
            AuditLevel {
                errors: true,
                ..every()
            },
        )
        .await;
        assert_eq!(
            errors.keys().cloned().collect::<BTreeSet<_>>(),
            set(&["aborted", "readfail", "doubted"]),
            "errors"
        );
        let (_, _, _, data, _) = run(
            &db,
            &logs,
            AuditLevel {
                audit_data: true,
                ..every()
            },
        )
        .await;
        assert_eq!(
            data,
            set(&["marked"]),
            "audit data: what marked procedures produced"
        );
        let (_, _, _, data, _) = run(
            &db,
            &logs,
            AuditLevel {
                all_transaction_data: true,
                ..every()
            },
        )
        .await;
        assert_eq!(data, all_five, "all transaction data");
        let procedure_cases: [(&str, AuditLevel, &[&str]); 6] = [
            (
                "procedures_marked",
                AuditLevel {
                    procedures_marked: true,
                    ..every()
                },
                &["marked"],
            ),
            (
                "procedures_aborted",
                AuditLevel {
                    procedures_aborted: true,
                    ..every()
                },
                &["aborted", "readfail", "doubted"],
            ),
            (
                "procedures_in_doubt",
                AuditLevel {
                    procedures_in_doubt: true,
                    ..every()
                },
                &["doubted"],
            ),
            (
                "procedures_successful",
                AuditLevel {
                    procedures_successful: true,
                    ..every()
                },
                &["plain", "marked"],
            ),
            (
                "procedures_failed",
                AuditLevel {
                    procedures_failed: true,
                    ..every()
                },
                &["aborted", "readfail", "doubted"],
            ),
            (
                "procedures_all",
                AuditLevel {
                    procedures_all: true,
                    ..every()
                },
                &["plain", "marked", "aborted", "readfail", "doubted"],
            ),
        ];
        for (name, level, expected) in procedure_cases {
            let (_, procedures, _, _, _) = run(&db, &logs, level).await;
            assert_eq!(
                procedures.keys().cloned().collect::<BTreeSet<_>>(),
                set(expected),
                "{name}"
            );
            assert!(
                procedures.values().all(|n| *n == 2),
                "{name}: one row per executed step"
            );
        }

        // Retention: rows swept longer ago than the period go, the others stay.
        run(&db, &logs, every()).await;
        let c = db.pool.get().await.expect("connection");
        c.execute(
            "UPDATE audit_transactions SET swept_at = now() - interval '3 days' WHERE request_id IN ('plain', 'marked')",
            &[],
        )
        .await
        .expect("age");
        let cfg = AuditorConfig {
            retention_days: 2,
            audit_level: every(),
            ..AuditorConfig::default()
        };
        let report = sweep(&db.pool, &logs, false, &cfg, 1).await.expect("sweep");
        assert_eq!(report.expired, 2);
        let kept = db
            .scalar_i64("SELECT count(*) FROM audit_transactions", &[])
            .await;
        assert_eq!(kept, 3);
    }
}

/// A transaction whose audit cannot be written is kept (in the log, with the reason in
/// `audit_failures`) and retried; its neighbours are swept; once writable, it is audited.
#[cfg(test)]
mod bad_audit {
    use provisio_shared::config::{AuditLevel, AuditorConfig, TxLogConfig};

    use super::sweep;
    use crate::logservers::LogServers;
    use crate::testing::TempDb;

    #[tokio::test]
    async fn a_transaction_whose_audit_fails_stays_in_the_log_and_is_retried() {
        let db = TempDb::new(4).await;
        let logs = LogServers::new(std::slice::from_ref(&db.url), &TxLogConfig::default())
            .expect("log servers");
        let c = db.pool.get().await.expect("connection");
        for name in ["good-1", "poison", "good-2"] {
            c.execute(
                "INSERT INTO transactions (id, request_id, attempt, namespace, procedure, model, status, audit, \
                   engine_id, started_at, finished_at) \
                 VALUES ($1, $2, 1, 'ns', 'p', 'compensating', 'committed', true, 'e', now() - interval '2 min', now() - interval '1 min')",
                &[&uuid::Uuid::now_v7(), &name],
            )
            .await
            .expect("transaction");
        }
        // The audit database refuses this one transaction's row (a stand-in for any failure).
        c.batch_execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
               BEGIN IF NEW.request_id = 'poison' THEN RAISE EXCEPTION 'audit store refuses %', NEW.request_id; END IF; \
               RETURN NEW; END $$; \
             CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_transactions \
               FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
        )
        .await
        .expect("trigger");
        let cfg = AuditorConfig {
            audit_level: AuditLevel::default(),
            sweep_min_age_seconds: 0,
            ..AuditorConfig::default()
        };
        for attempt in 1..=2 {
            sweep(&db.pool, &logs, false, &cfg, 5).await.expect("sweep");
            let audited = db
                .scalar_i64("SELECT count(*) FROM audit_transactions", &[])
                .await;
            assert_eq!(audited, 2, "the neighbours are audited");
            let left = db
                .scalar_i64(
                    "SELECT count(*) FROM transactions WHERE request_id = 'poison'",
                    &[],
                )
                .await;
            assert_eq!(left, 1, "the failing one stays in the log");
            let tries = db
                .scalar_i64("SELECT attempts::int8 FROM audit_failures", &[])
                .await;
            assert_eq!(tries, attempt, "kept, with how often it failed");
        }
        c.batch_execute("DROP TRIGGER refuse_poison ON audit_transactions")
            .await
            .expect("drop trigger");
        sweep(&db.pool, &logs, false, &cfg, 5).await.expect("sweep");
        assert_eq!(
            db.scalar_i64("SELECT count(*) FROM audit_transactions", &[])
                .await,
            3
        );
        assert_eq!(
            db.scalar_i64("SELECT count(*) FROM transactions", &[])
                .await,
            0
        );
        assert_eq!(
            db.scalar_i64("SELECT count(*) FROM audit_failures", &[])
                .await,
            0,
            "settled once written"
        );
    }
}
