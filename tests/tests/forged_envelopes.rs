//! End-to-end: envelopes published straight to RabbitMQ that the queue manager did not sign —
//! unsigned, with a made-up signature, signed with another key, or altered after signing — are
//! dead-lettered `unauthenticated` and never executed, even when they claim to come from an
//! admin; the engine goes on with honest requests.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use provisio_shared::amqp::{header_str, long_str};
use provisio_shared::domain::Envelope;
use provisio_shared::signing::{SIGNATURE_HEADER, sign};
use provisio_tests::{TestEnv, demo_namespace, eventually, request};
use serde_json::json;

/// An envelope as the queue manager would write it, claiming to come from an admin.
fn claims_admin(id: &str) -> Vec<u8> {
    json!({
        "id": id,
        "namespace": "demo",
        "procedure": "hello",
        "input": {"name": "mallory"},
        "priority": "normal",
        "kind": "queued",
        "principal": {"id": uuid::Uuid::new_v4(), "name": "admin", "permissions": ["admin"]},
    })
    .to_string()
    .into_bytes()
}

fn with_signature(id: &str, signature: Option<String>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(s) = signature {
        headers.insert(SIGNATURE_HEADER.into(), long_str(&s));
    }
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// Each refusal is a security event (source `engine`) and a counted denial.
async fn refusals_are_recorded(
    env: &TestEnv,
    pg: &tokio_postgres::Client,
    engine_url: &str,
) -> anyhow::Result<()> {
    let events = eventually(Duration::from_secs(10), "four security events", || async {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM security_events WHERE source = 'engine' \
                 AND reason = 'unauthenticated' AND detail->>'request_id' LIKE 'forged-%'",
                &[],
            )
            .await?
            .get(0);
        Ok((n == 4).then_some(n))
    })
    .await?;
    assert_eq!(events, 4);
    let metrics = env
        .http
        .get(format!("{engine_url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("provisio_denials_total{reason=\"unauthenticated\"} 4")),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn forged_and_unsigned_envelopes_are_dead_lettered_and_never_run() -> anyhow::Result<()> {
    let env = TestEnv::new("forged").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let topo = env.topology();
    let conn =
        lapin::Connection::connect(&env.amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut dead = ch
        .basic_consume(
            topo.dead_queue().into(),
            "forged".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let key = env.signing_key.as_bytes();
    let altered = {
        let mut body = claims_admin("forged-altered");
        let signature = sign(key, &body);
        // Signed as the queue manager would, then changed on the way.
        body.extend_from_slice(b" ");
        (body, Some(signature))
    };
    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        ("forged-unsigned", claims_admin("forged-unsigned"), None),
        (
            "forged-garbage",
            claims_admin("forged-garbage"),
            Some("00ff".repeat(16)),
        ),
        (
            "forged-other-key",
            claims_admin("forged-other-key"),
            Some(sign(
                b"not the signing key",
                &claims_admin("forged-other-key"),
            )),
        ),
        ("forged-altered", altered.0, altered.1),
    ];
    for (id, body, signature) in cases {
        // Well-formed: what stops it is authentication, not parsing.
        assert!(Envelope::parse(&body).is_ok(), "{id} parses");
        ch.basic_publish(
            topo.requests_exchange().into(),
            "normal".into(),
            BasicPublishOptions::default(),
            &body,
            with_signature(id, signature),
        )
        .await?
        .await?;
        let letter = tokio::time::timeout(Duration::from_mins(1), dead.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no dead letter for {id}"))??;
        assert_eq!(
            letter
                .properties
                .message_id()
                .as_ref()
                .map(lapin::types::ShortString::as_str),
            Some(id)
        );
        assert_eq!(
            header_str(&letter.properties, "x-provisio-reason").as_deref(),
            Some("unauthenticated"),
            "{id}"
        );
    }

    // An honest request runs after them: the engine went on, and ran none of the forged ones.
    let mut outcomes = env.outcomes().await?;
    let (_, body) = env
        .submit(&qm, &request("demo", "hello", json!({"name": "Bo"})))
        .await?;
    let outcome = outcomes
        .wait_for(body["id"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(outcome["status"], "succeeded", "{outcome}");
    let pg = env.pg().await?;
    let ran: i64 = pg
        .query_one(
            "SELECT count(*) FROM transactions WHERE request_id LIKE 'forged-%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(ran, 0, "a forged envelope was executed");
    refusals_are_recorded(&env, &pg, &engine.url).await?;
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}
