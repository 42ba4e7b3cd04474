//! The transaction log's group-commit writer (DESIGN §10).
//!
//! Every engine task that must make a log record durable sends it here and waits for the
//! commit that carries it. A collector takes whatever records are waiting (up to
//! `max_batch`) and commits them in one PostgreSQL transaction, so one fsync serves every
//! request in flight. Several batches may commit concurrently (`writers`), so a slow commit
//! does not stall the next batch from forming.

use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("transaction log unavailable: {0}")]
    Unavailable(String),
    #[error("transaction log writer stopped")]
    Stopped,
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
}

/// The outcome: transaction and request rows updated together, plus any step records not yet
/// written (the last step needs no separate commit: nothing runs after it).
#[derive(Debug, Clone)]
pub struct Finish {
    pub tx_id: Uuid,
    /// For `read` transactions, which were never opened: the row to create.
    pub open: Option<Begin>,
    pub steps: Vec<StepRecord>,
    pub tx_status: &'static str,
    pub request_id: String,
    pub request_status: &'static str,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub summary: Value,
}

#[derive(Debug, Clone)]
pub enum Record {
    Begin(Begin),
    Step(StepRecord),
    /// A transaction's status changes (two-phase: `prepared`, then the decision `committing`).
    Status {
        tx_id: Uuid,
        status: &'static str,
    },
    Finish(Finish),
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
}

struct Job {
    record: Record,
    done: oneshot::Sender<Result<Reply, LogError>>,
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
            .send(Job { record, done })
            .await
            .map_err(|_| LogError::Stopped)?;
        wait.await.map_err(|_| LogError::Stopped)?
    }
}

async fn collector(pool: Pool, mut rx: mpsc::Receiver<Job>, max_batch: usize, writers: usize) {
    let permits = Arc::new(Semaphore::new(writers));
    loop {
        // Wait for a free writer first, so records keep accumulating while all are busy.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit_batch(&pool, batch).await;
            drop(permit);
        });
    }
}

async fn commit_batch(pool: &Pool, batch: Vec<Job>) {
    metrics::histogram!(provisio_shared::metrics::TXLOG_BATCH_SIZE).record(batch.len() as f64);
    let started = Instant::now();
    let records: Vec<&Record> = batch.iter().map(|j| &j.record).collect();
    match write_together(pool, &records).await {
        Ok(replies) => {
            metrics::histogram!(provisio_shared::metrics::TXLOG_COMMIT_DURATION)
                .record(started.elapsed().as_secs_f64());
            for (job, reply) in batch.into_iter().zip(replies) {
                let _ = job.done.send(Ok(reply));
            }
        }
        Err(e) if batch.len() > 1 => {
            // One bad record must not fail its neighbours: retry each on its own.
            tracing::debug!(error = %e, size = batch.len(), "batch failed, isolating records");
            for job in batch {
                let r = write_together(pool, &[&job.record])
                    .await
                    .map(|mut v| v.pop().unwrap_or(Reply::Done));
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

const SQL_BEGIN_REQUEST: &str = "INSERT INTO requests (id, body_hash, namespace, procedure, namespace_version, \
     principal_id, priority, status, input, attempts, started_at) \
     VALUES ($1, '', $2, $3, $4, $5, $6, 'running', $7, 1, now()) \
     ON CONFLICT (id) DO UPDATE SET status = 'running', attempts = requests.attempts + 1, \
     started_at = now(), namespace_version = EXCLUDED.namespace_version \
     WHERE requests.status NOT IN ('succeeded', 'failed', 'in_doubt', 'dead', 'cancelled') \
     RETURNING attempts";
const SQL_BEGIN_TX: &str = "INSERT INTO transactions (id, request_id, attempt, namespace, procedure, \
     namespace_version, model, status, audit, engine_id, lease_until) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11))";
const SQL_STEP: &str = "INSERT INTO tx_steps (tx_id, seq, kind, path, provider, action, input, output, rollback_data, error) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
const SQL_STATUS: &str = "UPDATE transactions SET status = $2 WHERE id = $1";
const SQL_FINISH_TX: &str = "UPDATE transactions SET status = $2, output = $3, error = $4, \
     finished_at = now(), lease_until = NULL WHERE id = $1";
const SQL_FINISH_REQUEST: &str = "UPDATE requests SET status = $2, output = $3, error = $4, steps = $5, \
     finished_at = now(), started_at = coalesce(started_at, now()), \
     attempts = greatest(attempts, 1) WHERE id = $1";

async fn write_together(pool: &Pool, records: &[&Record]) -> Result<Vec<Reply>, LogError> {
    let unavailable = |e: &dyn std::fmt::Display| LogError::Unavailable(e.to_string());
    let mut client = pool.get().await.map_err(|e| unavailable(&e))?;
    let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
    let begin_req = tx
        .prepare_cached(SQL_BEGIN_REQUEST)
        .await
        .map_err(|e| unavailable(&e))?;
    let begin_tx = tx
        .prepare_cached(SQL_BEGIN_TX)
        .await
        .map_err(|e| unavailable(&e))?;
    let step = tx
        .prepare_cached(SQL_STEP)
        .await
        .map_err(|e| unavailable(&e))?;
    let fin_tx = tx
        .prepare_cached(SQL_FINISH_TX)
        .await
        .map_err(|e| unavailable(&e))?;
    let fin_req = tx
        .prepare_cached(SQL_FINISH_REQUEST)
        .await
        .map_err(|e| unavailable(&e))?;
    let set_status = tx
        .prepare_cached(SQL_STATUS)
        .await
        .map_err(|e| unavailable(&e))?;

    // Statements of different records are independent: issue them all at once so that
    // tokio-postgres pipelines them on the one connection.
    let work = records.iter().map(|r| {
        let (tx, begin_req, begin_tx, step, fin_tx, fin_req, set_status) = (
            &tx,
            &begin_req,
            &begin_tx,
            &step,
            &fin_tx,
            &fin_req,
            &set_status,
        );
        async move {
            match r {
                Record::Begin(b) => Ok(match open(tx, begin_req, begin_tx, b, "running").await? {
                    Some(attempt) => Reply::Began { attempt },
                    None => Reply::AlreadyFinished,
                }),
                Record::Step(s) => {
                    insert_step(tx, step, s).await?;
                    Ok(Reply::Done)
                }
                Record::Status { tx_id, status } => {
                    tx.execute(set_status, &[tx_id, status]).await?;
                    Ok(Reply::Done)
                }
                Record::Finish(f) => {
                    if let Some(b) = &f.open {
                        open(tx, begin_req, begin_tx, b, f.tx_status).await?;
                    }
                    for s in &f.steps {
                        insert_step(tx, step, s).await?;
                    }
                    tx.execute(fin_tx, &[&f.tx_id, &f.tx_status, &f.output, &f.error])
                        .await?;
                    tx.execute(
                        fin_req,
                        &[
                            &f.request_id,
                            &f.request_status,
                            &f.output,
                            &f.error,
                            &f.summary,
                        ],
                    )
                    .await?;
                    Ok(Reply::Done)
                }
            }
        }
    });
    let results: Vec<Result<Reply, tokio_postgres::Error>> = join_all(work).await;
    let mut replies = Vec::with_capacity(results.len());
    for r in results {
        replies.push(r.map_err(|e| unavailable(&e))?);
    }
    tx.commit().await.map_err(|e| unavailable(&e))?;
    Ok(replies)
}

async fn open(
    tx: &deadpool_postgres::Transaction<'_>,
    begin_req: &tokio_postgres::Statement,
    begin_tx: &tokio_postgres::Statement,
    b: &Begin,
    status: &str,
) -> Result<Option<i32>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            begin_req,
            &[
                &b.request_id,
                &b.namespace,
                &b.procedure,
                &b.namespace_version,
                &b.principal_id,
                &b.priority,
                &b.input,
            ],
        )
        .await?;
    // No row: the request already has a final status (a duplicate or a redelivery).
    let Some(row) = row else { return Ok(None) };
    let attempt: i32 = row.get(0);
    tx.execute(
        begin_tx,
        &[
            &b.tx_id,
            &b.request_id,
            &attempt,
            &b.namespace,
            &b.procedure,
            &b.namespace_version,
            &b.model,
            &status,
            &b.audit,
            &b.engine_id,
            &b.lease_seconds,
        ],
    )
    .await?;
    Ok(Some(attempt))
}

async fn insert_step(
    tx: &deadpool_postgres::Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    s: &StepRecord,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        stmt,
        &[
            &s.tx_id,
            &s.seq,
            &s.kind,
            &s.path,
            &s.provider,
            &s.action,
            &s.input,
            &s.output,
            &s.rollback_data,
            &s.error,
        ],
    )
    .await
}
