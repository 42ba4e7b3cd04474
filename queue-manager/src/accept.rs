//! Accepting requests in groups: group commit on the queue manager's side (docs/design.md §10).
//!
//! Every accepted request costs a row insert, a confirmed publish and a commit. Handlers hand
//! their validated submissions to the [`Acceptor`], which takes whatever is waiting and, in
//! one PostgreSQL transaction: inserts all rows with one statement, publishes every new one
//! (confirms awaited concurrently), deletes the rows whose publish failed, and commits. Each
//! handler waits only for the batch that carries its request. Under light load a batch is one
//! request; the durability contract is unchanged: a `2xx` only after confirm and commit.

use provisio_shared::domain::Permission;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use futures_util::future::join_all;
use provisio_shared::amqp::{Outgoing, Publisher};
use provisio_shared::config::Secret;
use provisio_shared::domain::{Envelope, Name, PrincipalRef};
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::procedure::{Access, Namespace};
use provisio_shared::sealing::Keyring;
use provisio_shared::signing;
use provisio_shared::telemetry::Readiness;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::api::ApiError;

/// How long a request whose publish is in doubt (sent, confirm lost) waits before the
/// scheduler publishes it again. If the first message did reach the queue, an engine has
/// normally started it by then (and the scheduler leaves it alone); a longer wait means fewer
/// duplicate messages behind a backlog, a shorter one less delay when the first was lost.
const IN_DOUBT_REPUBLISH_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// A validated request, ready to be made durable.
pub struct Submission {
    pub body_hash: String,
    /// The namespace version it was validated against (from the cache).
    pub checked_version: i32,
    /// Its input's sensitive properties sealed (`check_procedure` says which).
    pub envelope: Envelope,
    /// The input as submitted, kept in memory for a validation against a newer version (which
    /// sees clear values, and may mark other properties sensitive).
    pub clear_input: Value,
    /// In the future: the request waits in PostgreSQL until then (the scheduler publishes it).
    pub not_before: Option<DateTime<Utc>>,
    /// Published to the trusted queue instead of a lane.
    pub trusted: bool,
}

/// The answer for one submission: its status (`queued`, or an earlier request's status).
pub type Accepted = Result<String, ApiError>;

struct Job {
    sub: Submission,
    done: oneshot::Sender<Accepted>,
}

#[derive(Clone)]
pub struct Acceptor {
    tx: mpsc::Sender<Job>,
}

struct Ctx {
    pool: Pool,
    publisher: Publisher,
    namespaces: Arc<NamespaceCache>,
    validate: bool,
    signing_key: Secret,
    ready: Readiness,
    keyring: Keyring,
}

/// Rows inserted with one statement; the version is read inside the transaction, so a
/// version applied a moment ago is the one the request runs.
const SQL_INSERT: &str = "INSERT INTO requests (id, body_hash, namespace, procedure, namespace_version, kind, \
     principal_id, priority, status, input, submitted_at, not_before, envelope) \
     SELECT u.id, u.body_hash, u.namespace, u.procedure, \
            coalesce((SELECT max(version) FROM namespaces n WHERE n.name = u.namespace), u.version), \
            'queued', u.principal_id, u.priority, \
            CASE WHEN u.not_before IS NULL THEN 'queued' ELSE 'scheduled' END, \
            u.input, u.submitted_at, u.not_before, u.envelope \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::uuid[], $7::text[], \
                 $8::jsonb[], $9::timestamptz[], $10::timestamptz[], $11::jsonb[]) \
          AS u(id, body_hash, namespace, procedure, version, principal_id, priority, input, submitted_at, \
               not_before, envelope) \
     ON CONFLICT (id) DO NOTHING \
     RETURNING id, namespace_version";

impl Acceptor {
    pub fn start(
        pool: Pool,
        publisher: Publisher,
        namespaces: Arc<NamespaceCache>,
        validate: bool,
        signing_key: Secret,
        ready: Readiness,
        keyring: Keyring,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let ctx = Arc::new(Ctx {
            pool,
            publisher,
            namespaces,
            validate,
            signing_key,
            ready,
            keyring,
        });
        tokio::spawn(collector(ctx, rx));
        Self { tx }
    }

    pub async fn accept(&self, sub: Submission) -> Accepted {
        let (done, wait) = oneshot::channel();
        let stopped = || ApiError::Unavailable("the queue manager is shutting down".into());
        self.tx
            .send(Job { sub, done })
            .await
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }
}

/// One batch at a time: the next forms while the previous one commits, and is sent as soon as
/// that returns. Four at a time (before stop 18) made smaller batches that held a connection
/// and a transaction each across their broker confirms; under load that cost CPU and latency
/// (`ops/bench --rate 1000`: p99 163–188 ms with four, 77–80 ms with one; docs/decisions.md).
async fn collector(ctx: Arc<Ctx>, rx: mpsc::Receiver<Job>) {
    provisio_shared::batch::run(rx, 128, 1, move |batch| {
        let ctx = ctx.clone();
        async move { accept_batch(&ctx, batch).await }
    })
    .await;
}

/// The request may name this procedure of this namespace version with this input; answers
/// the procedure's sensitive input properties (to seal before the request is stored).
pub fn check_procedure(
    ns: &Namespace,
    principal: &PrincipalRef,
    procedure_name: &Name,
    input: &Value,
    validate: bool,
) -> Result<Vec<Vec<String>>, ApiError> {
    let procedure = ns.procedures.get(procedure_name.as_str()).ok_or_else(|| {
        ApiError::NotFound(format!(
            "procedure `{procedure_name}` does not exist in namespace `{}` v{}",
            ns.name, ns.version
        ))
    })?;
    if procedure.access == Access::Private && !principal.has(Permission::ExecutePrivate.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "procedure `{procedure_name}` is private; naming it needs `execute_private`"
        )));
    }
    if validate {
        let details = procedure.input_violations(input);
        if !details.is_empty() {
            return Err(ApiError::Invalid {
                message: "input does not match the procedure's input schema".into(),
                details: Value::Array(details),
            });
        }
    }
    Ok(procedure.sensitive_inputs.clone())
}

async fn accept_batch(ctx: &Ctx, batch: Vec<Job>) {
    let (subs, dones): (Vec<Submission>, Vec<oneshot::Sender<Accepted>>) =
        batch.into_iter().map(|j| (j.sub, j.done)).unzip();
    let answers = match run_batch(ctx, subs).await {
        Ok(a) => a,
        Err(e) => {
            let msg = e.to_string();
            (0..dones.len())
                .map(|_| Err(ApiError::Unavailable(msg.clone())))
                .collect()
        }
    };
    for (done, answer) in dones.into_iter().zip(answers) {
        let _ = done.send(answer);
    }
}

async fn run_batch(ctx: &Ctx, mut subs: Vec<Submission>) -> Result<Vec<Accepted>, ApiError> {
    let mut client = ctx.pool.get().await.map_err(ApiError::db)?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    let versions_now = insert_rows(&tx, &subs).await?;
    // Ids that were not inserted belong to earlier requests (or to an earlier one in this batch).
    let mut answers: Vec<Option<Accepted>> = (0..subs.len()).map(|_| None).collect();
    let mut inserted = versions_now.clone();
    let is_new: Vec<bool> = subs
        .iter()
        // Only the first of several submissions with one id inserted its row.
        .map(|s| inserted.remove(s.envelope.id.as_str()).is_some())
        .collect();
    answer_duplicates(&tx, &subs, &is_new, &mut answers).await?;
    revalidate(ctx, &tx, &mut subs, &is_new, &versions_now, &mut answers).await;
    let (failed, in_doubt) = publish_new(ctx, &subs, &is_new, &mut answers).await;
    let broker_up = failed.is_empty() && in_doubt.is_empty();
    clean_up(&tx, &subs, &is_new, &answers, failed, &in_doubt).await?;
    // Also sets `provisio_broker_up`.
    ctx.ready.set(broker_up);
    tx.commit().await.map_err(ApiError::db)?;
    count_accepted(&subs, &is_new, &answers);
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(ApiError::Internal("request was not answered".into()))))
        .collect())
}

/// Inserts every submission's row with one statement; the ids inserted, with the namespace
/// version current in this transaction.
async fn insert_rows(
    tx: &Transaction<'_>,
    subs: &[Submission],
) -> Result<HashMap<String, Option<i32>>, ApiError> {
    let stmt = tx.prepare_cached(SQL_INSERT).await.map_err(ApiError::db)?;
    let ids: Vec<&str> = subs.iter().map(|s| s.envelope.id.as_str()).collect();
    let hashes: Vec<&str> = subs.iter().map(|s| s.body_hash.as_str()).collect();
    let namespaces: Vec<&str> = subs.iter().map(|s| s.envelope.namespace.as_str()).collect();
    let procedures: Vec<&str> = subs.iter().map(|s| s.envelope.procedure.as_str()).collect();
    let versions: Vec<i32> = subs.iter().map(|s| s.checked_version).collect();
    let principals: Vec<Option<uuid::Uuid>> = subs
        .iter()
        .map(|s| s.envelope.principal.as_ref().map(|p| p.id))
        .collect();
    let priorities: Vec<&str> = subs.iter().map(|s| s.envelope.priority.as_str()).collect();
    let inputs: Vec<&Value> = subs.iter().map(|s| &s.envelope.input).collect();
    let submitted: Vec<Option<DateTime<Utc>>> =
        subs.iter().map(|s| s.envelope.submitted_at).collect();
    let not_before: Vec<Option<DateTime<Utc>>> = subs.iter().map(|s| s.not_before).collect();
    // Scheduled requests keep their envelope until the scheduler publishes it.
    let envelopes: Vec<Option<Value>> = subs
        .iter()
        .map(|s| {
            s.not_before
                .and_then(|_| serde_json::to_value(&s.envelope).ok())
        })
        .collect();
    let rows = tx
        .query(
            &stmt,
            &[
                &ids,
                &hashes,
                &namespaces,
                &procedures,
                &versions,
                &principals,
                &priorities,
                &inputs,
                &submitted,
                &not_before,
                &envelopes,
            ],
        )
        .await
        .map_err(ApiError::db)?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Option<i32>>(1)))
        .collect())
}

/// Answers the submissions whose id was already used: the earlier request's status when the
/// bodies match, a conflict when they do not.
async fn answer_duplicates(
    tx: &Transaction<'_>,
    subs: &[Submission],
    is_new: &[bool],
    answers: &mut [Option<Accepted>],
) -> Result<(), ApiError> {
    let dup_ids: Vec<&str> = subs
        .iter()
        .zip(is_new)
        .filter(|(_, n)| !**n)
        .map(|(s, _)| s.envelope.id.as_str())
        .collect();
    if !dup_ids.is_empty() {
        let existing = tx
            .query(
                "SELECT id, body_hash, status FROM requests WHERE id = ANY($1)",
                &[&dup_ids],
            )
            .await
            .map_err(ApiError::db)?;
        let existing: HashMap<String, (String, String)> = existing
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    (r.get::<_, String>(1), r.get::<_, String>(2)),
                )
            })
            .collect();
        for (i, s) in subs.iter().enumerate() {
            if is_new[i] {
                continue;
            }
            answers[i] = Some(match existing.get(s.envelope.id.as_str()) {
                Some((hash, _)) if *hash != s.body_hash => Err(ApiError::Conflict(format!(
                    "request id `{}` was already used for a different request",
                    s.envelope.id
                ))),
                Some((_, status)) => Ok(status.clone()),
                None => Err(ApiError::Unavailable(
                    "a concurrent request with the same id did not complete; retry".into(),
                )),
            });
        }
    }
    Ok(())
}

/// Validates again, against the version current in this transaction, the new submissions
/// checked against an older one: a version applied since validation is the one that runs.
async fn revalidate(
    ctx: &Ctx,
    tx: &Transaction<'_>,
    subs: &mut [Submission],
    is_new: &[bool],
    versions_now: &HashMap<String, Option<i32>>,
    answers: &mut [Option<Accepted>],
) {
    for (i, s) in subs.iter_mut().enumerate() {
        if !is_new[i] {
            continue;
        }
        let now = versions_now.get(s.envelope.id.as_str()).copied().flatten();
        if let Some(v) = now.filter(|v| *v != s.checked_version) {
            let checked = match ctx.namespaces.get(s.envelope.namespace.as_str(), v).await {
                Ok(Some(ns)) => {
                    let principal = s.envelope.principal.clone().unwrap_or(PrincipalRef {
                        id: uuid::Uuid::nil(),
                        name: String::new(),
                        permissions: Vec::new(),
                    });
                    check_procedure(
                        &ns,
                        &principal,
                        &s.envelope.procedure,
                        &s.clear_input,
                        ctx.validate,
                    )
                }
                Ok(None) => Err(ApiError::NotFound(format!(
                    "namespace `{}` does not exist",
                    s.envelope.namespace
                ))),
                Err(e) => Err(ApiError::db(e)),
            };
            ctx.namespaces.invalidate(s.envelope.namespace.as_str());
            let checked = match checked {
                Ok(sensitive) if s.envelope.steps.is_none() => {
                    reseal(ctx, tx, s, &sensitive, v).await
                }
                other => other.map(|_| ()),
            };
            match checked {
                Ok(()) => s.envelope.namespace_version = Some(v),
                Err(e) => answers[i] = Some(Err(e)),
            }
        }
    }
}

/// Seals a submission's input as namespace version `v` marks it; when that differs from what
/// its row got (sealed as the version it was checked against), the row is corrected in the
/// accepting transaction, so row and message carry the same input.
async fn reseal(
    ctx: &Ctx,
    tx: &Transaction<'_>,
    s: &mut Submission,
    sensitive: &[Vec<String>],
    v: i32,
) -> Result<(), ApiError> {
    let input = ctx
        .keyring
        .seal_paths(&s.clear_input, sensitive, s.envelope.id.as_str());
    if input == s.envelope.input {
        return Ok(());
    }
    s.envelope.input = input;
    let mut kept = s.envelope.clone();
    kept.namespace_version = Some(v);
    let envelope = s.not_before.and_then(|_| serde_json::to_value(&kept).ok());
    tx.execute(
        "UPDATE requests SET input = $2, envelope = $3 WHERE id = $1",
        &[&s.envelope.id.as_str(), &s.envelope.input, &envelope],
    )
    .await
    .map_err(ApiError::db)?;
    Ok(())
}

/// Publishes every new, still valid request (confirms awaited concurrently) and answers it;
/// the ids whose publish failed, and the submissions whose publish is in doubt.
async fn publish_new<'a>(
    ctx: &Ctx,
    subs: &'a [Submission],
    is_new: &[bool],
    answers: &mut [Option<Accepted>],
) -> (Vec<&'a str>, Vec<usize>) {
    let exchange = ctx.publisher.topology().requests_exchange();
    let trusted_exchange = ctx.publisher.topology().trusted_exchange();
    let key = ctx.signing_key.expose().as_bytes();
    let started = Instant::now();
    for (i, s) in subs.iter().enumerate() {
        if is_new[i] && answers[i].is_none() && s.not_before.is_some() {
            answers[i] = Some(Ok("scheduled".to_owned()));
        }
    }
    let publishes = subs
        .iter()
        .enumerate()
        .filter(|(i, _)| is_new[*i] && answers[*i].is_none())
        .map(|(i, s)| {
            let (bytes, props) = signing::signed_envelope(&s.envelope, key);
            let publisher = &ctx.publisher;
            let (exchange, lane) = if s.trusted {
                (&trusted_exchange, "")
            } else {
                (&exchange, s.envelope.priority.as_str())
            };
            async move {
                let r = publisher
                    .publish(Outgoing {
                        exchange,
                        routing_key: lane,
                        body: &bytes,
                        properties: props,
                    })
                    .await;
                (i, r)
            }
        });
    let results = join_all(publishes).await;
    metrics::histogram!(provisio_shared::metrics::PUBLISH_DURATION)
        .record(started.elapsed().as_secs_f64());
    let mut failed: Vec<&str> = Vec::new();
    let mut in_doubt: Vec<usize> = Vec::new();
    for (i, r) in results {
        match r {
            Ok(()) => answers[i] = Some(Ok("queued".to_owned())),
            // The broker may have the message: refusing would be a 503 for a request that
            // runs. Keep the row instead, as a scheduled request the scheduler publishes
            // unless an engine has started it by then: accepted either way.
            // (Credentials, if any, are sealed: the kept envelope holds them only sealed.)
            Err(e) if e.may_have_been_published() => {
                tracing::warn!(request_id = %subs[i].envelope.id, error = %e,
                    "publish in doubt; accepted, republished later unless an engine starts it");
                in_doubt.push(i);
                answers[i] = Some(Ok("queued".to_owned()));
            }
            Err(e) => {
                failed.push(subs[i].envelope.id.as_str());
                answers[i] = Some(Err(ApiError::Unavailable(format!(
                    "broker unavailable, nothing was accepted: {e}"
                ))));
            }
        }
    }
    (failed, in_doubt)
}

/// Deletes the rows whose message is not in the broker, and turns the in-doubt ones into
/// scheduled requests the scheduler republishes.
async fn clean_up(
    tx: &Transaction<'_>,
    subs: &[Submission],
    is_new: &[bool],
    answers: &[Option<Accepted>],
    failed: Vec<&str>,
    in_doubt: &[usize],
) -> Result<(), ApiError> {
    // Rows whose message is not in the broker (publish failed, or a newer version refused
    // the request) must not outlive this transaction.
    let mut remove = failed;
    for (i, s) in subs.iter().enumerate() {
        if is_new[i]
            && matches!(answers[i], Some(Err(_)))
            && !remove.contains(&s.envelope.id.as_str())
        {
            remove.push(s.envelope.id.as_str());
        }
    }
    if !remove.is_empty() {
        tx.execute("DELETE FROM requests WHERE id = ANY($1)", &[&remove])
            .await
            .map_err(ApiError::db)?;
    }
    if !in_doubt.is_empty() {
        let ids: Vec<&str> = in_doubt
            .iter()
            .map(|&i| subs[i].envelope.id.as_str())
            .collect();
        let envelopes: Vec<Value> = in_doubt
            .iter()
            .map(|&i| {
                serde_json::to_value(&subs[i].envelope)
                    .map_err(|e| ApiError::Internal(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        tx.execute(
            "UPDATE requests SET status = 'scheduled', envelope = u.envelope, \
                    not_before = now() + make_interval(secs => $3) \
             FROM unnest($1::text[], $2::jsonb[]) AS u(id, envelope) \
             WHERE requests.id = u.id AND requests.status = 'queued'",
            &[&ids, &envelopes, &IN_DOUBT_REPUBLISH_AFTER.as_secs_f64()],
        )
        .await
        .map_err(ApiError::db)?;
    }
    Ok(())
}

fn count_accepted(subs: &[Submission], is_new: &[bool], answers: &[Option<Accepted>]) {
    for (i, s) in subs.iter().enumerate() {
        if is_new[i] && matches!(answers[i], Some(Ok(_))) {
            // The names were checked against the namespace above; an inline procedure's name
            // is the caller's choice and is labelled `inline`.
            let procedure = provisio_shared::metrics::accepted_procedure_label(
                s.envelope.procedure.as_str(),
                s.envelope.steps.is_some(),
            );
            metrics::counter!(provisio_shared::metrics::REQUESTS_ACCEPTED,
                "namespace" => s.envelope.namespace.to_string(), "procedure" => procedure,
                "lane" => if s.trusted { "trusted" } else { s.envelope.priority.as_str() })
            .increment(1);
        }
    }
}
