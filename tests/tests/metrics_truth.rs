//! End-to-end: the metrics the dashboards and alerts read are the ones the processes serve.
//!
//! After a representative run (a success, a failure that rolls back, an in-doubt rollback, a
//! dead letter, a scheduled request, a refused submission), every `provisio_*` metric is served
//! by the process [`OWNERS`] names, with its description; every name that
//! `ops/grafana/*.json` and `ops/prometheus/*.yml` use is one of them; and the values that
//! were easy to get wrong are right (queue depth of every lane, in-doubt from the database and
//! not from engines, rejections of submissions only, durations without the scheduled wait).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use provisio_shared::metrics as m;
use provisio_tests::{Proc, TestEnv, demo_namespace, request};
use serde_json::json;

type R = anyhow::Result<()>;

const QM: &str = "queue-manager";
const ENGINE: &str = "engine";
const AUDITOR: &str = "auditor";

/// Which processes serve each metric. A metric served by several kinds of process (the broker
/// gauge, the log-server gauges) is checked in each.
const OWNERS: &[(&str, &[&str])] = &[
    (m::REQUESTS_ACCEPTED, &[QM]),
    (m::REQUESTS_REJECTED, &[QM]),
    (m::PUBLISH_DURATION, &[QM]),
    (m::QUEUE_DEPTH, &[QM]),
    (m::BROKER_UP, &[QM, ENGINE, AUDITOR]),
    (m::REQUESTS_FINISHED, &[ENGINE, AUDITOR]),
    (m::REQUEST_DURATION, &[ENGINE]),
    (m::REQUEST_RUN_DURATION, &[ENGINE]),
    (m::SCHEDULED_WAIT, &[ENGINE]),
    (m::STEP_DURATION, &[ENGINE]),
    (m::STEP_RETRIES, &[ENGINE]),
    (m::ROLLBACKS, &[ENGINE, AUDITOR]),
    (m::DEAD_LETTERS, &[ENGINE]),
    (m::INFLIGHT, &[ENGINE]),
    (m::FENCED, &[ENGINE]),
    (m::OPENINGS_REFUSED, &[ENGINE]),
    (m::PROVIDER_CALLS, &[ENGINE]),
    (m::PROVIDER_INFLIGHT, &[ENGINE]),
    (m::PROVIDER_THROTTLED, &[ENGINE]),
    (m::PROVIDER_WAIT, &[ENGINE]),
    (m::TXLOG_BATCH_SIZE, &[ENGINE]),
    (m::TXLOG_COMMIT_DURATION, &[ENGINE]),
    (m::TXLOG_QUEUE_WAIT, &[ENGINE]),
    (m::TXLOG_POOL_IN_USE, &[ENGINE, AUDITOR]),
    (m::TXLOG_BAD_SERVERS, &[ENGINE, AUDITOR]),
    (m::TXLOG_SERVER_UP, &[ENGINE, AUDITOR]),
    (m::IN_DOUBT, &[AUDITOR]),
    (m::RECOVERED, &[ENGINE, AUDITOR]),
    (m::AUDIT_ROWS_SWEPT, &[AUDITOR]),
    (m::AUDITOR_LEADER, &[AUDITOR]),
    (m::AUDITOR_STEP_DOWNS, &[AUDITOR]),
    (m::DEAD_LETTERS_SETTLED, &[AUDITOR]),
    (m::DENIALS, &[QM, ENGINE]),
    (m::RUNTIME_THREADS, &[QM, ENGINE, AUDITOR]),
];

const HISTOGRAMS: &[&str] = &[
    m::PUBLISH_DURATION,
    m::REQUEST_DURATION,
    m::REQUEST_RUN_DURATION,
    m::SCHEDULED_WAIT,
    m::STEP_DURATION,
    m::PROVIDER_WAIT,
    m::TXLOG_BATCH_SIZE,
    m::TXLOG_COMMIT_DURATION,
    m::TXLOG_QUEUE_WAIT,
];

/// A rollback that cannot complete (in doubt), and a procedure to schedule.
const NS: &str = r#"
namespace: truth
procedures:
  stuck:
    access: public
    steps:
      - id: held
        call: test.echo
        input: '{fail_rollback: true}'
      - id: boom
        call: test.fail
        input: '{code: "no_room", message: "no room left"}'
  later:
    access: public
    steps:
      - call: test.echo
"#;

/// The series names a scrape holds (`name{labels} value` and `name value` lines).
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of `labels`
/// (`key="value"` pairs); `None` when there is none.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (set, v) = if let Some(r) = rest.strip_prefix('{') {
            let Some((set, v)) = r.split_once("} ") else {
                continue;
            };
            (set, v)
        } else if let Some(v) = rest.strip_prefix(' ') {
            ("", v)
        } else {
            continue;
        };
        let pairs: Vec<&str> = set.split(',').collect();
        if labels.iter().all(|l| pairs.contains(l)) {
            *found.get_or_insert(0.0) += v.trim().parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

async fn scrape(env: &TestEnv, p: &Proc) -> anyhow::Result<String> {
    Ok(env
        .http
        .get(format!("{}/metrics", p.url))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Scrapes `p` until `cond` holds on the text (or a minute passed); the last text.
async fn scrape_until(
    env: &TestEnv,
    p: &Proc,
    cond: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let text = scrape(env, p).await?;
        if cond(&text) || Instant::now() >= deadline {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `provisio_*` name used in the files of `dir` ending in one of `exts`.
fn referenced_in(dir: &Path, exts: &[&str]) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        if !exts.contains(&ext) {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let mut rest = text.as_str();
        while let Some(at) = rest.find("provisio_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].trim_end_matches('_').to_owned());
            rest = &tail[end..];
        }
    }
    Ok(names)
}

/// The series a referenced name needs: a histogram's name stands for its three series.
fn needed_series(name: &str) -> anyhow::Result<(String, Vec<String>)> {
    if HISTOGRAMS.contains(&name) {
        let parts = ["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"));
        return Ok((name.to_owned(), parts.to_vec()));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && HISTOGRAMS.contains(&base)
        {
            return Ok((base.to_owned(), vec![name.to_owned()]));
        }
    }
    anyhow::ensure!(
        m::ALL.contains(&name),
        "`{name}` is used by ops/ but provisio_shared::metrics does not declare it"
    );
    Ok((name.to_owned(), vec![name.to_owned()]))
}

#[test]
fn every_declared_metric_has_an_owner_and_every_histogram_is_declared() {
    let owned: BTreeSet<&str> = OWNERS.iter().map(|(n, _)| *n).collect();
    let declared: BTreeSet<&str> = m::ALL.iter().copied().collect();
    assert_eq!(
        owned, declared,
        "OWNERS and metrics::ALL must list the same metrics"
    );
    assert!(HISTOGRAMS.iter().all(|h| declared.contains(h)));
    // The runbook's table lists the same metrics, each with the processes OWNERS names.
    let runbook = std::fs::read_to_string(repo_root().join("docs/operations.md"))
        .expect("docs/operations.md");
    let rows: Vec<(&str, &str)> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("| `provisio_"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            Some((cells.first()?.strip_suffix('`')?, *cells.get(3)?))
        })
        .collect();
    let documented: BTreeSet<String> = rows.iter().map(|(n, _)| format!("provisio_{n}")).collect();
    let declared: BTreeSet<String> = declared.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(documented, declared, "docs/operations.md's metrics table");
    for (name, served_by) in rows {
        let owners = OWNERS
            .iter()
            .find(|(n, _)| n.strip_prefix("provisio_") == Some(name))
            .map(|(_, o)| *o)
            .unwrap_or_default();
        for owner in owners {
            assert!(
                served_by.contains(&owner.replace('-', " ")) || served_by == "every process",
                "docs/operations.md: provisio_{name} is served by {owner}, the table says {served_by}"
            );
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the traffic made at the start is what the metric checks that follow read; one scrape-and-check story over the same fleet"
)]
#[tokio::test]
async fn every_metric_the_dashboards_and_alerts_read_is_served() -> R {
    let mut env = TestEnv::new("metrics-truth").await?;
    env.extra_env.extend([
        ("PROVISIO_AUDITOR__INTERVAL_MS".into(), "200".into()),
        // A limited provider, so that the limit metrics exist.
        (
            "PROVISIO_PROVIDERS__LIMITS__TEST__CONCURRENCY".into(),
            "64".into(),
        ),
    ]);
    let (qm, engine, auditor) = tokio::try_join!(
        env.queue_manager(),
        env.engine(),
        env.spawn("worker", &["--role", "auditor"], &[])
    )?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    assert_eq!(env.apply(&qm, "truth", NS).await?.0, 201);
    let mut outcomes = env.outcomes().await?;

    // A success, a failure that rolls back, a rollback that cannot complete.
    let mut ids = Vec::new();
    for (ns, procedure, input, status) in [
        ("demo", "hello", json!({"name": "Ada"}), "succeeded"),
        ("demo", "broken", json!({}), "failed"),
        ("truth", "stuck", json!({}), "in_doubt"),
    ] {
        let (code, body) = env.submit(&qm, &request(ns, procedure, input)).await?;
        assert_eq!(code, 202, "{body}");
        ids.push((body["id"].as_str().unwrap_or_default().to_owned(), status));
    }
    // A scheduled request, due in 4 s.
    let wait = chrono::Duration::seconds(4);
    let mut later = request("truth", "later", json!({}));
    later["id"] = json!("truth-later");
    later["not_before"] = json!((chrono::Utc::now() + wait).to_rfc3339());
    let (code, body) = env.submit(&qm, &later).await?;
    assert_eq!(
        (code, &body["status"]),
        (202, &json!("scheduled")),
        "{body}"
    );
    ids.push(("truth-later".into(), "succeeded"));
    // A refused submission (404), and a GET of an unknown id, which is no submission.
    let (code, _) = env
        .submit(&qm, &request("no-such-namespace", "x", json!({})))
        .await?;
    assert_eq!(code, 404);
    assert_eq!(env.get_request(&qm, "no-such-request").await?.0, 404);
    // Refused before the handler (no key): counted for a submission, not for a read.
    let anonymous = |req: reqwest::RequestBuilder| async move {
        anyhow::Ok(req.send().await?.status().as_u16())
    };
    let submit_url = format!("{}/v1/requests", qm.url);
    let body = request("demo", "hello", json!({"name": "Anon"}));
    assert_eq!(
        anonymous(env.http.post(&submit_url).json(&body)).await?,
        401
    );
    assert_eq!(
        anonymous(env.http.get(format!("{submit_url}/x"))).await?,
        401
    );
    // A dead letter: a message that is not an envelope.
    let conn = Connection::connect(&env.amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let confirm = ch
        .basic_publish(
            env.topology().requests_exchange().into(),
            "normal".into(),
            BasicPublishOptions::default(),
            b"{not json",
            BasicProperties::default().with_message_id("truth-garbage".into()),
        )
        .await?;
    confirm.await?;

    for (id, status) in &ids {
        let out = outcomes.wait_for(id).await?;
        assert_eq!(out["status"], *status, "{out}");
    }

    // Sampled values settle within a few seconds: wait for them rather than for a clock.
    let qm_text = scrape_until(&env, &qm, |t| {
        value(t, m::QUEUE_DEPTH, &["lane=\"dead\""]) == Some(1.0)
            && value(t, m::BROKER_UP, &[]) == Some(1.0)
    })
    .await?;
    let engine_text = scrape_until(&env, &engine, |t| {
        value(t, m::DEAD_LETTERS, &["reason=\"malformed\""]) == Some(1.0)
    })
    .await?;
    let auditor_text = scrape_until(&env, &auditor, |t| {
        value(t, m::IN_DOUBT, &[]) == Some(1.0)
            && value(t, m::BROKER_UP, &[]) == Some(1.0)
            && value(t, m::DEAD_LETTERS_SETTLED, &["outcome=\"unknown_request\""]) == Some(1.0)
    })
    .await?;
    let texts = [
        (QM, &qm_text),
        (ENGINE, &engine_text),
        (AUDITOR, &auditor_text),
    ];

    // Every declared metric, with its description, in each process that should serve it.
    let mut missing = Vec::new();
    for (name, procs) in OWNERS {
        let (_, needed) = needed_series(name)?;
        for (proc_name, text) in texts.iter().filter(|(p, _)| procs.contains(p)) {
            let present = series(text);
            for s in &needed {
                if !present.contains(s) {
                    missing.push(format!("{proc_name}: {s}"));
                }
            }
            if !text.contains(&format!("# HELP {name} ")) {
                missing.push(format!("{proc_name}: description of {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not served: {missing:#?}\n--- queue manager\n{qm_text}\n--- engine\n{engine_text}\n--- auditor\n{auditor_text}"
    );

    // Every name the dashboards and alerts use is declared (so served, as checked above).
    let root = repo_root().join("ops");
    let mut used = referenced_in(&root.join("grafana"), &["json"])?;
    used.extend(referenced_in(&root.join("prometheus"), &["yml", "yaml"])?);
    assert!(used.len() > 10, "too few names found in ops/: {used:?}");
    for name in &used {
        let (base, _) = needed_series(name)?;
        assert!(
            OWNERS.iter().any(|(n, _)| *n == base),
            "{name} is used by ops/ but served by no process"
        );
    }

    // Queue depth of every lane.
    for lane in m::LANES.iter().chain([&m::DEAD_LANE]) {
        let label = format!("lane=\"{lane}\"");
        assert!(
            value(&qm_text, m::QUEUE_DEPTH, &[&label]).is_some(),
            "no queue depth for lane {lane}"
        );
    }
    // Zero series of fixed label sets exist before they count anything.
    assert_eq!(
        value(&qm_text, m::REQUESTS_ACCEPTED, &["lane=\"high\""]),
        Some(0.0)
    );
    assert_eq!(
        value(&engine_text, m::DEAD_LETTERS, &["reason=\"forbidden\""]),
        Some(0.0)
    );
    // Only submissions count as rejected: the GET of an unknown id does not.
    assert_eq!(
        value(&qm_text, m::REQUESTS_REJECTED, &["code=\"not_found\""]),
        Some(1.0)
    );
    assert_eq!(
        value(&qm_text, m::REQUESTS_REJECTED, &["code=\"unauthorized\""]),
        Some(1.0)
    );
    // In doubt: from the log, by the auditor; engines no longer keep their own count.
    assert!(
        !series(&engine_text).contains(m::IN_DOUBT),
        "engines must not report {}",
        m::IN_DOUBT
    );
    assert_eq!(
        value(
            &engine_text,
            m::ROLLBACKS,
            &["namespace=\"demo\"", "procedure=\"broken\""]
        ),
        Some(1.0)
    );
    // The scheduled request's duration counts from `not_before`, its wait separately.
    let later = ["namespace=\"truth\"", "procedure=\"later\""];
    let waited =
        value(&engine_text, &format!("{}_sum", m::SCHEDULED_WAIT), &later).unwrap_or_default();
    let took = value(
        &engine_text,
        &format!("{}_sum", m::REQUEST_DURATION),
        &later,
    )
    .unwrap_or(f64::INFINITY);
    assert!(
        waited >= 3.0 && took < waited,
        "scheduled wait {waited} s, request duration {took} s"
    );

    drop((qm, engine, auditor, conn));
    env.cleanup().await;
    Ok(())
}
