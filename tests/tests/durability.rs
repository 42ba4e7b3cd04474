//! End-to-end: durable execution when things go wrong. Rollbacks that fail or are interrupted
//! by a crash, an engine that stalls (SIGSTOP) while recovery takes its transaction over,
//! duplicate deliveries, and chaos rounds of `kill -9` under load. Engines die by signals, not
//! by flags; every wait is bounded.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use provisio_shared::domain::Priority;
use provisio_tests::{Proc, TestEnv, eventually, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

const NS: &str = r#"
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
  undo_fails:
    access: public
    transaction: compensating
    steps:
      - {call: test.echo, input: '{n: 1}'}
      - {call: test.echo, input: '{n: 2, fail_rollback: true}'}
      - {call: test.fail, input: '{code: "boom"}'}
  slow_undo:
    access: public
    transaction: compensating
    steps:
      - {call: test.echo, input: '{n: 1}'}
      - {call: test.echo, input: '{n: 2, rollback_sleep_ms: (if .request.attempt == 1 then 600000 else 0 end)}'}
      - {call: test.echo, input: '{n: 3}'}
      - {call: test.fail, input: '{code: "boom"}'}
"#;

/// The test provider's record of one request: (attempt, path, kind) in order.
async fn calls(env: &TestEnv, id: &str) -> anyhow::Result<Vec<(i32, String, String)>> {
    let pg = env.pg().await?;
    Ok(pg
        .query(
            "SELECT t.attempt, c.step_path, c.kind FROM provider_test.calls c \
             JOIN transactions t ON t.id = c.tx_id WHERE t.request_id = $1 ORDER BY c.id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

async fn status_of(env: &TestEnv, id: &str) -> anyhow::Result<String> {
    let pg = env.pg().await?;
    Ok(pg
        .query_one("SELECT status FROM requests WHERE id = $1", &[&id])
        .await?
        .get(0))
}

async fn wait_final(env: &TestEnv, id: &str, limit: Duration) -> anyhow::Result<String> {
    eventually(limit, &format!("request {id} to finish"), || async {
        let s = status_of(env, id).await?;
        Ok(matches!(s.as_str(), "succeeded" | "failed" | "in_doubt" | "dead").then_some(s))
    })
    .await
}

fn signal(p: &Proc, sig: &str) -> anyhow::Result<()> {
    let pid = p.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let ok = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{sig} {pid} failed");
    Ok(())
}

fn owned(v: &[(i32, &str, &str)]) -> Vec<(i32, String, String)> {
    v.iter()
        .map(|(a, p, k)| (*a, (*p).to_owned(), (*k).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_failed_rollback_of_step_2_still_undoes_step_1_and_ends_in_doubt_listing_it() -> R {
    let env = TestEnv::new("undo-fails").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "chaos", NS).await?;
    let (status, body) = env
        .submit(&qm, &request("chaos", "undo_fails", json!({})))
        .await?;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        wait_final(&env, &id, Duration::from_mins(1)).await?,
        "in_doubt"
    );
    // Step 1's rollback failed (five tries, permanent at the first), step 0 was still undone.
    let c = calls(&env, &id).await?;
    assert_eq!(
        c,
        owned(&[
            (1, "0", "execute"),
            (1, "1", "execute"),
            (1, "2", "execute"),
            (1, "1", "rollback"),
            (1, "0", "rollback"),
        ])
    );
    let (_, rec) = env.get_request(&qm, &id).await?;
    assert_eq!(rec["status"], "in_doubt");
    assert_eq!(rec["error"]["code"], "boom", "{rec}");
    let not_undone = rec["error"]["not_undone"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(not_undone.len(), 1, "{rec}");
    assert_eq!(not_undone[0]["path"], "1");
    assert_eq!(not_undone[0]["error"]["code"], "rollback_refused");
    let pg = env.pg().await?;
    let tx: String = pg
        .query_one(
            "SELECT status FROM transactions WHERE request_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    assert_eq!(tx, "in_doubt");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_rollback_resumes_it_without_undoing_anything_twice() -> R {
    let mut env = TestEnv::new("undo-crash").await?;
    env.extra_env
        .push(("PROVISIO_ENGINE__LEASE_SECONDS".into(), "2".into()));
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    env.apply(&qm, "chaos", NS).await?;
    let (_, body) = env
        .submit(&qm, &request("chaos", "slow_undo", json!({})))
        .await?;
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    // Step 2 is undone (logged), then step 1's rollback starts and hangs: kill -9 there.
    eventually(
        Duration::from_mins(1),
        "the slow rollback to start",
        || async {
            let c = calls(&env, &id).await?;
            Ok(c.iter()
                .any(|(_, p, k)| p == "1" && k == "rollback")
                .then_some(()))
        },
    )
    .await?;
    engine.kill().await;
    // A new engine gets the redelivered message, recovers the attempt (resuming its rollback),
    // then runs the request again, which fails again, cleanly.
    let engine = env.engine().await?;
    assert_eq!(
        wait_final(&env, &id, Duration::from_secs(90)).await?,
        "failed"
    );
    let first: Vec<(String, String)> = calls(&env, &id)
        .await?
        .into_iter()
        .filter(|(a, _, _)| *a == 1)
        .map(|(_, p, k)| (p, k))
        .collect();
    let count =
        |path: &str, kind: &str| first.iter().filter(|(p, k)| p == path && k == kind).count();
    assert_eq!(
        count("2", "rollback"),
        1,
        "step 2 not undone twice: {first:?}"
    );
    assert_eq!(
        count("1", "rollback"),
        2,
        "step 1's interrupted rollback was resumed: {first:?}"
    );
    assert_eq!(count("0", "rollback"), 1, "{first:?}");
    let pg = env.pg().await?;
    let rows = pg
        .query(
            "SELECT attempt, status FROM transactions WHERE request_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?;
    let txs: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        txs,
        vec![(1, "rolled_back".to_owned()), (2, "rolled_back".to_owned())]
    );
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_stalled_engine_whose_lease_was_taken_over_cannot_overwrite_the_recovered_outcome() -> R {
    let mut env = TestEnv::new("stale").await?;
    env.extra_env
        .push(("PROVISIO_ENGINE__LEASE_SECONDS".into(), "2".into()));
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[("PROVISIO_AUDITOR__INTERVAL_MS", "200")],
        )
        .await?;
    env.apply(&qm, "chaos", NS).await?;
    let (_, body) = env
        .submit(&qm, &request("chaos", "work", json!({"ms": 4000})))
        .await?;
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    // Pause the engine inside the sleep step; recovery takes the transaction over.
    eventually(
        Duration::from_mins(1),
        "the sleep step to start",
        || async {
            let c = calls(&env, &id).await?;
            Ok(c.iter()
                .any(|(_, p, k)| p == "1" && k == "execute")
                .then_some(()))
        },
    )
    .await?;
    signal(&engine, "STOP")?;
    let pg = env.pg().await?;
    let first_tx: uuid::Uuid = pg
        .query_one(
            "SELECT id FROM transactions WHERE request_id = $1 AND attempt = 1",
            &[&id],
        )
        .await?
        .get(0);
    let recovered = eventually(Duration::from_mins(1), "recovery to finish", || async {
        let row = pg
            .query_one(
                "SELECT status, error FROM transactions WHERE id = $1",
                &[&first_tx],
            )
            .await?;
        let s: String = row.get(0);
        Ok((s == "rolled_back").then(|| row.get::<_, Option<Value>>(1)))
    })
    .await?;
    // Let the stale engine go on: its sleep ends, it tries to log and to go on, and finds the
    // transaction is no longer its own.
    signal(&engine, "CONT")?;
    assert_eq!(
        wait_final(&env, &id, Duration::from_secs(90)).await?,
        "succeeded"
    );
    let row = pg
        .query_one(
            "SELECT status, error, output FROM transactions WHERE id = $1",
            &[&first_tx],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "rolled_back", "not overwritten");
    assert_eq!(row.get::<_, Option<Value>>(1), recovered);
    assert_eq!(row.get::<_, Option<Value>>(2), None);
    // The first attempt never ran step 2; its steps 0 and 1 were undone (1 by recovery from
    // its intent, and again by the stale engine, which alone knew it had completed).
    let first: Vec<(String, String)> = calls(&env, &id)
        .await?
        .into_iter()
        .filter(|(a, _, _)| *a == 1)
        .map(|(_, p, k)| (p, k))
        .collect();
    assert!(
        !first.iter().any(|(p, _)| p == "2"),
        "no step after recovery started: {first:?}"
    );
    for path in ["0", "1"] {
        assert!(
            first.iter().any(|(p, k)| p == path && k == "rollback"),
            "step {path} undone: {first:?}"
        );
    }
    let (_, rec) = env.get_request(&qm, &id).await?;
    assert_eq!(rec["attempts"], 2, "{rec}");
    let metrics = env
        .http
        .get(format!("{}/metrics", engine.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("provisio_fenced_transactions_total") && l.ends_with(" 1")),
        "the engine counted the fenced transaction:\n{metrics}"
    );
    drop((qm, engine, auditor));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_duplicate_delivery_of_a_running_request_is_never_run_concurrently() -> R {
    let env = TestEnv::new("duplicate").await?;
    let qm = env.queue_manager().await?;
    env.apply(&qm, "chaos", NS).await?;
    let (_, body) = env
        .submit(&qm, &request("chaos", "work", json!({"ms": 1500})))
        .await?;
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    // Take the accepted message off its lane and publish two copies of it, as a duplicate
    // publish or a dead-letter replay would: neither copy is flagged `redelivered`.
    let conn =
        lapin::Connection::connect(&env.amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let lane = env.topology().lane_queue(Priority::Normal);
    let msg = eventually(Duration::from_secs(30), "the accepted message", || async {
        Ok(ch
            .basic_get(lane.clone().into(), BasicGetOptions::default())
            .await?)
    })
    .await?;
    for _ in 0..2 {
        ch.basic_publish(
            env.topology().requests_exchange().into(),
            "normal".into(),
            BasicPublishOptions::default(),
            &msg.delivery.data,
            msg.delivery.properties.clone(),
        )
        .await?
        .await?;
    }
    msg.delivery.ack(BasicAckOptions::default()).await?;
    let engine = env.engine().await?;
    assert_eq!(
        wait_final(&env, &id, Duration::from_mins(1)).await?,
        "succeeded"
    );
    // Both copies settle (the second is answered from the record), and one attempt ran.
    eventually(
        Duration::from_mins(1),
        "both copies to be settled",
        || async {
            let q = ch
                .queue_declare(
                    lane.clone().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            Ok((q.message_count() == 0).then_some(()))
        },
    )
    .await?;
    let pg = env.pg().await?;
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM transactions WHERE request_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    assert_eq!(n, 1, "one attempt only");
    let c = calls(&env, &id).await?;
    assert_eq!(
        c,
        owned(&[
            (1, "0", "execute"),
            (1, "1", "execute"),
            (1, "2", "execute")
        ])
    );
    drop((qm, engine, conn));
    env.cleanup().await;
    Ok(())
}

/// Per request: every attempt's effects in the test provider's own table.
#[derive(Default, Debug)]
struct Effects {
    /// (attempt, path) → (executes, rollbacks)
    by_step: HashMap<(i32, String), (usize, usize)>,
}

#[expect(
    clippy::too_many_lines,
    reason = "one chaos scenario: the load, the kill -9 rounds that depend on its progress, and the final accounting of the same requests read best as one story"
)]
#[tokio::test]
async fn chaos_rounds_of_kill_9_under_load_lose_nothing_and_apply_nothing_twice() -> R {
    const REQUESTS: usize = 500;
    const ROUNDS: usize = 10;
    const ENGINES: usize = 3;
    let mut env = TestEnv::new("chaos").await?;
    env.extra_env.extend([
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
                // Keep finished transactions in the log: the check below reads them.
                ("PROVISIO_AUDITOR__SWEEP_MIN_AGE_SECONDS", "100000"),
            ],
        )
        .await?;
    let mut engines = Vec::new();
    for _ in 0..ENGINES {
        engines.push(env.engine().await?);
    }
    env.apply(&qm, "chaos", NS).await?;

    // The load: every request accepted (2xx) must end in exactly one final state.
    let mut accepted = Vec::new();
    let mut refused = 0;
    let bodies: Vec<Value> = (0..REQUESTS)
        .map(|i| {
            let mut b = request("chaos", "work", json!({"ms": 150}));
            b["id"] = json!(format!("chaos-{i}"));
            b
        })
        .collect();
    let mut results =
        futures_util::stream::iter(bodies.iter().map(|b| env.submit(&qm, b))).buffer_unordered(16);
    while let Some(r) = results.next().await {
        let (status, body) = r?;
        if (200..300).contains(&status) {
            accepted.push(body["id"].as_str().unwrap_or_default().to_owned());
        } else {
            refused += 1;
        }
    }
    drop(results);

    // Rounds: each time another slice of the load has finished, kill -9 a random engine and
    // start a new one in its place.
    let pg = env.pg().await?;
    let finished = || async {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM requests WHERE status IN ('succeeded', 'failed', 'in_doubt', 'dead')",
                &[],
            )
            .await?
            .get(0);
        Ok::<_, anyhow::Error>(n as usize)
    };
    let mut kills = 0;
    for round in 1..=ROUNDS {
        let goal = round * accepted.len() / (ROUNDS + 2);
        eventually(Duration::from_mins(2), "progress before a kill", || async {
            Ok((finished().await? >= goal).then_some(()))
        })
        .await?;
        let victim = rand_index(engines.len());
        engines.swap_remove(victim).kill().await;
        kills += 1;
        engines.push(env.engine().await?);
    }
    let total = accepted.len();
    eventually(
        Duration::from_mins(5),
        "every accepted request to finish",
        || async { Ok((finished().await? >= total).then_some(())) },
    )
    .await?;

    // Exactly one final state each; effects applied once or rolled back, never twice.
    let rows = pg
        .query("SELECT status, count(*) FROM requests GROUP BY status", &[])
        .await?;
    let by_status: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let calls = pg
        .query(
            "SELECT t.request_id, t.attempt, t.status, c.step_path, c.kind FROM provider_test.calls c \
             JOIN transactions t ON t.id = c.tx_id",
            &[],
        )
        .await?;
    let mut effects: HashMap<String, Effects> = HashMap::new();
    let mut committed_attempt: HashMap<String, i32> = HashMap::new();
    for r in &calls {
        let (req, attempt, tx_status, path, kind): (String, i32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if tx_status == "committed" {
            committed_attempt.insert(req.clone(), attempt);
        }
        let e = effects
            .entry(req)
            .or_default()
            .by_step
            .entry((attempt, path))
            .or_default();
        if kind == "execute" {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let txs = pg
        .query(
            "SELECT status, count(*) FROM transactions GROUP BY status",
            &[],
        )
        .await?;
    let tx_by_status: HashMap<String, i64> = txs.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut retried = 0;
    let mut problems = Vec::new();
    for id in &accepted {
        let ok_attempt = committed_attempt.get(id).copied();
        let e = effects.remove(id).unwrap_or_default();
        if e.by_step.keys().any(|(a, _)| Some(*a) != ok_attempt) {
            retried += 1;
        }
        for ((attempt, path), (executes, rollbacks)) in &e.by_step {
            let good = if Some(*attempt) == ok_attempt {
                *executes == 1 && *rollbacks == 0
            } else {
                *executes <= 1 && *rollbacks >= 1
            };
            if !good {
                problems.push(format!(
                    "{id} attempt {attempt} step {path}: {executes} executes, {rollbacks} rollbacks"
                ));
            }
        }
        if ok_attempt.is_none() {
            problems.push(format!("{id}: no committed attempt"));
        }
    }
    println!(
        "chaos: {REQUESTS} submitted, {} accepted (2xx), {refused} refused; {kills} engines killed with kill -9; \
         requests by status {by_status:?}; transactions by status {tx_by_status:?}; \
         {retried} requests ran more than one attempt",
        accepted.len()
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        by_status.get("succeeded").copied().unwrap_or(0) as usize,
        accepted.len(),
        "{by_status:?}"
    );
    assert_eq!(
        tx_by_status.get("committed").copied().unwrap_or(0) as usize,
        accepted.len(),
        "one committed attempt per request: {tx_by_status:?}"
    );
    drop((qm, auditor, engines));
    env.cleanup().await;
    Ok(())
}

/// A random index below `n`, from the clock (no need for a generator crate here).
fn rand_index(n: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    nanos % n.max(1)
}
