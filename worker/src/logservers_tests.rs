use std::sync::OnceLock;

use metrics_exporter_prometheus::PrometheusHandle;

use super::*;
use crate::testing::{Proxy, TempDb, pg_base};

/// The recorder is global and `provisio_txlog_bad_servers` has no label: tests that look
/// at it, or move it, take turns.
static METRICS_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        provisio_shared::telemetry::install_metrics().expect("the only recorder in this binary")
    })
}

/// The value of a gauge, optionally the series of one server.
fn gauge(name: &str, server: Option<&str>) -> Option<f64> {
    let text = recorder().render();
    let series = match server {
        Some(s) => format!("{name}{{server=\"{s}\"}} "),
        None => format!("{name} "),
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

fn settings(timeout_seconds: u64, probe_interval_ms: u64) -> TxLogConfig {
    TxLogConfig {
        pool_size: 4,
        timeout_seconds,
        probe_interval_ms,
        ..TxLogConfig::default()
    }
}

async fn select_one(pool: Pool) -> Result<i32, OpError> {
    let client = pool.get().await?;
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

/// Polls `cond` every 50 ms for at most `within`.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

#[test]
fn server_names_carry_no_password() {
    let cfg = db::pg_config(&Secret::new("postgres://u:s3cret@db1:6000/txlog")).expect("url");
    assert_eq!(server_name(&cfg), "db1:6000/txlog");
    let cfg = db::pg_config(&Secret::new("postgres://u:s3cret@a,b:5433/x")).expect("url");
    assert_eq!(server_name(&cfg), "a:5432,b:5433/x");
}

#[tokio::test]
async fn a_cut_server_goes_bad_after_the_timeout_and_the_probe_brings_it_back() {
    let _turn = METRICS_TURN.lock().await;
    recorder();
    let a = TempDb::empty(1).await;
    let b = TempDb::empty(1).await;
    let upstream = tokio::net::lookup_host(
        pg_base()
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:5432")
            .to_owned(),
    )
    .await
    .expect("PostgreSQL address")
    .next()
    .expect("an address");
    let proxy = Proxy::start(upstream).await;
    let via_proxy = Secret::new(format!("postgres://postgres@{}/{}", proxy.addr, b.name()));
    let servers =
        Arc::new(LogServers::new(&[a.url.clone(), via_proxy], &settings(2, 100)).expect("servers"));
    let (name_a, name_b) = (
        servers.servers()[0].name().to_owned(),
        servers.servers()[1].name().to_owned(),
    );
    assert!(!name_b.contains("postgres@"), "{name_b}");
    let stop = CancellationToken::new();
    let probe = servers.spawn_probe(stop.clone());
    assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(0.0));

    // Both answer; picks alternate.
    for idx in 0..2 {
        assert_eq!(servers.run(idx, select_one).await.expect("answers"), 1);
    }
    let picks: Vec<_> = (0..4).filter_map(|_| servers.pick()).collect();
    assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");

    // A connection held from server a shows in its pool gauge.
    let held = servers.servers()[0].pool().get().await.expect("connection");
    servers.sample_pools();
    assert_eq!(gauge(TXLOG_POOL_IN_USE, Some(&name_a)), Some(1.0));
    drop(held);
    servers.sample_pools();
    assert_eq!(gauge(TXLOG_POOL_IN_USE, Some(&name_a)), Some(0.0));

    // Cut b: a writer on it retries for the timeout, then learns it is bad.
    proxy.cut().await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), servers.run(1, select_one))
        .await
        .expect("the writer gives up within the timeout, not never");
    assert!(
        matches!(outcome, Err(ServerError::Bad { .. })),
        "{outcome:?}"
    );
    assert!(servers.is_bad(1));
    assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(1.0));
    assert_eq!(gauge(TXLOG_SERVER_UP, Some(&name_b)), Some(0.0));
    for _ in 0..6 {
        assert_eq!(servers.pick(), Some(0));
    }
    // Later writers on b are told at once.
    assert!(matches!(
        servers.run(1, select_one).await,
        Err(ServerError::Bad { .. })
    ));
    // The other server is untouched.
    assert_eq!(servers.run(0, select_one).await.expect("a answers"), 1);

    // Restore b: the probe takes it off the list.
    proxy.restore().await;
    assert!(
        eventually(Duration::from_secs(30), || !servers.is_bad(1)).await,
        "the probe brought b back"
    );
    assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(0.0));
    assert_eq!(gauge(TXLOG_SERVER_UP, Some(&name_b)), Some(1.0));
    assert_eq!(servers.run(1, select_one).await.expect("b answers"), 1);
    let picks: Vec<_> = (0..4).filter_map(|_| servers.pick()).collect();
    assert!(picks.contains(&1), "{picks:?}");

    stop.cancel();
    probe.await.expect("probe task ends");
}

#[tokio::test]
async fn a_streak_shorter_than_the_timeout_is_forgiven_and_a_longer_one_is_not() {
    let _turn = METRICS_TURN.lock().await;
    recorder();
    // Never connected to: health is driven by reports alone.
    let urls = [
        Secret::new("postgres://postgres@127.0.0.1:1/one"),
        Secret::new("postgres://postgres@127.0.0.1:1/two"),
    ];
    let servers = LogServers::new(&urls, &settings(2, 100)).expect("servers");
    let ago = |secs: u64| {
        Instant::now()
            .checked_sub(Duration::from_secs(secs))
            .expect("the clock is past a few seconds")
    };

    // Failing, not yet bad: still retried, but new transactions prefer the other.
    assert!(!servers.report_err(0, "refused"));
    assert!(!servers.is_bad(0));
    for _ in 0..4 {
        assert_eq!(servers.pick(), Some(1));
    }
    // It answers again: the streak is over, and a new one starts from scratch.
    servers.report_ok(0);
    assert!(!servers.report_err_since(0, ago(1), "refused"));
    servers.report_ok(0);
    let picks: Vec<_> = (0..4).filter_map(|_| servers.pick()).collect();
    assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");

    // Failing since longer than the timeout: listed.
    assert!(!servers.report_err_since(0, ago(1), "refused"));
    assert!(servers.report_err_since(0, ago(3), "refused"));
    assert!(servers.is_bad(0));
    assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(1.0));
    assert_eq!(servers.pick(), Some(1));
    // A writer on a listed server is told at once, without an attempt.
    let mut attempts = 0;
    let r = servers
        .run(0, |_| {
            attempts += 1;
            async { Ok::<_, OpError>(()) }
        })
        .await;
    assert!(
        matches!(r, Err(ServerError::Bad { ref last, .. }) if last == "refused"),
        "{r:?}"
    );
    assert_eq!(attempts, 0);

    // Every server listed: nothing to pick.
    assert!(servers.report_err_since(1, ago(3), "refused"));
    assert_eq!(servers.pick(), None);
    assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(2.0));
    servers.report_ok(0);
    servers.report_ok(1);
    assert_eq!(servers.bad_count(), 0);
    assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(0.0));
}

#[tokio::test]
async fn unavailable_errors_are_retried_and_refusals_are_not() {
    let _turn = METRICS_TURN.lock().await;
    recorder();
    let db = TempDb::empty(1).await;
    let servers =
        LogServers::new(std::slice::from_ref(&db.url), &settings(30, 100)).expect("servers");

    // Two "no connection" failures, then an answer: the writer never sees the failures.
    let mut attempts = 0;
    let r = servers
        .run(0, |pool| {
            attempts += 1;
            let fail = attempts <= 2;
            async move {
                if fail {
                    return Err(OpError::Pool(PoolError::Closed));
                }
                select_one(pool).await
            }
        })
        .await;
    assert_eq!(r.expect("third attempt answers"), 1);
    assert_eq!(attempts, 3);
    assert!(!servers.is_bad(0));
    assert_eq!(servers.pick(), Some(0));

    // A server that answers with an error is healthy: no retry, no streak.
    let mut attempts = 0;
    let r = servers
        .run(0, |pool| {
            attempts += 1;
            async move {
                let client = pool.get().await?;
                Ok(client.query_one("SELECT 1/0", &[]).await?.get::<_, i32>(0))
            }
        })
        .await;
    assert!(matches!(r, Err(ServerError::Rejected { .. })), "{r:?}");
    assert_eq!(attempts, 1);
    assert_eq!(servers.servers()[0].state.load(Ordering::Acquire), HEALTHY);
}
