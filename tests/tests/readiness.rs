//! End-to-end: `/readyz` of the queue manager and of an engine goes 503, naming the missing
//! dependency, while either the database or the broker is away, and 200 again when it is back;
//! `provisio_broker_up` follows the broker in both.

use std::time::{Duration, Instant};

use provisio_tests::proxy::Proxy;
use provisio_tests::{Proc, TestEnv, pg_base};

/// Polls `p`'s `/readyz` until it answers `status` (its body), or gives up after a minute.
async fn readyz_becomes(env: &TestEnv, p: &Proc, status: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut last = (0, String::new());
    while Instant::now() < deadline {
        if let Ok(r) = env.http.get(format!("{}/readyz", p.url)).send().await {
            last = (r.status().as_u16(), r.text().await.unwrap_or_default());
            if last.0 == status {
                return Ok(last.1);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{}/readyz stayed at {last:?}, not {status}", p.url)
}

async fn proxy_to(addr: &str) -> anyhow::Result<Proxy> {
    let upstream = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no address for {addr}"))?;
    Proxy::start(upstream).await
}

#[tokio::test]
async fn readiness_follows_the_database_and_the_broker() -> anyhow::Result<()> {
    let mut env = TestEnv::new("readiness").await?;
    // Migrations and start-up go direct; the processes' own connections go through proxies.
    let pg_addr = pg_base()
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    let db = proxy_to(&pg_addr).await?;
    let broker = proxy_to("127.0.0.1:5672").await?;
    env.db_url = env.db_url.replace(&pg_addr, &db.addr.to_string());
    env.amqp_url = format!("amqp://guest:guest@{}/%2f", broker.addr);
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    for p in [&qm, &engine] {
        readyz_becomes(&env, p, 200).await?;
        assert_eq!(env.metric(p, "provisio_broker_up").await?, Some(1.0));
    }

    db.cut().await;
    for p in [&qm, &engine] {
        let body = readyz_becomes(&env, p, 503).await?;
        assert!(body.contains("database"), "{body}");
        assert!(!body.contains("broker"), "{body}");
    }
    db.restore().await?;
    for p in [&qm, &engine] {
        readyz_becomes(&env, p, 200).await?;
    }

    broker.cut().await;
    for p in [&qm, &engine] {
        let body = readyz_becomes(&env, p, 503).await?;
        assert!(body.contains("broker"), "{body}");
        assert_eq!(env.metric(p, "provisio_broker_up").await?, Some(0.0));
    }
    broker.restore().await?;
    for p in [&qm, &engine] {
        readyz_becomes(&env, p, 200).await?;
        assert_eq!(env.metric(p, "provisio_broker_up").await?, Some(1.0));
    }

    drop((qm, engine));
    // Through the proxies' addresses no more: drop the test's database directly.
    env.db_url = env.db_url.replace(&db.addr.to_string(), &pg_addr);
    env.amqp_url = provisio_tests::amqp_url();
    env.cleanup().await;
    Ok(())
}
