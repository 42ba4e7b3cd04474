//! End-to-end: an in-doubt transaction produced by a rollback that fails is listed with what
//! could not be undone; retrying its rollback while the provider is still broken leaves it in
//! doubt; after the provider is fixed the retry undoes it; another one is resolved by hand with
//! a note. The in-doubt gauge (set by the auditor from the log) follows.

use std::time::Duration;

use provisio_tests::{Proc, TestEnv, eventually, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

const NS: &str = r#"
namespace: doubt
procedures:
  fragile:
    access: public
    transaction: compensating
    steps:
      - {call: test.echo, input: '{n: 1}'}
      - {call: test.echo, input: '{n: 2, fail_rollback_while: .input.flag}'}
      - {call: test.fail, input: '{code: "boom"}'}
"#;

async fn post(env: &TestEnv, qm: &Proc, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let r = env
        .http
        .post(format!("{}{path}", qm.url))
        .bearer_auth(&env.admin_key)
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn in_doubt(env: &TestEnv, qm: &Proc) -> anyhow::Result<Vec<Value>> {
    let r: Value = env
        .http
        .get(format!("{}/v1/transactions?status=in_doubt", qm.url))
        .bearer_auth(&env.admin_key)
        .send()
        .await?
        .json()
        .await?;
    Ok(r["transactions"].as_array().cloned().unwrap_or_default())
}

/// Bad requests get clear errors: an unknown target, a resolution without a note, an
/// unknown action.
async fn bad_actions_get_clear_errors(env: &TestEnv, qm: &Proc, tx: &str) -> R {
    let (s, _) = post(env, qm, "/v1/transactions/nope:retry-rollback", &json!({})).await?;
    assert_eq!(s, 400);
    let (s, _) = post(
        env,
        qm,
        &format!("/v1/transactions/{tx}:resolve"),
        &json!({}),
    )
    .await?;
    assert_eq!(s, 400, "a resolution needs a note");
    let (s, _) = post(
        env,
        qm,
        &format!("/v1/transactions/{tx}:explode"),
        &json!({}),
    )
    .await?;
    assert_eq!(s, 404);
    Ok(())
}

/// Fix the provider, retry: undone, the request failed cleanly; step 1's undo was retried
/// until it worked, step 0 was not undone a second time.
async fn retried_after_the_fix(
    env: &TestEnv,
    qm: &Proc,
    pg: &tokio_postgres::Client,
    tx: &str,
    id: &str,
) -> R {
    pg.execute(
        "DELETE FROM provider_test.counters WHERE key = 'broken-a'",
        &[],
    )
    .await?;
    let (s, r) = post(
        env,
        qm,
        &format!("/v1/transactions/{tx}:retry-rollback?wait=30"),
        &json!({"note": "provider fixed"}),
    )
    .await?;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["result"]["transaction_status"], "rolled_back", "{r}");
    let (_, rec) = env.get_request(qm, id).await?;
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["error"]["resolution"]["command"], "retry_rollback");
    // Step 1's undo was retried until it worked; step 0 was not undone a second time.
    let undo: Vec<(String, i64)> = pg
        .query(
            "SELECT c.step_path, count(*) FROM provider_test.calls c JOIN transactions t ON t.id = c.tx_id \
             WHERE t.request_id = $1 AND c.kind = 'rollback' GROUP BY c.step_path ORDER BY 1",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(undo[0], ("0".to_owned(), 1), "{undo:?}");
    assert_eq!(undo[1].0, "1");
    assert!(
        undo[1].1 >= 3,
        "step 1's undo tried at each retry: {undo:?}"
    );
    Ok(())
}

/// The other one is resolved by hand, with a note; a second action on it is a conflict.
async fn resolved_by_hand(env: &TestEnv, qm: &Proc, tx: &str, id: &str) -> R {
    let (s, r) = post(
        env,
        qm,
        &format!("/v1/transactions/{tx}:resolve?wait=30"),
        &json!({"note": "removed the echo by hand, ticket OPS-7"}),
    )
    .await?;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["result"]["transaction_status"], "rolled_back", "{r}");
    let (_, rec) = env.get_request(qm, id).await?;
    assert_eq!(rec["status"], "failed");
    assert_eq!(
        rec["error"]["resolution"]["note"],
        "removed the echo by hand, ticket OPS-7"
    );
    let (s, _) = post(
        env,
        qm,
        &format!("/v1/transactions/{tx}:resolve"),
        &json!({"note": "again"}),
    )
    .await?;
    assert_eq!(s, 409);
    Ok(())
}

#[tokio::test]
async fn an_in_doubt_transaction_is_listed_retried_after_a_fix_and_another_resolved() -> R {
    let env = TestEnv::new("in-doubt").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[("PROVISIO_AUDITOR__INTERVAL_MS", "200")],
        )
        .await?;
    env.apply(&qm, "doubt", NS).await?;
    let pg = env.pg().await?;
    // The provider is broken for both requests' step 1 undo.
    pg.execute(
        "INSERT INTO provider_test.counters (key, calls) VALUES ('broken-a', 1), ('broken-b', 1)",
        &[],
    )
    .await?;
    let mut ids = Vec::new();
    for flag in ["broken-a", "broken-b"] {
        let (status, body) = env
            .submit(&qm, &request("doubt", "fragile", json!({"flag": flag})))
            .await?;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    let listed = eventually(
        Duration::from_mins(1),
        "two in-doubt transactions",
        || async {
            let l = in_doubt(&env, &qm).await?;
            Ok((l.len() == 2).then_some(l))
        },
    )
    .await?;
    for t in &listed {
        assert_eq!(t["status"], "in_doubt");
        assert_eq!(t["not_undone"].as_array().map(Vec::len), Some(1), "{t}");
        assert_eq!(t["not_undone"][0]["path"], "1", "{t}");
    }
    let tx_of = |id: &str| {
        listed
            .iter()
            .find(|t| t["request_id"] == id)
            .and_then(|t| t["id"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (tx_a, tx_b) = (tx_of(&ids[0]), tx_of(&ids[1]));
    eventually(Duration::from_secs(30), "the gauge at 2", || async {
        Ok((env
            .metric(&auditor, "provisio_in_doubt_transactions")
            .await?
            == Some(2.0))
        .then_some(()))
    })
    .await?;

    bad_actions_get_clear_errors(&env, &qm, &tx_b).await?;

    // Retrying while the provider is still broken: still in doubt.
    let (s, r) = post(
        &env,
        &qm,
        &format!("/v1/transactions/{tx_a}:retry-rollback?wait=30"),
        &json!({}),
    )
    .await?;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["status"], "done", "{r}");
    assert_eq!(r["result"]["transaction_status"], "in_doubt", "{r}");

    retried_after_the_fix(&env, &qm, &pg, &tx_a, &ids[0]).await?;
    resolved_by_hand(&env, &qm, &tx_b, &ids[1]).await?;

    assert!(in_doubt(&env, &qm).await?.is_empty());
    eventually(Duration::from_secs(30), "the gauge back at 0", || async {
        Ok((env
            .metric(&auditor, "provisio_in_doubt_transactions")
            .await?
            == Some(0.0))
        .then_some(()))
    })
    .await?;
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM operator_commands WHERE status = 'done' AND requested_by = 'admin'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 3, "every action is on record");
    drop((qm, engine, auditor));
    env.cleanup().await;
    Ok(())
}
