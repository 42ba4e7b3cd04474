//! End-to-end: values a namespace marks `sensitive` — an input property, and a step's output —
//! reach the provider call in clear and nowhere else. A request that succeeds, one that fails
//! and rolls back (the provider's error quoting the value), and one that is dead-lettered, all
//! with credentials too; then the audit sweep. After that neither the credential nor a
//! sensitive value is found in any table of the test's database (before and after the sweep),
//! any message in the test's queues, any outcome message, any API answer or any log line —
//! only in the provider's own record of what it received.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use lapin::options::BasicGetOptions;
use provisio_shared::domain::Priority;
use provisio_tests::{Proc, TestEnv, eventually, request};
use serde_json::{Value, json};

/// The credential, the sensitive input property, and the token a sensitive step returns.
const CREDENTIAL: &str = "Cr-credential-9901";
const PASSWORD: &str = "Pw-sensitive-7781";
const TOKEN: &str = "Tk-minted-5530";
const CLEAR: [&str; 3] = [CREDENTIAL, PASSWORD, TOKEN];

/// What the provider received: every `/execute` and `/rollback` body.
type Seen = Arc<Mutex<Vec<Value>>>;

/// A remote provider: `mint` returns the token (and its rollback data names it), `use` fails
/// when asked to, with a message that quotes the password it got.
async fn keeper(seen: Seen) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route(
            "/execute",
            post(|State(s): State<Seen>, Json(b): Json<Value>| async move {
                let answer = match (b["action"].as_str(), b["input"]["fail"] == json!(true)) {
                    (Some("mint"), _) => (
                        StatusCode::OK,
                        Json(json!({"output": {"token": TOKEN}, "rollback": {"revoke": TOKEN}})),
                    ),
                    (_, true) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        Json(json!({"error": {"code": "declined", "retryable": false,
                            "message": format!("password {} refused", b["input"]["password"])}})),
                    ),
                    _ => (StatusCode::OK, Json(json!({"output": {"ok": true}}))),
                };
                if let Ok(mut seen) = s.lock() {
                    seen.push(json!({"execute": b}));
                }
                answer
            }),
        )
        .route(
            "/rollback",
            post(|State(s): State<Seen>, Json(b): Json<Value>| async move {
                if let Ok(mut seen) = s.lock() {
                    seen.push(json!({"rollback": b}));
                }
                Json(json!({}))
            }),
        )
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

const NS: &str = r"
namespace: vault
procedures:
  login:
    access: public
    audit: '{user: .input.user, password: .input.password}'
    input_schema:
      type: object
      required: [user, password]
      properties:
        user: {type: string}
        password: {type: string, sensitive: true}
        fail: {type: boolean}
    steps:
      - id: token
        call: keeper.mint
        sensitive: true
        input: '{user: .input.user, password: .input.password}'
      - call: keeper.use
        input: '{token: .steps.token.token, password: .input.password, fail: (.input.fail // false)}'
    output: '{user: .input.user, token: .steps.token.token}'
";

/// Fails if `text` holds a clear value; `what` says where it was found.
fn assert_clean(text: &str, what: &str) {
    for clear in CLEAR {
        assert!(
            !text.contains(clear),
            "`{clear}` in clear in {what}: {text}"
        );
    }
}

/// Asserts no table of the database holds a clear value; returns how many rows of each table
/// hold a sealed one.
async fn search_tables(
    pg: &tokio_postgres::Client,
) -> anyhow::Result<std::collections::HashMap<String, i64>> {
    let tables = pg
        .query(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables \
             WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await?;
    assert!(tables.len() > 10, "the search covers the schema");
    let mut sealed = std::collections::HashMap::new();
    for t in &tables {
        let name: String = t.get(0);
        for clear in CLEAR {
            let hits: i64 = pg
                .query_one(
                    &format!("SELECT count(*) FROM {name} r WHERE r::text LIKE '%' || $1 || '%'"),
                    &[&clear],
                )
                .await?
                .get(0);
            assert_eq!(hits, 0, "`{clear}` in clear in {name}");
        }
        let n: i64 = pg
            .query_one(
                &format!("SELECT count(*) FROM {name} r WHERE r::text LIKE '%chacha20poly1305%'"),
                &[],
            )
            .await?
            .get(0);
        sealed.insert(name.trim_start_matches("public.").to_owned(), n);
    }
    Ok(sealed)
}

/// Every message waiting in every queue of the test's prefix (lanes, trusted, the dead-letter
/// archive and its status queue), read without settling: closing the channel puts them back.
/// (Outcomes go to an exchange; its queues are private to their consumers, and the outcome
/// messages are checked as the test receives them.)
async fn queued_messages(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    let conn =
        lapin::Connection::connect(&env.amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let t = env.topology();
    let queues = [
        t.lane_queue(Priority::High),
        t.lane_queue(Priority::Normal),
        t.lane_queue(Priority::Low),
        t.trusted_queue(),
        t.dead_queue(),
        t.dead_status_queue(),
    ];
    let mut bodies = Vec::new();
    for q in queues {
        while let Some(m) = ch
            .basic_get(q.clone().into(), BasicGetOptions::default())
            .await?
        {
            let headers = format!("{:?}", m.properties.headers());
            bodies.push(format!(
                "{q}: {headers} {}",
                String::from_utf8_lossy(&m.data)
            ));
        }
    }
    ch.close(200, "read".into()).await?;
    conn.close(200, "read".into()).await?;
    Ok(bodies)
}

/// A request of principal `vaultuser` that is dead-lettered: scheduled, its `execute` grant
/// withdrawn before it is due, so the engine refuses it (`forbidden`).
async fn dead_letter_one(env: &TestEnv, qm: &Proc) -> anyhow::Result<()> {
    let (_, key) = env.principal(qm, "vaultuser", &[]).await?;
    let grants = |list: Value| {
        env.admin(
            qm,
            reqwest::Method::PUT,
            "/v1/principals/vaultuser/grants",
            Some(list),
        )
    };
    assert_eq!(grants(json!(["execute"])).await?.0, 200);
    let mut body = request(
        "vault",
        "login",
        json!({"user": "dee", "password": PASSWORD}),
    );
    body["id"] = json!("v-dead");
    body["not_before"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let r = env
        .http
        .post(format!("{}/v1/requests", qm.url))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await?);
    assert_eq!(grants(json!([])).await?.0, 200);
    let due = env
        .pg()
        .await?
        .execute(
            "UPDATE requests SET not_before = now() WHERE id = 'v-dead' AND status = 'scheduled'",
            &[],
        )
        .await?;
    assert_eq!(due, 1);
    Ok(())
}

/// Every API answer about these requests, their audit and their dead letter.
async fn api_answers(env: &TestEnv, qm: &Proc) -> anyhow::Result<Vec<Value>> {
    let get = async |path: String| env.admin(qm, reqwest::Method::GET, &path, None).await;
    let mut answers = Vec::new();
    for id in ["v-ok", "v-fail", "v-dead"] {
        let (status, rec) = env.get_request(qm, id).await?;
        assert_eq!(status, 200, "{rec}");
        answers.push(rec);
    }
    let (_, list) = get("/v1/requests".into()).await?;
    answers.push(list);
    let (status, letters) = get("/v1/dead-letters?status=all".into()).await?;
    assert_eq!(status, 200, "{letters}");
    let letter = letters["dead_letters"][0].clone();
    assert_eq!(letter["request_id"], "v-dead", "{letters}");
    assert_eq!(
        letter["envelope"]["input"]["password"], "[redacted]",
        "{letter}"
    );
    assert_eq!(letter["envelope"]["input"]["user"], "dee", "{letter}");
    if let Some(id) = letter["id"].as_i64() {
        answers.push(get(format!("/v1/dead-letters/{id}")).await?.1);
    }
    answers.push(letters);
    let (status, audited) = get("/v1/audit/transactions".into()).await?;
    assert_eq!(status, 200, "{audited}");
    let list = audited["transactions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        list.len(),
        2,
        "v-ok (marked) and v-fail (aborted): {audited}"
    );
    for t in &list {
        let (status, one) = get(format!(
            "/v1/audit/transactions/{}",
            t["id"].as_str().unwrap_or_default()
        ))
        .await?;
        assert_eq!(status, 200, "{one}");
        if t["request_id"] == "v-ok" {
            assert_eq!(one["data"]["output"], "[redacted]", "{one}");
            assert_eq!(one["data"]["audit"], "[redacted]", "{one}");
        } else {
            let errors = one["errors"].as_array().cloned().unwrap_or_default();
            assert!(
                errors
                    .iter()
                    .any(|e| e["code"] == "declined" && e["description"] == "[redacted]"),
                "{one}"
            );
        }
        answers.push(one);
    }
    answers.push(audited);
    answers.push(get("/v1/transactions?status=in_doubt".into()).await?.1);
    Ok(answers)
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one story: requests, rollback, dead letter, sweep, then the search"
)]
async fn sensitive_values_are_sealed_everywhere_but_the_provider_call() -> anyhow::Result<()> {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let url = keeper(seen.clone()).await?;
    let mut env = TestEnv::new("sensitive").await?;
    env.extra_env.extend([
        (
            "PROVISIO_PROVIDERS__REMOTE__KEEPER__BASE_URL".to_owned(),
            url,
        ),
        (
            "PROVISIO_PROVIDERS__REMOTE__KEEPER__ACTIONS".to_owned(),
            "[mint, use]".to_owned(),
        ),
        ("RUST_LOG".to_owned(), "debug".to_owned()),
    ]);
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    assert_eq!(env.apply(&qm, "vault", NS).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    for (id, fail) in [("v-ok", false), ("v-fail", true)] {
        let mut body = request(
            "vault",
            "login",
            json!({"user": "ann", "password": PASSWORD, "fail": fail}),
        );
        body["id"] = json!(id);
        body["credentials"] = json!({"api_key": CREDENTIAL});
        let (status, answer) = env.submit(&qm, &body).await?;
        assert_eq!(status, 202, "{answer}");
    }
    let ok = outcomes.wait_for("v-ok").await?;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["output"], "[redacted]", "a sensitive run's output: {ok}");
    let failed = outcomes.wait_for("v-fail").await?;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "declined", "{failed}");
    assert_eq!(failed["error"]["message"], "[redacted]", "{failed}");
    for o in [&ok, &failed] {
        assert_clean(&o.to_string(), "an outcome message");
    }

    // The transaction log before the sweep: the steps' records are there, sealed.
    let pg = env.pg().await?;
    let sealed = search_tables(&pg).await?;
    assert!(sealed["tx_steps"] >= 5, "sealed step records: {sealed:?}");
    assert!(
        sealed["requests"] >= 2,
        "sealed input and output: {sealed:?}"
    );
    let rolled_back: i64 = pg
        .query_one(
            "SELECT count(*) FROM tx_steps s JOIN transactions t ON t.id = s.tx_id \
             WHERE t.request_id = 'v-fail' AND s.kind = 'rollback' AND s.error IS NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(rolled_back, 1, "the minted token was revoked");
    let hash: String = pg
        .query_one("SELECT body_hash FROM requests WHERE id = 'v-ok'", &[])
        .await?
        .get(0);
    assert!(
        hash.starts_with("hmac:"),
        "a body with secrets is fingerprinted with a key: {hash}"
    );

    // Dead-lettered, then the sweep.
    dead_letter_one(&env, &qm).await?;
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
    eventually(Duration::from_mins(1), "the request dead", || async {
        let (_, r) = env.get_request(&qm, "v-dead").await?;
        Ok((r["status"] == "dead").then_some(()))
    })
    .await?;
    eventually(Duration::from_mins(1), "the log swept", || async {
        let left: i64 = pg
            .query_one("SELECT count(*) FROM transactions", &[])
            .await?
            .get(0);
        Ok((left == 0).then_some(()))
    })
    .await?;

    // After: every table, every queued message, every API answer.
    let sealed = search_tables(&pg).await?;
    for table in [
        "requests",
        "audit_transactions",
        "audit_errors",
        "dead_letters",
    ] {
        assert!(sealed[table] > 0, "{table} holds sealed values: {sealed:?}");
    }
    let messages = queued_messages(&env).await?;
    assert!(
        messages.iter().any(|m| m.contains("chacha20poly1305")),
        "the dead-letter archive keeps the message, sealed: {messages:?}"
    );
    for m in &messages {
        assert_clean(m, "a queued message");
    }
    for answer in api_answers(&env, &qm).await? {
        assert_clean(&answer.to_string(), "an API answer");
    }

    // The provider got every value in clear: the password and the credential with each call,
    // the token in the next step's input and in the rollback data it revoked.
    let got: Vec<Value> = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let executes: Vec<&Value> = got.iter().filter_map(|g| g.get("execute")).collect();
    assert_eq!(executes.len(), 4, "mint and use, twice: {got:?}");
    for e in &executes {
        assert_eq!(e["input"]["password"], PASSWORD, "{e}");
        assert_eq!(e["credentials"]["api_key"], CREDENTIAL, "{e}");
    }
    let uses: Vec<&&Value> = executes.iter().filter(|e| e["action"] == "use").collect();
    assert!(uses.iter().all(|e| e["input"]["token"] == TOKEN), "{got:?}");
    let rollbacks: Vec<&Value> = got.iter().filter_map(|g| g.get("rollback")).collect();
    assert_eq!(rollbacks.len(), 1, "{got:?}");
    assert_eq!(rollbacks[0]["data"], json!({"revoke": TOKEN}));

    // And every log line.
    let logs = [qm.log.clone(), engine.log.clone(), auditor.log.clone()];
    drop((qm, engine, auditor));
    for log in logs {
        let text = std::fs::read_to_string(&log)?;
        assert!(!text.is_empty(), "the log was written");
        for clear in CLEAR {
            assert!(!text.contains(clear), "`{clear}` in {}", log.display());
        }
    }
    env.cleanup().await;
    Ok(())
}
