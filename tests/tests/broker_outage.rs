//! End-to-end: the queue manager answers 503 while the broker is away, accepts nothing
//! half-way, and recovers on its own when the broker is back.

use std::time::Duration;

use provisio_tests::proxy::Proxy;
use provisio_tests::{TestEnv, demo_namespace, request};
use serde_json::json;

#[tokio::test]
async fn broker_outage_gives_503_and_recovers_without_restart() -> anyhow::Result<()> {
    let env = TestEnv::new("outage").await?;
    let upstream = tokio::net::lookup_host("127.0.0.1:5672")
        .await?
        .next()
        .expect("address");
    let proxy = Proxy::start(upstream).await?;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let qm = env
        .spawn("queue-manager", &[], &[("PROVISIO_AMQP_URL", &via_proxy)])
        .await?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let mut body = request("demo", "hello", json!({"name": "Ed"}));

    body["id"] = json!("before");
    let (status, _) = env.submit(&qm, &body).await?;
    assert_eq!(status, 202);

    proxy.cut().await;
    // The answer must come within 5 seconds: the client gives up after that.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    body["id"] = json!("during");
    let r = quick
        .post(format!("{}/v1/requests", qm.url))
        .bearer_auth(&env.admin_key)
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 503);
    let err: serde_json::Value = r.json().await?;
    assert_eq!(err["error"]["code"], "unavailable");
    // Nothing was half-accepted.
    let pg = env.pg().await?;
    let n: i64 = pg
        .query_one("SELECT count(*) FROM requests WHERE id = 'during'", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    let ready = quick.get(format!("{}/readyz", qm.url)).send().await?;
    assert_eq!(
        ready.status().as_u16(),
        503,
        "readiness reflects the outage"
    );

    proxy.restore().await?;
    // Wait for the queue manager to notice (its readiness probe reconnects), bounded.
    let mut ready = false;
    for _ in 0..100 {
        if quick
            .get(format!("{}/readyz", qm.url))
            .send()
            .await?
            .status()
            .is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "queue manager reconnected");
    let (status, b) = env.submit(&qm, &body).await?;
    assert_eq!(
        status, 202,
        "the same id is accepted once the broker is back: {b}"
    );

    // Both accepted requests are really in the broker.
    let depth = provisio_shared::amqp::Publisher::new(
        &env.amqp_url,
        env.topology(),
        Duration::from_secs(5),
    )
    .queue_depth(
        &env.topology()
            .lane_queue(provisio_shared::domain::Priority::Normal),
    )
    .await?;
    assert_eq!(depth, 2);
    drop(qm);
    proxy.cut().await;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn broker_cut_under_load_loses_no_accepted_request() -> anyhow::Result<()> {
    use futures_util::FutureExt;
    let env = TestEnv::new("outage-load").await?;
    // Cleanup runs whether the body passes, fails or panics.
    let result = std::panic::AssertUnwindSafe(async {
        let upstream = tokio::net::lookup_host("127.0.0.1:5672")
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("no broker address"))?;
        let proxy = Proxy::start(upstream).await?;
        let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
        let r = provisio_tests::load::outage_under_load(
            &env,
            &via_proxy,
            || async {
                proxy.cut().await;
                Ok(())
            },
            || proxy.restore(),
        )
        .await;
        proxy.cut().await;
        r
    })
    .catch_unwind()
    .await;
    env.cleanup().await;
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
