//! End-to-end: a request's credentials are sealed before they reach RabbitMQ or PostgreSQL,
//! reach the provider call in clear, and are found in clear nowhere else: not in any table of
//! the test's database, not in the queued message, not in an API answer, not in a log line —
//! also when the request is scheduled, retried and fails.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use provisio_tests::{TestEnv, eventually, request};
use serde_json::{Value, json};
use std::time::Duration;

const SECRET: &str = "Zq7-sealed-secret-42";

/// A remote provider that keeps what it received: its own record, the one place the clear
/// credentials may appear.
async fn provider(seen: Arc<Mutex<Vec<Value>>>) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route(
            "/execute",
            post(|State(s): State<Arc<Mutex<Vec<Value>>>>, Json(b): Json<Value>| async move {
                let fail = b["input"]["fail"] == json!(true);
                if let Ok(mut seen) = s.lock() {
                    seen.push(b);
                }
                if fail {
                    (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        Json(json!({"error": {"code": "declined", "message": "no", "retryable": false}})),
                    )
                } else {
                    (StatusCode::OK, Json(json!({"output": {"ok": true}})))
                }
            }),
        )
        .route("/rollback", post(|| async { Json(json!({})) }))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

const NS: &str = r"
namespace: vault
procedures:
  use_secret:
    access: public
    steps:
      - call: keeper.use
        input: '{fail: (.input.fail // false)}'
";

/// The first message waiting in the normal lane, put back after reading.
async fn peek_lane(env: &TestEnv) -> anyhow::Result<String> {
    let conn =
        lapin::Connection::connect(&env.amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let lane = env
        .topology()
        .lane_queue(provisio_shared::domain::Priority::Normal);
    let message = eventually(Duration::from_secs(10), "the queued message", || async {
        Ok(ch
            .basic_get(lane.clone().into(), BasicGetOptions::default())
            .await?)
    })
    .await?;
    let body = String::from_utf8_lossy(&message.data).into_owned();
    message
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await?;
    Ok(body)
}

/// Asserts no table of the database holds the clear secret; returns how many rows hold a
/// sealed value.
async fn search_tables(pg: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let tables = pg
        .query(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables \
             WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await?;
    assert!(tables.len() > 10, "the search covers the schema");
    let mut sealed_rows = 0;
    for t in &tables {
        let name: String = t.get(0);
        let hits: i64 = pg
            .query_one(
                &format!("SELECT count(*) FROM {name} r WHERE r::text LIKE '%' || $1 || '%'"),
                &[&SECRET],
            )
            .await?
            .get(0);
        assert_eq!(hits, 0, "clear credentials in {name}");
        sealed_rows += pg
            .query_one(
                &format!("SELECT count(*) FROM {name} r WHERE r::text LIKE '%chacha20poly1305%'"),
                &[],
            )
            .await?
            .get::<_, i64>(0);
    }
    Ok(sealed_rows)
}

#[tokio::test]
async fn credentials_are_sealed_everywhere_but_the_provider_call() -> anyhow::Result<()> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = provider(seen.clone()).await?;
    let mut env = TestEnv::new("sealed").await?;
    env.extra_env.extend([
        (
            "PROVISIO_PROVIDERS__REMOTE__KEEPER__BASE_URL".to_owned(),
            url,
        ),
        (
            "PROVISIO_PROVIDERS__REMOTE__KEEPER__ACTIONS".to_owned(),
            "[use]".to_owned(),
        ),
        ("RUST_LOG".to_owned(), "debug".to_owned()),
    ]);
    let qm = env.queue_manager().await?;
    assert_eq!(env.apply(&qm, "vault", NS).await?.0, 201);
    let with_secret = |id: &str, input: Value| {
        let mut body = request("vault", "use_secret", input);
        body["id"] = json!(id);
        body["credentials"] = json!({"password": SECRET});
        body
    };

    // Queued, no engine yet: the message waiting in RabbitMQ holds the credentials sealed.
    let (status, answer) = env.submit(&qm, &with_secret("s-now", json!({}))).await?;
    assert_eq!(status, 202, "{answer}");
    let body = peek_lane(&env).await?;
    assert!(!body.contains(SECRET), "clear credentials on the broker");
    assert!(body.contains("chacha20poly1305"), "{body}");

    // Scheduled (stored in PostgreSQL until due), and retried after a failure then parked.
    let mut later = with_secret("s-later", json!({}));
    later["not_before"] = json!((chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339());
    assert_eq!(env.submit(&qm, &later).await?.0, 202);
    let mut retried = with_secret("s-retried", json!({"fail": true}));
    retried["retry"] = json!({"count": 1, "interval_ms": 50, "on_exhausted": "park"});
    assert_eq!(env.submit(&qm, &retried).await?.0, 202);

    let mut outcomes = env.outcomes().await?;
    let engine = env.engine().await?;
    for id in ["s-now", "s-later"] {
        let out = outcomes.wait_for(id).await?;
        assert_eq!(out["status"], "succeeded", "{out}");
    }
    let pg = env.pg().await?;
    eventually(
        Duration::from_secs(20),
        "the retried request to park",
        || async {
            let row = pg
                .query_one("SELECT status FROM requests WHERE id = 's-retried'", &[])
                .await?;
            let status: String = row.get(0);
            Ok((status == "parked").then_some(()))
        },
    )
    .await?;

    // The provider got the credentials in clear, on every attempt.
    let got: Vec<Value> = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let with_clear = got
        .iter()
        .filter(|b| b["credentials"]["password"] == SECRET)
        .count();
    assert_eq!(with_clear, got.len(), "{got:?}");
    assert_eq!(
        got.len(),
        4,
        "s-now, s-later and two attempts of s-retried: {got:?}"
    );

    // Nowhere else: every table of the database, every API answer, every log line.
    let sealed_rows = search_tables(&pg).await?;
    assert!(
        sealed_rows > 0,
        "the parked request keeps its credentials, sealed"
    );
    for id in ["s-now", "s-later", "s-retried"] {
        let (status, rec) = env.get_request(&qm, id).await?;
        assert_eq!(status, 200);
        assert!(!rec.to_string().contains(SECRET), "{rec}");
    }
    let (qm_log, engine_log) = (qm.log.clone(), engine.log.clone());
    drop((qm, engine));
    for log in [qm_log, engine_log] {
        let text = std::fs::read_to_string(&log)?;
        assert!(!text.is_empty(), "the log was written");
        assert!(
            !text.contains(SECRET),
            "clear credentials in {}",
            log.display()
        );
    }
    env.cleanup().await;
    Ok(())
}
