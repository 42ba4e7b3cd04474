//! End-to-end: the `sql` provider's two-phase commit across two target databases, recovery of
//! an engine killed between prepare and commit, and provider panics.

use std::time::Duration;

use provisio_shared::config::Secret;
use provisio_tests::{TestEnv, request};
use serde_json::json;

type R = anyhow::Result<()>;

const NS: &str = r#"
namespace: ledger
procedures:
  both:
    access: public
    transaction: two_phase
    steps:
      - id: a
        call: sql.execute
        input: '{target: "a", sql: "INSERT INTO accounts (name) VALUES ($1) RETURNING name", params: [.input.name]}'
      - id: b
        call: sql.execute
        input: '{target: "b", sql: "INSERT INTO accounts (name) VALUES ($1)", params: [.input.name]}'
    output: '{a: .steps.a.rows[0].name, b: .steps.b.affected}'
  compensated:
    access: public
    transaction: compensating
    steps:
      - call: sql.execute
        input: '{target: "a", sql: "INSERT INTO accounts (name) VALUES ($1)", params: [.input.name], rollback: {sql: "DELETE FROM accounts WHERE name = $1", params: [.input.name]}}'
      - call: test.fail
  panics:
    access: public
    steps:
      - call: sql.execute
        input: '{target: "a", sql: "INSERT INTO accounts (name) VALUES ($1)", params: [.input.name], rollback: {sql: "DELETE FROM accounts WHERE name = $1", params: [.input.name]}}'
      - call: test.panic
"#;

struct Targets {
    a: String,
    b: String,
}

async fn targets(env: &TestEnv) -> anyhow::Result<Targets> {
    let a = format!("{}_a", env.db_url);
    let b = format!("{}_b", env.db_url);
    for (url, check) in [(&a, ""), (&b, ", CHECK (length(name) < 8)")] {
        provisio_shared::db::create_database_if_missing(&Secret::new(url.clone())).await?;
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS accounts (name text PRIMARY KEY{check})"
        ))
        .await?;
    }
    Ok(Targets { a, b })
}

async fn count(url: &str, name: &str) -> anyhow::Result<i64> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(
        c.query_one("SELECT count(*) FROM accounts WHERE name = $1", &[&name])
            .await?
            .get(0),
    )
}

async fn prepared(env: &TestEnv, t: &Targets) -> anyhow::Result<i64> {
    let pg = env.pg().await?;
    let names: Vec<String> = [&t.a, &t.b]
        .iter()
        .filter_map(|u| u.rsplit('/').next().map(str::to_owned))
        .collect();
    Ok(pg
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = ANY($1)",
            &[&names],
        )
        .await?
        .get(0))
}

async fn drop_targets(t: Targets) {
    for u in [t.a, t.b] {
        let _ = provisio_shared::db::drop_database(&Secret::new(u)).await;
    }
}

fn sql_env(t: &Targets) -> Vec<(String, String)> {
    vec![
        (
            "PROVISIO_PROVIDERS__SQL__TARGETS__A__URL".into(),
            t.a.clone(),
        ),
        (
            "PROVISIO_PROVIDERS__SQL__TARGETS__B__URL".into(),
            t.b.clone(),
        ),
    ]
}

#[tokio::test]
async fn two_phase_commits_both_databases_or_neither() -> R {
    let mut env = TestEnv::new("twophase").await?;
    let t = targets(&env).await?;
    env.extra_env.extend(sql_env(&t));
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let (status, body) = env.apply(&qm, "ledger", NS).await?;
    assert_eq!(status, 201, "{body}");
    let mut outcomes = env.outcomes().await?;

    let (_, body) = env
        .submit(&qm, &request("ledger", "both", json!({"name": "ok"})))
        .await?;
    let out = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(out["output"], json!({"a": "ok", "b": 1}));
    assert_eq!((count(&t.a, "ok").await?, count(&t.b, "ok").await?), (1, 1));

    // `b` refuses a long name after `a` accepted it: neither keeps it.
    let (_, body) = env
        .submit(
            &qm,
            &request("ledger", "both", json!({"name": "much-too-long"})),
        )
        .await?;
    let out = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(out["status"], "failed", "{out}");
    assert_eq!(out["error"]["code"], "sql_23514", "{out}");
    assert_eq!(
        (
            count(&t.a, "much-too-long").await?,
            count(&t.b, "much-too-long").await?
        ),
        (0, 0)
    );
    assert_eq!(prepared(&env, &t).await?, 0);

    // Compensating: the declared rollback statement undoes the insert.
    let (_, body) = env
        .submit(
            &qm,
            &request("ledger", "compensated", json!({"name": "comp"})),
        )
        .await?;
    let out = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(out["status"], "failed");
    assert_eq!(count(&t.a, "comp").await?, 0);
    drop((qm, engine));
    env.cleanup().await;
    drop_targets(t).await;
    Ok(())
}

#[tokio::test]
async fn an_engine_killed_between_prepare_and_commit_leaves_nothing_prepared_after_recovery() -> R {
    let mut env = TestEnv::new("killed").await?;
    let t = targets(&env).await?;
    env.extra_env.extend(sql_env(&t));
    env.extra_env
        .push(("PROVISIO_ENGINE__LEASE_SECONDS".into(), "2".into()));
    let qm = env.queue_manager().await?;
    let engine = env
        .spawn(
            "worker",
            &["--role", "engine"],
            &[("PROVISIO_PROVIDERS__TEST__PAUSE_AFTER_PREPARE_MS", "600000")],
        )
        .await?;
    env.apply(&qm, "ledger", NS).await?;
    let (_, body) = env
        .submit(&qm, &request("ledger", "both", json!({"name": "kill"})))
        .await?;
    let id = body["id"].as_str().unwrap_or_default().to_owned();

    // Wait (bounded) until both participants are prepared, then kill the engine there.
    let mut seen = 0;
    for _ in 0..300 {
        seen = prepared(&env, &t).await?;
        if seen == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 2, "both participants prepared");
    engine.kill().await;
    assert_eq!(
        prepared(&env, &t).await?,
        2,
        "a killed engine leaves them prepared"
    );

    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[("PROVISIO_AUDITOR__INTERVAL_MS", "200")],
        )
        .await?;
    let pg = env.pg().await?;
    let mut status = String::new();
    for _ in 0..300 {
        status = pg
            .query_one(
                "SELECT status FROM transactions WHERE request_id = $1",
                &[&id],
            )
            .await?
            .get(0);
        if status == "rolled_back" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "rolled_back");
    assert_eq!(
        prepared(&env, &t).await?,
        0,
        "recovery left nothing prepared"
    );
    assert_eq!(
        (count(&t.a, "kill").await?, count(&t.b, "kill").await?),
        (0, 0)
    );
    // The request is queued again (its message was never acked) and says what happened.
    let (_, rec) = env.get_request(&qm, &id).await?;
    assert_eq!(rec["status"], "queued");
    assert_eq!(rec["error"]["code"], "engine_lost");
    drop((qm, auditor));
    env.cleanup().await;
    drop_targets(t).await;
    Ok(())
}

#[tokio::test]
async fn a_panicking_provider_fails_the_step_rolls_back_and_the_engine_lives() -> R {
    let mut env = TestEnv::new("panic").await?;
    let t = targets(&env).await?;
    env.extra_env.extend(sql_env(&t));
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "ledger", NS).await?;
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env
        .submit(&qm, &request("ledger", "panics", json!({"name": "pan"})))
        .await?;
    let out = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(out["status"], "failed");
    assert_eq!(out["error"]["code"], "provider_panic");
    assert_eq!(
        count(&t.a, "pan").await?,
        0,
        "the completed step was rolled back"
    );
    let (_, body) = env
        .submit(&qm, &request("ledger", "both", json!({"name": "after"})))
        .await?;
    let out = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(out["status"], "succeeded", "the same engine goes on");
    drop((qm, engine));
    env.cleanup().await;
    drop_targets(t).await;
    Ok(())
}

#[tokio::test]
async fn a_killed_engine_loses_nothing_the_request_is_recovered_and_run_again() -> R {
    let mut env = TestEnv::new("killed2").await?;
    env.extra_env
        .push(("PROVISIO_ENGINE__LEASE_SECONDS".into(), "2".into()));
    let qm = env.queue_manager().await?;
    let first = env.engine().await?;
    // The first attempt hangs in its second step; later attempts do not.
    let ns = "namespace: crash\nprocedures:\n  p:\n    access: public\n    steps:\n      - call: test.echo\n        input: '{n: .request.attempt}'\n      - when: '.request.attempt == 1'\n        call: test.sleep\n        input: '{ms: 600000}'\n    output: '.request.attempt'\n";
    assert_eq!(env.apply(&qm, "crash", ns).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env.submit(&qm, &request("crash", "p", json!({}))).await?;
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let pg = env.pg().await?;
    let mut hanging = false;
    for _ in 0..300 {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM provider_test.calls WHERE action = 'sleep'",
                &[],
            )
            .await?
            .get(0);
        if n == 1 {
            hanging = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hanging, "the first attempt reached its second step");
    first.kill().await;

    // Another engine gets the redelivery, recovers the dead attempt once its lease expired,
    // then runs the request again.
    let second = env.engine().await?;
    let out = outcomes.wait_for(&id).await?;
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(out["output"], 2);
    let rows = pg
        .query(
            "SELECT attempt, status FROM transactions WHERE request_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?;
    let attempts: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        attempts,
        vec![(1, "rolled_back".to_owned()), (2, "committed".to_owned())]
    );
    // The first attempt's completed step was undone.
    let undone: i64 = pg
        .query_one(
            "SELECT count(*) FROM provider_test.calls c JOIN transactions t ON t.id = c.tx_id \
             WHERE t.request_id = $1 AND t.attempt = 1 AND c.kind = 'rollback' AND c.step_path = '0'",
            &[&id],
        )
        .await?
        .get(0);
    assert_eq!(undone, 1);
    drop((qm, second));
    env.cleanup().await;
    Ok(())
}
