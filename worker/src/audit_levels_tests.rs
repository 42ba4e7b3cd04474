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
        Some(r#"{"code": "boom", "message": "b", "not_undone": [], "resolution": {"note": "x"}}"#),
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
#[expect(
    clippy::too_many_lines,
    reason = "one table of audit-level cases, each checked against the same five transactions; splitting it would hide the table"
)]
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
