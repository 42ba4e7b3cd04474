//! One measurement: submissions paced by a [`Plan`], outcomes timed, costs metered.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use provisio_tests::measure::{
    CostMeter, Percentiles, ProcessCost, Who, latencies_from, percentile, tail_by_second,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::Plan;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub(crate) struct RunFigures {
    pub(crate) submitted: usize,
    pub(crate) accepted: usize,
    /// Submissions not accepted, by HTTP status (or `transport`, `nacked`).
    pub(crate) rejected: BTreeMap<String, usize>,
    pub(crate) finished: usize,
    /// Finished requests by outcome status.
    pub(crate) outcomes: BTreeMap<String, usize>,
    /// Accepted submissions per second, from the start to the last acceptance.
    pub(crate) accepted_per_s: f64,
    /// Finished requests per second, from the start to the last finish.
    pub(crate) finished_per_s: f64,
    /// Start to last finish: the window the cost is measured over.
    pub(crate) window_seconds: f64,
    /// Open loop: the latest a submission left after it was due (the load generator lagging).
    pub(crate) max_submit_lag_ms: Option<f64>,
    /// Submission (open loop: when it was due) → outcome.
    pub(crate) latency_ms: Percentiles,
    /// Submission → accepted (HTTP 202, or the publish confirm in the reference run).
    pub(crate) accept_latency_ms: Percentiles,
    /// The same for the requests submitted (or due) after the run's first second: the
    /// steady state, without the cold start that the tail line shows piled into second 0.
    pub(crate) latency_after_first_second_ms: Percentiles,
    /// Requests at or above p99, by the second of the run they were submitted (or due) in.
    pub(crate) p99_tail_by_second: Vec<usize>,
    /// Every finished request: (submitted or due, after the start; submission → outcome).
    /// Written by `--trace`, not with `--json`.
    #[serde(skip)]
    pub(crate) timeline: Vec<(Duration, Duration)>,
    pub(crate) cost: Vec<ProcessCost>,
    /// Where the time went, from the fleet's own histograms (empty for the reference run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) stages: Vec<crate::stages::Stage>,
}

pub(crate) type SubmitFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// Submits request `i`; `Err` carries why it was not accepted (a short label, counted).
pub(crate) type SubmitFn = Arc<dyn Fn(usize) -> SubmitFuture + Send + Sync>;
/// When each request was submitted (open loop: was due), by index.
pub(crate) type Sent = Arc<Mutex<HashMap<usize, Instant>>>;

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
    /// (submitted or due, submission → outcome), in the order the outcomes arrived.
    timeline: Vec<(Instant, Duration)>,
    outcomes: BTreeMap<String, usize>,
    last: Option<Instant>,
}

/// Runs one measurement: `submit` per `plan`, finishes reported on `finishes` as
/// (request index, outcome status); costs measured over the groups of `who`.
pub(crate) async fn measure(
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
                    f.timeline.push((at, now - at));
                    *f.outcomes.entry(status).or_default() += 1;
                    f.last = Some(now);
                    f.timeline.len()
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
    let cost = meter.finish(f.timeline.len());
    collector.abort();

    let secs = |t: Option<Instant>| t.map_or(0.0, |t| (t - start).as_secs_f64());
    let window_seconds = secs(f.last);
    let per_s = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let timeline: Vec<(Duration, Duration)> = f
        .timeline
        .iter()
        .map(|&(at, took)| (at.saturating_duration_since(start), took))
        .collect();
    let finished = timeline.len();
    // The threshold is the p99 sample itself, not its printed milliseconds turned back into a
    // duration, so that rounding never leaves the p99 request out of its own tail.
    let mut sorted: Vec<Duration> = timeline.iter().map(|&(_, took)| took).collect();
    sorted.sort_unstable();
    let p99_tail_by_second = tail_by_second(&timeline, percentile(&sorted, 0.99));
    let latency_ms = Percentiles::of_sorted(&sorted);
    let latency_after_first_second_ms =
        Percentiles::of(latencies_from(&timeline, Duration::from_secs(1)));
    Ok(RunFigures {
        submitted: tally.submitted,
        accepted: tally.accepted,
        rejected: tally.rejected,
        finished,
        outcomes: f.outcomes,
        accepted_per_s: per_s(tally.accepted, secs(tally.last_accepted)),
        finished_per_s: per_s(finished, window_seconds),
        window_seconds,
        max_submit_lag_ms: tally.max_lag.map(|d| d.as_secs_f64() * 1e3),
        latency_ms,
        accept_latency_ms: Percentiles::of(tally.accept),
        latency_after_first_second_ms,
        p99_tail_by_second,
        timeline,
        cost,
        stages: Vec::new(),
    })
}

/// The shared infrastructure's groups, measured in both runs. PostgreSQL and RabbitMQ are
/// shared with whatever else runs on the machine; the backends of the run's own database
/// are listed separately for that reason, and the whole machine's busy CPU time next to them.
pub(crate) fn shared_groups(database: &str) -> Vec<(String, Who)> {
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

pub(crate) fn database_name(url: &str) -> &str {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}
