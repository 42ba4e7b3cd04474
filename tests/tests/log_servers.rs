//! End-to-end: two transaction-log servers. Transactions are spread over both; one is cut off
//! under load (a TCP proxy in front of it drops every connection and refuses new ones): after
//! the Tran Log Timeout it is on the bad-server list, its running transactions are rolled back
//! and re-routed, traffic goes on on the other server, and nothing is lost or stuck; when it
//! answers again it is taken off the list and used again, and recovery settles what it held.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use provisio_shared::config::Secret;
use provisio_tests::proxy::Proxy;
use provisio_tests::{Proc, TestEnv, eventually, pg_base, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

const NS: &str = r"
namespace: chaos
procedures:
  work:
    access: public
    transaction: compensating
    steps:
      - {id: a, call: test.echo, input: '{n: 1}'}
      - {id: b, call: test.sleep, input: '{ms: (.input.ms // 0)}'}
      - {id: c, call: test.echo, input: '{n: 3}'}
    output: '{done: true}'
";

async fn count(c: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(sql, &[]).await?.get(0))
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Submits `n` requests with ids `{tag}-{i}`; returns the accepted ids.
async fn submit_many(
    env: &TestEnv,
    qm: &Proc,
    tag: &str,
    n: usize,
    ms: u64,
) -> anyhow::Result<Vec<String>> {
    let bodies: Vec<Value> = (0..n)
        .map(|i| {
            let mut b = request("chaos", "work", json!({"ms": ms}));
            b["id"] = json!(format!("{tag}-{i}"));
            b
        })
        .collect();
    let mut results =
        futures_util::stream::iter(bodies.iter().map(|b| env.submit(qm, b))).buffer_unordered(16);
    let mut accepted = Vec::new();
    while let Some(r) = results.next().await {
        let (status, body) = r?;
        anyhow::ensure!((200..300).contains(&status), "refused: {status} {body}");
        accepted.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    Ok(accepted)
}

#[expect(
    clippy::too_many_lines,
    reason = "one outage story on the same fleet: both servers used, one stops, traffic moves, it returns, and every request is accounted for at the end"
)]
#[tokio::test]
async fn a_log_server_that_stops_answering_goes_on_the_bad_list_and_nothing_is_lost() -> R {
    let mut env = TestEnv::new("logservers").await?;
    let suffix = env.prefix.clone();
    let log1 = format!("{}/pv_{suffix}_log1", pg_base());
    let log2_direct = format!("{}/pv_{suffix}_log2", pg_base());
    for url in [&log1, &log2_direct] {
        provisio_shared::db::create_database_if_missing(&Secret::new(url.clone())).await?;
    }
    let upstream = tokio::net::lookup_host(
        pg_base()
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:5432")
            .to_owned(),
    )
    .await?
    .next()
    .ok_or_else(|| anyhow::anyhow!("no PostgreSQL address"))?;
    let proxy = Proxy::start(upstream).await?;
    let user = pg_base()
        .strip_prefix("postgres://")
        .and_then(|r| r.split('@').next())
        .unwrap_or("postgres")
        .to_owned();
    let log2 = format!("postgres://{user}@{}/pv_{suffix}_log2", proxy.addr);
    env.extra_env.extend([
        ("PROVISIO_TXLOG__SERVERS".into(), format!("{log1},{log2}")),
        ("PROVISIO_TXLOG__TIMEOUT_SECONDS".into(), "3".into()),
        ("PROVISIO_TXLOG__PROBE_INTERVAL_MS".into(), "300".into()),
        ("PROVISIO_ENGINE__LEASE_SECONDS".into(), "2".into()),
        ("PROVISIO_ENGINE__PREFETCH".into(), "8".into()),
    ]);
    let qm = env.queue_manager().await?;
    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[
                ("PROVISIO_AUDITOR__INTERVAL_MS", "200"),
                ("PROVISIO_AUDITOR__SWEEP_MIN_AGE_SECONDS", "100000"),
            ],
        )
        .await?;
    let engines = [env.engine().await?, env.engine().await?];
    env.apply(&qm, "chaos", NS).await?;
    let pg = env.pg().await?;
    let (db1, db2) = (connect(&log1).await?, connect(&log2_direct).await?);
    let succeeded = || async {
        Ok::<i64, anyhow::Error>(
            pg.query_one(
                "SELECT count(*) FROM requests WHERE status = 'succeeded'",
                &[],
            )
            .await?
            .get(0),
        )
    };

    // Both servers take transactions.
    let mut all = submit_many(&env, &qm, "before", 60, 0).await?;
    eventually(Duration::from_mins(1), "the first requests", || async {
        Ok((succeeded().await? >= 60).then_some(()))
    })
    .await?;
    let on = |c| count(c, "SELECT count(*) FROM transactions");
    let (a, b) = (on(&db1).await?, on(&db2).await?);
    assert!(a > 0 && b > 0, "spread over both servers: {a} and {b}");

    // Under load, server 2 stops answering.
    let load = submit_many(&env, &qm, "during", 200, 150).await?;
    all.extend(load);
    eventually(
        Duration::from_mins(1),
        "some of the load to run",
        || async { Ok((succeeded().await? >= 80).then_some(())) },
    )
    .await?;
    proxy.cut().await;
    for e in &engines {
        eventually(
            Duration::from_secs(30),
            "server 2 on the bad list",
            || async {
                Ok((env.metric(e, "provisio_txlog_bad_servers").await? == Some(1.0)).then_some(()))
            },
        )
        .await?;
    }
    // Traffic goes on, on server 1: every accepted request succeeds.
    let more = submit_many(&env, &qm, "cut", 40, 0).await?;
    all.extend(more);
    let total = all.len() as i64;
    eventually(
        Duration::from_mins(3),
        "every request while server 2 is away",
        || async { Ok((succeeded().await? >= total).then_some(())) },
    )
    .await?;

    // Server 2 answers again: off the list, used again, and what it held is settled.
    proxy.restore().await?;
    for e in &engines {
        eventually(
            Duration::from_secs(30),
            "server 2 off the bad list",
            || async {
                Ok((env.metric(e, "provisio_txlog_bad_servers").await? == Some(0.0)).then_some(()))
            },
        )
        .await?;
    }
    let before_after = on(&db2).await?;
    let after = submit_many(&env, &qm, "after", 60, 0).await?;
    all.extend(after);
    let total = all.len() as i64;
    eventually(
        Duration::from_mins(1),
        "the requests after the return",
        || async { Ok((succeeded().await? >= total).then_some(())) },
    )
    .await?;
    assert!(
        on(&db2).await? > before_after,
        "server 2 is used again after it returns"
    );
    eventually(
        Duration::from_mins(1),
        "server 2's unfinished transactions to be settled",
        || async {
            Ok((count(
                &db2,
                "SELECT count(*) FROM transactions WHERE finished_at IS NULL",
            )
            .await?
                == 0)
                .then_some(()))
        },
    )
    .await?;

    // Every request: succeeded, exactly one committed attempt over both servers, on the server
    // its request row names.
    let rows = pg
        .query("SELECT status, count(*) FROM requests GROUP BY status", &[])
        .await?;
    let by_status: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        by_status.get("succeeded").copied(),
        Some(total),
        "{by_status:?}"
    );
    let mut committed: HashMap<String, usize> = HashMap::new();
    let mut statuses: HashMap<String, i64> = HashMap::new();
    for c in [&db1, &db2] {
        for r in c
            .query("SELECT request_id, status FROM transactions", &[])
            .await?
        {
            let (id, status): (String, String) = (r.get(0), r.get(1));
            if status == "committed" {
                *committed.entry(id).or_default() += 1;
            }
            *statuses.entry(status).or_default() += 1;
        }
    }
    let wrong: Vec<_> = all
        .iter()
        .filter(|id| committed.get(*id).copied() != Some(1))
        .collect();
    println!(
        "log servers: {total} requests; transactions by status over both servers {statuses:?}; server 1 {} and server 2 {}",
        on(&db1).await?,
        on(&db2).await?
    );
    assert!(
        wrong.is_empty(),
        "not exactly one committed attempt: {wrong:?}"
    );
    drop((qm, auditor, engines, db1, db2));
    env.cleanup().await;
    for url in [log1, log2_direct] {
        let _ = provisio_shared::db::drop_database(&Secret::new(url)).await;
    }
    Ok(())
}
