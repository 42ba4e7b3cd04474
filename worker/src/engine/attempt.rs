//! An attempt's life in the transaction log: opening it (one attempt at a time per request),
//! keeping its lease, and writing its outcome — fenced, so that an engine that lost its
//! transaction to recovery writes nothing more. Both log layouts (see `crate::logset`):
//! combined (requests and transactions committed together) and separate (the request row in
//! the configuration database decides the outcome; the transaction row on its own server
//! follows).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use provisio_shared::domain::{Status, TxStatus};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Engine, Held};
use crate::txlog::{Begin, Finish, LogError, LogSink, Record, Reply, StepRecord};

/// What opening a transaction for a delivery came to.
pub(super) enum Opened {
    Began(i32),
    AlreadyFinished,
    /// Another attempt is running (or being recovered), or no log server answers: try again
    /// later.
    Busy,
}

/// An attempt's outcome as decided, ready to be written.
pub(super) struct Decided {
    pub steps: Vec<StepRecord>,
    pub tx_status: TxStatus,
    pub status: Status,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub summary: Value,
    /// Run again at this time from this envelope (or, parked, keep the envelope).
    pub retry_at: Option<(chrono::DateTime<chrono::Utc>, Value)>,
    /// Some procedure that ran was marked for audit.
    pub audit: bool,
    pub audit_data: Option<Value>,
}

/// What became of an attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    Yes,
    /// The attempt is no longer this engine's: nothing was written.
    Fenced,
    /// Its log server went on the bad-server list before the outcome could be written.
    ServerBad,
}

/// Separate layout: the request row of a new attempt (the attempt's server and owner on it).
/// Refused while the request is final or `running` (one attempt at a time).
const SQL_OPEN_REQUEST: &str = "INSERT INTO requests (id, body_hash, namespace, procedure, namespace_version, principal_id, \
       priority, status, input, attempts, started_at, current_tx, tx_server, tx_owner) \
     VALUES ($1, '', $2, $3, $4, $5, $6, 'running', $7, 1, now(), $8, $9, $10) \
     ON CONFLICT (id) DO UPDATE SET status = 'running', attempts = requests.attempts + 1, started_at = now(), \
       namespace_version = EXCLUDED.namespace_version, current_tx = EXCLUDED.current_tx, \
       tx_server = EXCLUDED.tx_server, tx_owner = EXCLUDED.tx_owner \
     WHERE requests.status NOT IN ('succeeded', 'failed', 'in_doubt', 'dead', 'cancelled', 'running') \
     RETURNING attempts";

/// Separate layout: the transaction row on its server.
const SQL_OPEN_TX: &str = "INSERT INTO transactions (id, request_id, attempt, namespace, procedure, namespace_version, model, \
       status, audit, engine_id, lease_until, finished_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11), \
       CASE WHEN $8 = 'running' THEN NULL ELSE now() END) \
     ON CONFLICT DO NOTHING";

/// Separate layout: the decision. Only the engine that still holds the request's current
/// attempt may write it.
const SQL_DECIDE: &str = "UPDATE requests SET status = $4, output = $5, error = $6, steps = $7, \
       finished_at = CASE WHEN $8::timestamptz IS NULL THEN now() END, \
       not_before = coalesce($8, not_before), envelope = coalesce($9, envelope), \
       started_at = coalesce(started_at, now()), attempts = greatest(attempts, 1) \
     WHERE id = $1 AND current_tx = $2 AND tx_owner = $3 AND status = 'running' RETURNING id";

/// Separate layout: the transaction row follows the decision.
const SQL_FINISH_TX: &str = "UPDATE transactions SET status = $2, output = $3, error = $4, finished_at = now(), \
       lease_until = NULL, audit = audit OR $6, audit_data = $7 \
     WHERE id = $1 AND engine_id = $5 AND finished_at IS NULL";

impl Engine {
    /// Opens the transaction of `begin` on log server `server`. One attempt at a time,
    /// whatever the delivery: a request whose current attempt still runs under a live lease
    /// elsewhere is `Busy` (the delivery goes back to the queue); one whose attempt's engine
    /// died is recovered first (rolled back from the log), then opened.
    pub(super) async fn open(&self, begin: &Begin, server: usize) -> anyhow::Result<Opened> {
        for _ in 0..2 {
            let reply = if self.log.separate {
                self.open_separate(begin, server).await?
            } else {
                let reply = self
                    .log
                    .sink(server)
                    .write_record(Record::Begin(begin.clone()))
                    .await
                    .context("opening the transaction")?;
                (reply, server)
            };
            match reply {
                (Reply::Began { attempt }, _) => return Ok(Opened::Began(attempt)),
                (Reply::AlreadyFinished, _) => return Ok(Opened::AlreadyFinished),
                (Reply::Busy | Reply::Done, _) => {
                    tracing::info!(request_id = %begin.request_id, "another attempt runs under a live lease; requeueing");
                    return Ok(Opened::Busy);
                }
                (Reply::Unsettled { tx }, on) => {
                    let Some(r) = &self.recovery else {
                        return Ok(Opened::Busy);
                    };
                    let resolved = r
                        .settle_request(&begin.request_id, tx, on)
                        .await
                        .context("recovering the earlier attempt")?;
                    tracing::info!(request_id = %begin.request_id, ?tx, ?resolved, "recovered an earlier attempt whose engine stopped");
                }
            }
        }
        Ok(Opened::Busy)
    }

    /// Separate layout: the request row first (the attempt claims the request), then the
    /// transaction row on its server. Returns the reply and, for `Unsettled`, the server of
    /// the earlier attempt.
    async fn open_separate(&self, b: &Begin, server: usize) -> anyhow::Result<(Reply, usize)> {
        let client = self.pool.get().await.context("database")?;
        let name = self.log.name(server);
        let opened = open_request_row(&client, b, name)
            .await
            .context("opening the request")?;
        let Some(row) = opened else {
            return self.why_not_opened(&b.request_id).await;
        };
        let attempt: i32 = row.get(0);
        let written = self
            .log
            .servers
            .run(server, |pool| async move {
                let c = pool.get().await?;
                insert_tx_row(&c, b, attempt, "running").await?;
                Ok(())
            })
            .await;
        if let Err(e) = written {
            // Nothing ran: give the request back, to be opened on a server that answers.
            tracing::warn!(server = name, error = %e, "cannot open a transaction on its log server; requeueing");
            self.release_request(&b.request_id, b.tx_id, None).await?;
            return Ok((Reply::Busy, server));
        }
        Ok((Reply::Began { attempt }, server))
    }

    /// Separate layout: why a request could not be opened, asking the server of its current
    /// attempt whether that attempt is still alive.
    async fn why_not_opened(&self, request_id: &str) -> anyhow::Result<(Reply, usize)> {
        let client = self.pool.get().await.context("database")?;
        let Some(row) = client
            .query_opt(
                "SELECT status, current_tx, tx_server FROM requests WHERE id = $1",
                &[&request_id],
            )
            .await?
        else {
            return Ok((Reply::Busy, 0));
        };
        let (status, tx, on): (String, Option<Uuid>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        if status.parse::<Status>().is_ok_and(Status::is_final) {
            return Ok((Reply::AlreadyFinished, 0));
        }
        let Some(server) = on.as_deref().and_then(|n| self.log.index_of(n)) else {
            // Opened by a log layout that is gone, or never got as far as a server.
            return Ok((Reply::Unsettled { tx: None }, 0));
        };
        let Some(pool) = self.log.pool(server) else {
            return Ok((Reply::Busy, server));
        };
        let live = async {
            let c = pool.get().await?;
            Ok::<_, anyhow::Error>(
                c.query_opt(
                    "SELECT coalesce(lease_until > now(), false) FROM transactions WHERE id = $1 AND finished_at IS NULL",
                    &[&tx],
                )
                .await?
                .map(|r| r.get::<_, bool>(0)),
            )
        }
        .await;
        Ok(match live {
            // Its server does not answer: nobody can tell yet.
            Err(_) | Ok(Some(true)) => (Reply::Busy, server),
            Ok(_) => (Reply::Unsettled { tx }, server),
        })
    }

    /// Separate layout: gives a request back (`queued`) that this engine's attempt `tx_id`
    /// holds, after undoing everything the attempt did; `error` says why.
    pub(super) async fn release_request(
        &self,
        request_id: &str,
        tx_id: Uuid,
        error: Option<&Value>,
    ) -> anyhow::Result<()> {
        let client = self.pool.get().await.context("database")?;
        client
            .execute(
                "UPDATE requests SET status = 'queued', error = coalesce($4, error) \
                 WHERE id = $1 AND current_tx = $2 AND tx_owner = $3 AND status = 'running'",
                &[&request_id, &tx_id, &self.engine_id, &error],
            )
            .await
            .context("giving the request back")?;
        Ok(())
    }

    /// Starts renewing `tx_id`'s lease on `server` once `opened` is raised (at once for a
    /// transaction already opened); the returned flag rises if the lease is lost.
    pub(super) fn hold_lease(
        &self,
        tx_id: Uuid,
        server: usize,
        opened: Arc<AtomicBool>,
    ) -> Arc<AtomicBool> {
        let lost = Arc::new(AtomicBool::new(false));
        if let Ok(mut l) = self.leases.lock() {
            let held = Held {
                server,
                lost: lost.clone(),
                opened,
            };
            l.insert(tx_id, held);
        }
        lost
    }

    /// Stops renewing `tx_id`'s lease.
    pub(super) fn release_lease(&self, tx_id: Uuid) {
        if let Ok(mut l) = self.leases.lock() {
            l.remove(&tx_id);
        }
    }

    /// Writes an attempt's outcome.
    pub(super) async fn finish(
        &self,
        tx_id: Uuid,
        request_id: &str,
        server: usize,
        open: Option<Begin>,
        d: Decided,
    ) -> anyhow::Result<Written> {
        let f = Finish {
            tx_id,
            request_id: request_id.to_owned(),
            open,
            steps: d.steps,
            tx_status: d.tx_status,
            request_status: d.status,
            output: d.output,
            error: d.error,
            summary: d.summary,
            retry_at: d.retry_at,
            owner: self.owner.clone(),
            audit: d.audit,
            audit_data: d.audit_data,
        };
        let r = if self.log.separate {
            self.finish_separate(f, server).await
        } else {
            self.log
                .sink(server)
                .write_record(Record::Finish(Box::new(f)))
                .await
                .map(|_| ())
        };
        match r {
            Ok(()) => Ok(Written::Yes),
            Err(LogError::Fenced(_)) => Ok(Written::Fenced),
            Err(LogError::Bad(_)) => Ok(Written::ServerBad),
            Err(e) => Err(e).context("committing the outcome"),
        }
    }

    /// Separate layout: the last step records on the server, then the decision in the
    /// request row (fenced by `tx_owner`), then the transaction row on the server — in the
    /// background: once decided, a server that is slow to answer delays nobody, and recovery
    /// completes the row from the decision if this engine cannot.
    async fn finish_separate(&self, f: Finish, server: usize) -> Result<(), LogError> {
        let unavailable = |e: &dyn std::fmt::Display| LogError::Unavailable(e.to_string());
        if !f.steps.is_empty() {
            self.log
                .sink(server)
                .write_record(Record::Steps(f.steps.clone()))
                .await?;
        }
        let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let (retry_at, envelope) = match &f.retry_at {
            Some((t, e)) => (Some(*t), Some(e)),
            None => (None, None),
        };
        if let Some(b) = &f.open {
            // Nothing was opened (a `read` procedure, or a refusal): the request row is
            // claimed and decided at once.
            let opened = open_request_row(&client, b, self.log.name(server))
                .await
                .map_err(|e| unavailable(&e))?;
            if opened.is_none() {
                return Err(LogError::Fenced(f.tx_id));
            }
        }
        let decided = client
            .query_opt(
                SQL_DECIDE,
                &[
                    &f.request_id,
                    &f.tx_id,
                    &&*f.owner,
                    &f.request_status.as_str(),
                    &f.output,
                    &f.error,
                    &f.summary,
                    &retry_at,
                    &envelope,
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        if decided.is_none() {
            return Err(LogError::Fenced(f.tx_id));
        }
        let log = self.log.clone();
        tokio::spawn(async move {
            let f = &f;
            let r = log
                .servers
                .run(server, |pool| async move {
                    let c = pool.get().await?;
                    if let Some(b) = &f.open {
                        insert_tx_row(&c, b, 1, f.tx_status.as_str()).await?;
                    }
                    let owner: &str = &f.owner;
                    let params: [&(dyn ToSql + Sync); 7] = [
                        &f.tx_id,
                        &f.tx_status.as_str(),
                        &f.output,
                        &f.error,
                        &owner,
                        &f.audit,
                        &f.audit_data,
                    ];
                    c.execute(SQL_FINISH_TX, &params).await?;
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(tx_id = %f.tx_id, error = %e, "the outcome is decided but its transaction row is not finished yet; recovery will complete it");
            }
        });
        Ok(())
    }

    /// Renews the leases of every transaction this engine is running, one statement per log
    /// server, and raises the lost flag of each one that is no longer ours (taken over by
    /// recovery after this engine stalled), so that its run starts no further call.
    pub async fn renew_leases(&self) -> anyhow::Result<()> {
        let held: Vec<(Uuid, usize)> = self
            .leases
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(_, h)| h.opened.load(Ordering::Relaxed))
                    .map(|(id, h)| (*id, h.server))
                    .collect()
            })
            .unwrap_or_default();
        if held.is_empty() {
            return Ok(());
        }
        let mut renewed = std::collections::HashSet::new();
        let mut asked = std::collections::HashSet::new();
        for server in 0..self.log.servers.len() {
            let ids: Vec<Uuid> = held
                .iter()
                .filter(|(_, s)| *s == server)
                .map(|(id, _)| *id)
                .collect();
            let Some(pool) = self.log.pool(server).filter(|_| !ids.is_empty()) else {
                continue;
            };
            let rows = async {
                let client = pool.get().await.context("database")?;
                Ok::<_, anyhow::Error>(
                    client
                        .query(
                            "UPDATE transactions SET lease_until = now() + make_interval(secs => $2) \
                             WHERE id = ANY($1) AND engine_id = $3 AND finished_at IS NULL RETURNING id",
                            &[&ids as &(dyn ToSql + Sync), &(self.cfg.engine.lease_seconds as f64), &self.engine_id],
                        )
                        .await?,
                )
            }
            .await;
            match rows {
                Ok(rows) => {
                    renewed.extend(rows.iter().map(|r| r.get::<_, Uuid>(0)));
                    asked.extend(ids);
                }
                Err(e) => {
                    tracing::warn!(server = self.log.name(server), error = %e, "cannot renew leases");
                }
            }
        }
        if let Ok(l) = self.leases.lock() {
            for (id, h) in l.iter() {
                // Ids added since the query started are simply not renewed yet.
                if asked.contains(id) && !renewed.contains(id) {
                    h.lost.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// Separate layout: claims the request row for the attempt `b` on server `server_name`
/// (`None`: the request is final or another attempt holds it).
async fn open_request_row(
    client: &tokio_postgres::Client,
    b: &Begin,
    server_name: &str,
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    let params: [&(dyn ToSql + Sync); 10] = [
        &b.request_id,
        &b.namespace,
        &b.procedure,
        &b.namespace_version,
        &b.principal_id,
        &b.priority,
        &b.input,
        &b.tx_id,
        &server_name,
        &b.engine_id,
    ];
    client.query_opt(SQL_OPEN_REQUEST, &params).await
}

/// Separate layout: the attempt's transaction row on its server, with `status`.
async fn insert_tx_row(
    client: &tokio_postgres::Client,
    b: &Begin,
    attempt: i32,
    status: &str,
) -> Result<u64, tokio_postgres::Error> {
    let params: [&(dyn ToSql + Sync); 11] = [
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
    ];
    client.execute(SQL_OPEN_TX, &params).await
}
