//! The transaction log's group-commit writer (docs/design.md §6.3).
//!
//! Every engine task that must make a log record durable sends it here and waits for the
//! commit that carries it. A collector takes whatever records are waiting (up to
//! `max_batch`) and commits them in one PostgreSQL transaction, so one fsync serves every
//! request in flight. Several batches may commit concurrently (`writers`), so a slow commit
//! does not stall the next batch from forming.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::{GenericClient, Pool};
use futures_util::future::BoxFuture;
use provisio_shared::domain::{Status, TxStatus};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("transaction log unavailable: {0}")]
    Unavailable(String),
    #[error("transaction log writer stopped")]
    Stopped,
    /// The transaction is no longer this engine's: its lease expired and recovery (or another
    /// owner) took it over, or it is already finished. Nothing was written.
    #[error("transaction {0} is no longer owned by this engine")]
    Fenced(Uuid),
    /// The transaction's log server stopped answering for longer than the timeout and is on
    /// the bad-server list: the run rolls back what it did and the request moves elsewhere.
    #[error("{0}")]
    Bad(String),
}

/// Where a run's records go: one server's group-commit writer, directly or through the
/// server's health tracking (retried until the server answers or is declared bad).
pub trait LogSink: Send + Sync {
    fn write_record(&self, record: Record) -> BoxFuture<'_, Result<Reply, LogError>>;
}

impl LogSink for TxLog {
    fn write_record(&self, record: Record) -> BoxFuture<'_, Result<Reply, LogError>> {
        Box::pin(self.write(record))
    }
}

/// A transaction's opening: the row recovery looks for, and the request marked running.
#[derive(Debug, Clone)]
pub struct Begin {
    pub tx_id: Uuid,
    pub request_id: String,
    pub namespace: String,
    pub procedure: String,
    pub namespace_version: i32,
    pub model: &'static str,
    pub audit: bool,
    pub engine_id: String,
    pub lease_seconds: f64,
    pub input: Value,
    pub principal_id: Option<Uuid>,
    pub priority: &'static str,
    /// Open only if this is the request's first attempt (nothing refused, nothing retried
    /// yet): an opening written together with the first step's intent was computed for
    /// attempt 1, and must not open anything else.
    pub first_only: bool,
}

/// A completed step (with what rolling it back needs) or a rollback of one.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub tx_id: Uuid,
    pub seq: i32,
    pub kind: &'static str,
    pub path: String,
    pub provider: Option<String>,
    pub action: Option<String>,
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub rollback_data: Option<Value>,
    pub error: Option<Value>,
    /// The engine that must still own the transaction for this record to be written.
    pub owner: Arc<str>,
    /// `namespace.procedure` the step ran in (nested procedures name themselves).
    pub procedure: Option<String>,
}

/// The outcome: transaction and request rows updated together, plus any step records not yet
/// written (the last step needs no separate commit: nothing runs after it).
#[derive(Debug, Clone)]
pub struct Finish {
    pub tx_id: Uuid,
    /// For `read` transactions, which were never opened: the row to create.
    pub open: Option<Begin>,
    pub steps: Vec<StepRecord>,
    pub tx_status: TxStatus,
    pub request_id: String,
    pub request_status: Status,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub summary: Value,
    /// Request-level retry: run again at this time from this envelope (status `scheduled`);
    /// also a parked request's envelope, kept for an operator's resume (a parked request is
    /// not finished: its `finished_at` stays empty, and nothing publishes it at that time).
    pub retry_at: Option<(chrono::DateTime<chrono::Utc>, Value)>,
    /// The engine that must still own the transaction for the outcome to be written.
    pub owner: Arc<str>,
    /// Some procedure that ran (nested ones included) was marked for audit.
    pub audit: bool,
    /// What the procedures' `audit:` expressions gave.
    pub audit_data: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Record {
    Begin(Begin),
    /// An opening and the first step records (the first call's intent) in one statement and
    /// one commit: a run's first flush, when the engine opens transactions with their first
    /// call (`engine.open_with_first_call`). Answered like `Begin`; when nothing was opened,
    /// nothing was written.
    BeginWith(Begin, Vec<StepRecord>),
    /// Step records written together, in one commit (a completion and the next intent).
    Steps(Vec<StepRecord>),
    /// A transaction's status changes (two-phase: `prepared`, then the decision `committing`).
    Status {
        tx_id: Uuid,
        status: &'static str,
        owner: Arc<str>,
    },
    Finish(Box<Finish>),
}

/// What a committed record reports back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done,
    /// `Begin` only: the attempt number given to this transaction.
    Began {
        attempt: i32,
    },
    /// `Begin` only: the request already has a final status; nothing was opened.
    AlreadyFinished,
    /// `Begin` only: another attempt of the request runs under a live lease; nothing was
    /// opened (a duplicate delivery must wait, never run concurrently).
    Busy,
    /// `Begin` only: the request's last attempt never finished and its lease expired: it must
    /// be recovered (`tx`) before the request can run again; nothing was opened.
    Unsettled {
        tx: Option<Uuid>,
    },
}

struct Job {
    record: Record,
    done: oneshot::Sender<Result<Reply, LogError>>,
    /// When the record was handed to the writer: its wait for a commit slot is the engine's
    /// own queueing, which the commit duration alone does not show.
    queued: Instant,
}

#[derive(Clone)]
pub struct TxLog {
    tx: mpsc::Sender<Job>,
}

impl TxLog {
    /// Starts the collector on `pool`.
    pub fn start(pool: Pool, max_batch: usize, writers: usize) -> Self {
        let (tx, rx) = mpsc::channel(max_batch * writers * 4);
        tokio::spawn(collector(pool, rx, max_batch, writers));
        Self { tx }
    }

    /// Waits until `record` is committed.
    pub async fn write(&self, record: Record) -> Result<Reply, LogError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job {
                record,
                done,
                queued: Instant::now(),
            })
            .await
            .map_err(|_| LogError::Stopped)?;
        wait.await.map_err(|_| LogError::Stopped)?
    }
}

async fn collector(pool: Pool, rx: mpsc::Receiver<Job>, max_batch: usize, writers: usize) {
    provisio_shared::batch::run(rx, max_batch, writers, move |batch| {
        let pool = pool.clone();
        async move { commit_batch(&pool, batch).await }
    })
    .await;
}

async fn commit_batch(pool: &Pool, batch: Vec<Job>) {
    metrics::histogram!(provisio_shared::metrics::TXLOG_BATCH_SIZE).record(batch.len() as f64);
    let started = Instant::now();
    let waited = metrics::histogram!(provisio_shared::metrics::TXLOG_QUEUE_WAIT);
    for job in &batch {
        waited.record(started.duration_since(job.queued).as_secs_f64());
    }
    let records: Vec<&Record> = batch.iter().map(|j| &j.record).collect();
    match write_together(pool, &records).await {
        Ok(replies) => {
            metrics::histogram!(provisio_shared::metrics::TXLOG_COMMIT_DURATION)
                .record(started.elapsed().as_secs_f64());
            for (job, reply) in batch.into_iter().zip(replies) {
                let _ = job.done.send(reply);
            }
        }
        Err(e) if batch.len() > 1 => {
            // One bad record must not fail its neighbours: retry each on its own.
            tracing::debug!(error = %e, size = batch.len(), "batch failed, isolating records");
            for job in batch {
                let r = match write_together(pool, &[&job.record]).await {
                    Ok(mut v) => v.pop().unwrap_or(Ok(Reply::Done)),
                    Err(e) => Err(e),
                };
                let _ = job.done.send(r);
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.done.send(Err(e.clone()));
            }
        }
    }
}

/// All `Begin`s of a batch in one statement: upsert the requests (not those already final,
/// not those whose previous attempt is still `running`: one attempt at a time, and not those
/// already attempted when the opening is `first_only`), then open a transaction for each
/// request that was upserted and make it the request's current one, and write the step
/// records that came with an opening (`BeginWith`) for each transaction opened. Those records
/// need no fencing: their transaction was created by this very statement.
macro_rules! begin_ctes {
    () => {
        "u AS (\
       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::uuid[], $6::text[], \
                            $7::jsonb[], $8::uuid[], $9::text[], $10::text[], $11::bool[], $12::text[], $13::float8[], \
                            $14::bool[]) \
       AS u(request_id, namespace, procedure, namespace_version, principal_id, priority, input, \
            tx_id, model, status, audit, engine_id, lease, first_only)), \
     r AS (\
       INSERT INTO requests (id, body_hash, namespace, procedure, namespace_version, principal_id, priority, \
                             status, input, attempts, started_at, current_tx) \
       SELECT request_id, '', namespace, procedure, namespace_version, principal_id, priority, 'running', input, 1, now(), tx_id \
       FROM u \
       ON CONFLICT (id) DO UPDATE SET status = 'running', attempts = requests.attempts + 1, \
          started_at = now(), namespace_version = EXCLUDED.namespace_version, current_tx = EXCLUDED.current_tx \
       WHERE requests.status NOT IN ('succeeded', 'failed', 'in_doubt', 'dead', 'cancelled', 'running') \
         AND NOT EXISTS (SELECT 1 FROM u WHERE u.request_id = requests.id AND u.first_only AND requests.attempts > 0) \
       RETURNING id, attempts), \
     t AS (\
       INSERT INTO transactions (id, request_id, attempt, namespace, procedure, namespace_version, model, status, \
                                 audit, engine_id, lease_until) \
       SELECT u.tx_id, u.request_id, r.attempts, u.namespace, u.procedure, u.namespace_version, u.model, u.status, \
              u.audit, u.engine_id, now() + make_interval(secs => u.lease) \
       FROM u JOIN r ON r.id = u.request_id \
       RETURNING id, request_id, attempt), \
     s AS (\
       INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action, input, output, rollback_data, error, procedure) \
       SELECT v.tx_id, v.seq, v.kind, v.path, v.provider, v.action, v.input, v.output, v.rollback_data, v.error, v.procedure \
       FROM unnest($15::uuid[], $16::int4[], $17::text[], $18::text[], $19::text[], $20::text[], \
                   $21::jsonb[], $22::jsonb[], $23::jsonb[], $24::jsonb[], $25::text[]) \
            AS v(tx_id, seq, kind, path, provider, action, input, output, rollback_data, error, procedure) \
       JOIN t ON t.id = v.tx_id)"
    };
}
const SQL_BEGIN: &str = concat!("WITH ", begin_ctes!(), " SELECT request_id, attempt FROM t");

/// Why a `Begin` opened nothing: the request's status, and whether its current attempt is
/// unfinished and still leased.
const SQL_NOT_OPENED: &str = "SELECT r.id, r.status, r.current_tx, t.id IS NOT NULL, coalesce(t.lease_until > now(), false) \
     FROM requests r LEFT JOIN transactions t ON t.id = r.current_tx AND t.finished_at IS NULL \
     WHERE r.id = ANY($1)";

/// All step records of a batch in one statement, each written only while its transaction is
/// unfinished and still owned by the writer (fencing).
const SQL_STEPS: &str = "INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action, input, output, rollback_data, error, procedure) \
     SELECT u.tx_id, u.seq, u.kind, u.path, u.provider, u.action, u.input, u.output, u.rollback_data, u.error, u.procedure \
     FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::jsonb[], $8::jsonb[], $9::jsonb[], $10::jsonb[], $11::text[], $12::text[]) \
          AS u(tx_id, seq, kind, path, provider, action, input, output, rollback_data, error, procedure, owner) \
     WHERE EXISTS (SELECT 1 FROM transactions t WHERE t.id = u.tx_id AND t.engine_id = u.owner AND t.finished_at IS NULL) \
     RETURNING tx_id, seq";

const SQL_STATUS: &str =
    "UPDATE transactions SET status = $2 WHERE id = $1 AND engine_id = $3 AND finished_at IS NULL";

/// All outcomes of a batch in one statement: transactions and their requests together, each
/// only while the writer still owns the transaction, and the request only while that
/// transaction is its current attempt (fencing). The `= ANY(array)` conditions make the
/// planner look rows up by primary key; joined with `unnest` alone it may choose to scan the
/// whole table.
macro_rules! finish_ctes {
    () => {
        "fu AS (\
       SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::jsonb[], \
                            $8::timestamptz[], $9::jsonb[], $10::text[], $11::bool[], $12::jsonb[]) \
       AS fu(tx_id, tx_status, request_id, request_status, output, error, summary, retry_at, envelope, owner, \
            audit, audit_data)), \
     ft AS (\
       UPDATE transactions SET status = fu.tx_status, output = fu.output, error = fu.error, \
              audit = transactions.audit OR fu.audit, audit_data = fu.audit_data, \
              finished_at = now(), lease_until = NULL \
       FROM fu WHERE transactions.id = ANY($1::uuid[]) AND transactions.id = fu.tx_id \
         AND transactions.engine_id = fu.owner AND transactions.finished_at IS NULL \
       RETURNING transactions.id), \
     fr AS (\
       UPDATE requests SET status = fu.request_status, output = fu.output, error = fu.error, steps = fu.summary, \
            finished_at = CASE WHEN fu.retry_at IS NULL THEN now() END, \
            not_before = coalesce(fu.retry_at, requests.not_before), \
            envelope = coalesce(fu.envelope, requests.envelope), \
            started_at = coalesce(requests.started_at, now()), \
            attempts = greatest(requests.attempts, 1) \
       FROM fu JOIN ft ON ft.id = fu.tx_id \
       WHERE requests.id = ANY($3::text[]) AND requests.id = fu.request_id AND requests.current_tx = fu.tx_id)"
    };
}
const SQL_FINISH: &str = concat!("WITH ", finish_ctes!(), " SELECT id FROM ft");

/// The step records and the outcomes of one batch in one statement, so that a request's last
/// commit (its last call's result with its outcome) needs no `BEGIN` and `COMMIT`. Both parts
/// read one snapshot: a step record's fencing sees its transaction unfinished even when the
/// same statement finishes it, exactly as when the records are written first. Rows with a
/// `seq` answer step records, rows without answer outcomes.
static SQL_STEPS_THEN_FINISH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH st AS ({SQL_STEPS}), {} SELECT tx_id, seq FROM st UNION ALL SELECT id, NULL FROM ft",
        renumber(finish_ctes!(), SQL_STEPS_PARAMS)
    )
});

/// Parameters of `SQL_STEPS`: the step columns and the owner.
const SQL_STEPS_PARAMS: usize = 12;
/// Parameters of `begin_ctes!`'s openings, before the step columns of its records.
const BEGIN_PARAMS: usize = 14;
/// Step columns (`StepColumns::params`).
const STEP_COLUMNS: usize = 11;

/// A whole batch in one statement: openings (with their first records), step records and
/// outcomes, so that a batch under load is one round trip and one commit instead of `BEGIN`,
/// three statements and `COMMIT`. All parts read one snapshot, so this is used only when no
/// part depends on another's writes: no outcome opens its own transaction (`Finish::open`),
/// and a plain step record or outcome never belongs to a transaction opened in the same
/// batch (a run writes past its opening only once the opening is answered). Rows: kind 0 an
/// opening (request, attempt), 1 a step record (tx, seq), 2 an outcome (tx).
static SQL_OPEN_STEPS_FINISH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let steps_at = BEGIN_PARAMS + STEP_COLUMNS;
    format!(
        "WITH {}, st AS ({}), {} \
         SELECT 0, request_id, attempt, NULL::uuid FROM t \
         UNION ALL SELECT 1, NULL, seq, tx_id FROM st \
         UNION ALL SELECT 2, NULL, NULL, id FROM ft",
        begin_ctes!(),
        renumber(SQL_STEPS, steps_at),
        renumber(finish_ctes!(), steps_at + SQL_STEPS_PARAMS)
    )
});

/// `sql` with every parameter `$n` renamed `$(n + by)`, to place a statement's parameters
/// after another's in one statement.
fn renumber(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(n) = rest[..digits].parse::<usize>() {
            out.push_str(&(n + by).to_string());
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// A batch's records by kind, each with the index of the record it answers.
#[derive(Default)]
struct Sorted<'r> {
    /// (the record it answers, if any; the begin; the transaction's status)
    begins: Vec<(Option<usize>, &'r Begin, &'r str)>,
    /// Step records that came with an opening: written by the opening's statement.
    begin_steps: Vec<&'r StepRecord>,
    steps: Vec<(usize, &'r StepRecord)>,
    statuses: Vec<(usize, Uuid, &'r str, &'r str)>,
    finishes: Vec<(usize, &'r Finish)>,
}

impl<'r> Sorted<'r> {
    /// How many statements writing this batch takes (an opening that opens nothing adds a
    /// read, which needs no transaction).
    fn statements(&self) -> usize {
        let begins = !self.begins.is_empty();
        let rest = self.has_rest();
        usize::from(begins || rest)
            + usize::from(begins && rest && !self.all_together())
            + self.statuses.len()
    }

    /// Step records or outcomes, besides openings.
    fn has_rest(&self) -> bool {
        !self.steps.is_empty() || !self.finishes.is_empty()
    }

    /// Openings, step records and outcomes go in one statement (`SQL_OPEN_STEPS_FINISH`):
    /// there are openings and something else, and no outcome opens its own transaction, so
    /// nothing in the batch needs to see another part's writes.
    fn all_together(&self) -> bool {
        !self.begins.is_empty()
            && self.has_rest()
            && self.finishes.iter().all(|(_, f)| f.open.is_none())
    }

    fn of(records: &[&'r Record]) -> Self {
        let mut b = Self::default();
        for (i, r) in records.iter().enumerate() {
            match r {
                Record::Begin(begin) => b.begins.push((Some(i), begin, "running")),
                Record::BeginWith(begin, steps) => {
                    b.begins.push((Some(i), begin, "running"));
                    b.begin_steps.extend(steps);
                }
                Record::Steps(list) => b.steps.extend(list.iter().map(|s| (i, s))),
                Record::Status {
                    tx_id,
                    status,
                    owner,
                } => b.statuses.push((i, *tx_id, status, owner)),
                Record::Finish(f) => {
                    if let Some(begin) = &f.open {
                        b.begins.push((None, begin, f.tx_status.as_str()));
                    }
                    b.steps.extend(f.steps.iter().map(|s| (i, s)));
                    b.finishes.push((i, &**f));
                }
            }
        }
        b
    }
}

type Replies = Vec<Result<Reply, LogError>>;

fn unavailable(e: &dyn std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// Commits `records` with a fixed number of statements — one per kind of record, whatever
/// the batch size (arrays through `unnest`). Each record gets its own answer: a fenced record
/// fails alone, its neighbours commit.
///
/// A batch that one statement can write (only openings, only step records, one status
/// change, or outcomes without step records) is that statement alone, which PostgreSQL
/// commits atomically by itself: no `BEGIN` and `COMMIT` round trips. Under light load most
/// batches are a single record, and those two round trips were half of what each commit
/// cost (docs/decisions.md, "One statement, no explicit transaction").
async fn write_together(pool: &Pool, records: &[&Record]) -> Result<Replies, LogError> {
    let sorted = Sorted::of(records);
    let mut replies: Replies = vec![Ok(Reply::Done); records.len()];
    let mut client = pool.get().await.map_err(|e| unavailable(&e))?;
    if sorted.statements() == 1 {
        write_sorted(&client, &sorted, &mut replies).await?;
        return Ok(replies);
    }
    let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
    write_sorted(&tx, &sorted, &mut replies).await?;
    tx.commit().await.map_err(|e| unavailable(&e))?;
    Ok(replies)
}

async fn write_sorted<C: GenericClient>(
    c: &C,
    sorted: &Sorted<'_>,
    replies: &mut Replies,
) -> Result<(), LogError> {
    if sorted.all_together() {
        write_statuses(c, &sorted.statuses, replies).await?;
        return write_all(c, sorted, replies).await;
    }
    if !sorted.begins.is_empty() {
        write_begins(c, &sorted.begins, &sorted.begin_steps, replies).await?;
    }
    // Status changes first: like step records, they must land before an outcome that
    // finishes their transaction, and neither fences the other.
    write_statuses(c, &sorted.statuses, replies).await?;
    match (sorted.steps.is_empty(), sorted.finishes.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => write_steps(c, &sorted.steps, replies).await,
        (true, false) => write_finishes(c, &sorted.finishes, replies).await,
        (false, false) => {
            write_steps_then_finishes(c, &sorted.steps, &sorted.finishes, replies).await
        }
    }
}

/// Opens transactions; a request that cannot be opened is answered with why (finished, busy
/// or unsettled).
async fn write_begins<C: GenericClient>(
    tx: &C,
    begins: &[(Option<usize>, &Begin, &str)],
    with: &[&StepRecord],
    replies: &mut Replies,
) -> Result<(), LogError> {
    let stmt = tx
        .prepare_cached(SQL_BEGIN)
        .await
        .map_err(|e| unavailable(&e))?;
    let bc = BeginColumns::of(begins);
    let sc = StepColumns::of(with.iter().copied());
    let mut params = bc.params().to_vec();
    params.extend(sc.params());
    let rows = tx
        .query(&stmt, &params)
        .await
        .map_err(|e| unavailable(&e))?;
    let opened = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
        .collect();
    answer_begins(tx, begins, &opened, replies).await
}

/// Every kind of record of a batch in one statement (`SQL_OPEN_STEPS_FINISH`): openings, step
/// records and outcomes.
async fn write_all<C: GenericClient>(
    c: &C,
    sorted: &Sorted<'_>,
    replies: &mut Replies,
) -> Result<(), LogError> {
    let stmt = c
        .prepare_cached(&SQL_OPEN_STEPS_FINISH)
        .await
        .map_err(|e| unavailable(&e))?;
    let bc = BeginColumns::of(&sorted.begins);
    let with = StepColumns::of(sorted.begin_steps.iter().copied());
    let sc = FencedSteps::of(&sorted.steps);
    let fc = FinishColumns::of(&sorted.finishes);
    let mut params = bc.params().to_vec();
    params.extend(with.params());
    params.extend(sc.params());
    params.extend(fc.params());
    let rows = c.query(&stmt, &params).await.map_err(|e| unavailable(&e))?;
    let mut opened = HashMap::new();
    let mut written = HashSet::new();
    let mut finished = HashSet::new();
    for r in &rows {
        match r.get::<_, i32>(0) {
            0 => {
                opened.insert(r.get::<_, String>(1), r.get::<_, i32>(2));
            }
            1 => {
                written.insert((r.get::<_, Uuid>(3), r.get::<_, i32>(2)));
            }
            _ => {
                finished.insert(r.get::<_, Uuid>(3));
            }
        }
    }
    answer_steps(&sorted.steps, &written, replies);
    answer_finishes(&sorted.finishes, &finished, replies);
    answer_begins(c, &sorted.begins, &opened, replies).await
}

/// Answers each opening: its attempt, or (read after the fact) why it opened nothing.
async fn answer_begins<C: GenericClient>(
    c: &C,
    begins: &[(Option<usize>, &Begin, &str)],
    opened: &HashMap<String, i32>,
    replies: &mut Replies,
) -> Result<(), LogError> {
    let not_opened: Vec<&str> = begins
        .iter()
        .filter(|(i, b, _)| i.is_some() && !opened.contains_key(&b.request_id))
        .map(|(_, b, _)| b.request_id.as_str())
        .collect();
    let mut why = HashMap::new();
    if !not_opened.is_empty() {
        for r in c
            .query(SQL_NOT_OPENED, &[&not_opened])
            .await
            .map_err(|e| unavailable(&e))?
        {
            let status: String = r.get(1);
            let reply = if matches!(
                status.as_str(),
                "succeeded" | "failed" | "in_doubt" | "dead" | "cancelled"
            ) {
                Reply::AlreadyFinished
            } else if r.get::<_, bool>(4) {
                Reply::Busy
            } else {
                Reply::Unsettled {
                    tx: r.get::<_, Option<Uuid>>(2),
                }
            };
            why.insert(r.get::<_, String>(0), reply);
        }
    }
    for (i, b, _) in begins {
        if let Some(i) = i {
            replies[*i] = Ok(match opened.get(&b.request_id) {
                Some(attempt) => Reply::Began { attempt: *attempt },
                None => why.remove(&b.request_id).unwrap_or(Reply::Busy),
            });
        }
    }
    Ok(())
}

/// Openings as the columns of the first `unnest` in `begin_ctes!`.
struct BeginColumns<'a> {
    request_ids: Vec<&'a str>,
    namespaces: Vec<&'a str>,
    procedures: Vec<&'a str>,
    versions: Vec<i32>,
    principals: Vec<Option<Uuid>>,
    priorities: Vec<&'a str>,
    inputs: Vec<&'a Value>,
    tx_ids: Vec<Uuid>,
    models: Vec<&'a str>,
    status: Vec<&'a str>,
    audits: Vec<bool>,
    engines: Vec<&'a str>,
    leases: Vec<f64>,
    first_only: Vec<bool>,
}

impl<'a> BeginColumns<'a> {
    fn of(begins: &[(Option<usize>, &'a Begin, &'a str)]) -> Self {
        let b = || begins.iter().map(|(_, b, _)| *b);
        Self {
            request_ids: b().map(|b| b.request_id.as_str()).collect(),
            namespaces: b().map(|b| b.namespace.as_str()).collect(),
            procedures: b().map(|b| b.procedure.as_str()).collect(),
            versions: b().map(|b| b.namespace_version).collect(),
            principals: b().map(|b| b.principal_id).collect(),
            priorities: b().map(|b| b.priority).collect(),
            inputs: b().map(|b| &b.input).collect(),
            tx_ids: b().map(|b| b.tx_id).collect(),
            models: b().map(|b| b.model).collect(),
            status: begins.iter().map(|(_, _, s)| *s).collect(),
            audits: b().map(|b| b.audit).collect(),
            engines: b().map(|b| b.engine_id.as_str()).collect(),
            leases: b().map(|b| b.lease_seconds).collect(),
            first_only: b().map(|b| b.first_only).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); BEGIN_PARAMS] {
        [
            &self.request_ids,
            &self.namespaces,
            &self.procedures,
            &self.versions,
            &self.principals,
            &self.priorities,
            &self.inputs,
            &self.tx_ids,
            &self.models,
            &self.status,
            &self.audits,
            &self.engines,
            &self.leases,
            &self.first_only,
        ]
    }
}

/// Step records, each only while its writer still owns the transaction.
async fn write_steps<C: GenericClient>(
    tx: &C,
    steps: &[(usize, &StepRecord)],
    replies: &mut Replies,
) -> Result<(), LogError> {
    let stmt = tx
        .prepare_cached(SQL_STEPS)
        .await
        .map_err(|e| unavailable(&e))?;
    let sc = FencedSteps::of(steps);
    let rows = tx
        .query(&stmt, &sc.params())
        .await
        .map_err(|e| unavailable(&e))?;
    let written: HashSet<(Uuid, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    answer_steps(steps, &written, replies);
    Ok(())
}

/// Step records and outcomes in one statement (`SQL_STEPS_THEN_FINISH`).
async fn write_steps_then_finishes<C: GenericClient>(
    tx: &C,
    steps: &[(usize, &StepRecord)],
    finishes: &[(usize, &Finish)],
    replies: &mut Replies,
) -> Result<(), LogError> {
    let stmt = tx
        .prepare_cached(&SQL_STEPS_THEN_FINISH)
        .await
        .map_err(|e| unavailable(&e))?;
    let sc = FencedSteps::of(steps);
    let fc = FinishColumns::of(finishes);
    let mut params = sc.params().to_vec();
    params.extend(fc.params());
    let rows = tx
        .query(&stmt, &params)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut written = HashSet::new();
    let mut finished = HashSet::new();
    for r in &rows {
        match r.get::<_, Option<i32>>(1) {
            Some(seq) => written.insert((r.get(0), seq)),
            None => finished.insert(r.get(0)),
        };
    }
    answer_steps(steps, &written, replies);
    answer_finishes(finishes, &finished, replies);
    Ok(())
}

/// A step record that was not written was fenced: its transaction is no longer its writer's.
fn answer_steps(
    steps: &[(usize, &StepRecord)],
    written: &HashSet<(Uuid, i32)>,
    replies: &mut Replies,
) {
    for (i, s) in steps {
        if !written.contains(&(s.tx_id, s.seq)) {
            replies[*i] = Err(LogError::Fenced(s.tx_id));
        }
    }
}

/// Step records written only while their writer owns the transaction: the columns and
/// the owner, as `SQL_STEPS` reads them.
struct FencedSteps<'a> {
    columns: StepColumns<'a>,
    owners: Vec<&'a str>,
}

impl<'a> FencedSteps<'a> {
    fn of(steps: &[(usize, &'a StepRecord)]) -> Self {
        Self {
            columns: StepColumns::of(steps.iter().map(|(_, s)| *s)),
            owners: steps.iter().map(|(_, s)| &*s.owner).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); SQL_STEPS_PARAMS] {
        let columns = self.columns.params();
        let mut all = [columns[0]; SQL_STEPS_PARAMS];
        all[..STEP_COLUMNS].copy_from_slice(&columns);
        all[STEP_COLUMNS] = &self.owners;
        all
    }
}

/// Step records as the columns of an `unnest`.
struct StepColumns<'a> {
    tx_ids: Vec<Uuid>,
    seqs: Vec<i32>,
    kinds: Vec<&'a str>,
    paths: Vec<&'a str>,
    providers: Vec<Option<&'a str>>,
    actions: Vec<Option<&'a str>>,
    inputs: Vec<Option<&'a Value>>,
    outputs: Vec<Option<&'a Value>>,
    rollbacks: Vec<Option<&'a Value>>,
    errors: Vec<Option<&'a Value>>,
    procedures: Vec<Option<&'a str>>,
}

impl<'a> StepColumns<'a> {
    fn of(steps: impl Iterator<Item = &'a StepRecord> + Clone) -> Self {
        Self {
            tx_ids: steps.clone().map(|s| s.tx_id).collect(),
            seqs: steps.clone().map(|s| s.seq).collect(),
            kinds: steps.clone().map(|s| s.kind).collect(),
            paths: steps.clone().map(|s| s.path.as_str()).collect(),
            providers: steps.clone().map(|s| s.provider.as_deref()).collect(),
            actions: steps.clone().map(|s| s.action.as_deref()).collect(),
            inputs: steps.clone().map(|s| s.input.as_ref()).collect(),
            outputs: steps.clone().map(|s| s.output.as_ref()).collect(),
            rollbacks: steps.clone().map(|s| s.rollback_data.as_ref()).collect(),
            errors: steps.clone().map(|s| s.error.as_ref()).collect(),
            procedures: steps.map(|s| s.procedure.as_deref()).collect(),
        }
    }

    /// The columns as statement parameters, in the order of the `unnest`s that read them
    /// (`SQL_STEPS` and the records of `SQL_BEGIN`).
    fn params(&self) -> [&(dyn ToSql + Sync); STEP_COLUMNS] {
        [
            &self.tx_ids,
            &self.seqs,
            &self.kinds,
            &self.paths,
            &self.providers,
            &self.actions,
            &self.inputs,
            &self.outputs,
            &self.rollbacks,
            &self.errors,
            &self.procedures,
        ]
    }
}

/// Two-phase status changes, fenced like every write.
async fn write_statuses<C: GenericClient>(
    tx: &C,
    statuses: &[(usize, Uuid, &str, &str)],
    replies: &mut Replies,
) -> Result<(), LogError> {
    for (i, tx_id, status, owner) in statuses {
        let stmt = tx
            .prepare_cached(SQL_STATUS)
            .await
            .map_err(|e| unavailable(&e))?;
        let n = tx
            .execute(&stmt, &[tx_id, status, owner])
            .await
            .map_err(|e| unavailable(&e))?;
        if n == 0 {
            replies[*i] = Err(LogError::Fenced(*tx_id));
        }
    }
    Ok(())
}

/// Outcomes: the transaction row and the request row, in the same commit.
async fn write_finishes<C: GenericClient>(
    tx: &C,
    finishes: &[(usize, &Finish)],
    replies: &mut Replies,
) -> Result<(), LogError> {
    let stmt = tx
        .prepare_cached(SQL_FINISH)
        .await
        .map_err(|e| unavailable(&e))?;
    let fc = FinishColumns::of(finishes);
    let rows = tx
        .query(&stmt, &fc.params())
        .await
        .map_err(|e| unavailable(&e))?;
    let finished: HashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    answer_finishes(finishes, &finished, replies);
    Ok(())
}

/// An outcome that was not written was fenced.
fn answer_finishes(finishes: &[(usize, &Finish)], finished: &HashSet<Uuid>, replies: &mut Replies) {
    for (i, f) in finishes {
        if !finished.contains(&f.tx_id) {
            replies[*i] = Err(LogError::Fenced(f.tx_id));
        }
    }
}

/// Outcomes as the columns of the `unnest` in `finish_ctes!`.
struct FinishColumns<'a> {
    tx_ids: Vec<Uuid>,
    tx_status: Vec<&'a str>,
    request_ids: Vec<&'a str>,
    request_status: Vec<&'a str>,
    outputs: Vec<Option<&'a Value>>,
    errors: Vec<Option<&'a Value>>,
    summaries: Vec<&'a Value>,
    retry_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    envelopes: Vec<Option<&'a Value>>,
    owners: Vec<&'a str>,
    audits: Vec<bool>,
    audit_data: Vec<Option<&'a Value>>,
}

impl<'a> FinishColumns<'a> {
    fn of(finishes: &[(usize, &'a Finish)]) -> Self {
        let f = || finishes.iter().map(|(_, f)| *f);
        Self {
            tx_ids: f().map(|f| f.tx_id).collect(),
            tx_status: f().map(|f| f.tx_status.as_str()).collect(),
            request_ids: f().map(|f| f.request_id.as_str()).collect(),
            request_status: f().map(|f| f.request_status.as_str()).collect(),
            outputs: f().map(|f| f.output.as_ref()).collect(),
            errors: f().map(|f| f.error.as_ref()).collect(),
            summaries: f().map(|f| &f.summary).collect(),
            retry_at: f().map(|f| f.retry_at.as_ref().map(|(t, _)| *t)).collect(),
            envelopes: f().map(|f| f.retry_at.as_ref().map(|(_, e)| e)).collect(),
            owners: f().map(|f| &*f.owner).collect(),
            audits: f().map(|f| f.audit).collect(),
            audit_data: f().map(|f| f.audit_data.as_ref()).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.tx_ids,
            &self.tx_status,
            &self.request_ids,
            &self.request_status,
            &self.outputs,
            &self.errors,
            &self.summaries,
            &self.retry_at,
            &self.envelopes,
            &self.owners,
            &self.audits,
            &self.audit_data,
        ]
    }
}

#[cfg(test)]
#[path = "txlog_tests.rs"]
pub(crate) mod tests;
