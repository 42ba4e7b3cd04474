//! `provisio-bench`: throughput, latency and per-process cost of the whole fleet, next to a
//! reference figure measured on the same broker and database in the same run
//! (docs/design.md §10).
//!
//! Provisio run: requests of a procedure (default `demo.hello`, three compensating steps)
//! submitted over HTTP to one queue manager feeding E engines; a request is finished when its
//! outcome is published on `{prefix}.results`. Reference run: the same number of messages,
//! published with confirms and consumed with the same prefetch, each doing two PostgreSQL
//! commits and an ack — the irreducible work of a durable queue-driven system with no
//! application logic.
//!
//! Load: closed loop by default (C clients, each submitting when its previous submission was
//! answered), or open loop with `--rate` (a submission every 1/R s whether or not earlier
//! ones were answered — what producers do, and the only way a slow answer shows up in the
//! latency tail instead of silently lowering the load).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
use provisio_tests::measure::{CostMeter, Percentiles, ProcessCost, Who};
use provisio_tests::{TestEnv, demo_namespace};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

#[derive(Parser, Debug, Clone)]
#[command(about = "Provisio benchmark: throughput, latency and cost per request")]
struct Args {
    /// Requests to submit [closed loop: 5000 unless --duration; open loop: instead of --duration].
    #[arg(long)]
    requests: Option<usize>,
    /// Open loop: submit at this fixed rate (requests/s), each submission on its own whether
    /// or not earlier ones were answered. Without it the load is closed loop (--concurrency).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to submit for [open loop: 30 unless --requests; closed loop: stop submitting
    /// after this, or after --requests, whichever comes first].
    #[arg(long)]
    duration: Option<f64>,
    /// Closed loop: concurrent HTTP clients (and concurrent publishers in the reference run).
    /// Also the number of publisher channels of the reference run in open loop.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Engines to start.
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// Engine prefetch per lane (also the reference consumer's prefetch).
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// The procedure to run, NAMESPACE.PROCEDURE.
    #[arg(long, default_value = "demo.hello")]
    procedure: String,
    /// Namespace document (YAML or JSON) to apply for --procedure's namespace; the shipped
    /// schemas/examples/demo.yaml for `demo`.
    #[arg(long)]
    namespace_file: Option<PathBuf>,
    /// Request input (JSON) [default: {"name": "User<i>"}, which demo.hello needs].
    #[arg(long)]
    input: Option<String>,
    /// Run with MPF's "Enable Schema Validation" on (input validated at submit, output at end).
    #[arg(long)]
    schema_validation: bool,
    /// Skip the reference run.
    #[arg(long)]
    no_reference: bool,
    /// Print one JSON object with every figure on stdout (the readable lines go to stderr).
    #[arg(long)]
    json: bool,
}

/// How submissions are paced.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// `concurrency` clients, each waiting for its answer before the next submission.
    Closed {
        concurrency: usize,
        requests: usize,
        deadline: Option<Duration>,
    },
    /// Request `i` is due at `i / rate` seconds after the start.
    Open { rate: f64, requests: usize },
}

impl Plan {
    fn from_args(args: &Args) -> anyhow::Result<Self> {
        let duration = match args.duration {
            Some(d) if !(d.is_finite() && d > 0.0) => bail!("--duration must be positive"),
            d => d.map(Duration::from_secs_f64),
        };
        match args.rate {
            None => {
                if args.concurrency == 0 {
                    bail!("--concurrency must be at least 1");
                }
                Ok(Self::Closed {
                    concurrency: args.concurrency,
                    requests: args.requests.unwrap_or(if duration.is_some() {
                        usize::MAX
                    } else {
                        5000
                    }),
                    deadline: duration,
                })
            }
            Some(rate) if !(rate.is_finite() && rate > 0.0) => bail!("--rate must be positive"),
            Some(rate) => {
                let requests = match (args.requests, duration) {
                    (Some(_), Some(_)) => {
                        bail!("open loop: give --duration or --requests, not both")
                    }
                    (Some(n), None) => n,
                    (None, d) => {
                        (rate * d.unwrap_or(Duration::from_secs(30)).as_secs_f64()).ceil() as usize
                    }
                };
                Ok(Self::Open { rate, requests })
            }
        }
    }

    fn requests(&self) -> usize {
        match self {
            Self::Closed { requests, .. } | Self::Open { requests, .. } => *requests,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Closed {
                concurrency,
                requests,
                deadline,
            } => {
                let n = if *requests == usize::MAX {
                    "as many requests as fit".to_owned()
                } else {
                    format!("{requests} requests")
                };
                let d = deadline.map_or(String::new(), |d| {
                    format!(" within {:.0} s", d.as_secs_f64())
                });
                format!("closed loop, {n}{d}, concurrency {concurrency}")
            }
            Self::Open { rate, requests } => format!(
                "open loop, {rate} requests/s for {:.1} s ({requests} requests)",
                *requests as f64 / rate
            ),
        }
    }
}

/// Where the readable lines go: stdout, or stderr when stdout carries the JSON.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn line(self, s: &str) {
        if self.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
struct RunFigures {
    submitted: usize,
    accepted: usize,
    /// Submissions not accepted, by HTTP status (or `transport`, `nacked`).
    rejected: BTreeMap<String, usize>,
    finished: usize,
    /// Finished requests by outcome status.
    outcomes: BTreeMap<String, usize>,
    /// Accepted submissions per second, from the start to the last acceptance.
    accepted_per_s: f64,
    /// Finished requests per second, from the start to the last finish.
    finished_per_s: f64,
    /// Start to last finish: the window the cost is measured over.
    window_seconds: f64,
    /// Open loop: the latest a submission left after it was due (the load generator lagging).
    max_submit_lag_ms: Option<f64>,
    /// Submission (open loop: when it was due) → outcome.
    latency_ms: Percentiles,
    /// Submission → accepted (HTTP 202, or the publish confirm in the reference run).
    accept_latency_ms: Percentiles,
    cost: Vec<ProcessCost>,
}

#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    rate: Option<f64>,
    duration_seconds: Option<f64>,
    requests: Option<usize>,
    concurrency: usize,
    engines: usize,
    prefetch: u16,
    procedure: String,
    schema_validation: bool,
    provisio: RunFigures,
    reference: Option<RunFigures>,
    /// finished/s provisio ÷ reference.
    ratio: Option<f64>,
}

type SubmitFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// Submits request `i`; `Err` carries why it was not accepted (a short label, counted).
type SubmitFn = Arc<dyn Fn(usize) -> SubmitFuture + Send + Sync>;
/// When each request was submitted (open loop: was due), by index.
type Sent = Arc<Mutex<HashMap<usize, Instant>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Tally {
    submitted: usize,
    accepted: usize,
    rejected: BTreeMap<String, usize>,
    accept: Vec<Duration>,
    last_accepted: Option<Instant>,
    max_lag: Option<Duration>,
}

impl Tally {
    fn record(&mut self, r: Result<(), String>, took: Duration) {
        self.submitted += 1;
        match r {
            Ok(()) => {
                self.accepted += 1;
                self.accept.push(took);
                self.last_accepted = Some(Instant::now());
            }
            Err(why) => *self.rejected.entry(why).or_default() += 1,
        }
    }

    fn merge(&mut self, o: Self) {
        self.submitted += o.submitted;
        self.accepted += o.accepted;
        for (k, v) in o.rejected {
            *self.rejected.entry(k).or_default() += v;
        }
        self.accept.extend(o.accept);
        self.last_accepted = self.last_accepted.max(o.last_accepted);
    }
}

fn bar(n: usize, what: &str) -> ProgressBar {
    let (pb, template) = if n == usize::MAX {
        (ProgressBar::no_length(), "{msg:>10} {pos} {per_sec}")
    } else {
        (
            ProgressBar::new(n as u64),
            "{msg:>10} [{bar:40}] {pos}/{len} {per_sec}",
        )
    };
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// Submits according to `plan`, returning once every submission has been answered.
async fn drive(plan: Plan, start: Instant, sent: &Sent, submit: &SubmitFn) -> Tally {
    let pb = bar(plan.requests(), "submitted");
    let mut tally = Tally::default();
    match plan {
        Plan::Closed {
            concurrency,
            requests,
            deadline,
        } => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut clients = JoinSet::new();
            for _ in 0..concurrency {
                let (next, sent, submit, pb) =
                    (next.clone(), sent.clone(), submit.clone(), pb.clone());
                clients.spawn(async move {
                    let mut mine = Tally::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests || deadline.is_some_and(|d| start.elapsed() >= d) {
                            return mine;
                        }
                        let t = Instant::now();
                        lock(&sent).insert(i, t);
                        let r = submit(i).await;
                        mine.record(r, t.elapsed());
                        pb.inc(1);
                    }
                });
            }
            while let Some(client) = clients.join_next().await {
                if let Ok(t) = client {
                    tally.merge(t);
                }
            }
        }
        Plan::Open { rate, requests } => {
            let mut inflight = JoinSet::new();
            let mut max_lag = Duration::ZERO;
            for i in 0..requests {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                max_lag = max_lag.max(due.elapsed());
                // Timed from when it was due, so a lagging generator shows as latency instead
                // of hiding it (coordinated omission).
                lock(sent).insert(i, due);
                let (submit, pb) = (submit.clone(), pb.clone());
                inflight.spawn(async move {
                    let r = submit(i).await;
                    pb.inc(1);
                    (r, due.elapsed())
                });
                while let Some(Ok((r, took))) = inflight.try_join_next() {
                    tally.record(r, took);
                }
            }
            while let Some(done) = inflight.join_next().await {
                if let Ok((r, took)) = done {
                    tally.record(r, took);
                }
            }
            tally.max_lag = Some(max_lag);
        }
    }
    pb.finish();
    tally
}

#[derive(Default)]
struct Finished {
    latencies: Vec<Duration>,
    outcomes: BTreeMap<String, usize>,
    last: Option<Instant>,
}

/// Runs one measurement: `submit` per `plan`, finishes reported on `finishes` as
/// (request index, outcome status); costs measured over the groups of `who`.
async fn measure(
    plan: Plan,
    submit: SubmitFn,
    mut finishes: mpsc::UnboundedReceiver<(usize, String)>,
    who: Vec<(String, Who)>,
) -> anyhow::Result<RunFigures> {
    let sent: Sent = Arc::default();
    let finished = Arc::new(Mutex::new(Finished::default()));
    let (count_tx, mut count_rx) = watch::channel(0usize);
    let collector = {
        let (sent, finished) = (sent.clone(), finished.clone());
        let pb = bar(plan.requests(), "finished");
        tokio::spawn(async move {
            while let Some((i, status)) = finishes.recv().await {
                let now = Instant::now();
                let Some(at) = lock(&sent).get(&i).copied() else {
                    continue;
                };
                let n = {
                    let mut f = lock(&finished);
                    f.latencies.push(now - at);
                    *f.outcomes.entry(status).or_default() += 1;
                    f.last = Some(now);
                    f.latencies.len()
                };
                pb.inc(1);
                let _ = count_tx.send(n);
            }
            pb.finish();
        })
    };

    let meter = CostMeter::start(who);
    let start = Instant::now();
    let tally = drive(plan, start, &sent, &submit).await;
    if tally.accepted == 0 {
        bail!("no submission was accepted: {:?}", tally.rejected);
    }
    let all = tally.accepted;
    tokio::time::timeout(Duration::from_mins(30), count_rx.wait_for(|&n| n >= all))
        .await
        .context("requests did not finish within 30 minutes")?
        .context("the outcome stream ended")?;
    let f = std::mem::take(&mut *lock(&finished));
    let cost = meter.finish(f.latencies.len());
    collector.abort();

    let secs = |t: Option<Instant>| t.map_or(0.0, |t| (t - start).as_secs_f64());
    let window_seconds = secs(f.last);
    let per_s = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    Ok(RunFigures {
        submitted: tally.submitted,
        accepted: tally.accepted,
        rejected: tally.rejected,
        finished: f.latencies.len(),
        outcomes: f.outcomes,
        accepted_per_s: per_s(tally.accepted, secs(tally.last_accepted)),
        finished_per_s: per_s(f.latencies.len(), window_seconds),
        window_seconds,
        max_submit_lag_ms: tally.max_lag.map(|d| d.as_secs_f64() * 1e3),
        latency_ms: Percentiles::of(f.latencies),
        accept_latency_ms: Percentiles::of(tally.accept),
        cost,
    })
}

/// The shared infrastructure's groups, measured in both runs. PostgreSQL and RabbitMQ are
/// shared with whatever else runs on the machine; the backends of the run's own database
/// are listed separately for that reason, and the whole machine's busy CPU time next to them.
fn shared_groups(database: &str) -> Vec<(String, Who)> {
    vec![
        ("postgres (all)".into(), Who::Named("postgres")),
        (
            format!("postgres ({database} backends)"),
            Who::NamedWith("postgres", format!(" {database} ")),
        ),
        ("rabbitmq (beam.smp)".into(), Who::Named("beam.smp")),
        ("provisio-bench".into(), Who::Pid(std::process::id())),
        ("machine (all CPUs busy)".into(), Who::Machine),
    ]
}

fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

fn request_input(template: Option<&Value>, i: usize) -> Value {
    template
        .cloned()
        .unwrap_or_else(|| json!({"name": format!("User{i}")}))
}

async fn provisio(args: &Args, plan: Plan) -> anyhow::Result<RunFigures> {
    let (namespace, procedure) = args
        .procedure
        .split_once('.')
        .context("--procedure is NAMESPACE.PROCEDURE")?;
    let document = match &args.namespace_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None if namespace == "demo" => demo_namespace(),
        None => bail!("--procedure {namespace}.*: give its namespace with --namespace-file"),
    };
    let input: Option<Value> = args
        .input
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--input is not JSON")?;

    let mut env = TestEnv::new("bench").await?;
    for (k, v) in [
        ("PROVISIO_LOG__FORMAT", "json".to_owned()),
        ("PROVISIO_LOG__LEVEL", "warn".to_owned()),
        ("PROVISIO_ENGINE__PREFETCH", args.prefetch.to_string()),
        ("PROVISIO_DATABASE__POOL_SIZE", "16".to_owned()),
        ("PROVISIO_TXLOG__POOL_SIZE", "8".to_owned()),
    ] {
        env.extra_env.push((k.into(), v));
    }
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
    let (status, body) = env.apply(&qm, namespace, &document).await?;
    if status >= 300 {
        bail!("applying namespace {namespace} failed: {body}");
    }

    let mut who = vec![(
        "queue-manager".to_owned(),
        Who::Pid(qm.child.id().context("queue manager pid")?),
    )];
    for (k, e) in engines.iter().enumerate() {
        who.push((
            format!("engine-{}", k + 1),
            Who::Pid(e.child.id().context("engine pid")?),
        ));
    }
    who.extend(shared_groups(database_name(&env.db_url)));

    let mut outcomes = env.outcomes().await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(v) = outcomes.next_any().await {
            let Some(i) = v["id"]
                .as_str()
                .and_then(|id| id.strip_prefix("bench-"))
                .and_then(|i| i.parse().ok())
            else {
                continue;
            };
            let status = v["status"].as_str().unwrap_or("?").to_owned();
            if tx.send((i, status)).is_err() {
                return;
            }
        }
    });

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = format!("{}/v1/requests", qm.url);
    let key = env.admin_key.clone();
    let (namespace, procedure) = (namespace.to_owned(), procedure.to_owned());
    let submit: SubmitFn = Arc::new(move |i| {
        let body = json!({
            "id": format!("bench-{i}"),
            "namespace": namespace,
            "procedure": procedure,
            "input": request_input(input.as_ref(), i),
        });
        let req = client.post(&url).bearer_auth(&key).json(&body);
        Box::pin(async move {
            match req.send().await {
                Ok(r) if r.status().as_u16() == 202 => Ok(()),
                Ok(r) => Err(r.status().as_u16().to_string()),
                Err(_) => Err("transport".to_owned()),
            }
        })
    });

    let figures = measure(plan, submit, rx, who).await;
    reader.abort();
    for e in engines {
        let _ = e.terminate().await;
    }
    let _ = qm.terminate().await;
    env.cleanup().await;
    figures
}

/// Publish with confirm → deliver → two commits → ack, per message; nothing else.
async fn reference(args: &Args, plan: Plan) -> anyhow::Result<RunFigures> {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let database = format!("pvref_{suffix}");
    let secret = Secret::new(format!("{}/{database}", provisio_tests::pg_base()));
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

    let (tx, rx) = mpsc::unbounded_channel();
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
        let (pool, tx) = (pool.clone(), tx.clone());
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let (pool, tx) = (pool.clone(), tx.clone());
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
                    if let Some(i) = id.strip_prefix("ref-").and_then(|i| i.parse().ok()) {
                        let _ = tx.send((i, "done".to_owned()));
                    }
                });
            }
        }));
    }
    drop(tx);

    // Publishers: `concurrency` confirming channels, request i on channel i mod C.
    let mut channels = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let channels = Arc::new(channels);
    let q = queue.clone();
    let submit: SubmitFn = Arc::new(move |i| {
        let (channels, queue) = (channels.clone(), q.clone());
        Box::pin(async move {
            let id = format!("ref-{i}");
            let body = json!({"id": id, "namespace": "demo", "procedure": "hello", "input": {"name": format!("User{i}")}}).to_string();
            let ch = &channels[i % channels.len()];
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_message_id(id.into())
                        .with_delivery_mode(2),
                )
                .await
                .map_err(|_| "transport".to_owned())?
                .await
                .map_err(|_| "transport".to_owned())?;
            if confirm.is_ack() {
                Ok(())
            } else {
                Err("nacked".to_owned())
            }
        })
    });

    let figures = measure(plan, submit, rx, shared_groups(&database)).await;
    for c in consumers {
        c.abort();
    }
    let _ = setup
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    drop(pool);
    let _ = provisio_shared::db::drop_database(&secret).await;
    figures
}

fn print(out: Out, name: &str, f: &RunFigures) {
    let l = &f.latency_ms;
    out.line(&format!(
        "{name:<10} accepted/s {:>8.1}   finished/s {:>8.1}   p50 {:>8.1} ms   p95 {:>8.1} ms   p99 {:>8.1} ms   p99.9 {:>8.1} ms   max {:>8.1} ms",
        f.accepted_per_s, f.finished_per_s, l.p50, l.p95, l.p99, l.p99_9, l.max
    ));
    let a = &f.accept_latency_ms;
    let lag = f
        .max_submit_lag_ms
        .map_or(String::new(), |m| format!("   generator lag max {m:.1} ms"));
    out.line(&format!(
        "{:<10} accepted {}/{}   finished {}   outcomes {:?}   accept p50 {:.1} ms p99 {:.1} ms p99.9 {:.1} ms{lag}",
        "", f.accepted, f.submitted, f.finished, f.outcomes, a.p50, a.p99, a.p99_9
    ));
    if !f.rejected.is_empty() {
        out.line(&format!("{:<10} rejected {:?}", "", f.rejected));
    }
    out.line(&format!(
        "{:<10} cost over {:.1} s: {:<34} {:>12} {:>12} {:>12}",
        "", f.window_seconds, "process", "CPU s", "CPU s/1000", "peak RSS"
    ));
    for c in &f.cost {
        out.line(&format!(
            "{:<10} {:<48} {:>12.2} {:>12.3} {:>12}",
            "",
            c.process,
            c.cpu_seconds,
            c.cpu_seconds_per_1000_requests,
            c.peak_rss_mib
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.1} MiB"))
        ));
    }
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
    let plan = Plan::from_args(&args)?;
    let out = Out { json: args.json };
    out.line(&format!(
        "provisio-bench: {} ({}), {}, {} engines, prefetch {}, schema validation {}",
        args.procedure,
        if args.procedure == "demo.hello" {
            "3 compensating steps"
        } else {
            "custom"
        },
        plan.describe(),
        args.engines,
        args.prefetch,
        if args.schema_validation { "on" } else { "off" }
    ));
    let p = provisio(&args, plan).await?;
    print(out, "provisio", &p);
    let r = if args.no_reference {
        None
    } else {
        let r = reference(&args, plan).await?;
        print(out, "reference", &r);
        Some(r)
    };
    let ratio = r.as_ref().map(|r| p.finished_per_s / r.finished_per_s);
    if let Some(ratio) = ratio {
        out.line(&format!(
            "ratio      finished/s provisio ÷ reference = {ratio:.2}"
        ));
    }
    if args.json {
        let report = Report {
            mode: if args.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            rate: args.rate,
            duration_seconds: args.duration,
            requests: args.requests,
            concurrency: args.concurrency,
            engines: args.engines,
            prefetch: args.prefetch,
            procedure: args.procedure.clone(),
            schema_validation: args.schema_validation,
            provisio: p,
            reference: r,
            ratio,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> Args {
        Args::parse_from(std::iter::once("provisio-bench").chain(argv.iter().copied()))
    }

    #[test]
    fn closed_loop_is_the_default() {
        let Plan::Closed {
            concurrency,
            requests,
            deadline,
        } = Plan::from_args(&args(&[])).expect("plan")
        else {
            panic!("not closed loop");
        };
        assert_eq!((concurrency, requests, deadline), (64, 5000, None));
        let Plan::Closed {
            requests, deadline, ..
        } = Plan::from_args(&args(&["--duration", "10"])).expect("plan")
        else {
            panic!("not closed loop");
        };
        assert_eq!(
            (requests, deadline),
            (usize::MAX, Some(Duration::from_secs(10)))
        );
    }

    #[test]
    fn open_loop_requests_from_rate_and_duration() {
        let plan = |a: &[&str]| match Plan::from_args(&args(a)) {
            Ok(Plan::Open { rate, requests }) => Ok((rate, requests)),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            plan(&["--rate", "200", "--duration", "15"]),
            Ok((200.0, 3000))
        );
        assert_eq!(
            plan(&["--rate", "200", "--requests", "10"]),
            Ok((200.0, 10))
        );
        assert_eq!(plan(&["--rate", "2.5"]), Ok((2.5, 75)));
        assert!(plan(&["--rate", "200", "--duration", "1", "--requests", "5"]).is_err());
        assert!(plan(&["--rate", "0"]).is_err());
        assert!(plan(&["--rate", "10", "--duration=-1"]).is_err());
    }

    #[test]
    fn database_name_is_the_last_path_segment() {
        assert_eq!(
            database_name("postgres://postgres@127.0.0.1:5432/pv_0123456789ab"),
            "pv_0123456789ab"
        );
    }

    #[test]
    fn default_input_names_the_request() {
        assert_eq!(request_input(None, 7), json!({"name": "User7"}));
        let t = json!({"x": 1});
        assert_eq!(request_input(Some(&t), 7), t);
    }
}
