//! The command line: global options, commands and their arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub(crate) const EXIT_CODES: &str = "\
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
pub(crate) struct Cli {
    /// Queue manager base URL.
    #[arg(
        long,
        env = "PROVISIO_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub(crate) url: String,
    /// API key (most commands need an admin's).
    #[arg(long, env = "PROVISIO_API_KEY", hide_env_values = true, global = true)]
    pub(crate) api_key: Option<String>,
    /// Output: aligned columns, or the API's JSON.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub(crate) output: Format,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
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
pub(crate) enum Get {
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
pub(crate) enum Describe {
    /// A request's record with its steps, rollbacks and (when audited) audit rows.
    Request { id: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum Delete {
    /// Delete a dead letter (one that cannot be requeued).
    DeadLetter { id: String },
}

#[derive(Args, Debug)]
pub(crate) struct Submit {
    #[arg(required_unless_present = "bulk")]
    pub(crate) namespace: Option<String>,
    #[arg(required_unless_present = "bulk")]
    pub(crate) procedure: Option<String>,
    /// JSON input.
    #[arg(long, default_value = "{}", conflicts_with = "bulk")]
    pub(crate) input: String,
    #[arg(long, conflicts_with = "bulk")]
    pub(crate) id: Option<String>,
    /// low, normal or high.
    #[arg(long, conflicts_with = "bulk")]
    pub(crate) priority: Option<String>,
    /// Run no earlier than this (RFC 3339).
    #[arg(long, conflicts_with = "bulk")]
    pub(crate) not_before: Option<String>,
    /// Seconds to wait for the outcome (the record is printed when it finished in time).
    #[arg(long, conflicts_with = "bulk")]
    pub(crate) wait: Option<u64>,
    /// Submit to the trusted queue (`execute_trusted`).
    #[arg(long, conflicts_with = "bulk")]
    pub(crate) trusted: bool,
    /// With --trusted: the principal the procedure acts for.
    #[arg(long)]
    pub(crate) run_as: Option<String>,
    /// A JSON-lines file (or `-`) of request bodies, submitted concurrently.
    #[arg(long)]
    pub(crate) bulk: Option<PathBuf>,
    /// With --bulk: requests per `POST /v1/requests:batch` (1 to 1000); 1, the default, is
    /// one `POST /v1/requests` each (as fast here, and gentler on the queue manager's
    /// database pool than large batches in flight).
    #[arg(long, default_value_t = 1, requires = "bulk", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) chunk: u16,
    /// With --bulk: HTTP calls in flight at once.
    #[arg(long, default_value_t = 32, requires = "bulk", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) in_flight: u16,
    /// With --bulk: report progress on stderr even when it is not a terminal.
    #[arg(long, requires = "bulk")]
    pub(crate) progress: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Principals {
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
    /// Show a principal's own grants and effective permissions, or set its own grants
    /// (`--set`, with no permission to withdraw them all).
    Grants {
        name: String,
        /// Replace its own grants with these permissions.
        #[arg(long)]
        set: bool,
        permissions: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum Keys {
    /// A new API key for a principal, printed this once.
    Create {
        principal: String,
        /// The key stops working after this many seconds.
        #[arg(long)]
        ttl_seconds: Option<u64>,
    },
    /// Revoke a key.
    Revoke { principal: String, key_id: String },
}
