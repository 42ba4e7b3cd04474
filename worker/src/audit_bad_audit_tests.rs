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
