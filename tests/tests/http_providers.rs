//! End-to-end: the `http` provider and a remote provider against a local HTTP server that the
//! test starts.
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, post};
use provisio_tests::{TestEnv, request};
use serde_json::{Value, json};

#[derive(Default)]
struct Seen {
    events: Mutex<Vec<(String, String)>>,
    flaky: Mutex<HashMap<String, u32>>,
}

fn key(h: &HeaderMap) -> String {
    h.get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn service(seen: Arc<Seen>) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route(
            "/accounts",
            post(|State(s): State<Arc<Seen>>, h: HeaderMap, Json(b): Json<Value>| async move {
                let mut ev = s.events.lock().expect("lock");
                ev.push(("create".into(), key(&h)));
                let id = format!("acc-{}", ev.len());
                (StatusCode::CREATED, Json(json!({"id": id, "name": b["name"]})))
            }),
        )
        .route(
            "/accounts/{id}",
            delete(|State(s): State<Arc<Seen>>, Path(id): Path<String>| async move {
                s.events.lock().expect("lock").push(("delete".into(), id));
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/flaky",
            post(|State(s): State<Arc<Seen>>, h: HeaderMap| async move {
                let mut m = s.flaky.lock().expect("lock");
                let n = m.entry(key(&h)).or_insert(0);
                *n += 1;
                if *n <= 2 { (StatusCode::SERVICE_UNAVAILABLE, Json(json!({}))) } else { (StatusCode::OK, Json(json!({"after": *n}))) }
            }),
        )
        .route(
            "/bad",
            post(|State(s): State<Arc<Seen>>| async move {
                s.events.lock().expect("lock").push(("bad".into(), String::new()));
                (StatusCode::BAD_REQUEST, Json(json!({"error": "no"})))
            }),
        )
        .route(
            "/execute",
            post(|State(s): State<Arc<Seen>>, Json(b): Json<Value>| async move {
                s.events.lock().expect("lock").push(("charge".into(), b["idempotency_key"].as_str().unwrap_or("").to_owned()));
                if let Some(c) = b.get("credentials") {
                    s.events.lock().expect("lock").push(("credentials".into(), c.to_string()));
                }
                match b["action"].as_str() {
                    Some("charge") => (StatusCode::OK, Json(json!({"output": {"charged": b["input"]["amount"]}, "rollback": {"refund": b["input"]["amount"]}}))),
                    _ => (StatusCode::PAYMENT_REQUIRED, Json(json!({"error": {"code": "declined", "message": "card declined", "retryable": false}}))),
                }
            }),
        )
        .route(
            "/rollback",
            post(|State(s): State<Arc<Seen>>, Json(b): Json<Value>| async move {
                s.events.lock().expect("lock").push(("refund".into(), b["data"]["refund"].to_string()));
                Json(json!({}))
            }),
        )
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

const NS: &str = r#"
namespace: shop
procedures:
  signup:
    access: public
    steps:
      - id: account
        call: http.request
        input: '{service: "accounts", path: "/accounts", body: {name: .input.name}, compensate: {method: "DELETE", path: "/accounts/{response.id}"}}'
      - id: charge
        call: billing.charge
        input: '{amount: 5}'
      - when: '.input.fail == true'
        call: test.fail
    output: '{account: .steps.account.body.id, charged: .steps.charge.charged}'
  flaky:
    access: public
    steps:
      - id: f
        call: http.request
        input: '{service: "accounts", path: "/flaky"}'
        retry: {max_attempts: 5, initial_ms: 10, max_ms: 20}
    output: '.steps.f.body'
  bad:
    access: public
    steps:
      - call: http.request
        input: '{service: "accounts", path: "/bad"}'
        retry: {max_attempts: 5, initial_ms: 10}
  declined:
    access: public
    steps:
      - call: billing.decline
  flaky_test:
    access: public
    steps:
      - call: test.fail_n_times
        input: '{key: ("ftn-" + .request.id), n: 2}'
        retry: {max_attempts: 3, initial_ms: 5, max_ms: 10}
"#;

#[tokio::test]
async fn http_and_remote_providers_call_compensate_and_classify_errors() -> anyhow::Result<()> {
    let seen = Arc::new(Seen::default());
    let url = service(seen.clone()).await?;
    let mut env = TestEnv::new("http").await?;
    env.extra_env.extend([
        (
            "PROVISIO_PROVIDERS__HTTP__SERVICES__ACCOUNTS__BASE_URL".to_owned(),
            url.clone(),
        ),
        (
            "PROVISIO_PROVIDERS__REMOTE__BILLING__BASE_URL".to_owned(),
            url.clone(),
        ),
        (
            "PROVISIO_PROVIDERS__REMOTE__BILLING__ACTIONS".to_owned(),
            "[charge,decline]".to_owned(),
        ),
    ]);
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let (status, body) = env.apply(&qm, "shop", NS).await?;
    assert_eq!(status, 201, "{body}");
    let mut outcomes = env.outcomes().await?;
    let mut run = async |body: Value| -> anyhow::Result<Value> {
        let (_, answer) = env.submit(&qm, &body).await?;
        outcomes
            .wait_for(answer["id"].as_str().unwrap_or_default())
            .await
    };

    let out = run(request("shop", "signup", json!({"name": "ada"}))).await?;
    assert_eq!(
        out["output"],
        json!({"account": "acc-1", "charged": 5}),
        "{out}"
    );
    let events = seen.events.lock().expect("lock").clone();
    assert_eq!(events[0].0, "create");
    assert!(
        events[0].1.ends_with(":0"),
        "Idempotency-Key is {{tx_id}}:{{step_path}}: {}",
        events[0].1
    );

    // A later failure compensates both calls, newest first.
    let out = run(request(
        "shop",
        "signup",
        json!({"name": "bo", "fail": true}),
    ))
    .await?;
    assert_eq!(out["status"], "failed");
    let events = seen.events.lock().expect("lock").clone();
    let tail: Vec<(&str, &str)> = events[events.len() - 2..]
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        tail,
        vec![("refund", "5"), ("delete", "acc-3")],
        "{events:?}"
    );

    // 5xx is retried, 4xx is not.
    let out = run(request("shop", "flaky", json!({}))).await?;
    assert_eq!(out["output"], json!({"after": 3}), "{out}");
    let before = seen.events.lock().expect("lock").len();
    let out = run(request("shop", "bad", json!({}))).await?;
    assert_eq!(out["error"]["code"], "http_400");
    assert_eq!(
        seen.events.lock().expect("lock").len(),
        before + 1,
        "a 4xx is not retried"
    );

    // Credentials reach the provider for a caller allowed to pass them (admins are).
    let mut with_creds = request("shop", "signup", json!({"name": "cy"}));
    with_creds["credentials"] = json!({"token": "s3cret"});
    run(with_creds).await?;
    assert!(
        seen.events
            .lock()
            .expect("lock")
            .iter()
            .any(|(k, v)| k == "credentials" && v.contains("s3cret")),
        "the remote provider saw the credentials"
    );
    // The test provider's fail_n_times: two retryable failures, then success under `retry`.
    let out = run(request("shop", "flaky_test", json!({}))).await?;
    assert_eq!(out["status"], "succeeded", "{out}");

    // The remote provider's own error comes through.
    let out = run(request("shop", "declined", json!({}))).await?;
    assert_eq!(
        (
            out["error"]["code"].clone(),
            out["error"]["message"].clone()
        ),
        (json!("declined"), json!("card declined"))
    );
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn an_unknown_remote_action_is_rejected_at_apply_time() -> anyhow::Result<()> {
    let mut env = TestEnv::new("remote").await?;
    env.extra_env.extend([
        (
            "PROVISIO_PROVIDERS__REMOTE__BILLING__BASE_URL".to_owned(),
            "http://127.0.0.1:9".to_owned(),
        ),
        (
            "PROVISIO_PROVIDERS__REMOTE__BILLING__ACTIONS".to_owned(),
            "[charge]".to_owned(),
        ),
    ]);
    let qm = env.queue_manager().await?;
    let (status, body) = env
        .apply(
            &qm,
            "shop",
            "namespace: shop\nprocedures:\n  p: {steps: [{call: billing.refund}]}\n",
        )
        .await?;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.to_string().contains("has no action `refund`"),
        "{body}"
    );
    drop(qm);
    env.cleanup().await;
    Ok(())
}
