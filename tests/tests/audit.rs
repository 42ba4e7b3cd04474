//! End-to-end: the auditor sweeps finished transactions into the audit tables per the audit
//! level, and deletes the rest from the log; request records stay.

use std::time::Duration;

use provisio_tests::{Proc, TestEnv, request};
use serde_json::json;

const NS: &str = r#"
namespace: aud
procedures:
  plain:
    access: public
    steps: [{call: test.echo}]
  marked:
    access: public
    audit: true
    steps: [{call: test.echo}, {call: test.echo}]
  outer:
    access: public
    steps:
      - {call: test.echo}
      - {procedure: inner, input: '{name: "Ada"}'}
  inner:
    audit: '{who: .input.name, result: .output}'
    steps: [{call: test.echo}]
    output: '"done"'
  broken:
    access: public
    steps:
      - call: test.echo
      - call: test.fail
        input: '{code: "quota_exceeded", message: "no room"}'
"#;

/// A nested procedure's audit mark selects the transaction; each procedure row names the
/// procedure its step ran in; the `audit:` expression's value is kept as audit data.
async fn audit_rows_hold_what_ran(
    pg: &tokio_postgres::Client,
    ids: &[String],
) -> anyhow::Result<()> {
    let rows = pg
        .query(
            "SELECT p.step_number, p.procedure FROM audit_procedures p JOIN audit_transactions t ON t.tx_id = p.tx_id \
             WHERE t.request_id = $1 ORDER BY p.step_number",
            &[&ids[3]],
        )
        .await?;
    let ran: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(ran, vec!["outer".to_owned(), "inner".to_owned()]);
    let data: serde_json::Value = pg
        .query_one(
            "SELECT data FROM audit_transactions WHERE request_id = $1",
            &[&ids[3]],
        )
        .await?
        .get(0);
    assert_eq!(
        data["audit"][0]["data"],
        json!({"who": "Ada", "result": "done"}),
        "{data}"
    );
    assert_eq!(data["audit"][0]["procedure"], "aud.inner");
    let error: (String, String) = pg
        .query_one(
            "SELECT e.code, e.description FROM audit_errors e JOIN audit_transactions t ON t.tx_id = e.tx_id \
             WHERE t.request_id = $1 AND e.source = 'transaction'",
            &[&ids[2]],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    assert_eq!(error, ("quota_exceeded".to_owned(), "no room".to_owned()));
    let procedures: i64 = pg
        .query_one(
            "SELECT count(*) FROM audit_procedures p JOIN audit_transactions t ON t.tx_id = p.tx_id WHERE t.request_id = $1",
            &[&ids[1]],
        )
        .await?
        .get(0);
    assert_eq!(
        procedures, 2,
        "one procedure row per executed step of the marked procedure"
    );
    Ok(())
}

/// The audit query API: filters, keyset pages, one transaction with its rows.
async fn query_api_filters_and_pages(
    env: &TestEnv,
    qm: &Proc,
    ids: &[String],
) -> anyhow::Result<()> {
    let get = |path: String| {
        let (http, key) = (env.http.clone(), env.admin_key.clone());
        async move {
            let r = http.get(path).bearer_auth(key).send().await?;
            let status = r.status().as_u16();
            anyhow::Ok((status, r.json::<serde_json::Value>().await?))
        }
    };
    let base = format!("{}/v1/audit/transactions", qm.url);
    let (s, all) = get(base.clone()).await?;
    assert_eq!(s, 200, "{all}");
    assert_eq!(
        all["transactions"].as_array().map(Vec::len),
        Some(3),
        "{all}"
    );
    let (_, failed) = get(format!("{base}?outcome=rolled_back")).await?;
    let list = failed["transactions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(list.len(), 1, "{failed}");
    assert_eq!(list[0]["request_id"], ids[2].as_str());
    let (_, by_id) = get(format!("{base}?request_id={}", ids[1])).await?;
    assert_eq!(by_id["transactions"][0]["procedure"], "marked", "{by_id}");
    let (_, none) = get(format!("{base}?procedure=plain")).await?;
    assert_eq!(none["transactions"], serde_json::json!([]));
    let (_, later) = get(format!("{base}?from=2999-01-01T00:00:00Z")).await?;
    assert_eq!(later["transactions"], serde_json::json!([]));
    let (_, page1) = get(format!("{base}?limit=1")).await?;
    let next = page1["next"].as_str().unwrap_or_default().to_owned();
    assert!(!next.is_empty(), "{page1}");
    let (_, page2) = get(format!("{base}?limit=1&after={next}")).await?;
    assert_eq!(page2["transactions"].as_array().map(Vec::len), Some(1));
    assert_ne!(
        page1["transactions"][0]["id"], page2["transactions"][0]["id"],
        "pages do not overlap"
    );
    let tx = list[0]["id"].as_str().unwrap_or_default();
    let (s, one) = get(format!("{base}/{tx}")).await?;
    assert_eq!(s, 200);
    assert_eq!(one["errors"][0]["code"], "quota_exceeded", "{one}");
    let (s, _) = get(format!("{base}?outcome=maybe")).await?;
    assert_eq!(s, 400);
    let (s, _) = get(format!("{base}/{}", uuid::Uuid::now_v7())).await?;
    assert_eq!(s, 404);
    Ok(())
}

#[tokio::test]
async fn the_sweep_audits_what_the_level_selects_and_empties_the_log() -> anyhow::Result<()> {
    let env = TestEnv::new("audit").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    assert_eq!(env.apply(&qm, "aud", NS).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    let mut ids = Vec::new();
    for p in ["plain", "marked", "broken", "outer"] {
        let (_, body) = env.submit(&qm, &request("aud", p, json!({}))).await?;
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        outcomes.wait_for(&id).await?;
        ids.push(id);
    }
    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[
                ("PROVISIO_AUDITOR__INTERVAL_MS", "200"),
                ("PROVISIO_AUDITOR__SWEEP_MIN_AGE_SECONDS", "0"),
            ],
        )
        .await?;
    let pg = env.pg().await?;
    let mut left: i64 = -1;
    for _ in 0..300 {
        left = pg
            .query_one("SELECT count(*) FROM transactions", &[])
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the log was swept");
    let audited: Vec<String> = pg
        .query(
            "SELECT request_id FROM audit_transactions ORDER BY request_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = vec![ids[1].clone(), ids[2].clone(), ids[3].clone()];
    expected.sort();
    assert_eq!(
        audited, expected,
        "marked (nested marks included) and failed are audited, plain success is not"
    );
    audit_rows_hold_what_ran(&pg, &ids).await?;
    for id in &ids {
        let (status, _) = env.get_request(&qm, id).await?;
        assert_eq!(status, 200, "request records outlive the log");
    }

    query_api_filters_and_pages(&env, &qm, &ids).await?;
    drop((qm, engine, auditor));
    env.cleanup().await;
    Ok(())
}
