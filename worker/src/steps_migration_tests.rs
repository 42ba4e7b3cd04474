//! Migration V13 moves step records from the `tx_steps` table into `transactions.steps`: a
//! log that holds unfinished transactions when the fleet is upgraded must read back, through
//! the `tx_steps` view, exactly what the table held (recovery undoes from those records).

use provisio_providers::testing::TempDb;

const COLUMNS: &str =
    "tx_id, seq, kind, path, provider, action, input, output, rollback_data, error, at, procedure";

#[tokio::test]
async fn step_records_survive_the_move_into_the_transaction_row() {
    let db = TempDb::empty(1).await;
    provisio_shared::db::migrate_to(&db.url, 12)
        .await
        .expect("the migrations before V13");
    let c = db.pool.get().await.expect("connection");
    // SQL NULLs and JSON nulls both, nested nulls, and a second transaction.
    c.batch_execute(
        "INSERT INTO transactions (id, request_id, attempt, namespace, procedure, model, status) VALUES \
           ('00000000-0000-0000-0000-000000000001', 'r1', 1, 'ns', 'p', 'compensating', 'running'), \
           ('00000000-0000-0000-0000-000000000002', 'r2', 1, 'ns', 'p', 'compensating', 'rolling_back'); \
         INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action, input, output, rollback_data, error, procedure) VALUES \
           ('00000000-0000-0000-0000-000000000001', 1, 'intent', '0', 'test', 'echo', 'null', NULL, NULL, NULL, 'ns.p'), \
           ('00000000-0000-0000-0000-000000000001', 2, 'execute', '0', 'test', 'echo', '{\"a\": null}', '{\"b\": 1}', '{\"c\": [1, null]}', NULL, 'ns.p'), \
           ('00000000-0000-0000-0000-000000000001', 3, 'intent', '1', 'test', 'echo', '{}', NULL, NULL, NULL, 'ns.p'), \
           ('00000000-0000-0000-0000-000000000002', 1, 'execute', '0.1', 'test', 'echo', '[]', 'null', '{\"d\": 2}', NULL, NULL), \
           ('00000000-0000-0000-0000-000000000002', 2, 'rollback', '0.1', 'test', 'echo', '{\"d\": 2}', NULL, NULL, '{\"code\": \"x\"}', NULL); \
         CREATE TABLE before_v13 AS SELECT * FROM tx_steps;",
    )
    .await
    .expect("a log from before V13");
    provisio_shared::db::migrate(&db.url)
        .await
        .expect("the remaining migrations");
    let differing = |a: &str, b: &str| {
        format!(
            "SELECT count(*) FROM (SELECT {COLUMNS} FROM {a} EXCEPT ALL SELECT {COLUMNS} FROM {b}) d"
        )
    };
    for (a, b) in [("before_v13", "tx_steps"), ("tx_steps", "before_v13")] {
        let n: i64 = c
            .query_one(&differing(a, b), &[])
            .await
            .expect("comparison")
            .get(0);
        assert_eq!(n, 0, "rows of {a} missing from {b}");
    }
    // A SQL NULL stays NULL and a JSON null stays a JSON null.
    let row = c
        .query_one(
            "SELECT input, output IS NULL FROM tx_steps WHERE tx_id = '00000000-0000-0000-0000-000000000001' AND seq = 1",
            &[],
        )
        .await
        .expect("intent row");
    assert_eq!(
        row.get::<_, Option<serde_json::Value>>(0),
        Some(serde_json::Value::Null)
    );
    assert!(row.get::<_, bool>(1));
}
