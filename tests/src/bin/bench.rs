//! `provisio-bench`: throughput and latency of the whole fleet, next to a reference figure
//! measured on the same broker and database in the same run (docs/design.md §10).
//!
//! Provisio run: N requests of `demo.hello` (three compensating steps) submitted over HTTP by C
//! concurrent clients to one queue manager feeding E engines; a request is finished when its
//! outcome is published. Reference run: the same N messages, C concurrent publishers with
//! confirms, consumed with the same prefetch, each doing two PostgreSQL commits and an ack —
//! the irreducible work of a durable queue-driven system with no application logic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use provisio_shared::config::Secret;
use provisio_tests::{TestEnv, demo_namespace};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Parser, Debug, Clone)]
#[command(about = "Provisio benchmark")]
struct Args {
    /// Requests to submit.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Concurrent HTTP clients (and concurrent publishers in the reference run).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Engines to start.
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// Engine prefetch per lane (also the reference consumer's prefetch).
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// Run with MPF's "Enable Schema Validation" on (input validated at submit, output at end).
    #[arg(long)]
    schema_validation: bool,
    /// Skip the reference run.
    #[arg(long)]
    no_reference: bool,
}

struct Figures {
    accepted_per_s: f64,
    finished_per_s: f64,
    p50: Duration,
    p95: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn bar(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

async fn provisio(args: &Args) -> anyhow::Result<Figures> {
    let mut env = TestEnv::new("bench").await?;
    env.extra_env
        .push(("PROVISIO_LOG__FORMAT".into(), "json".into()));
    env.extra_env
        .push(("PROVISIO_LOG__LEVEL".into(), "warn".into()));
    env.extra_env.push((
        "PROVISIO_ENGINE__PREFETCH".into(),
        args.prefetch.to_string(),
    ));
    env.extra_env
        .push(("PROVISIO_DATABASE__POOL_SIZE".into(), "16".into()));
    env.extra_env
        .push(("PROVISIO_TXLOG__POOL_SIZE".into(), "8".into()));
    if args.schema_validation {
        env.extra_env.push((
            "PROVISIO_VALIDATION__ENABLE_SCHEMA_VALIDATION".into(),
            "true".into(),
        ));
    }
    let qm = env.queue_manager().await?;
    let mut engines = Vec::new();
    for _ in 0..args.engines {
        engines.push(env.engine().await?);
    }
    let (status, body) = env.apply(&qm, "demo", &demo_namespace()).await?;
    if status >= 300 {
        bail!("applying the demo namespace failed: {body}");
    }
    let mut outcomes = env.outcomes().await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = format!("{}/v1/requests", qm.url);
    let submitted: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(args.requests)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pb = bar(args.requests, "submitted");
    let start = Instant::now();

    // Collect outcomes concurrently with submitting.
    let n = args.requests;
    let collector = {
        let submitted = submitted.clone();
        tokio::spawn(async move {
            let pb = bar(n, "finished");
            let mut latencies = Vec::with_capacity(n);
            let mut statuses: HashMap<String, usize> = HashMap::new();
            let mut last = Instant::now();
            while latencies.len() < n {
                let v = outcomes.next_any().await?;
                let now = Instant::now();
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                *statuses
                    .entry(v["status"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
                // The outcome can arrive before the submitter records its timestamp.
                let at = loop {
                    if let Some(t) = submitted.lock().await.get(&id) {
                        break *t;
                    }
                    tokio::task::yield_now().await;
                };
                latencies.push(now - at);
                last = now;
                pb.inc(1);
            }
            pb.finish();
            Ok::<_, anyhow::Error>((latencies, last, statuses))
        })
    };

    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, submitted, next, pb) = (
            client.clone(),
            url.clone(),
            submitted.clone(),
            next.clone(),
            pb.clone(),
        );
        let (key, n) = (env.admin_key.clone(), args.requests);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = format!("bench-{i}");
                let body = json!({"id": id, "namespace": "demo", "procedure": "hello", "input": {"name": format!("User{i}")}});
                let t = Instant::now();
                submitted.lock().await.insert(id.clone(), t);
                let r = client.post(&url).bearer_auth(&key).json(&body).send().await?;
                if r.status().as_u16() != 202 {
                    bail!("submit {id}: {} {}", r.status(), r.text().await.unwrap_or_default());
                }
                pb.inc(1);
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let submit_elapsed = start.elapsed();
    pb.finish();
    let (mut latencies, last, statuses) = tokio::time::timeout(Duration::from_mins(30), collector)
        .await
        .context("requests did not finish within 30 minutes")???;
    let finish_elapsed = last - start;
    latencies.sort();
    println!("  outcomes: {statuses:?}");
    for e in engines {
        let _ = e.terminate().await;
    }
    let _ = qm.terminate().await;
    env.cleanup().await;
    Ok(Figures {
        accepted_per_s: args.requests as f64 / submit_elapsed.as_secs_f64(),
        finished_per_s: args.requests as f64 / finish_elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p95: percentile(&latencies, 0.95),
        p99: percentile(&latencies, 0.99),
    })
}

/// Publish with confirm → deliver → two commits → ack, per message; nothing else.
async fn reference(args: &Args) -> anyhow::Result<Figures> {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db_url = format!("{}/pvref_{suffix}", provisio_tests::pg_base());
    let secret = Secret::new(db_url.clone());
    provisio_shared::db::create_database_if_missing(&secret).await?;
    let pool = provisio_shared::db::pool(&secret, 32)?;
    pool.get().await?.batch_execute("CREATE TABLE ref (id text PRIMARY KEY, body jsonb, done boolean NOT NULL DEFAULT false)").await?;
    let queue = format!("pvref.{suffix}");
    let conn = lapin::Connection::connect(
        &provisio_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let setup = conn.create_channel().await?;
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        provisio_shared::amqp::long_str("quorum"),
    );
    setup
        .queue_declare(queue.clone().into(), QueueDeclareOptions::durable(), qargs)
        .await?;

    let n = args.requests;
    let submitted: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(n)));
    let done = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let finished = Arc::new(tokio::sync::Notify::new());
    let pb = bar(n, "reference");
    // Consumers: one channel per "engine", each with the engines' prefetch.
    let mut consumers = Vec::new();
    for e in 0..args.engines {
        let ch = conn.create_channel().await?;
        ch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = ch
            .basic_consume(
                queue.clone().into(),
                format!("ref-{e}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (pool, submitted, done, finished, pb) = (
            pool.clone(),
            submitted.clone(),
            done.clone(),
            finished.clone(),
            pb.clone(),
        );
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let (pool, submitted, done, finished, pb) = (
                    pool.clone(),
                    submitted.clone(),
                    done.clone(),
                    finished.clone(),
                    pb.clone(),
                );
                tokio::spawn(async move {
                    let id = String::from_utf8_lossy(
                        d.properties
                            .message_id()
                            .as_ref()
                            .map_or(&[][..], |m| m.as_str().as_bytes()),
                    )
                    .into_owned();
                    let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                    let Ok(client) = pool.get().await else { return };
                    // Two commits: the message recorded, then its outcome.
                    let _ = client
                        .execute(
                            "INSERT INTO ref (id, body) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            &[&id, &body],
                        )
                        .await;
                    let _ = client
                        .execute("UPDATE ref SET done = true WHERE id = $1", &[&id])
                        .await;
                    drop(client);
                    let _ = d.ack(BasicAckOptions::default()).await;
                    let now = Instant::now();
                    let at = loop {
                        if let Some(t) = submitted.lock().await.get(&id) {
                            break *t;
                        }
                        tokio::task::yield_now().await;
                    };
                    let mut done = done.lock().await;
                    done.push((now - at, now));
                    pb.inc(1);
                    if done.len() >= n {
                        finished.notify_one();
                    }
                });
            }
        }));
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut producers = Vec::new();
    for _ in 0..args.concurrency {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (queue, submitted, next) = (queue.clone(), submitted.clone(), next.clone());
        producers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = format!("ref-{i}");
                let body = json!({"id": id, "namespace": "demo", "procedure": "hello", "input": {"name": format!("User{i}")}}).to_string();
                submitted.lock().await.insert(id.clone(), Instant::now());
                let confirm = ch
                    .basic_publish("".into(), queue.clone().into(), BasicPublishOptions::default(), body.as_bytes(), BasicProperties::default().with_message_id(id.into()).with_delivery_mode(2))
                    .await?
                    .await?;
                if !confirm.is_ack() {
                    bail!("reference publish nacked");
                }
            }
        }));
    }
    for p in producers {
        p.await??;
    }
    let submit_elapsed = start.elapsed();
    tokio::time::timeout(Duration::from_mins(30), finished.notified())
        .await
        .context("reference did not finish")?;
    pb.finish();
    let mut done = std::mem::take(&mut *done.lock().await);
    let last = done.iter().map(|(_, t)| *t).max().unwrap_or(start);
    let mut latencies: Vec<Duration> = done.drain(..).map(|(l, _)| l).collect();
    latencies.sort();
    for c in consumers {
        c.abort();
    }
    let _ = setup
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    drop(pool);
    let _ = provisio_shared::db::drop_database(&secret).await;
    Ok(Figures {
        accepted_per_s: n as f64 / submit_elapsed.as_secs_f64(),
        finished_per_s: n as f64 / (last - start).as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p95: percentile(&latencies, 0.95),
        p99: percentile(&latencies, 0.99),
    })
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<10} accepted/s {:>8.1}   finished/s {:>8.1}   p50 {:>8.1} ms   p95 {:>8.1} ms   p99 {:>8.1} ms",
        f.accepted_per_s,
        f.finished_per_s,
        f.p50.as_secs_f64() * 1e3,
        f.p95.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3
    );
}

/// mimalloc: the engine and the queue manager allocate many small JSON values per request,
/// where glibc's allocator showed up at ~8 % of all CPU under `ops/bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // On Ctrl-C or SIGTERM the run is dropped, and with it the fleet it started
    // (`kill_on_drop`): an interrupted benchmark leaves no processes behind.
    tokio::select! {
        r = run() => r,
        () = provisio_shared::shutdown::signal() => {
            eprintln!("interrupted; stopping the fleet");
            Ok(())
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "provisio-bench: {} requests of demo.hello (3 compensating steps), concurrency {}, {} engines, prefetch {}, schema validation {}",
        args.requests,
        args.concurrency,
        args.engines,
        args.prefetch,
        if args.schema_validation { "on" } else { "off" }
    );
    let p = provisio(&args).await?;
    print("provisio", &p);
    if !args.no_reference {
        let r = reference(&args).await?;
        print("reference", &r);
        println!(
            "ratio      finished/s provisio ÷ reference = {:.2}",
            p.finished_per_s / r.finished_per_s
        );
    }
    Ok(())
}
