//! End-to-end: per-principal rate limits on submissions, and metric labels that a client
//! cannot grow.

use std::path::PathBuf;

use provisio_tests::{Proc, TestEnv, demo_namespace, request};
use serde_json::{Value, json};

/// POSTs `body` to `path` with `key`; returns (status, Retry-After, body).
async fn post(
    env: &TestEnv,
    qm: &Proc,
    key: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<(u16, Option<String>, Value)> {
    let r = env
        .http
        .post(format!("{}{path}", qm.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((status, retry_after, r.json().await.unwrap_or(Value::Null)))
}

fn assert_rate_limited(what: &str, (status, retry_after, body): &(u16, Option<String>, Value)) {
    assert_eq!(*status, 429, "{what}: {body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
    // One allowance comes back every 100 s.
    let secs: u64 = retry_after
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: Retry-After is whole seconds: {retry_after:?}"));
    assert!((1..=100).contains(&secs), "{what}: Retry-After {secs}");
}

#[tokio::test]
async fn a_principal_over_its_rate_limit_gets_429_and_others_are_unaffected() -> anyhow::Result<()>
{
    let mut env = TestEnv::new("rate_limits").await?;
    // Slow enough that no allowance comes back while the test runs.
    env.extra_env.extend([
        (
            "PROVISIO_QUEUE_MANAGER__RATE_LIMIT__PER_PRINCIPAL_PER_SECOND".to_owned(),
            "0.01".to_owned(),
        ),
        (
            "PROVISIO_QUEUE_MANAGER__RATE_LIMIT__BURST".to_owned(),
            "3".to_owned(),
        ),
    ]);
    let qm = env.queue_manager().await?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let (_, portal) = env.principal(&qm, "portal", &["producers"]).await?;
    let admin = env.admin_key.clone();
    let hello = request("demo", "hello", json!({"name": "r"}));

    // The admin spends its burst; then every submission route refuses it, with Retry-After.
    for i in 0..3 {
        let (status, _, body) = post(&env, &qm, &admin, "/v1/requests", &hello).await?;
        assert_eq!(status, 202, "submission {i} is within the burst: {body}");
    }
    for path in ["/v1/requests", "/v1/requests/trusted"] {
        assert_rate_limited(path, &post(&env, &qm, &admin, path, &hello).await?);
    }
    let one = json!([hello]);
    assert_rate_limited(
        "batch",
        &post(&env, &qm, &admin, "/v1/requests:batch", &one).await?,
    );

    // Another principal is unaffected; a batch takes one allowance per element.
    let two = json!([hello, hello]);
    let (status, _, body) = post(&env, &qm, &portal, "/v1/requests:batch", &two).await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["results"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|x| x["status"] == 202)),
        "{body}"
    );
    let (status, _, body) = post(&env, &qm, &portal, "/v1/requests", &hello).await?;
    assert_eq!(status, 202, "the third of the burst: {body}");
    assert_rate_limited(
        "portal, past its burst",
        &post(&env, &qm, &portal, "/v1/requests", &hello).await?,
    );
    // A batch larger than the burst could never pass: refused as such, not "retry later".
    let four = json!([hello, hello, hello, hello]);
    let (status, _, body) = post(&env, &qm, &portal, "/v1/requests:batch", &four).await?;
    assert_eq!(status, 400, "{body}");

    // Refused submissions left nothing behind.
    let pg = env.pg().await?;
    let stored: i64 = pg
        .query_one("SELECT count(*) FROM requests", &[])
        .await?
        .get(0);
    assert_eq!(stored, 6);

    // The answer is documented for every submission route.
    let spec_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/openapi.yaml");
    let spec: Value = serde_norway::from_str(&std::fs::read_to_string(spec_path)?)?;
    for path in ["/v1/requests", "/v1/requests/trusted", "/v1/requests:batch"] {
        assert!(
            spec["paths"][path]["post"]["responses"]["429"].is_object(),
            "429 is not documented for {path}"
        );
    }
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn client_chosen_procedure_names_never_become_metric_labels() -> anyhow::Result<()> {
    let env = TestEnv::new("metric_labels").await?;
    let qm = env.queue_manager().await?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let admin = env.admin_key.clone();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let adhoc = format!("adhoc-{suffix}");
    let missing = format!("missing-{suffix}");

    let inline = json!({
        "namespace": "demo", "procedure": adhoc, "input": {},
        "steps": [{"call": "test.echo", "input": "{}"}],
    });
    let (status, _, body) = post(&env, &qm, &admin, "/v1/requests/trusted", &inline).await?;
    assert_eq!(status, 202, "{body}");
    let known = request("demo", "hello", json!({"name": "m"}));
    assert_eq!(
        post(&env, &qm, &admin, "/v1/requests", &known).await?.0,
        202
    );
    let unknown = request("demo", &missing, json!({}));
    for path in ["/v1/requests", "/v1/requests/trusted"] {
        assert_eq!(post(&env, &qm, &admin, path, &unknown).await?.0, 404);
    }

    let text = env
        .http
        .get(format!("{}/metrics", qm.url))
        .send()
        .await?
        .text()
        .await?;
    let accepted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("provisio_requests_accepted_total{"))
        .collect();
    assert!(
        accepted
            .iter()
            .any(|l| l.contains(r#"procedure="inline""#) && l.contains(r#"lane="trusted""#)),
        "the inline request is counted as `inline`: {accepted:?}"
    );
    assert!(
        accepted.iter().any(|l| l.contains(r#"procedure="hello""#)),
        "applied names stay labels: {accepted:?}"
    );
    assert!(!text.contains(&adhoc), "inline name leaked into /metrics");
    assert!(
        !text.contains(&missing),
        "unknown name leaked into /metrics"
    );
    drop(qm);
    env.cleanup().await;
    Ok(())
}
