//! End-to-end: auditor leadership. Of two auditors on one database exactly one recovers and
//! sweeps; when it is killed the other takes over within 10 s; a leader whose lock session
//! is terminated steps down at once and leads again on a new session.

use std::time::{Duration, Instant};

use provisio_tests::{Proc, TestEnv, request};
use serde_json::json;

const NS: &str = r"
namespace: lead
procedures:
  echo:
    access: public
    steps: [{call: test.echo}]
";

const LEADER: &str = "provisio_auditor_leader";
const SWEPT: &str = "provisio_audit_rows_swept_total";
const STEP_DOWNS: &str = "provisio_auditor_step_downs_total";
/// The auditors' own configuration is the default, but for sweeping at once.
const AUDITOR_ENV: &[(&str, &str)] = &[("PROVISIO_AUDITOR__SWEEP_MIN_AGE_SECONDS", "0")];

async fn auditor(env: &TestEnv) -> anyhow::Result<Proc> {
    env.spawn("worker", &["--role", "auditor"], AUDITOR_ENV)
        .await
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

/// Whether `p` counts swept rows within 10 s. The sweep adds its count after its last
/// statement (the expiry pass), a moment after the log is seen empty.
async fn swept_some(env: &TestEnv, p: &Proc) -> anyhow::Result<bool> {
    until(Duration::from_secs(10), async || {
        Ok(env.metric(p, SWEPT).await?.unwrap_or_default() > 0.0)
    })
    .await
}

async fn log_is_empty(pg: &tokio_postgres::Client) -> anyhow::Result<bool> {
    let n: i64 = pg
        .query_one("SELECT count(*) FROM transactions", &[])
        .await?
        .get(0);
    Ok(n == 0)
}

/// Runs `n` requests to their outcome.
async fn run_requests(env: &TestEnv, qm: &Proc, n: usize) -> anyhow::Result<()> {
    let mut outcomes = env.outcomes().await?;
    for _ in 0..n {
        let (status, body) = env.submit(qm, &request("lead", "echo", json!({}))).await?;
        assert_eq!(status, 202, "{body}");
        outcomes
            .wait_for(body["id"].as_str().unwrap_or_default())
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn one_auditor_sweeps_and_a_standby_takes_over_within_10_s_of_its_death() -> anyhow::Result<()>
{
    let env = TestEnv::new("auditor-takeover").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    assert_eq!(env.apply(&qm, "lead", NS).await?.0, 201);
    let first = auditor(&env).await?;
    assert!(
        until(Duration::from_secs(30), async || Ok(env
            .metric(&first, LEADER)
            .await?
            == Some(1.0)))
        .await?,
        "the first auditor leads"
    );
    let second = auditor(&env).await?;
    let ready = format!("{}/readyz", second.url);
    assert!(
        until(Duration::from_secs(30), async || Ok(env
            .http
            .get(&ready)
            .send()
            .await?
            .status()
            .is_success()))
        .await?,
        "a standby is ready"
    );

    run_requests(&env, &qm, 3).await?;
    let pg = env.pg().await?;
    assert!(
        until(Duration::from_secs(30), async || log_is_empty(&pg).await).await?,
        "the log is swept"
    );
    assert_eq!(env.metric(&first, LEADER).await?, Some(1.0));
    assert_eq!(env.metric(&second, LEADER).await?, Some(0.0));
    assert!(swept_some(&env, &first).await?, "the leader swept");
    assert_eq!(
        env.metric(&second, SWEPT).await?,
        Some(0.0),
        "the standby swept nothing"
    );

    // kill -9: no shutdown path runs; PostgreSQL ends the session and frees the lock.
    let killed_at = Instant::now();
    first.kill().await;
    assert!(
        until(Duration::from_secs(10), async || Ok(env
            .metric(&second, LEADER)
            .await?
            == Some(1.0)))
        .await?,
        "the standby leads within 10 s of the leader's death"
    );
    eprintln!("takeover after {:?}", killed_at.elapsed());
    run_requests(&env, &qm, 2).await?;
    assert!(
        until(Duration::from_secs(10), async || log_is_empty(&pg).await).await?,
        "the new leader sweeps within 10 s"
    );
    assert!(swept_some(&env, &second).await?, "the new leader swept");
    drop((qm, engine, second));
    env.cleanup().await;
    Ok(())
}

/// The session holding the leader lock in this test's database, if any.
async fn lock_holder(pg: &tokio_postgres::Client) -> anyhow::Result<Option<i32>> {
    Ok(pg
        .query_opt(
            "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND a.application_name = 'provisio-auditor-lock'",
            &[],
        )
        .await?
        .map(|r| r.get(0)))
}

#[tokio::test]
async fn a_leader_whose_lock_session_is_terminated_steps_down_and_leads_again() -> anyhow::Result<()>
{
    let env = TestEnv::new("auditor-terminated").await?;
    let a = auditor(&env).await?;
    let pg = env.pg().await?;
    assert!(
        until(Duration::from_secs(30), async || Ok(env
            .metric(&a, LEADER)
            .await?
            == Some(1.0)))
        .await?,
        "the auditor leads"
    );
    let old = lock_holder(&pg)
        .await?
        .expect("the lock session holds the lock");
    assert_eq!(env.metric(&a, STEP_DOWNS).await?, Some(0.0));

    pg.execute("SELECT pg_terminate_backend($1)", &[&old])
        .await?;
    assert!(
        until(Duration::from_secs(10), async || Ok(env
            .metric(&a, STEP_DOWNS)
            .await?
            == Some(1.0)))
        .await?,
        "the leader noticed the loss and stepped down"
    );
    assert!(
        until(Duration::from_secs(10), async || Ok(env
            .metric(&a, LEADER)
            .await?
            == Some(1.0)
            && lock_holder(&pg).await?.is_some_and(|pid| pid != old)))
        .await?,
        "it leads again, on a new session"
    );
    drop(a);
    env.cleanup().await;
    Ok(())
}
