//! End-to-end: the operator surfaces beyond in-doubt transactions. Dead letters listed
//! (credentials redacted), requeued (one, or in bulk by filter) so that the request runs once
//! under its own id, and discarded; a parked request resumed; `:batch?wait`; resource pools.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use provisio_shared::amqp::Topology;
use provisio_shared::config::AmqpConfig;
use provisio_shared::domain::Priority;
use provisio_tests::{Outcomes, Proc, TestEnv, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

const NS: &str = r"
namespace: dla
procedures:
  echo:
    access: public
    steps: [{call: test.echo}]
";

/// Polls `cond` until it holds or `limit` has passed; whether it held.
async fn until(
    limit: Duration,
    mut cond: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if cond().await? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `req` as admin; (status, JSON body).
async fn call(env: &TestEnv, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
    let r = req.bearer_auth(&env.admin_key).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn letters(env: &TestEnv, qm: &Proc, query: &str) -> anyhow::Result<Vec<Value>> {
    let (status, body) = call(
        env,
        env.http.get(format!("{}/v1/dead-letters{query}", qm.url)),
    )
    .await?;
    anyhow::ensure!(status == 200, "listing dead letters: {status} {body}");
    Ok(body["dead_letters"].as_array().cloned().unwrap_or_default())
}

/// An environment whose lanes dead-letter a message after 2 deliveries, with a queue manager
/// and an auditor (no engine yet).
async fn limited(name: &str) -> anyhow::Result<(TestEnv, Topology, Proc, Proc)> {
    let mut env = TestEnv::new(name).await?;
    env.extra_env
        .push(("PROVISIO_AMQP__DELIVERY_LIMIT".into(), "2".into()));
    let topology = Topology::new(&AmqpConfig {
        prefix: env.prefix.clone(),
        delivery_limit: 2,
        ..AmqpConfig::default()
    });
    let (qm, aud) = tokio::try_join!(
        env.queue_manager(),
        env.spawn("worker", &["--role", "auditor"], &[])
    )?;
    Ok((env, topology, qm, aud))
}

/// Consumes the normal lane without ever settling, until every request of `ids` is dead;
/// the consumer's connection is closed afterwards, so that nothing is held back from the
/// engine started later.
async fn dead_by_delivery_limit(env: &TestEnv, topology: &Topology, qm: &Proc, ids: &[&str]) -> R {
    let conn = Connection::connect(&env.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            topology.lane_queue(Priority::Normal).into(),
            "never-settles".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let refuser = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    });
    let dead = until(Duration::from_mins(1), async || {
        for id in ids {
            if env.get_request(qm, id).await?.1["status"] != "dead" {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await;
    refuser.abort();
    let _ = conn.close(200, "done".into()).await;
    anyhow::ensure!(dead?, "the requests {ids:?} became dead");
    Ok(())
}

/// Polls `id`'s record until it is final (where `env.outcomes()` cannot be used: it declares
/// the lanes with the default delivery limit).
async fn finished(env: &TestEnv, qm: &Proc, id: &str) -> anyhow::Result<Value> {
    let mut rec = Value::Null;
    let done = until(Duration::from_mins(1), async || {
        rec = env.get_request(qm, id).await?.1;
        Ok(matches!(
            rec["status"].as_str(),
            Some("succeeded" | "failed" | "in_doubt" | "dead" | "cancelled")
        ))
    })
    .await?;
    anyhow::ensure!(done, "{id} did not finish: {rec}");
    Ok(rec)
}

/// Follows `id`'s outcomes until a final one (or `parked`).
async fn settle(outcomes: &mut Outcomes, id: &str) -> anyhow::Result<Value> {
    loop {
        let o = outcomes.wait_for(id).await?;
        if !matches!(o["status"].as_str(), Some("scheduled" | "queued")) {
            return Ok(o);
        }
    }
}

/// Both dead letters are listed (the record commits with the request's status), oldest
/// first, the credentials redacted and never stored; the list pages by id. Returns the
/// letters of `dl-secret` and `dl-plain`.
async fn listed_and_redacted(env: &TestEnv, qm: &Proc) -> anyhow::Result<(Value, Value)> {
    let list = letters(env, qm, "").await?;
    assert_eq!(list.len(), 2, "{list:?}");
    let by_request = |id: &str| {
        list.iter()
            .find(|l| l["request_id"] == id)
            .cloned()
            .unwrap_or_default()
    };
    let (secret, plain_letter) = (by_request("dl-secret"), by_request("dl-plain"));
    for l in [&secret, &plain_letter] {
        assert_eq!(l["reason"], "delivery_limit", "{l}");
        assert_eq!(l["settled"], "marked_dead", "{l}");
        assert_eq!(l["status"], "dead", "{l}");
        assert_eq!(l["lane"], "normal", "{l}");
        assert_eq!(l["signed"], true, "{l}");
        assert_eq!(l["request_status"], "dead", "{l}");
        assert!(l["dead_at"].is_string(), "{l}");
    }
    assert_eq!(secret["credentials_redacted"], true, "{secret}");
    assert_eq!(secret["envelope"]["credentials"], "[redacted]", "{secret}");
    assert_eq!(secret["envelope"]["input"], json!({"n": 1}), "{secret}");
    assert_eq!(plain_letter["credentials_redacted"], false);
    assert!(plain_letter["envelope"].get("credentials").is_none());
    let pg = env.pg().await?;
    let in_clear: i64 = pg
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE envelope::text LIKE '%hunter2%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(in_clear, 0, "credentials are never stored");
    // Keyset pagination by id.
    let (_, page) = call(
        env,
        env.http.get(format!("{}/v1/dead-letters?limit=1", qm.url)),
    )
    .await?;
    assert_eq!(page["dead_letters"].as_array().map(Vec::len), Some(1));
    let next = page["next"].as_i64().unwrap_or_default();
    let rest = letters(env, qm, &format!("?limit=1&after={next}")).await?;
    assert_eq!(rest.len(), 1);
    assert!(rest[0]["id"].as_i64() > Some(next));
    Ok((secret, plain_letter))
}

#[tokio::test]
async fn a_dead_letter_is_listed_redacted_requeued_to_run_once_or_discarded() -> R {
    let (env, topology, qm, aud) = limited("dl-api").await?;
    assert_eq!(env.apply(&qm, "dla", NS).await?.0, 201);
    let mut with_secret = request("dla", "echo", json!({"n": 1}));
    with_secret["id"] = json!("dl-secret");
    with_secret["credentials"] = json!({"password": "hunter2"});
    let mut plain = request("dla", "echo", json!({"n": 2}));
    plain["id"] = json!("dl-plain");
    for body in [&with_secret, &plain] {
        let (status, answer) = env.submit(&qm, body).await?;
        assert_eq!(status, 202, "{answer}");
    }
    dead_by_delivery_limit(&env, &topology, &qm, &["dl-secret", "dl-plain"]).await?;

    let (secret, plain_letter) = listed_and_redacted(&env, &qm).await?;
    let pg = env.pg().await?;

    // Requeued: the request runs once, under its own id.
    let engine = env.engine().await?;
    let plain_id = plain_letter["id"].as_i64().unwrap_or_default();
    let requeue = |id: i64| {
        env.http
            .post(format!("{}/v1/dead-letters/{id}:requeue", qm.url))
    };
    let (status, answer) = call(&env, requeue(plain_id)).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["request"]["id"], "dl-plain");
    assert_eq!(answer["dead_letter"]["status"], "requeued", "{answer}");
    let rec = finished(&env, &qm, "dl-plain").await?;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    let row = pg
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status = 'committed') FROM transactions \
             WHERE request_id = 'dl-plain'",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (1, 1),
        "one transaction, committed"
    );
    assert_eq!(
        call(&env, requeue(plain_id)).await?.0,
        409,
        "requeued already"
    );
    let remaining = letters(&env, &qm, "").await?;
    assert_eq!(
        remaining.len(),
        1,
        "requeued letters leave the default list"
    );
    assert_eq!(letters(&env, &qm, "?status=requeued").await?.len(), 1);

    // With credentials: never requeued (they were not stored); discarded instead.
    let secret_id = secret["id"].as_i64().unwrap_or_default();
    let (status, answer) = call(&env, requeue(secret_id)).await?;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("credentials")),
        "{answer}"
    );
    let discard = || {
        env.http
            .delete(format!("{}/v1/dead-letters/{secret_id}", qm.url))
    };
    assert_eq!(call(&env, discard()).await?.0, 200);
    assert_eq!(call(&env, discard()).await?.0, 404, "gone");
    assert_eq!(call(&env, requeue(secret_id)).await?.0, 404);
    assert!(
        letters(&env, &qm, "?status=all")
            .await?
            .iter()
            .all(|l| l["id"] != secret_id)
    );
    assert_eq!(env.get_request(&qm, "dl-secret").await?.1["status"], "dead");
    drop((qm, aud, engine));
    env.cleanup().await;
    Ok(())
}

/// Publishes a message straight to the dead-letter exchange: one no request is behind.
async fn publish_stray(env: &TestEnv, topology: &Topology) -> R {
    let conn = Connection::connect(&env.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-provisio-reason".into(),
        AMQPValue::LongString(LongString::from(b"malformed".to_vec())),
    );
    let confirm = ch
        .basic_publish(
            topology.dead_exchange().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{\"id\": \"nobody\"}",
            BasicProperties::default()
                .with_message_id("nobody".into())
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await?;
    anyhow::ensure!(confirm.await?.is_ack());
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_requeued_in_bulk_by_filter_and_stray_ones_only_deleted() -> R {
    let (env, topology, qm, aud) = limited("dl-bulk").await?;
    assert_eq!(env.apply(&qm, "dla", NS).await?.0, 201);
    assert_eq!(
        env.apply(&qm, "dlb", &NS.replace("namespace: dla", "namespace: dlb"))
            .await?
            .0,
        201
    );
    for (id, ns) in [("a-1", "dla"), ("a-2", "dla"), ("b-1", "dlb")] {
        let mut body = request(ns, "echo", json!({"id": id}));
        body["id"] = json!(id);
        assert_eq!(env.submit(&qm, &body).await?.0, 202);
    }
    dead_by_delivery_limit(&env, &topology, &qm, &["a-1", "a-2", "b-1"]).await?;
    publish_stray(&env, &topology).await?;
    assert!(
        until(Duration::from_secs(30), async || Ok(letters(&env, &qm, "")
            .await?
            .len()
            == 4))
        .await?,
        "three dead requests and the stray letter are recorded"
    );
    let stray = letters(&env, &qm, "?reason=malformed").await?;
    assert_eq!(stray.len(), 1, "{stray:?}");
    assert!(stray[0]["request_id"].is_null(), "{stray:?}");
    assert_eq!(stray[0]["message_id"], "nobody");
    assert_eq!(stray[0]["signed"], false);

    let engine = env.engine().await?;
    let bulk = |filter: Value| {
        env.http
            .post(format!("{}/v1/dead-letters:requeue", qm.url))
            .json(&filter)
    };
    let (status, answer) = call(&env, bulk(json!({"namespace": "dla"}))).await?;
    assert_eq!(status, 200, "{answer}");
    let mut requeued: Vec<&str> = answer["requeued"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    requeued.sort_unstable();
    assert_eq!(requeued, ["a-1", "a-2"], "{answer}");
    assert_eq!(answer["skipped"], json!([]), "{answer}");
    for id in ["a-1", "a-2"] {
        assert_eq!(finished(&env, &qm, id).await?["status"], "succeeded");
    }
    assert_eq!(
        env.get_request(&qm, "b-1").await?.1["status"],
        "dead",
        "outside the filter"
    );

    // Everything left: the request is requeued, the stray letter is skipped with the reason.
    let (status, answer) = call(&env, bulk(json!({}))).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["requeued"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    assert_eq!(answer["requeued"][0]["request_id"], "b-1");
    assert_eq!(
        answer["skipped"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    assert!(
        answer["skipped"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("only be deleted")),
        "{answer}"
    );
    assert_eq!(finished(&env, &qm, "b-1").await?["status"], "succeeded");
    let stray_id = stray[0]["id"].as_i64().unwrap_or_default();
    assert_eq!(
        call(
            &env,
            env.http
                .delete(format!("{}/v1/dead-letters/{stray_id}", qm.url))
        )
        .await?
        .0,
        200
    );
    assert!(letters(&env, &qm, "").await?.is_empty());
    drop((qm, aud, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_parked_request_is_resumed_and_succeeds() -> R {
    let env = TestEnv::new("resume").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let ns = "namespace: flaky\nprocedures:\n  twice:\n    access: public\n    steps:\n      - call: test.fail_n_times\n        input: '{key: .request.id, n: 2}'\n    output: '.request.attempt'\n";
    assert_eq!(env.apply(&qm, "flaky", ns).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    // A `:` in the id: the action is what follows the last one.
    let id = "park:1";
    let mut body = request("flaky", "twice", json!({}));
    body["id"] = json!(id);
    body["retry"] = json!({"count": 1, "interval_ms": 50, "on_exhausted": "park"});
    assert_eq!(env.submit(&qm, &body).await?.0, 202);
    let out = settle(&mut outcomes, id).await?;
    assert_eq!(out["status"], "parked", "{out}");

    let resume = |id: &str| env.http.post(format!("{}/v1/requests/{id}:resume", qm.url));
    let (status, rec) = call(&env, resume(id)).await?;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["id"], id);
    assert!(
        matches!(
            rec["status"].as_str(),
            Some("queued" | "scheduled" | "running" | "succeeded")
        ),
        "{rec}"
    );
    let out = settle(&mut outcomes, id).await?;
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(
        out["output"], 3,
        "two failures, then the resumed third attempt"
    );
    assert_eq!(
        call(&env, resume(id)).await?.0,
        409,
        "only a parked request is resumed"
    );
    assert_eq!(call(&env, resume("nobody")).await?.0, 404);
    let (status, _) = call(
        &env,
        env.http.post(format!("{}/v1/requests/{id}:rewind", qm.url)),
    )
    .await?;
    assert_eq!(status, 404, "no such action");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_batch_with_wait_answers_finished_records() -> R {
    let env = TestEnv::new("batch-wait").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    assert_eq!(env.apply(&qm, "dla", NS).await?.0, 201);
    let items = json!([
        request("dla", "echo", json!({"n": 1})),
        request("dla", "echo", json!({"n": 2})),
        request("nowhere", "echo", json!({})),
    ]);
    let (status, body) = call(
        &env,
        env.http
            .post(format!("{}/v1/requests:batch?wait=30", qm.url))
            .json(&items),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 3, "{body}");
    for r in &results[..2] {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["request_status"], "succeeded", "{r}");
        assert_eq!(r["record"]["status"], "succeeded", "{r}");
        assert_eq!(r["record"]["id"], r["id"], "{r}");
    }
    assert_eq!(results[2]["status"], 404, "{body}");
    // Without `wait`, the batch answers at once.
    let (_, body) = call(
        &env,
        env.http
            .post(format!("{}/v1/requests:batch", qm.url))
            .json(&json!([request("dla", "echo", json!({"n": 3}))])),
    )
    .await?;
    assert_eq!(body["results"][0]["status"], 202, "{body}");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn resource_pools_are_listed_with_their_use_to_admins_only() -> R {
    let mut env = TestEnv::new("pools").await?;
    let config = std::env::temp_dir().join(format!("provisio-{}.toml", env.prefix));
    std::fs::write(
        &config,
        "[[providers.resource.pools]]\nname = \"ips\"\nresources = [{name = \"r1\", capacity = 10}, {name = \"r2\", capacity = 5}]\n\n\
         [[providers.resource.pools]]\nname = \"empty\"\nresources = []\n",
    )?;
    env.extra_env
        .push(("PROVISIO_CONFIG".into(), config.display().to_string()));
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let ns = "namespace: alloc\nprocedures:\n  take:\n    access: public\n    steps:\n      - call: resource.allocate\n        input: '{pool: \"ips\", amount: 3}'\n";
    assert_eq!(env.apply(&qm, "alloc", ns).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env
        .submit(&qm, &request("alloc", "take", json!({})))
        .await?;
    let out = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(out["status"], "succeeded", "{out}");

    let pools_url = format!("{}/v1/resources/pools", qm.url);
    let (status, body) = call(&env, env.http.get(&pools_url)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"pools": [
            {"name": "empty", "strategy": "least_used", "capacity": 0, "used": 0, "free": 0,
             "resources": []},
            {"name": "ips", "strategy": "least_used", "capacity": 15, "used": 3, "free": 12,
             "resources": [
                 {"name": "r1", "capacity": 10, "used": 3, "free": 7, "rank": 0},
                 {"name": "r2", "capacity": 5, "used": 0, "free": 5, "rank": 0},
             ]},
        ]})
    );

    // Not for producers: pools and dead letters are admin surfaces.
    let (_, key) = env.principal(&qm, "producer", &["producers"]).await?;
    for url in [pools_url, format!("{}/v1/dead-letters", qm.url)] {
        let r = env.http.get(&url).bearer_auth(&key).send().await?;
        assert_eq!(r.status().as_u16(), 403, "{url}");
    }
    drop((qm, engine));
    let _ = std::fs::remove_file(&config);
    env.cleanup().await;
    Ok(())
}

/// `provisioctl` against the real routes: dead letters listed, one requeued (it then runs),
/// one deleted; a parked request resumed; pools listed.
#[tokio::test]
async fn provisioctl_drives_dead_letters_resume_and_pools() -> R {
    async fn ctl(env: &TestEnv, qm: &Proc, args: &[&str]) -> anyhow::Result<(i32, Value)> {
        let out = tokio::process::Command::new(provisio_tests::binary("provisioctl"))
            .args(["--url", &qm.url, "--api-key", &env.admin_key, "-o", "json"])
            .args(args)
            .env_remove("PROVISIO_URL")
            .env_remove("PROVISIO_API_KEY")
            .kill_on_drop(true)
            .output()
            .await?;
        let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        Ok((out.status.code().unwrap_or(-1), json))
    }
    let (env, topology, qm, aud) = limited("dla-ctl").await?;
    assert_eq!(env.apply(&qm, "dla", NS).await?.0, 201);
    for id in ["ctl-a", "ctl-b"] {
        let mut body = request("dla", "echo", json!({"who": id}));
        body["id"] = json!(id);
        assert_eq!(env.submit(&qm, &body).await?.0, 202);
    }
    dead_by_delivery_limit(&env, &topology, &qm, &["ctl-a", "ctl-b"]).await?;
    let (code, listed) = ctl(&env, &qm, &["get", "dead-letters"]).await?;
    assert_eq!(code, 0, "{listed}");
    let listed = listed["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let letter = |rid: &str| {
        listed
            .iter()
            .find(|l| l["request_id"] == rid)
            .map(|l| l["id"].to_string())
            .unwrap_or_default()
    };
    let (a, b) = (letter("ctl-a"), letter("ctl-b"));
    assert!(!a.is_empty() && !b.is_empty(), "{listed:?}");
    let (code, out) = ctl(&env, &qm, &["requeue", &a]).await?;
    assert_eq!(code, 0, "{out}");
    let (code, out) = ctl(&env, &qm, &["delete", "dead-letter", &b]).await?;
    assert_eq!(code, 0, "{out}");
    let (code, _) = ctl(&env, &qm, &["delete", "dead-letter", &b]).await?;
    assert_eq!(code, 2, "gone: not found");
    let engine = env.engine().await?;
    assert_eq!(finished(&env, &qm, "ctl-a").await?["status"], "succeeded");
    assert_eq!(env.get_request(&qm, "ctl-b").await?.1["status"], "dead");

    // A parked request, resumed from the command line.
    let ns = "namespace: flaky\nprocedures:\n  twice:\n    access: public\n    steps:\n      - call: test.fail_n_times\n        input: '{key: .request.id, n: 2}'\n";
    assert_eq!(env.apply(&qm, "flaky", ns).await?.0, 201);
    let mut body = request("flaky", "twice", json!({}));
    body["id"] = json!("ctl-park");
    body["retry"] = json!({"count": 1, "interval_ms": 50, "on_exhausted": "park"});
    assert_eq!(env.submit(&qm, &body).await?.0, 202);
    let parked = until(Duration::from_mins(1), async || {
        Ok(env.get_request(&qm, "ctl-park").await?.1["status"] == "parked")
    })
    .await?;
    assert!(parked, "the request parked");
    let (code, out) = ctl(&env, &qm, &["resume", "ctl-park"]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        finished(&env, &qm, "ctl-park").await?["status"],
        "succeeded"
    );

    let (code, pools) = ctl(&env, &qm, &["get", "pools"]).await?;
    assert_eq!(code, 0, "{pools}");
    assert!(pools["pools"].is_array(), "{pools}");
    drop((qm, aud, engine));
    env.cleanup().await;
    Ok(())
}
