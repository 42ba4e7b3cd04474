//! End-to-end: the walking skeleton. Real binaries, real PostgreSQL and RabbitMQ.

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use provisio_tests::{Proc, TestEnv, demo_namespace, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

#[tokio::test]
async fn a_request_succeeds_with_the_expected_output() -> R {
    let env = TestEnv::new("succeeds").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let (status, body) = env.apply(&qm, "demo", &demo_namespace()).await?;
    assert_eq!(status, 201, "{body}");
    let mut outcomes = env.outcomes().await?;
    let (status, body) = env
        .submit(&qm, &request("demo", "hello", json!({"name": "Ada"})))
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    let id = body["id"].as_str().expect("id").to_owned();
    let outcome = outcomes.wait_for(&id).await?;
    assert_eq!(outcome["status"], "succeeded", "{outcome}");
    let (status, rec) = env.get_request(&qm, &id).await?;
    assert_eq!(status, 200);
    assert_eq!(rec["status"], "succeeded");
    assert_eq!(
        rec["output"],
        json!({"message": "hello, Ada", "account": "ada"})
    );
    assert_eq!(rec["attempts"], 1);
    assert!(rec["finished_at"].is_string());
    // The transaction log has the transaction and its three steps.
    let pg = env.pg().await?;
    let row = pg.query_one("SELECT status, model, (SELECT count(*) FROM tx_steps s WHERE s.tx_id = t.id AND s.kind = 'execute') FROM transactions t WHERE request_id = $1", &[&id]).await?;
    assert_eq!(row.get::<_, String>(0), "committed");
    assert_eq!(row.get::<_, String>(1), "compensating");
    assert_eq!(row.get::<_, i64>(2), 3);
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_step_ends_failed_with_the_error_and_the_step_and_rolls_back_in_reverse() -> R {
    let env = TestEnv::new("fails").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env
        .submit(&qm, &request("demo", "broken", json!({})))
        .await?;
    let id = body["id"].as_str().expect("id").to_owned();
    let outcome = outcomes.wait_for(&id).await?;
    assert_eq!(outcome["status"], "failed");
    let (_, rec) = env.get_request(&qm, &id).await?;
    assert_eq!(
        rec["error"],
        json!({"code": "quota_exceeded", "message": "no room left", "step": "2"})
    );
    // From the provider's own records: steps 0,1,2 executed, then 1 and 0 rolled back.
    let pg = env.pg().await?;
    let rows = pg
        .query(
            "SELECT c.step_path, c.kind FROM provider_test.calls c JOIN transactions t ON t.id = c.tx_id \
             WHERE t.request_id = $1 ORDER BY c.id",
            &[&id],
        )
        .await?;
    let calls: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: Vec<(String, String)> = [
        ("0", "execute"),
        ("1", "execute"),
        ("2", "execute"),
        ("1", "rollback"),
        ("0", "rollback"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(calls, expected);
    // From the transaction log: two executes, then rollbacks of 1 and 0, in that order.
    let rows = pg
        .query("SELECT s.kind, s.path FROM tx_steps s JOIN transactions t ON t.id = s.tx_id WHERE t.request_id = $1 AND s.kind IN ('execute', 'rollback') ORDER BY s.seq", &[&id])
        .await?;
    let log: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        log,
        vec![
            ("execute".to_owned(), "0".to_owned()),
            ("execute".to_owned(), "1".to_owned()),
            ("rollback".to_owned(), "1".to_owned()),
            ("rollback".to_owned(), "0".to_owned()),
        ]
    );
    let tx_status: String = pg
        .query_one(
            "SELECT status FROM transactions WHERE request_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    assert_eq!(tx_status, "rolled_back");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_malformed_message_lands_in_the_dead_queue_and_the_engine_goes_on() -> R {
    let env = TestEnv::new("dead").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let topo = env.topology();
    let conn =
        lapin::Connection::connect(&env.amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut dead = ch
        .basic_consume(
            topo.dead_queue().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    ch.basic_publish(
        topo.requests_exchange().into(),
        "normal".into(),
        BasicPublishOptions::default(),
        b"{this is not json",
        BasicProperties::default().with_message_id("garbage-1".into()),
    )
    .await?
    .await?;
    let d = tokio::time::timeout(std::time::Duration::from_mins(1), dead.next())
        .await?
        .expect("a dead letter")?;
    assert_eq!(d.data, b"{this is not json");
    let reason = provisio_shared::amqp::header_str(&d.properties, "x-provisio-reason");
    assert_eq!(reason.as_deref(), Some("malformed"));
    let detail =
        provisio_shared::amqp::header_str(&d.properties, "x-provisio-error").unwrap_or_default();
    assert!(detail.contains("not valid JSON"), "{detail}");
    // The engine is still consuming.
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env
        .submit(&qm, &request("demo", "hello", json!({"name": "Bo"})))
        .await?;
    let outcome = outcomes.wait_for(body["id"].as_str().expect("id")).await?;
    assert_eq!(outcome["status"], "succeeded");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

/// `on_exhausted` has two values; anything else is a malformed body that names them.
async fn on_exhausted_is_typed(env: &TestEnv, qm: &Proc) -> R {
    let (status, b) = env
        .submit(
            qm,
            &json!({"namespace": "demo", "procedure": "hello",
                    "retry": {"count": 1, "interval_ms": 10, "on_exhausted": "never"}}),
        )
        .await?;
    assert_eq!(status, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`fail`") && m.contains("`park`")),
        "{b}"
    );
    Ok(())
}

#[tokio::test]
async fn api_errors_are_json_with_the_right_status() -> R {
    let env = TestEnv::new("errors").await?;
    let qm = env.queue_manager().await?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let url = format!("{}/v1/requests", qm.url);
    let body = request("demo", "hello", json!({"name": "x"}));

    let r = env.http.post(&url).json(&body).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().await?["error"]["code"], "unauthorized");
    let r = env
        .http
        .post(&url)
        .bearer_auth("wrong-key")
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);

    let (status, b) = env.submit(&qm, &request("demo", "nope", json!({}))).await?;
    assert_eq!(status, 404, "{b}");
    assert_eq!(b["error"]["code"], "not_found");
    let (status, _) = env
        .submit(&qm, &request("nosuch", "hello", json!({})))
        .await?;
    assert_eq!(status, 404);

    let r = env
        .http
        .post(&url)
        .bearer_auth(&env.admin_key)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().await?["error"]["code"], "malformed");
    let (status, _) = env
        .submit(
            &qm,
            &json!({"namespace": "demo", "procedure": "hello", "bogus": 1}),
        )
        .await?;
    assert_eq!(status, 400);
    let (status, _) = env
        .submit(
            &qm,
            &json!({"namespace": "demo", "procedure": "hello", "id": ""}),
        )
        .await?;
    assert_eq!(status, 400);
    on_exhausted_is_typed(&env, &qm).await?;

    let big = json!({"namespace": "demo", "procedure": "hello", "input": {"pad": "x".repeat(300 * 1024)}});
    let (status, b) = env.submit(&qm, &big).await?;
    assert_eq!(status, 413, "{b}");
    assert_eq!(b["error"]["code"], "too_large");

    let (status, _) = env.get_request(&qm, "does-not-exist").await?;
    assert_eq!(status, 404);

    // A principal without `execute` is refused with 403.
    let (_, key) = env.principal(&qm, "nobody", &[]).await?;
    let key = key.as_str();
    let r = env
        .http
        .post(&url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(r.json::<Value>().await?["error"]["code"], "forbidden");
    // A producer may execute, but not pass credentials.
    let (_, pkey) = env.principal(&qm, "portal", &["producers"]).await?;
    let pkey = pkey.as_str();
    let mut with_creds = body.clone();
    with_creds["credentials"] = json!({"token": "x"});
    let r = env
        .http
        .post(&url)
        .bearer_auth(pkey)
        .json(&with_creds)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    let msg = r.json::<Value>().await?["error"]["message"].to_string();
    assert!(msg.contains("execute_with_credentials"), "{msg}");
    let r = env
        .http
        .post(&url)
        .bearer_auth(pkey)
        .json(&body)
        .send()
        .await?;
    assert_eq!(
        r.status().as_u16(),
        202,
        "without credentials a producer may execute"
    );
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_same_id_is_one_request_and_a_different_body_conflicts() -> R {
    let env = TestEnv::new("idempotent").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut outcomes = env.outcomes().await?;
    let mut body = request("demo", "hello", json!({"name": "Cy"}));
    body["id"] = json!("order-1");
    let (s1, _) = env.submit(&qm, &body).await?;
    assert_eq!(s1, 202);
    outcomes.wait_for("order-1").await?;
    let (s2, b2) = env.submit(&qm, &body).await?;
    assert_eq!(s2, 202);
    assert_eq!(
        b2["status"], "succeeded",
        "answered from the existing request"
    );
    body["input"] = json!({"name": "Other"});
    let (s3, b3) = env.submit(&qm, &body).await?;
    assert_eq!(s3, 409, "{b3}");
    let pg = env.pg().await?;
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM transactions WHERE request_id = 'order-1'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 1, "ran once");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn every_process_serves_metrics_health_and_readiness() -> R {
    let env = TestEnv::new("metrics").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env
        .submit(&qm, &request("demo", "hello", json!({"name": "Di"})))
        .await?;
    outcomes.wait_for(body["id"].as_str().expect("id")).await?;
    for p in [&qm, &engine] {
        for path in ["/healthz", "/readyz"] {
            let r = env.http.get(format!("{}{path}", p.url)).send().await?;
            assert_eq!(r.status().as_u16(), 200, "{path}");
        }
    }
    let qm_metrics = env
        .http
        .get(format!("{}/metrics", qm.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        qm_metrics.contains("provisio_requests_accepted_total"),
        "{qm_metrics}"
    );
    let engine_metrics = env
        .http
        .get(format!("{}/metrics", engine.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(engine_metrics.contains("provisio_requests_finished_total{namespace=\"demo\",procedure=\"hello\",status=\"succeeded\"} 1"), "{engine_metrics}");
    assert!(
        engine_metrics.contains("provisio_request_duration_seconds_bucket"),
        "{engine_metrics}"
    );
    assert!(
        engine_metrics.contains("# HELP provisio_txlog_batch_records"),
        "{engine_metrics}"
    );
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

/// `runtime.threads = 1` runs a process on tokio's current-thread runtime: everything (the
/// HTTP server, the broker and database connections, the log writer, timers) must make
/// progress on one thread, for a success and for a failure that rolls back.
#[tokio::test]
async fn the_fleet_runs_requests_on_the_runtime_threads_it_is_given() -> R {
    let env = TestEnv::new("threads").await?;
    let one = [("PROVISIO_RUNTIME__THREADS", "1")];
    let (qm, engine, wide) = tokio::try_join!(
        env.spawn("queue-manager", &[], &one),
        env.spawn("worker", &["--role", "engine"], &one),
        env.spawn(
            "worker",
            &["--role", "engine"],
            &[("PROVISIO_RUNTIME__THREADS", "3")]
        ),
    )?;
    assert_eq!(
        env.metric(&qm, "provisio_runtime_threads").await?,
        Some(1.0)
    );
    assert_eq!(
        env.metric(&engine, "provisio_runtime_threads").await?,
        Some(1.0)
    );
    assert_eq!(
        env.metric(&wide, "provisio_runtime_threads").await?,
        Some(3.0)
    );
    // Only the one-thread engine consumes: the three-thread one has shown its count.
    drop(wide);
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut outcomes = env.outcomes().await?;
    for (procedure, input, status) in [
        ("hello", json!({"name": "Uno"}), "succeeded"),
        ("broken", json!({}), "failed"),
    ] {
        let (code, body) = env.submit(&qm, &request("demo", procedure, input)).await?;
        assert_eq!(code, 202, "{body}");
        let outcome = outcomes.wait_for(body["id"].as_str().expect("id")).await?;
        assert_eq!(outcome["status"], status, "{outcome}");
    }
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn print_config_shows_effective_values_with_secrets_masked() -> R {
    for bin in ["queue-manager", "worker"] {
        let out = tokio::process::Command::new(provisio_tests::binary(bin))
            .arg("--print-config")
            .env("PROVISIO_SIGNING_KEY", "very-secret-signing-key")
            .env("PROVISIO_AMQP__PREFIX", "shown")
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin}: {text}");
        assert!(text.contains("prefix = \"shown\""), "{bin}: {text}");
        assert!(text.contains("signing_key = \"********\""), "{bin}: {text}");
        assert!(!text.contains("very-secret-signing-key"), "{bin}: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_the_engine_which_finishes_what_it_holds_and_exits_0() -> R {
    let env = TestEnv::new("drain").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let ns = "namespace: slow\nprocedures:\n  nap:\n    access: public\n    steps:\n      - id: z\n        call: test.sleep\n        input: '{ms: 1500}'\n    output: '.steps.z'\n";
    assert_eq!(env.apply(&qm, "slow", ns).await?.0, 201);
    let pg = env.pg().await?;
    let (_, body) = env.submit(&qm, &request("slow", "nap", json!({}))).await?;
    let id = body["id"].as_str().expect("id").to_owned();
    // Wait (bounded) until the engine has started it, then ask it to stop.
    let mut running = false;
    for _ in 0..200 {
        let s: Option<String> = pg
            .query_opt("SELECT status FROM requests WHERE id = $1", &[&id])
            .await?
            .map(|r| r.get(0));
        if s.as_deref() == Some("running") {
            running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(running, "the engine picked the request up");
    let status = engine.terminate().await?;
    assert!(status.success(), "exit status {status:?}");
    let (_, rec) = env.get_request(&qm, &id).await?;
    assert_eq!(
        rec["status"], "succeeded",
        "finished within the grace period: {rec}"
    );
    assert_eq!(rec["output"], json!({"slept_ms": 1500}));
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_submissions_of_one_id_make_one_request() -> R {
    let env = TestEnv::new("sameid").await?;
    let qm = env.queue_manager().await?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut body = request("demo", "hello", json!({"name": "Eve"}));
    body["id"] = json!("dup-1");
    // Twenty identical submissions at once (they may share one accepting batch).
    let same: Vec<_> = (0..20).map(|_| env.submit(&qm, &body)).collect();
    for r in futures_util::future::join_all(same).await {
        let (status, b) = r?;
        assert_eq!(status, 202, "{b}");
    }
    // And ten with a different body at once: all conflict.
    let mut other = body.clone();
    other["input"] = json!({"name": "Mallory"});
    let diff: Vec<_> = (0..10).map(|_| env.submit(&qm, &other)).collect();
    for r in futures_util::future::join_all(diff).await {
        assert_eq!(r?.0, 409);
    }
    let pg = env.pg().await?;
    let n: i64 = pg
        .query_one("SELECT count(*) FROM requests WHERE id = 'dup-1'", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    let depth = provisio_shared::amqp::Publisher::new(
        &env.amqp_url,
        env.topology(),
        std::time::Duration::from_secs(5),
    )
    .queue_depth(
        &env.topology()
            .lane_queue(provisio_shared::domain::Priority::Normal),
    )
    .await?;
    assert_eq!(depth, 1, "published once");
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn wait_answers_200_with_the_outcome_or_202_when_it_is_not_done_in_time() -> R {
    let env = TestEnv::new("wait").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let slow = "namespace: slow\nprocedures:\n  nap:\n    access: public\n    steps:\n      - call: test.sleep\n        input: '{ms: 3000}'\n";
    env.apply(&qm, "slow", slow).await?;
    let post = |query: &str, body: Value| {
        env.http
            .post(format!("{}/v1/requests{query}", qm.url))
            .bearer_auth(&env.admin_key)
            .json(&body)
            .send()
    };
    let r = post("?wait=30", request("demo", "hello", json!({"name": "Wu"}))).await?;
    assert_eq!(r.status().as_u16(), 200);
    let rec: Value = r.json().await?;
    assert_eq!(rec["status"], "succeeded");
    assert_eq!(rec["output"]["message"], "hello, Wu");
    let r = post("?wait=1", request("slow", "nap", json!({}))).await?;
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(r.json::<Value>().await?["status"], "queued");
    let r = post("?wait=soon", request("demo", "hello", json!({"name": "x"}))).await?;
    assert_eq!(r.status().as_u16(), 400);
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn batch_answers_each_request_and_list_pages_newest_first() -> R {
    let env = TestEnv::new("batch").await?;
    let qm = env.queue_manager().await?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut items: Vec<Value> = (0..5)
        .map(|i| {
            let mut b = request("demo", "hello", json!({"name": format!("n{i}")}));
            b["id"] = json!(format!("b-{i}"));
            b
        })
        .collect();
    items.push(request("demo", "nosuch", json!({})));
    items.push(json!({"namespace": "demo"}));
    let r = env
        .http
        .post(format!("{}/v1/requests:batch", qm.url))
        .bearer_auth(&env.admin_key)
        .json(&items)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await?;
    let codes: Vec<i64> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(codes, vec![202, 202, 202, 202, 202, 404, 400]);
    assert_eq!(body["results"][0]["id"], "b-0");

    // Newest first, two at a time, following `next`.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let url = match &after {
            Some(a) => format!("{}/v1/requests?limit=2&namespace=demo&after={a}", qm.url),
            None => format!("{}/v1/requests?limit=2&namespace=demo", qm.url),
        };
        let page: Value = env
            .http
            .get(url)
            .bearer_auth(&env.admin_key)
            .send()
            .await?
            .json()
            .await?;
        for item in page["requests"].as_array().expect("requests") {
            seen.push(item["id"].as_str().unwrap_or_default().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..5).map(|i| format!("b-{i}")).collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected, "every request exactly once");
    let r = env
        .http
        .get(format!("{}/v1/requests?status=bogus", qm.url))
        .bearer_auth(&env.admin_key)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    let queued: Value = env
        .http
        .get(format!("{}/v1/requests?status=queued", qm.url))
        .bearer_auth(&env.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(queued["requests"].as_array().map(Vec::len), Some(5));
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn scheduled_requests_wait_in_postgres_run_when_due_and_can_be_cancelled() -> R {
    let env = TestEnv::new("sched").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut outcomes = env.outcomes().await?;
    // An hour ahead, then made due by the test: a loaded machine cannot race the schedule.
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let mut body = request("demo", "hello", json!({"name": "Later"}));
    body["id"] = json!("s-1");
    body["not_before"] = json!(soon);
    let (status, b) = env.submit(&qm, &body).await?;
    assert_eq!(
        (status, b["status"].clone()),
        (202, json!("scheduled")),
        "{b}"
    );
    let depth = provisio_shared::amqp::Publisher::new(
        &env.amqp_url,
        env.topology(),
        std::time::Duration::from_secs(5),
    )
    .queue_depth(
        &env.topology()
            .lane_queue(provisio_shared::domain::Priority::Normal),
    )
    .await?;
    assert_eq!(depth, 0, "nothing is in the broker before it is due");
    let pg = env.pg().await?;
    let due: chrono::DateTime<chrono::Utc> = pg
        .query_one(
            "UPDATE requests SET not_before = now() WHERE id = 's-1' RETURNING not_before",
            &[],
        )
        .await?
        .get(0);
    let out = outcomes.wait_for("s-1").await?;
    assert_eq!(out["status"], "succeeded");
    let started: chrono::DateTime<chrono::Utc> = pg
        .query_one("SELECT started_at FROM requests WHERE id = 's-1'", &[])
        .await?
        .get(0);
    assert!(started >= due, "it did not run before `not_before`");

    // Far in the future: cancel it; cancelling twice is a conflict.
    let mut later = request("demo", "hello", json!({"name": "Never"}));
    later["id"] = json!("s-2");
    later["not_before"] = json!("2999-01-01T00:00:00Z");
    assert_eq!(env.submit(&qm, &later).await?.0, 202);
    let del = |id: &str| {
        env.http
            .delete(format!("{}/v1/requests/{id}", qm.url))
            .bearer_auth(&env.admin_key)
            .send()
    };
    let r = del("s-2").await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await?["status"], "cancelled");
    assert_eq!(del("s-2").await?.status().as_u16(), 409);
    assert_eq!(
        del("s-1").await?.status().as_u16(),
        409,
        "a finished request cannot be cancelled"
    );
    // A scheduled request may carry credentials: they wait in PostgreSQL sealed.
    let mut with_creds = later.clone();
    with_creds["id"] = json!("s-3");
    with_creds["credentials"] = json!({"k": "clear-value-s3"});
    assert_eq!(env.submit(&qm, &with_creds).await?.0, 202);
    let stored: Value = env
        .pg()
        .await?
        .query_one("SELECT envelope FROM requests WHERE id = 's-3'", &[])
        .await?
        .get(0);
    assert_eq!(
        stored["credentials"]["sealed"], "chacha20poly1305",
        "{stored}"
    );
    assert!(!stored.to_string().contains("clear-value-s3"), "{stored}");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn request_level_retries_run_failed_requests_again_then_park_them() -> R {
    let env = TestEnv::new("retry").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let ns = "namespace: flaky\nprocedures:\n  twice:\n    access: public\n    steps:\n      - call: test.fail_n_times\n        input: '{key: .request.id, n: 2}'\n    output: '.request.attempt'\n  never:\n    access: public\n    steps:\n      - call: test.fail\n";
    assert_eq!(env.apply(&qm, "flaky", ns).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    // Follows the outcomes of `id` until a final one.
    async fn settle(outcomes: &mut provisio_tests::Outcomes, id: &str) -> anyhow::Result<Value> {
        loop {
            let o = outcomes.wait_for(id).await?;
            if !matches!(o["status"].as_str(), Some("scheduled")) {
                return Ok(o);
            }
        }
    }
    let mut body = request("flaky", "twice", json!({}));
    body["id"] = json!("r-twice");
    body["retry"] = json!({"count": 3, "interval_ms": 100});
    assert_eq!(env.submit(&qm, &body).await?.0, 202);
    let out = settle(&mut outcomes, "r-twice").await?;
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(out["output"], 3, "two failures, then the third attempt");
    // Each retry's opening, written with its first call, was refused (not the request's first
    // attempt) and the attempt opened the ordinary way: its `.request.attempt` is right.
    let metrics = env
        .http
        .get(format!("{}/metrics", engine.url))
        .send()
        .await?
        .text()
        .await?;
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("provisio_first_call_openings_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        refused >= 2.0,
        "two retries, two refused openings:\n{metrics}"
    );

    let mut body = request("flaky", "never", json!({}));
    body["id"] = json!("r-never");
    body["retry"] = json!({"count": 1, "interval_ms": 50, "on_exhausted": "park"});
    assert_eq!(env.submit(&qm, &body).await?.0, 202);
    let out = settle(&mut outcomes, "r-never").await?;
    assert_eq!(out["status"], "parked", "{out}");
    let (_, rec) = env.get_request(&qm, "r-never").await?;
    assert_eq!(rec["attempts"], 2);
    let r = env
        .http
        .delete(format!("{}/v1/requests/r-never", qm.url))
        .bearer_auth(&env.admin_key)
        .send()
        .await?;
    assert_eq!(
        r.status().as_u16(),
        200,
        "a parked request can be cancelled"
    );
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}
