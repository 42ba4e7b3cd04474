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

mod drive;
mod pairs;
mod provisio;
mod reference;
mod stages;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;

use drive::RunFigures;

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
    /// Engine prefetch per lane (also the reference consumer's prefetch) [default: the
    /// engine's own default, `engine.prefetch`].
    #[arg(long, default_value_t = provisio_shared::config::EngineConfig::default().prefetch)]
    prefetch: u16,
    /// Runtime threads of the queue manager and of each engine (`runtime.threads`). One by
    /// default: on the bench's machine they share the cores with PostgreSQL, RabbitMQ and the
    /// load generator, and one thread per process is the sizing docs/operations.md §9 gives
    /// for that; 0 for one per CPU (the product's default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
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
    /// Run N interleaved pairs (fleet, reference, fleet, reference, …) and print each ratio
    /// with their median, min and max: on a shared machine one pair is one draw of a noisy
    /// figure (docs/operations.md §9).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    pairs: u32,
    /// Print one JSON object with every figure on stdout (the readable lines go to stderr).
    #[arg(long)]
    json: bool,
    /// Write every finished request to FILE as CSV (run, seconds after the start it was
    /// submitted or due, milliseconds to its outcome), to see when the slow ones happened.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// A setting for the fleet, as in the configuration file (`engine.open_with_first_call=false`);
    /// repeatable. Compares settings on the same binaries, interleaved.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = setting)]
    set: Vec<(String, String)>,
}

/// `section.key=value` as the environment variable the fleet reads (`PROVISIO_SECTION__KEY`).
fn setting(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return Err(format!("`{key}`: expected a key like engine.prefetch"));
    }
    let var = format!("PROVISIO_{}", key.to_ascii_uppercase().replace('.', "__"));
    Ok((var, value.to_owned()))
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

#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    rate: Option<f64>,
    duration_seconds: Option<f64>,
    requests: Option<usize>,
    concurrency: usize,
    engines: usize,
    prefetch: u16,
    threads: usize,
    procedure: String,
    schema_validation: bool,
    provisio: RunFigures,
    reference: Option<RunFigures>,
    /// finished/s provisio ÷ reference.
    ratio: Option<f64>,
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
    let s = &f.latency_after_first_second_ms;
    out.line(&format!(
        "{:<10} after the first second ({} requests): p50 {:.1} ms   p95 {:.1} ms   p99 {:.1} ms   p99.9 {:.1} ms",
        "", s.count, s.p50, s.p95, s.p99, s.p99_9
    ));
    out.line(&format!(
        "{:<10} p99 tail by second: {}",
        "",
        f.p99_tail_by_second
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
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
    if !f.stages.is_empty() {
        out.line(&format!(
            "{:<10} where the time went (the fleet's histograms) {:>15} {:>12} {:>12}",
            "", "samples", "mean", "p99 ≤"
        ));
    }
    for s in &f.stages {
        let unit = if s.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", s.unit)
        };
        out.line(&format!(
            "{:<10} {:<48} {:>12} {:>12} {:>12}",
            "",
            s.what,
            s.count,
            format!("{:.1}{unit}", s.mean),
            s.p99_at_most
                .map_or_else(|| "> last".to_owned(), |b| format!("{b}{unit}"))
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
    if args.pairs > 1 && (args.no_reference || args.trace.is_some()) {
        bail!("--pairs needs the reference run, and --trace takes one pair");
    }
    let out = Out { json: args.json };
    out.line(&format!(
        "provisio-bench: {} ({}), {}, {} engines, prefetch {}, runtime threads {}, schema validation {}",
        args.procedure,
        if args.procedure == "demo.hello" {
            "3 compensating steps"
        } else {
            "custom"
        },
        plan.describe(),
        args.engines,
        args.prefetch,
        args.threads,
        if args.schema_validation { "on" } else { "off" }
    ));
    for (k, v) in &args.set {
        out.line(&format!("  setting {k}={v}"));
    }
    let mut reports = Vec::new();
    for k in 1..=args.pairs {
        if args.pairs > 1 {
            out.line(&format!("pair {k} of {}", args.pairs));
        }
        reports.push(run_pair(&args, plan, out).await?);
    }
    let ratios: Vec<f64> = reports.iter().filter_map(|r| r.ratio).collect();
    let summary = (args.pairs > 1)
        .then(|| pairs::RatioSummary::of(&ratios))
        .flatten();
    if let Some(s) = &summary {
        out.line(&s.line());
    }
    if args.json {
        if args.pairs > 1 {
            #[derive(Serialize)]
            struct Pairs {
                pairs: Vec<Report>,
                ratios: Option<pairs::RatioSummary>,
            }
            println!(
                "{}",
                serde_json::to_string(&Pairs {
                    pairs: reports,
                    ratios: summary,
                })?
            );
        } else if let Some(report) = reports.first() {
            println!("{}", serde_json::to_string(report)?);
        }
    }
    Ok(())
}

/// One fleet run and, unless `--no-reference`, the reference run right after it.
async fn run_pair(args: &Args, plan: Plan, out: Out) -> anyhow::Result<Report> {
    let p = provisio::run(args, plan).await?;
    print(out, "provisio", &p);
    let r = if args.no_reference {
        None
    } else {
        let r = reference::run(args, plan).await?;
        print(out, "reference", &r);
        Some(r)
    };
    let ratio = r.as_ref().map(|r| p.finished_per_s / r.finished_per_s);
    if let Some(ratio) = ratio {
        out.line(&format!(
            "ratio      finished/s provisio ÷ reference = {ratio:.2}"
        ));
    }
    if let Some(path) = &args.trace {
        write_trace(path, &p, r.as_ref())?;
        out.line(&format!("trace      {}", path.display()));
    }
    Ok(Report {
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
        threads: args.threads,
        procedure: args.procedure.clone(),
        schema_validation: args.schema_validation,
        provisio: p,
        reference: r,
        ratio,
    })
}

/// `--trace`: one CSV line per finished request of each run.
fn write_trace(
    path: &std::path::Path,
    provisio: &RunFigures,
    reference: Option<&RunFigures>,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut csv = String::from("run,submitted_s,latency_ms\n");
    let runs = std::iter::once(("provisio", provisio)).chain(reference.map(|r| ("reference", r)));
    for (name, f) in runs {
        for (at, took) in &f.timeline {
            let _ = writeln!(
                csv,
                "{name},{:.4},{:.3}",
                at.as_secs_f64(),
                took.as_secs_f64() * 1e3
            );
        }
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
#[path = "main_tests.rs"]
mod tests;
