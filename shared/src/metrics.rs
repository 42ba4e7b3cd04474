//! Every metric Provisio exports, named and described in one place. Names carry their unit
//! (`_seconds`, `_total`); labels are bounded sets (namespace, procedure, provider, status,
//! lane, reason), never request ids, and never names a client chose: a namespace or procedure
//! label is a name an admin applied, or a fixed value ([`request_labels`]).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const REQUESTS_ACCEPTED: &str = "provisio_requests_accepted_total";
pub const REQUESTS_REJECTED: &str = "provisio_requests_rejected_total";
pub const REQUESTS_FINISHED: &str = "provisio_requests_finished_total";
pub const REQUEST_DURATION: &str = "provisio_request_duration_seconds";
pub const REQUEST_RUN_DURATION: &str = "provisio_request_run_duration_seconds";
pub const STEP_DURATION: &str = "provisio_step_duration_seconds";
pub const STEP_RETRIES: &str = "provisio_step_retries_total";
pub const ROLLBACKS: &str = "provisio_rollbacks_total";
pub const PUBLISH_DURATION: &str = "provisio_publish_duration_seconds";
pub const BROKER_UP: &str = "provisio_broker_up";
pub const DEAD_LETTERS: &str = "provisio_dead_letters_total";
pub const INFLIGHT: &str = "provisio_inflight_requests";
pub const QUEUE_DEPTH: &str = "provisio_queue_depth_messages";
pub const TXLOG_BATCH_SIZE: &str = "provisio_txlog_batch_records";
pub const TXLOG_COMMIT_DURATION: &str = "provisio_txlog_commit_duration_seconds";
pub const TXLOG_QUEUE_WAIT: &str = "provisio_txlog_queue_wait_seconds";
pub const TXLOG_POOL_IN_USE: &str = "provisio_txlog_pool_connections_in_use";
pub const TXLOG_BAD_SERVERS: &str = "provisio_txlog_bad_servers";
pub const TXLOG_SERVER_UP: &str = "provisio_txlog_server_up";
pub const IN_DOUBT: &str = "provisio_in_doubt_transactions";
pub const PROVIDER_CALLS: &str = "provisio_provider_calls_total";
pub const PROVIDER_INFLIGHT: &str = "provisio_provider_inflight_calls";
pub const PROVIDER_THROTTLED: &str = "provisio_provider_throttled_total";
pub const PROVIDER_WAIT: &str = "provisio_provider_wait_seconds";
pub const RECOVERED: &str = "provisio_recovered_transactions_total";
pub const AUDIT_ROWS_SWEPT: &str = "provisio_audit_rows_swept_total";
pub const FENCED: &str = "provisio_fenced_transactions_total";
pub const OPENINGS_REFUSED: &str = "provisio_first_call_openings_refused_total";
pub const AUDITOR_LEADER: &str = "provisio_auditor_leader";
pub const AUDITOR_STEP_DOWNS: &str = "provisio_auditor_step_downs_total";
pub const DEAD_LETTERS_SETTLED: &str = "provisio_dead_letters_settled_total";
pub const SCHEDULED_WAIT: &str = "provisio_scheduled_wait_seconds";
pub const DENIALS: &str = "provisio_denials_total";
pub const RUNTIME_THREADS: &str = "provisio_runtime_threads";

/// Every metric above, for tests that check each one is served.
pub const ALL: &[&str] = &[
    REQUESTS_ACCEPTED,
    REQUESTS_REJECTED,
    REQUESTS_FINISHED,
    REQUEST_DURATION,
    REQUEST_RUN_DURATION,
    STEP_DURATION,
    STEP_RETRIES,
    ROLLBACKS,
    PUBLISH_DURATION,
    BROKER_UP,
    DEAD_LETTERS,
    INFLIGHT,
    QUEUE_DEPTH,
    TXLOG_BATCH_SIZE,
    TXLOG_COMMIT_DURATION,
    TXLOG_QUEUE_WAIT,
    TXLOG_POOL_IN_USE,
    TXLOG_BAD_SERVERS,
    TXLOG_SERVER_UP,
    IN_DOUBT,
    PROVIDER_CALLS,
    PROVIDER_INFLIGHT,
    PROVIDER_THROTTLED,
    PROVIDER_WAIT,
    RECOVERED,
    AUDIT_ROWS_SWEPT,
    FENCED,
    OPENINGS_REFUSED,
    AUDITOR_LEADER,
    AUDITOR_STEP_DOWNS,
    DEAD_LETTERS_SETTLED,
    SCHEDULED_WAIT,
    DENIALS,
    RUNTIME_THREADS,
];

/// The statuses an engine finishes a request with (`scheduled`: a request-level retry is due
/// later); the auditor finishes requests as `dead`.
pub const ENGINE_FINISHED_STATUSES: &[&str] =
    &["succeeded", "failed", "in_doubt", "parked", "scheduled"];
/// Why an engine dead-letters a message.
pub const DEAD_LETTER_REASONS: &[&str] = &["malformed", "unauthenticated", "forbidden"];
/// Why a call or a delivery was refused (`provisio_denials_total`): no or an unknown key, an
/// expired key, a permission the principal lacks (or a disabled principal), a submission limit.
pub const DENIAL_REASONS: &[&str] = &[
    "unauthenticated",
    "expired_key",
    "forbidden",
    "rate_limited",
];
/// The `lane` label of queue depth and accepted requests: the three priority lanes, the
/// trusted lane and (queue depth only) the dead-letter queue kept for operators.
pub const LANES: &[&str] = &["high", "normal", "low", "trusted"];
pub const DEAD_LANE: &str = "dead";

/// The `procedure` label of inline (ad-hoc) procedures of trusted requests: their names are
/// chosen per request by the caller, and as labels they would grow the metric set (and the
/// memory of every scraper) without bound.
pub const INLINE_PROCEDURE: &str = "inline";
/// The label of a namespace or procedure that does not exist (a forged or stale request).
pub const UNKNOWN: &str = "unknown";

/// The `namespace` and `procedure` labels of a request run against `ns` (`None`: no such
/// namespace). Inline procedures are `inline` even though the compiled namespace holds them
/// under the caller's name; names that the namespace lacks are `unknown`.
pub fn request_labels(
    ns: Option<&crate::procedure::Namespace>,
    procedure: &str,
    inline: bool,
) -> (String, String) {
    let Some(ns) = ns else {
        return (UNKNOWN.to_owned(), UNKNOWN.to_owned());
    };
    let procedure = if inline {
        INLINE_PROCEDURE
    } else if ns.procedures.contains_key(procedure) {
        procedure
    } else {
        UNKNOWN
    };
    (ns.name.to_string(), procedure.to_owned())
}

/// The `procedure` label where the name was checked against its namespace when the request
/// was accepted (the queue manager, request rows): the name itself, or `inline`.
pub fn accepted_procedure_label(procedure: &str, inline: bool) -> String {
    if inline {
        INLINE_PROCEDURE.to_owned()
    } else {
        procedure.to_owned()
    }
}

/// The kind of a metric, for [`DESCRIPTIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric with its kind, unit and help text: the one place a metric is described.
pub const DESCRIPTIONS: &[(Kind, &str, Unit, &str)] = &[
    (
        Kind::Counter,
        REQUESTS_ACCEPTED,
        Unit::Count,
        "Requests accepted (durable) by the queue manager, by namespace, procedure and lane.",
    ),
    (
        Kind::Counter,
        REQUESTS_REJECTED,
        Unit::Count,
        "Submissions (POST /v1/requests, /v1/requests/trusted, each element of /v1/requests:batch) the queue manager refused, by error code.",
    ),
    (
        Kind::Counter,
        REQUESTS_FINISHED,
        Unit::Count,
        "Requests that reached a final status, by namespace, procedure and status.",
    ),
    (
        Kind::Histogram,
        REQUEST_DURATION,
        Unit::Seconds,
        "From submission (or, for a scheduled request, the later `not_before`) to final status, by namespace, procedure and status.",
    ),
    (
        Kind::Histogram,
        REQUEST_RUN_DURATION,
        Unit::Seconds,
        "From delivery to final status in the engine, by namespace, procedure and status.",
    ),
    (
        Kind::Histogram,
        STEP_DURATION,
        Unit::Seconds,
        "Provider call duration (retries included), by provider.",
    ),
    (
        Kind::Counter,
        STEP_RETRIES,
        Unit::Count,
        "Step retries after retryable provider errors, by provider.",
    ),
    (
        Kind::Counter,
        ROLLBACKS,
        Unit::Count,
        "Transactions rolled back, by namespace and procedure.",
    ),
    (
        Kind::Histogram,
        PUBLISH_DURATION,
        Unit::Seconds,
        "Publish to broker confirm, as seen by the queue manager.",
    ),
    (
        Kind::Gauge,
        BROKER_UP,
        Unit::Count,
        "1 while the process has a working broker connection.",
    ),
    (
        Kind::Counter,
        DEAD_LETTERS,
        Unit::Count,
        "Messages sent to the dead-letter queue, by reason.",
    ),
    (
        Kind::Gauge,
        INFLIGHT,
        Unit::Count,
        "Requests an engine is running right now.",
    ),
    (
        Kind::Gauge,
        QUEUE_DEPTH,
        Unit::Count,
        "Messages ready in each request lane and in the dead-letter queue, sampled by the queue manager.",
    ),
    (
        Kind::Histogram,
        TXLOG_BATCH_SIZE,
        Unit::Count,
        "Records committed together by the transaction-log group-commit writer.",
    ),
    (
        Kind::Histogram,
        TXLOG_COMMIT_DURATION,
        Unit::Seconds,
        "Duration of one group commit of the transaction log.",
    ),
    (
        Kind::Histogram,
        TXLOG_QUEUE_WAIT,
        Unit::Seconds,
        "Time a transaction-log record waited for a commit slot before its batch started.",
    ),
    (
        Kind::Gauge,
        TXLOG_POOL_IN_USE,
        Unit::Count,
        "Transaction-log connections in use, by server.",
    ),
    (
        Kind::Gauge,
        TXLOG_BAD_SERVERS,
        Unit::Count,
        "Transaction-log servers currently on the bad-server list.",
    ),
    (
        Kind::Gauge,
        TXLOG_SERVER_UP,
        Unit::Count,
        "0 while a transaction-log server is on the bad-server list, else 1, by server.",
    ),
    (
        Kind::Gauge,
        IN_DOUBT,
        Unit::Count,
        "Transactions whose rollback could not complete, counted in the log by the leading auditor.",
    ),
    (
        Kind::Counter,
        PROVIDER_CALLS,
        Unit::Count,
        "Provider calls, by provider, action and outcome.",
    ),
    (
        Kind::Counter,
        FENCED,
        Unit::Count,
        "Transactions an engine lost to recovery (lease expired while it stalled): it stopped and wrote nothing more.",
    ),
    (
        Kind::Counter,
        OPENINGS_REFUSED,
        Unit::Count,
        "Openings written with a run's first call that opened nothing (the request was finished, busy or not on its first attempt): the request was opened the ordinary way and run again, no call having been made.",
    ),
    (
        Kind::Counter,
        AUDIT_ROWS_SWEPT,
        Unit::Count,
        "Rows moved from the transaction log into audit tables.",
    ),
    (
        Kind::Gauge,
        AUDITOR_LEADER,
        Unit::Count,
        "1 while this auditor holds the leader lock (recovers and sweeps), 0 on standby.",
    ),
    (
        Kind::Counter,
        AUDITOR_STEP_DOWNS,
        Unit::Count,
        "Times this auditor stopped leading because its lock session was lost.",
    ),
    (
        Kind::Counter,
        DEAD_LETTERS_SETTLED,
        Unit::Count,
        "Dead letters read by the auditors, by outcome (marked_dead, not_queued, unknown_request, mismatch).",
    ),
    (
        Kind::Counter,
        RECOVERED,
        Unit::Count,
        "Transactions finished for an engine that died (rolled back or completed), by the leading auditor or by the engine that runs the request again.",
    ),
    (
        Kind::Gauge,
        PROVIDER_INFLIGHT,
        Unit::Count,
        "Calls running now on a provider with limits, by provider.",
    ),
    (
        Kind::Counter,
        PROVIDER_THROTTLED,
        Unit::Count,
        "Times a call waited for its provider's rate limit, by provider.",
    ),
    (
        Kind::Histogram,
        PROVIDER_WAIT,
        Unit::Seconds,
        "Time a call waited for its provider's rate limit, by provider.",
    ),
    (
        Kind::Histogram,
        SCHEDULED_WAIT,
        Unit::Seconds,
        "From submission to `not_before` (or to a request-level retry's due time), by namespace and procedure: the wait a producer asked for, kept out of the request duration.",
    ),
    (
        Kind::Counter,
        DENIALS,
        Unit::Count,
        "Calls and deliveries refused for security, by reason (unauthenticated, expired_key, forbidden, rate_limited).",
    ),
    (
        Kind::Gauge,
        RUNTIME_THREADS,
        Unit::Count,
        "Threads that run the process's tasks (`runtime.threads`; 0 there means one per CPU the process may use).",
    ),
];

/// Registers descriptions with the installed recorder; call once after installing it.
pub fn describe() {
    for &(kind, name, unit, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => describe_counter!(name, unit, help),
            Kind::Gauge => describe_gauge!(name, unit, help),
            Kind::Histogram => describe_histogram!(name, unit, help),
        }
    }
}

/// Zero series of the queue manager's counters and histograms, so that dashboards show 0
/// rather than "no data" before the first request; `rejection_codes` are the API's error codes.
pub fn queue_manager_baseline(rejection_codes: &[&'static str]) {
    for lane in LANES {
        metrics::counter!(REQUESTS_ACCEPTED, "lane" => *lane).increment(0);
    }
    for code in rejection_codes {
        metrics::counter!(REQUESTS_REJECTED, "code" => *code).increment(0);
    }
    let _ = metrics::histogram!(PUBLISH_DURATION);
    metrics::gauge!(BROKER_UP).set(0.0);
    denials_baseline();
}

fn denials_baseline() {
    for reason in DENIAL_REASONS {
        metrics::counter!(DENIALS, "reason" => *reason).increment(0);
    }
}

/// Zero series of an engine's metrics; `providers` are the names of its providers.
pub fn engine_baseline<'a>(providers: impl IntoIterator<Item = &'a str>) {
    for status in ENGINE_FINISHED_STATUSES {
        metrics::counter!(REQUESTS_FINISHED, "status" => *status).increment(0);
        let _ = metrics::histogram!(REQUEST_DURATION, "status" => *status);
        let _ = metrics::histogram!(REQUEST_RUN_DURATION, "status" => *status);
    }
    for reason in DEAD_LETTER_REASONS {
        metrics::counter!(DEAD_LETTERS, "reason" => *reason).increment(0);
    }
    for provider in providers {
        let provider = provider.to_owned();
        let _ = metrics::histogram!(STEP_DURATION, "provider" => provider.clone());
        metrics::counter!(STEP_RETRIES, "provider" => provider.clone()).increment(0);
        for outcome in ["ok", "error"] {
            metrics::counter!(PROVIDER_CALLS, "provider" => provider.clone(), "outcome" => outcome)
                .increment(0);
        }
    }
    metrics::counter!(ROLLBACKS).increment(0);
    // An engine recovers an earlier attempt it finds unsettled before running a request.
    metrics::counter!(RECOVERED).increment(0);
    metrics::counter!(FENCED).increment(0);
    metrics::counter!(OPENINGS_REFUSED).increment(0);
    metrics::gauge!(INFLIGHT).set(0.0);
    metrics::gauge!(BROKER_UP).set(0.0);
    let _ = metrics::histogram!(SCHEDULED_WAIT);
    let _ = metrics::histogram!(TXLOG_BATCH_SIZE);
    let _ = metrics::histogram!(TXLOG_COMMIT_DURATION);
    let _ = metrics::histogram!(TXLOG_QUEUE_WAIT);
    denials_baseline();
}

/// Zero series of an auditor's counters (in-doubt and leadership gauges are set by the roles
/// that know them).
pub fn auditor_baseline() {
    metrics::counter!(RECOVERED).increment(0);
    metrics::counter!(REQUESTS_FINISHED, "status" => "dead").increment(0);
    metrics::counter!(ROLLBACKS, "namespace" => "recovery", "procedure" => "recovery").increment(0);
    metrics::gauge!(BROKER_UP).set(0.0);
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
