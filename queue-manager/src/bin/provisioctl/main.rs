//! `provisioctl`: the command-line client of the queue manager's API, shaped like kubectl
//! (`get`, `describe`, `apply -f`, verbs on one object), so that operators need no curl.

mod apply;
mod bulk;
mod client;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use client::{Api, Body, Exit, Failure, filters, seg};
use table::Col;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  usage: bad arguments, unreadable file, --input not JSON
  2  not found (HTTP 404)
  3  refused (any other 4xx: invalid, conflict, forbidden, unauthorized...; or a namespace
     document that --dry-run finds invalid)
  4  server error (5xx) or the queue manager is unreachable
  5  bulk submission: some lines were refused or malformed

Errors go to stderr as `error: CODE: MESSAGE (HTTP STATUS)`, CODE being the API's error code.";

#[derive(Parser, Debug)]
#[command(version, about = "Provisio command-line client", after_help = EXIT_CODES)]
struct Cli {
    /// Queue manager base URL.
    #[arg(
        long,
        env = "PROVISIO_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// API key (most commands need an admin's).
    #[arg(long, env = "PROVISIO_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Output: aligned columns, or the API's JSON.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Upload namespace documents: a file, every .yaml/.yml/.json file of a folder, or `-`
    /// for standard input.
    Apply {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
        /// Check the documents here (schema and language; providers that are not built in and
        /// other namespaces are checked by the server on a real apply) and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List or show resources.
    #[command(subcommand)]
    Get(Get),
    /// Show one object in detail.
    #[command(subcommand)]
    Describe(Describe),
    /// Submit a request (or, with --bulk, a file of them) and print the answer.
    Submit(Box<Submit>),
    /// Cancel a scheduled or parked request.
    Cancel { id: String },
    /// Resume a parked request.
    Resume { id: String },
    /// Requeue a dead letter (its request runs again), or every dead one with --all.
    Requeue {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        /// With --all: only dead letters of this reason.
        #[arg(long)]
        reason: Option<String>,
        /// With --all: only dead letters of this namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Delete an object.
    #[command(subcommand)]
    Delete(Delete),
    /// Resolve an in-doubt transaction by hand (after undoing its effects yourself).
    Resolve {
        tx_id: String,
        /// What was done, for the audit trail.
        #[arg(long)]
        note: String,
        /// Seconds to wait for the auditor to carry it out (up to 60).
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Retry an in-doubt transaction's rollback (e.g. after fixing the provider).
    RetryRollback {
        tx_id: String,
        #[arg(long)]
        note: Option<String>,
        /// Seconds to wait for the auditor to carry it out (up to 60).
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Manage principals.
    #[command(subcommand)]
    Principals(Principals),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(Keys),
}

#[derive(Subcommand, Debug)]
enum Get {
    /// Every namespace with its current version.
    #[command(alias = "ns")]
    Namespaces,
    /// One namespace's version history (-o json: with its document).
    Namespace { name: String },
    /// Requests, newest first.
    #[command(alias = "req")]
    Requests {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        /// The `next` of the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    /// One request's record.
    Request { id: String },
    /// In-doubt transactions.
    #[command(alias = "tx")]
    Transactions {
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Audited transactions, newest first.
    Audit {
        /// Started at or after (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Started before (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        procedure: Option<String>,
        /// committed, rolled_back, failed or in_doubt.
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
    },
    /// Dead letters.
    #[command(alias = "dl")]
    DeadLetters {
        /// dead (the default), requeued or all.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
    },
    /// The resource manager's pools.
    Pools,
}

#[derive(Subcommand, Debug)]
enum Describe {
    /// A request's record with its steps, rollbacks and (when audited) audit rows.
    Request { id: String },
}

#[derive(Subcommand, Debug)]
enum Delete {
    /// Delete a dead letter (one that cannot be requeued).
    DeadLetter { id: String },
}

#[derive(Args, Debug)]
struct Submit {
    #[arg(required_unless_present = "bulk")]
    namespace: Option<String>,
    #[arg(required_unless_present = "bulk")]
    procedure: Option<String>,
    /// JSON input.
    #[arg(long, default_value = "{}", conflicts_with = "bulk")]
    input: String,
    #[arg(long, conflicts_with = "bulk")]
    id: Option<String>,
    /// low, normal or high.
    #[arg(long, conflicts_with = "bulk")]
    priority: Option<String>,
    /// Run no earlier than this (RFC 3339).
    #[arg(long, conflicts_with = "bulk")]
    not_before: Option<String>,
    /// Seconds to wait for the outcome (the record is printed when it finished in time).
    #[arg(long, conflicts_with = "bulk")]
    wait: Option<u64>,
    /// Submit to the trusted queue (`execute_trusted`).
    #[arg(long, conflicts_with = "bulk")]
    trusted: bool,
    /// With --trusted: the principal the procedure acts for.
    #[arg(long)]
    run_as: Option<String>,
    /// A JSON-lines file (or `-`) of request bodies, submitted concurrently.
    #[arg(long)]
    bulk: Option<PathBuf>,
    /// With --bulk: requests per `POST /v1/requests:batch` (1 to 1000); 1, the default, is
    /// one `POST /v1/requests` each (as fast here, and gentler on the queue manager's
    /// database pool than large batches in flight).
    #[arg(long, default_value_t = 1, requires = "bulk", value_parser = clap::value_parser!(u16).range(1..=1000))]
    chunk: u16,
    /// With --bulk: HTTP calls in flight at once.
    #[arg(long, default_value_t = 32, requires = "bulk", value_parser = clap::value_parser!(u16).range(1..))]
    in_flight: u16,
    /// With --bulk: report progress on stderr even when it is not a terminal.
    #[arg(long, requires = "bulk")]
    progress: bool,
}

#[derive(Subcommand, Debug)]
enum Principals {
    /// Create a principal.
    Create {
        name: String,
        /// A group to put it in (repeat for several).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// person or service.
        #[arg(long)]
        kind: Option<String>,
        /// The RabbitMQ user that publishes as this principal.
        #[arg(long)]
        amqp_user: Option<String>,
    },
    /// Set a principal's groups (replacing them; none = no group).
    Groups { name: String, groups: Vec<String> },
}

#[derive(Subcommand, Debug)]
enum Keys {
    /// A new API key for a principal, printed this once.
    Create { principal: String },
    /// Revoke a key.
    Revoke { principal: String, key_id: String },
}

/// Prints an answer: its JSON, or the rows at `key` (or the answer itself when `key` is
/// empty) in columns.
fn print(answer: &Value, format: Format, key: &str, cols: &[Col]) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Format::Table => {
            let rows = if key.is_empty() {
                std::slice::from_ref(answer)
            } else {
                table::list_of(answer, key)
            };
            print!("{}", table::render(rows, cols));
            if let Some(next) = answer.get("next").filter(|n| !n.is_null()) {
                eprintln!("more: --after {}", table::cell(Some(next)));
            }
        }
    }
    Ok(())
}

fn wait_query(wait: Option<u64>) -> Vec<(&'static str, String)> {
    wait.map(|w| vec![("wait", w.to_string())])
        .unwrap_or_default()
}

fn opt<T: ToString>(v: Option<&T>) -> Option<String> {
    v.map(ToString::to_string)
}

async fn get(api: &Api, what: &Get, format: Format) -> anyhow::Result<Exit> {
    match what {
        Get::Namespaces => {
            let v = api.get("/v1/namespaces", &[]).await?;
            print(&v, format, "namespaces", table::NAMESPACES)?;
        }
        Get::Namespace { name } => {
            let v = api
                .get(&format!("/v1/namespaces/{}", seg(name)), &[])
                .await?;
            print(&v, format, "history", table::HISTORY)?;
        }
        Get::Requests {
            status,
            namespace,
            limit,
            after,
        } => {
            let q = filters(&[
                ("status", status.clone()),
                ("namespace", namespace.clone()),
                ("limit", opt(limit.as_ref())),
                ("after", after.clone()),
            ]);
            let v = api.get("/v1/requests", &q).await?;
            print(&v, format, "requests", table::REQUEST)?;
        }
        Get::Request { id } => {
            let v = api.get(&format!("/v1/requests/{}", seg(id)), &[]).await?;
            print(&v, format, "", table::REQUEST)?;
        }
        Get::Transactions { limit } => {
            let q = filters(&[
                ("status", Some("in_doubt".to_owned())),
                ("limit", opt(limit.as_ref())),
            ]);
            let v = api.get("/v1/transactions", &q).await?;
            print(&v, format, "transactions", table::IN_DOUBT)?;
        }
        Get::Audit {
            from,
            to,
            namespace,
            procedure,
            outcome,
            request_id,
            limit,
            after,
        } => {
            let q = filters(&[
                ("from", from.clone()),
                ("to", to.clone()),
                ("namespace", namespace.clone()),
                ("procedure", procedure.clone()),
                ("outcome", outcome.clone()),
                ("request_id", request_id.clone()),
                ("limit", opt(limit.as_ref())),
                ("after", after.clone()),
            ]);
            let v = api.get("/v1/audit/transactions", &q).await?;
            print(&v, format, "transactions", table::AUDIT)?;
        }
        Get::DeadLetters {
            status,
            reason,
            namespace,
            request_id,
            limit,
            after,
        } => {
            let q = filters(&[
                ("status", status.clone()),
                ("reason", reason.clone()),
                ("namespace", namespace.clone()),
                ("request_id", request_id.clone()),
                ("limit", opt(limit.as_ref())),
                ("after", after.clone()),
            ]);
            let v = api.get("/v1/dead-letters", &q).await?;
            print(&v, format, "dead_letters", table::DEAD_LETTERS)?;
        }
        Get::Pools => {
            let v = api.get("/v1/resources/pools", &[]).await?;
            print(&v, format, "pools", table::POOLS)?;
        }
    }
    Ok(Exit::Ok)
}

/// `describe request ID`: the record, then its audit rows when the caller may read them (an
/// admin) and the transaction was audited.
async fn describe_request(api: &Api, id: &str, format: Format) -> anyhow::Result<Exit> {
    let rec = api.get(&format!("/v1/requests/{}", seg(id)), &[]).await?;
    let mut audit = Vec::new();
    let mut audit_note = None;
    match api
        .get(
            "/v1/audit/transactions",
            &[("request_id", id.to_owned()), ("limit", "1000".to_owned())],
        )
        .await
    {
        Ok(list) => {
            for t in table::list_of(&list, "transactions") {
                let Some(tx) = t.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let full = api
                    .get(&format!("/v1/audit/transactions/{}", seg(tx)), &[])
                    .await?;
                audit.push(full);
            }
        }
        Err(Failure::Api { status: 403, .. }) => {
            audit_note = Some("not shown: reading the audit needs the admin permission");
        }
        Err(e) => return Err(e.into()),
    }
    if format == Format::Json {
        let out = json!({"request": rec, "audit": audit});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Exit::Ok);
    }
    let field = |label: &str, p: &str| {
        if let Some(v) = rec.pointer(p).filter(|v| !v.is_null()) {
            println!("{:<11}{}", format!("{label}:"), table::cell(Some(v)));
        }
    };
    field("Request", "/id");
    field("Namespace", "/namespace");
    field("Procedure", "/procedure");
    field("Status", "/status");
    field("Attempts", "/attempts");
    field("Submitted", "/submitted_at");
    field("Started", "/started_at");
    field("Finished", "/finished_at");
    if let Some(e) = rec.get("error").filter(|e| !e.is_null()) {
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
        let step = e
            .get("step")
            .and_then(Value::as_str)
            .map(|s| format!(" (step {s})"))
            .unwrap_or_default();
        println!(
            "{:<11}{}: {}{step}",
            "Error:",
            text("code"),
            text("message")
        );
        if let Some(r) = e.get("resolution") {
            println!("{:<11}{r}", "Resolution:");
        }
        if let Some(n) = e
            .get("not_undone")
            .and_then(Value::as_array)
            .filter(|n| !n.is_empty())
        {
            println!("Not undone:");
            print!(
                "{}",
                indent(&table::render(
                    n,
                    &[
                        ("PATH", "/path"),
                        ("PROVIDER", "/provider"),
                        ("ACTION", "/action"),
                        ("ERROR", "/error")
                    ]
                ))
            );
        }
    }
    if let Some(o) = rec.get("output").filter(|o| !o.is_null()) {
        println!("{:<11}{o}", "Output:");
    }
    let steps = rec
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (rollbacks, forward): (Vec<Value>, Vec<Value>) = steps.into_iter().partition(|s| {
        matches!(
            s.get("status").and_then(Value::as_str),
            Some("rolled_back" | "rollback_failed")
        )
    });
    println!("Steps:");
    if forward.is_empty() {
        println!("  (none recorded)");
    } else {
        print!("{}", indent(&table::render(&forward, table::STEPS)));
    }
    if !rollbacks.is_empty() {
        println!("Rollbacks:");
        print!(
            "{}",
            indent(&table::render(
                &rollbacks,
                &[("PATH", "/path"), ("STATUS", "/status")]
            ))
        );
    }
    println!("Audit:");
    if let Some(note) = audit_note {
        println!("  ({note})");
    } else if audit.is_empty() {
        println!("  (not audited, or not swept yet)");
    }
    for t in &audit {
        print!(
            "{}",
            indent(&table::render(std::slice::from_ref(t), table::AUDIT))
        );
        if let Some(p) = t
            .get("procedures")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
        {
            println!("  Procedures:");
            print!(
                "{}",
                indent(&indent(&table::render(
                    p,
                    &[
                        ("STEP", "/step"),
                        ("NAMESPACE", "/namespace"),
                        ("PROCEDURE", "/procedure")
                    ]
                )))
            );
        }
        if let Some(e) = t
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            println!("  Errors:");
            print!(
                "{}",
                indent(&indent(&table::render(
                    e,
                    &[
                        ("SEQ", "/seq"),
                        ("SOURCE", "/source"),
                        ("CODE", "/code"),
                        ("DESCRIPTION", "/description")
                    ]
                )))
            );
        }
    }
    Ok(Exit::Ok)
}

fn indent(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines() {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

async fn submit(api: &Api, s: &Submit, format: Format) -> anyhow::Result<Exit> {
    if let Some(file) = &s.bulk {
        let opts = bulk::Options {
            file,
            chunk: usize::from(s.chunk),
            in_flight: usize::from(s.in_flight),
            progress: s.progress,
        };
        return bulk::run(api, &opts, format).await;
    }
    if s.run_as.is_some() && !s.trusted {
        return Err(Failure::Usage("--run-as goes with --trusted".into()).into());
    }
    let input: Value = serde_json::from_str(&s.input)
        .map_err(|e| Failure::Usage(format!("--input is not JSON: {e}")))?;
    let mut body = json!({
        "namespace": s.namespace, "procedure": s.procedure, "input": input,
    });
    for (k, v) in [
        ("id", &s.id),
        ("priority", &s.priority),
        ("not_before", &s.not_before),
        ("run_as", &s.run_as),
    ] {
        if let Some(v) = v {
            body[k] = Value::String(v.clone());
        }
    }
    let path = if s.trusted {
        "/v1/requests/trusted"
    } else {
        "/v1/requests"
    };
    let (status, v) = api
        .call(Method::POST, path, &wait_query(s.wait), Body::Json(&body))
        .await?;
    // 200: finished within --wait, the record; 202: accepted (queued or scheduled).
    let cols = if status == StatusCode::OK {
        table::REQUEST
    } else {
        table::ACCEPTED
    };
    print(&v, format, "", cols)?;
    Ok(Exit::Ok)
}

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let api = Api::new(&cli.url, cli.api_key.clone())?;
    let format = cli.output;
    let post = |path: String, query: Vec<(&'static str, String)>, body: Option<Value>| {
        let api = &api;
        async move {
            let body = body.as_ref().map_or(Body::Empty, Body::Json);
            api.call(Method::POST, &path, &query, body)
                .await
                .map(|(_, v)| v)
        }
    };
    match &cli.cmd {
        Cmd::Apply { path, dry_run } => apply::run(&api, path, *dry_run, format).await,
        Cmd::Get(what) => get(&api, what, format).await,
        Cmd::Describe(Describe::Request { id }) => describe_request(&api, id, format).await,
        Cmd::Submit(s) => submit(&api, s, format).await,
        Cmd::Cancel { id } => {
            let (_, v) = api
                .call(
                    Method::DELETE,
                    &format!("/v1/requests/{}", seg(id)),
                    &[],
                    Body::Empty,
                )
                .await?;
            print(&v, format, "", table::REQUEST)?;
            Ok(Exit::Ok)
        }
        Cmd::Resume { id } => {
            let v = post(format!("/v1/requests/{}:resume", seg(id)), vec![], None).await?;
            print(&v, format, "", table::REQUEST)?;
            Ok(Exit::Ok)
        }
        Cmd::Requeue {
            all: false,
            reason,
            namespace,
            ..
        } if reason.is_some() || namespace.is_some() => {
            Err(Failure::Usage("--reason and --namespace go with --all".into()).into())
        }
        Cmd::Requeue {
            id: Some(id),
            all: false,
            ..
        } => {
            let v = post(
                format!("/v1/dead-letters/{}:requeue", seg(id)),
                vec![],
                None,
            )
            .await?;
            print(&v, format, "", table::REQUEUED_ONE)?;
            Ok(Exit::Ok)
        }
        Cmd::Requeue {
            reason, namespace, ..
        } => {
            let mut filter = serde_json::Map::new();
            for (k, v) in [("reason", reason), ("namespace", namespace)] {
                if let Some(v) = v {
                    filter.insert(k.into(), Value::String(v.clone()));
                }
            }
            let v = post(
                "/v1/dead-letters:requeue".into(),
                vec![],
                Some(Value::Object(filter)),
            )
            .await?;
            print(&v, format, "requeued", table::REQUEUED)?;
            if format == Format::Table {
                for s in v
                    .get("skipped")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    eprintln!(
                        "skipped: dead letter {}: {}",
                        table::cell(s.get("id")),
                        table::cell(s.get("reason"))
                    );
                }
                if v.get("more").and_then(Value::as_bool) == Some(true) {
                    eprintln!("more dead letters match: run it again");
                }
            }
            Ok(Exit::Ok)
        }
        Cmd::Delete(Delete::DeadLetter { id }) => {
            let (_, v) = api
                .call(
                    Method::DELETE,
                    &format!("/v1/dead-letters/{}", seg(id)),
                    &[],
                    Body::Empty,
                )
                .await?;
            print(&v, format, "", table::DELETED)?;
            Ok(Exit::Ok)
        }
        Cmd::Resolve { tx_id, note, wait } => {
            let v = post(
                format!("/v1/transactions/{}:resolve", seg(tx_id)),
                wait_query(*wait),
                Some(json!({"note": note})),
            )
            .await?;
            print(&v, format, "", table::COMMAND)?;
            Ok(Exit::Ok)
        }
        Cmd::RetryRollback { tx_id, note, wait } => {
            let body = note.as_ref().map(|n| json!({"note": n}));
            let v = post(
                format!("/v1/transactions/{}:retry-rollback", seg(tx_id)),
                wait_query(*wait),
                body,
            )
            .await?;
            print(&v, format, "", table::COMMAND)?;
            Ok(Exit::Ok)
        }
        Cmd::Principals(Principals::Create {
            name,
            groups,
            kind,
            amqp_user,
        }) => {
            let mut body = json!({"name": name, "groups": groups});
            if let Some(k) = kind {
                body["kind"] = json!(k);
            }
            if let Some(u) = amqp_user {
                body["amqp_user"] = json!(u);
            }
            let v = post("/v1/principals".into(), vec![], Some(body)).await?;
            print(&v, format, "", table::PRINCIPAL)?;
            Ok(Exit::Ok)
        }
        Cmd::Principals(Principals::Groups { name, groups }) => {
            let body = json!({"groups": groups});
            let (_, v) = api
                .call(
                    Method::PUT,
                    &format!("/v1/principals/{}/groups", seg(name)),
                    &[],
                    Body::Json(&body),
                )
                .await?;
            print(&v, format, "", table::GROUPS)?;
            Ok(Exit::Ok)
        }
        Cmd::Keys(Keys::Create { principal }) => {
            let v = post(
                format!("/v1/principals/{}/keys", seg(principal)),
                vec![],
                None,
            )
            .await?;
            print(&v, format, "", table::KEY)?;
            Ok(Exit::Ok)
        }
        Cmd::Keys(Keys::Revoke { principal, key_id }) => {
            let (_, v) = api
                .call(
                    Method::DELETE,
                    &format!("/v1/principals/{}/keys/{}", seg(principal), seg(key_id)),
                    &[],
                    Body::Empty,
                )
                .await?;
            print(&v, format, "", table::REVOKED)?;
            Ok(Exit::Ok)
        }
    }
}

fn report(e: &anyhow::Error) -> Exit {
    let failure = e.chain().find_map(|c| c.downcast_ref::<Failure>());
    match failure {
        Some(Failure::Api { details, .. }) => {
            eprintln!("error: {e:#}");
            for d in details.as_array().into_iter().flatten() {
                let p = d.get("path").and_then(Value::as_str).unwrap_or("");
                let m = d.get("message").and_then(Value::as_str).unwrap_or("");
                eprintln!("  {p}: {m}");
            }
        }
        _ => eprintln!("error: {e:#}"),
    }
    failure.map_or(Exit::Usage, Failure::exit)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    match run(cli).await {
        Ok(code) => code.into(),
        Err(e) => report(&e).into(),
    }
}
