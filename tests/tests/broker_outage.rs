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

/// Submissions per producer task, and producer tasks.
const PER_PRODUCER: usize = 100;
const PRODUCERS: usize = 4;
/// The broker is cut once this many submissions have been answered.
const CUT_AFTER: usize = 120;
/// How long the broker stays away.
const OUTAGE: Duration = Duration::from_secs(4);

#[tokio::test]
async fn broker_restart_under_load_loses_no_accepted_request() -> anyhow::Result<()> {
    use futures_util::FutureExt;
    let env = TestEnv::new("outage-load").await?;
    // Cleanup runs whether the body passes, fails or panics.
    let result = std::panic::AssertUnwindSafe(restart_under_load(&env))
        .catch_unwind()
        .await;
    env.cleanup().await;
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn restart_under_load(env: &TestEnv) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    let upstream = tokio::net::lookup_host("127.0.0.1:5672")
        .await?
        .next()
        .expect("address");
    let proxy = Proxy::start(upstream).await?;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let through_proxy = [("PROVISIO_AMQP_URL", via_proxy.as_str())];
    let qm = env.spawn("queue-manager", &[], &through_proxy).await?;
    let engines = [
        env.spawn("worker", &["--role", "engine"], &through_proxy)
            .await?,
        env.spawn("worker", &["--role", "engine"], &through_proxy)
            .await?,
    ];
    let (status, b) = env.apply(&qm, "demo", &demo_namespace()).await?;
    assert!(status < 300, "{status} {b}");

    // 0: before the cut, 1: broker away, 2: restored.
    let phase = AtomicU8::new(0);
    let answered = AtomicUsize::new(0);
    // id -> (HTTP status or 0 for a transport error, phase when answered, detail)
    let results: Mutex<BTreeMap<String, (u16, u8, String)>> = Mutex::new(BTreeMap::new());

    let producer = |p: usize| {
        let (phase, answered, results, qm) = (&phase, &answered, &results, &qm);
        async move {
            for i in 0..PER_PRODUCER {
                let id = format!("load-{p}-{i:03}");
                let mut body = request("demo", "hello", json!({"name": format!("N{p}x{i}")}));
                body["id"] = json!(id);
                let (status, detail) = match env.submit(qm, &body).await {
                    Ok((s, b)) => (s, b.to_string()),
                    Err(e) => (0, e.to_string()),
                };
                let when = phase.load(Ordering::SeqCst);
                results
                    .lock()
                    .expect("results")
                    .insert(id, (status, when, detail));
                answered.fetch_add(1, Ordering::SeqCst);
                if status == 503 {
                    // What a well-behaved producer does with a 503: back off a little.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let controller = async {
        let deadline = tokio::time::Instant::now() + Duration::from_mins(2);
        while answered.load(Ordering::SeqCst) < CUT_AFTER {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the load never reached {CUT_AFTER} answers"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.cut().await;
        phase.store(1, Ordering::SeqCst);
        eprintln!(
            "broker cut after {} answers",
            answered.load(Ordering::SeqCst)
        );
        tokio::time::sleep(OUTAGE).await;
        proxy.restore().await?;
        phase.store(2, Ordering::SeqCst);
        eprintln!(
            "broker restored after {} answers",
            answered.load(Ordering::SeqCst)
        );
        anyhow::Ok(())
    };
    let (_, c) = tokio::join!(
        futures_util::future::join_all((0..PRODUCERS).map(producer)),
        controller
    );
    c?;
    let results = results.into_inner().expect("results");

    let accepted: Vec<String> = results
        .iter()
        .filter(|(_, (s, _, _))| (200..300).contains(s))
        .map(|(id, _)| id.clone())
        .collect();
    let refused: Vec<String> = results
        .iter()
        .filter(|(_, (s, _, _))| *s == 503)
        .map(|(id, _)| id.clone())
        .collect();
    let per_phase = |want: u8, accepted: bool| {
        results
            .values()
            .filter(|(s, p, _)| *p == want && ((200..300).contains(s) == accepted))
            .count()
    };
    eprintln!(
        "{} submissions: {} accepted (2xx), {} refused (503); accepted/refused before the cut {}/{}, \
         during {}/{}, after {}/{}",
        results.len(),
        accepted.len(),
        refused.len(),
        per_phase(0, true),
        per_phase(0, false),
        per_phase(1, true),
        per_phase(1, false),
        per_phase(2, true),
        per_phase(2, false),
    );
    let other: Vec<_> = results
        .iter()
        .filter(|(_, (s, _, _))| !(200..300).contains(s) && *s != 503)
        .collect();
    assert!(
        other.is_empty(),
        "every submission is either accepted or refused with 503: {other:?}"
    );
    assert!(!refused.is_empty(), "the outage was seen by producers");
    assert!(
        per_phase(2, true) > 0,
        "requests were accepted again after the restore"
    );

    // Every accepted request succeeds, and nothing stays queued or running.
    let pg = env.pg().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_mins(3);
    loop {
        let rows = pg.query("SELECT id, status FROM requests", &[]).await?;
        let status: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let not_done: Vec<(&String, Option<&String>)> = accepted
            .iter()
            .map(|id| (id, status.get(id)))
            .filter(|(_, s)| s.map(String::as_str) != Some("succeeded"))
            .collect();
        let unfinished: Vec<(&String, &String)> = status
            .iter()
            .filter(|(_, s)| matches!(s.as_str(), "queued" | "running"))
            .collect();
        if not_done.is_empty() && unfinished.is_empty() {
            eprintln!("all {} accepted requests succeeded", accepted.len());
            // A 503 means nothing was accepted: no refused request ever runs (a publish cut
            // off before its confirm is accepted and republished, not refused).
            let ran_anyway: Vec<&String> = refused
                .iter()
                .filter(|id| status.contains_key(*id))
                .collect();
            assert!(
                ran_anyway.is_empty(),
                "refused with 503, yet ran: {ran_anyway:?}"
            );
            assert_eq!(status.len(), accepted.len(), "only accepted requests exist");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not finished within 3 minutes: accepted but not succeeded {not_done:?}; \
             queued/running {unfinished:?}; engine logs: {:?}",
            engines
                .iter()
                .map(|e| e.log.display().to_string())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(engines);
    drop(qm);
    proxy.cut().await;
    Ok(())
}
