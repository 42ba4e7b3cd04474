//! Load under a broker outage, shared by the tests that take the broker away (through a
//! proxy, or by restarting RabbitMQ itself).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::{Proc, TestEnv, demo_namespace, request};

/// Submissions per producer task, and producer tasks.
const PER_PRODUCER: usize = 100;
const PRODUCERS: usize = 4;
/// The broker is cut once this many submissions have been answered.
const CUT_AFTER: usize = 120;
/// Submissions each producer makes after the broker is back.
const AFTER_RESTORE: usize = 10;
/// How long the broker stays away (at least: taking it away may itself take a while).
const OUTAGE: Duration = Duration::from_secs(4);

/// Each submission's answer by request id: HTTP status (0 for a transport error), the phase
/// it was answered in, and the answer's text.
type Answers = BTreeMap<String, (u16, u8, String)>;

/// The load's phases, as the producers see them.
const BEFORE_CUT: u8 = 0;
const BROKER_AWAY: u8 = 1;
const RESTORED: u8 = 2;

/// Runs a load of demo requests against a queue manager and two engines that reach the broker
/// at `amqp_url`; once `CUT_AFTER` submissions are answered, `cut` takes the broker away, and
/// `restore` brings it back `OUTAGE` later. Then every request that got a 2xx must end
/// `succeeded`, every other submission must have got a 503, and no refused request may run.
pub async fn outage_under_load<C, CF, S, SF>(
    env: &TestEnv,
    amqp_url: &str,
    cut: C,
    restore: S,
) -> anyhow::Result<()>
where
    C: FnOnce() -> CF,
    CF: Future<Output = anyhow::Result<()>>,
    S: FnOnce() -> SF,
    SF: Future<Output = anyhow::Result<()>>,
{
    let through_proxy = [("PROVISIO_AMQP_URL", amqp_url)];
    let qm = env.spawn("queue-manager", &[], &through_proxy).await?;
    let engines = [
        env.spawn("worker", &["--role", "engine"], &through_proxy)
            .await?,
        env.spawn("worker", &["--role", "engine"], &through_proxy)
            .await?,
    ];
    let (status, b) = env.apply(&qm, "demo", &demo_namespace()).await?;
    assert!(status < 300, "{status} {b}");

    let phase = AtomicU8::new(BEFORE_CUT);
    let answered = AtomicUsize::new(0);
    let results: Mutex<Answers> = Mutex::new(BTreeMap::new());
    let producers = (0..PRODUCERS).map(|p| produce(env, &qm, p, &phase, &answered, &results));
    let (_, c) = tokio::join!(
        futures_util::future::join_all(producers),
        control(&phase, &answered, cut, restore)
    );
    c?;
    let results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (accepted, refused) = check_answers(&results);
    all_accepted_succeed(env, &accepted, &refused, &engines).await?;
    drop(engines);
    drop(qm);
    Ok(())
}

/// One producer: its share of submissions, and on (bounded) until it has made some after the
/// broker is back, however long the outage lasted.
async fn produce(
    env: &TestEnv,
    qm: &Proc,
    p: usize,
    phase: &AtomicU8,
    answered: &AtomicUsize,
    results: &Mutex<Answers>,
) {
    let mut after_restore = 0;
    for i in 0..PER_PRODUCER * 20 {
        if i >= PER_PRODUCER && after_restore >= AFTER_RESTORE {
            break;
        }
        let id = format!("load-{p}-{i:04}");
        let mut body = request("demo", "hello", json!({"name": format!("N{p}x{i}")}));
        body["id"] = json!(id);
        let (status, detail) = match env.submit(qm, &body).await {
            Ok((s, b)) => (s, b.to_string()),
            Err(e) => (0, e.to_string()),
        };
        let when = phase.load(Ordering::SeqCst);
        if when == RESTORED {
            after_restore += 1;
        }
        // A poisoned lock only means another producer panicked, which fails the
        // test anyway; its map is still whole.
        results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, (status, when, detail));
        answered.fetch_add(1, Ordering::SeqCst);
        if status == 503 {
            // What a well-behaved producer does with a 503: back off a little.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Cuts the broker once `CUT_AFTER` submissions are answered, restores it `OUTAGE` later.
async fn control<C, CF, S, SF>(
    phase: &AtomicU8,
    answered: &AtomicUsize,
    cut: C,
    restore: S,
) -> anyhow::Result<()>
where
    C: FnOnce() -> CF,
    CF: Future<Output = anyhow::Result<()>>,
    S: FnOnce() -> SF,
    SF: Future<Output = anyhow::Result<()>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_mins(2);
    while answered.load(Ordering::SeqCst) < CUT_AFTER {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the load never reached {CUT_AFTER} answers"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cut().await?;
    phase.store(BROKER_AWAY, Ordering::SeqCst);
    eprintln!(
        "broker cut after {} answers",
        answered.load(Ordering::SeqCst)
    );
    tokio::time::sleep(OUTAGE).await;
    restore().await?;
    phase.store(RESTORED, Ordering::SeqCst);
    eprintln!(
        "broker restored after {} answers",
        answered.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Checks that every submission was accepted or refused with 503, that the outage was seen
/// and that requests were accepted again after it; the ids accepted and refused.
fn check_answers(results: &Answers) -> (Vec<String>, Vec<String>) {
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
        per_phase(BEFORE_CUT, true),
        per_phase(BEFORE_CUT, false),
        per_phase(BROKER_AWAY, true),
        per_phase(BROKER_AWAY, false),
        per_phase(RESTORED, true),
        per_phase(RESTORED, false),
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
        per_phase(RESTORED, true) > 0,
        "requests were accepted again after the restore"
    );
    (accepted, refused)
}

/// Waits until every accepted request succeeded and nothing is queued or running, then
/// checks that no refused request ran.
async fn all_accepted_succeed(
    env: &TestEnv,
    accepted: &[String],
    refused: &[String],
    engines: &[Proc],
) -> anyhow::Result<()> {
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
    Ok(())
}
