//! `submit --bulk FILE.jsonl`: one request body per line, submitted concurrently through
//! `POST /v1/requests:batch` in chunks (or one `POST /v1/requests` each with `--chunk 1`),
//! with a progress bar and a summary by outcome.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::Context;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};

use crate::Format;
use crate::client::{Api, Body, Exit, Failure};

/// At most this many failed lines are listed one by one; the summary counts them all.
const LISTED: usize = 20;

pub struct Options<'a> {
    pub file: &'a Path,
    /// Requests per `:batch` call (at most 1000, the API's limit); 1 = `POST /v1/requests`.
    pub chunk: usize,
    /// HTTP calls in flight at once.
    pub in_flight: usize,
    /// Draw progress even when stderr is not a terminal.
    pub progress: bool,
}

#[derive(Clone)]
enum Outcome {
    Accepted,
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    Unreachable(String),
}

fn refused(f: Failure) -> Outcome {
    match f {
        Failure::Api {
            status,
            code,
            message,
            ..
        } => Outcome::Refused {
            status,
            code,
            message,
        },
        other => Outcome::Unreachable(format!("{:#}", anyhow::Error::from(other))),
    }
}

async fn one(api: &Api, body: &Value) -> Outcome {
    match api
        .call(Method::POST, "/v1/requests", &[], Body::Json(body))
        .await
    {
        Ok(_) => Outcome::Accepted,
        Err(f) => refused(f),
    }
}

/// One `:batch` call: each element's own result, or the whole call's failure for each.
async fn batch(api: &Api, items: &[(usize, Value)]) -> Vec<(usize, Outcome)> {
    let body = Value::Array(items.iter().map(|(_, v)| v.clone()).collect());
    let answer = api
        .call(Method::POST, "/v1/requests:batch", &[], Body::Json(&body))
        .await;
    let results = match answer {
        Ok((_, v)) => v.get("results").and_then(Value::as_array).cloned(),
        Err(f) => {
            let whole = refused(f);
            return items.iter().map(|(n, _)| (*n, whole.clone())).collect();
        }
    };
    let results = results.unwrap_or_default();
    items
        .iter()
        .enumerate()
        .map(|(i, (n, _))| {
            let Some(r) = results.get(i) else {
                return (
                    *n,
                    Outcome::Unreachable("the batch answer has no result for this line".into()),
                );
            };
            let status = r.get("status").and_then(Value::as_u64).unwrap_or(0);
            if (200..300).contains(&status) {
                return (*n, Outcome::Accepted);
            }
            let text = |p: &str| {
                r.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            (
                *n,
                Outcome::Refused {
                    status: status as u16,
                    code: text("/error/code"),
                    message: text("/error/message"),
                },
            )
        })
        .collect()
}

fn read_lines(file: &Path) -> anyhow::Result<String> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(file)
        .map_err(|e| Failure::Usage(format!("reading {}: {e}", file.display())).into())
}

/// The bar on stderr: drawn when stderr is a terminal; with `--progress` elsewhere (a log),
/// a plain line at each tenth instead, since a redrawn bar makes no sense in a file.
struct Progress {
    bar: ProgressBar,
    lines: bool,
    total: u64,
    done: u64,
}

impl Progress {
    fn new(total: u64, forced: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} submitted, {per_sec}, eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            lines: forced && !terminal,
            total,
            done: 0,
        }
    }

    fn inc(&mut self, n: u64) {
        let before = self.done * 10 / self.total.max(1);
        self.done += n;
        self.bar.inc(n);
        if self.lines && self.done * 10 / self.total.max(1) > before {
            eprintln!("progress: {}/{} submitted", self.done, self.total);
        }
    }
}

pub async fn run(api: &Api, opts: &Options<'_>, format: Format) -> anyhow::Result<Exit> {
    let text = read_lines(opts.file)?;
    let mut items: Vec<(usize, Value)> = Vec::new();
    let mut malformed: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => items.push((i + 1, v)),
            Ok(_) => malformed.push((i + 1, "not a JSON object".into())),
            Err(e) => malformed.push((i + 1, e.to_string())),
        }
    }
    let mut progress = Progress::new(items.len() as u64, opts.progress);
    let in_flight = opts.in_flight.max(1);
    let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(items.len());
    if opts.chunk <= 1 {
        let mut results = futures_util::stream::iter(&items)
            .map(|(n, v)| async move { (*n, one(api, v).await) })
            .buffer_unordered(in_flight);
        while let Some(r) = results.next().await {
            progress.inc(1);
            outcomes.push(r);
        }
    } else {
        let mut results = futures_util::stream::iter(items.chunks(opts.chunk.min(1000)))
            .map(|c| batch(api, c))
            .buffer_unordered(in_flight);
        while let Some(r) = results.next().await {
            progress.inc(r.len() as u64);
            outcomes.extend(r);
        }
    }
    progress.bar.finish_and_clear();
    outcomes.sort_by_key(|(n, _)| *n);
    summarize(&outcomes, &malformed, format)
}

fn summarize(
    outcomes: &[(usize, Outcome)],
    malformed: &[(usize, String)],
    format: Format,
) -> anyhow::Result<Exit> {
    let accepted = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Accepted))
        .count();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut unreachable = 0;
    let mut failures = Vec::new();
    for (n, o) in outcomes {
        match o {
            Outcome::Accepted => {}
            Outcome::Refused {
                status,
                code,
                message,
            } => {
                *by_status.entry(*status).or_default() += 1;
                failures
                    .push(json!({"line": n, "status": status, "code": code, "message": message}));
            }
            Outcome::Unreachable(m) => {
                unreachable += 1;
                failures
                    .push(json!({"line": n, "status": null, "code": "unreachable", "message": m}));
            }
        }
    }
    let refused: usize = by_status.values().sum();
    let lines = outcomes.len() + malformed.len();
    match format {
        Format::Json => {
            let summary = json!({
                "lines": lines,
                "accepted": accepted,
                "refused": refused,
                "refused_by_status": by_status.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "unreachable": unreachable,
                "malformed": malformed.iter().map(|(n, e)| json!({"line": n, "error": e})).collect::<Vec<_>>(),
                "failures": failures,
            });
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Format::Table => {
            println!(
                "lines: {lines}, accepted: {accepted}, refused: {refused}, unreachable: {unreachable}, malformed: {}",
                malformed.len()
            );
            if !by_status.is_empty() {
                let list: Vec<String> =
                    by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
                println!("refused by status: {}", list.join(", "));
            }
            if !malformed.is_empty() {
                let list: Vec<String> = malformed.iter().map(|(n, _)| n.to_string()).collect();
                println!("malformed lines: {}", list.join(", "));
            }
        }
    }
    for f in failures.iter().take(LISTED) {
        eprintln!(
            "error: line {}: {} {}: {}",
            f["line"],
            f["status"],
            f["code"].as_str().unwrap_or(""),
            f["message"].as_str().unwrap_or("")
        );
    }
    if failures.len() > LISTED {
        eprintln!(
            "error: … and {} more refused lines",
            failures.len() - LISTED
        );
    }
    for (n, e) in malformed.iter().take(LISTED) {
        eprintln!("error: line {n}: malformed: {e}");
    }
    if malformed.len() > LISTED {
        eprintln!(
            "error: … and {} more malformed lines",
            malformed.len() - LISTED
        );
    }
    Ok(if failures.is_empty() && malformed.is_empty() {
        Exit::Ok
    } else if accepted == 0 && refused == 0 && malformed.is_empty() {
        Exit::Server
    } else {
        Exit::Partial
    })
}
