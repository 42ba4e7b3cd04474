//! End-to-end: an accepted request whose message is dead-lettered becomes `dead`, with the
//! reason in its error, whether RabbitMQ gave up on it (delivery limit) or an engine refused
//! it; the message itself stays in `{prefix}.dead` for operators.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use provisio_shared::amqp::Topology;
use provisio_shared::config::AmqpConfig;
use provisio_shared::domain::Priority;
use provisio_tests::{Proc, TestEnv, request};
use serde_json::{Value, json};

const NS: &str = r"
namespace: dl
procedures:
  echo:
    access: public
    steps: [{call: test.echo}]
";

async fn auditor(env: &TestEnv) -> anyhow::Result<Proc> {
    env.spawn("worker", &["--role", "auditor"], &[]).await
}

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

async fn status_of(env: &TestEnv, qm: &Proc, id: &str) -> anyhow::Result<Value> {
    let (code, body) = env.get_request(qm, id).await?;
    assert_eq!(code, 200, "{body}");
    Ok(body)
}

async fn channel(env: &TestEnv) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(&env.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

async fn depth(ch: &Channel, queue: &str) -> anyhow::Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

#[tokio::test]
async fn a_request_that_reaches_the_delivery_limit_is_dead() -> anyhow::Result<()> {
    let mut env = TestEnv::new("dead-limit").await?;
    // Every process declares the lanes with this limit (queue arguments must agree).
    env.extra_env
        .push(("PROVISIO_AMQP__DELIVERY_LIMIT".into(), "2".into()));
    let topology = Topology::new(&AmqpConfig {
        prefix: env.prefix.clone(),
        delivery_limit: 2,
        ..AmqpConfig::default()
    });
    let (qm, aud) = tokio::try_join!(env.queue_manager(), auditor(&env))?;
    assert_eq!(env.apply(&qm, "dl", NS).await?.0, 201);
    let (status, body) = env
        .submit(&qm, &request("dl", "echo", json!({"n": 1})))
        .await?;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();

    // No engine: the test is the consumer that never settles the message.
    let (_conn, ch) = channel(&env).await?;
    let mut consumer = ch
        .basic_consume(
            topology.lane_queue(Priority::Normal).into(),
            "never-settles".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let deliveries = Arc::new(AtomicUsize::new(0));
    let counted = deliveries.clone();
    let refuser = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let _ = d
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    });
    let mut record = Value::Null;
    let dead = until(Duration::from_mins(1), async || {
        record = status_of(&env, &qm, &id).await?;
        Ok(record["status"] == "dead")
    })
    .await?;
    refuser.abort();
    assert!(
        dead,
        "the request became dead after {} deliveries: {record}",
        deliveries.load(Ordering::Relaxed)
    );
    assert_eq!(record["error"]["code"], "dead_lettered", "{record}");
    assert_eq!(record["error"]["reason"], "delivery_limit", "{record}");
    assert!(record["finished_at"].is_string(), "{record}");
    assert!(deliveries.load(Ordering::Relaxed) > 1, "it was redelivered");
    assert_eq!(
        depth(&ch, &topology.dead_queue()).await?,
        1,
        "the message is kept for operators"
    );
    assert_eq!(
        env.metric(
            &aud,
            "provisio_dead_letters_settled_total{outcome=\"marked_dead\"}"
        )
        .await?,
        Some(1.0)
    );
    drop((qm, aud));
    env.cleanup().await;
    Ok(())
}

async fn publish_dead(
    ch: &Channel,
    topology: &Topology,
    message_id: &str,
    body: &Value,
) -> anyhow::Result<()> {
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
            &serde_json::to_vec(body)?,
            BasicProperties::default()
                .with_message_id(message_id.into())
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await?;
    assert!(confirm.await?.is_ack());
    Ok(())
}

#[tokio::test]
async fn a_request_an_engine_cannot_authenticate_is_dead_and_stray_letters_kill_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new("dead-engine").await?;
    let topology = env.topology();
    let (qm, aud) = tokio::try_join!(env.queue_manager(), auditor(&env))?;
    assert_eq!(env.apply(&qm, "dl", NS).await?.0, 201);
    let (status, body) = env
        .submit(&qm, &request("dl", "echo", json!({"n": 2})))
        .await?;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();

    // Dead letters that are not this request's message: one naming its id with another
    // input, one naming no request at all. Neither may touch it.
    let (_conn, ch) = channel(&env).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let stray = json!({"id": id, "namespace": "dl", "procedure": "echo", "input": {"n": 666}});
    publish_dead(&ch, &topology, &id, &stray).await?;
    publish_dead(&ch, &topology, "no-such-request", &json!({})).await?;
    let settled =
        |outcome: &str| format!("provisio_dead_letters_settled_total{{outcome=\"{outcome}\"}}");
    assert!(
        until(Duration::from_secs(30), async || Ok(env
            .metric(&aud, &settled("mismatch"))
            .await?
            == Some(1.0)
            && env.metric(&aud, &settled("unknown_request")).await?
                == Some(1.0)))
        .await?,
        "both stray letters were read"
    );
    assert_eq!(status_of(&env, &qm, &id).await?["status"], "queued");

    // An engine with another signing key cannot authenticate the queue manager's envelope.
    let engine = env
        .spawn(
            "worker",
            &["--role", "engine"],
            &[("PROVISIO_SIGNING_KEY", "not-the-fleet-key")],
        )
        .await?;
    let mut record = Value::Null;
    assert!(
        until(Duration::from_mins(1), async || {
            record = status_of(&env, &qm, &id).await?;
            Ok(record["status"] == "dead")
        })
        .await?,
        "the request became dead: {record}"
    );
    assert_eq!(record["error"]["code"], "dead_lettered", "{record}");
    assert_eq!(record["error"]["reason"], "unauthenticated", "{record}");
    assert!(
        record["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signature")),
        "{record}"
    );
    assert_eq!(
        depth(&ch, &topology.dead_queue()).await?,
        3,
        "every dead letter is kept for operators"
    );
    drop((qm, aud, engine));
    env.cleanup().await;
    Ok(())
}
