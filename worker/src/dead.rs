//! Dead letters end somewhere: a request whose message was dead-lettered (RabbitMQ's delivery
//! limit on a lane, or an engine refusing the envelope after acceptance) gets the status
//! `dead`, with the reason in its error, instead of staying `queued` forever; and the letter
//! itself is recorded in `dead_letters`, where operators list, requeue and discard it through
//! the queue manager's API.
//!
//! The dead-letter exchange is a fanout: `{prefix}.dead` is the broker's raw archive (bounded,
//! nobody consumes it), and `{prefix}.dead.status` feeds this consumer. Every auditor consumes
//! it, leader or not: the update is idempotent and the record is kept once per message (its
//! fingerprint), so they compete for messages safely. A message is acked only after its
//! request's status and its record are committed, together.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use provisio_shared::amqp::{self, Topology, header_str};
use provisio_shared::config::{Config, Secret};
use provisio_shared::metrics as m;
use provisio_shared::reconnect::Reconnect;
use provisio_shared::signing;
use provisio_shared::telemetry::Readiness;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Dead letters settled at once per auditor.
const PREFETCH: u16 = 16;
/// How often a request whose transaction is still unfinished is looked at again.
const RECHECK: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What a dead letter says about its request, read from its properties and headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    /// `message_id`, else the envelope's `id`.
    pub request_id: Option<String>,
    /// The engine's `x-provisio-reason`, else RabbitMQ's death reason (`delivery_limit`, …).
    pub reason: String,
    pub message: String,
    /// The envelope as JSON, if the body is JSON at all.
    pub body: Option<Value>,
    /// The engine that refused it, or the queue RabbitMQ dead-lettered it from.
    pub source: Option<String>,
    /// `x-provisio-signature`, the queue manager's signature of the body, if any.
    pub signature: Option<String>,
    pub body_bytes: usize,
    /// SHA-256 of the message id, headers and body: the same message delivered again is
    /// recorded once.
    pub fingerprint: String,
}

impl Letter {
    pub fn read(body: &[u8], props: &BasicProperties) -> Self {
        let raw = body;
        let body: Option<Value> = serde_json::from_slice(raw).ok();
        let message_id = props.message_id().as_ref().map(|id| id.as_str().to_owned());
        let request_id = message_id.clone().or_else(|| {
            body.as_ref()
                .and_then(|b| b.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let mut source = None;
        let (reason, message) = if let Some(reason) = header_str(props, "x-provisio-reason") {
            let detail = header_str(props, "x-provisio-error")
                .unwrap_or_else(|| "an engine dead-lettered the message".to_owned());
            source = header_str(props, "x-provisio-engine").map(|e| format!("engine {e}"));
            (reason, format!("dead-lettered by an engine: {detail}"))
        } else if let Some((reason, queue)) = broker_death(props) {
            let message = match reason.as_str() {
                "delivery_limit" => format!(
                    "RabbitMQ dead-lettered the message from `{queue}`: delivered more often than the delivery limit without being settled"
                ),
                other => format!("RabbitMQ dead-lettered the message from `{queue}` ({other})"),
            };
            source = (!queue.is_empty()).then(|| format!("queue {queue}"));
            (reason, message)
        } else {
            (
                "unknown".to_owned(),
                "the message was dead-lettered for no stated reason".to_owned(),
            )
        };
        // Without the count a quorum queue adds when it delivers the message again.
        let headers: Vec<_> = props
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| k.as_str() != "x-delivery-count")
                    .collect()
            })
            .unwrap_or_default();
        let headers = format!("{headers:?}");
        let fingerprint = signing::digest(&[
            message_id.as_deref().unwrap_or_default().as_bytes(),
            headers.as_bytes(),
            raw,
        ]);
        Self {
            request_id,
            reason,
            message,
            body,
            source,
            signature: header_str(props, signing::SIGNATURE_HEADER),
            body_bytes: raw.len(),
            fingerprint,
        }
    }

    /// The request's `error` once it is dead.
    pub fn error(&self) -> Value {
        json!({"code": "dead_lettered", "message": self.message, "reason": self.reason})
    }

    /// The envelope as it may be stored: without its credentials (never kept in clear), and
    /// whether it had any.
    pub fn redacted(&self) -> (Option<Value>, bool) {
        let mut body = self.body.clone();
        let had = body
            .as_mut()
            .and_then(Value::as_object_mut)
            .and_then(|o| o.remove("credentials"))
            .is_some_and(|c| !c.is_null());
        (body, had)
    }

    /// Where the message would run again: `(lane, trusted)`, from the envelope.
    pub fn route(&self) -> (Option<String>, bool) {
        let Some(b) = self.body.as_ref().and_then(Value::as_object) else {
            return (None, false);
        };
        if b.get("kind").and_then(Value::as_str) == Some("trusted") {
            return (None, true);
        }
        let lane = b
            .get("priority")
            .and_then(Value::as_str)
            .unwrap_or("normal");
        (Some(lane.to_owned()), false)
    }
}

/// RabbitMQ's first death of the message: `x-first-death-reason`/`-queue`, else the first
/// entry of `x-death`.
fn broker_death(props: &BasicProperties) -> Option<(String, String)> {
    if let Some(reason) = header_str(props, "x-first-death-reason") {
        let queue = header_str(props, "x-first-death-queue").unwrap_or_default();
        return Some((reason, queue));
    }
    let headers = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get(&ShortString::from("x-death"))? else {
        return None;
    };
    // Newest first; the first death is the last entry.
    let AMQPValue::FieldTable(death) = deaths.as_slice().last()? else {
        return None;
    };
    let text = |key: &str| match death.inner().get(&ShortString::from(key)) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((text("reason")?, text("queue").unwrap_or_default()))
}

/// How a dead letter was settled (the `outcome` label of
/// `provisio_dead_letters_settled_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The request is now `dead`.
    MarkedDead,
    /// The request is not waiting for a message (finished, scheduled, parked, cancelled).
    NotQueued,
    /// No message id, or no request by that id (e.g. a direct AMQP producer's message that no
    /// engine ever opened).
    UnknownRequest,
    /// The body is not the request's message: a dead letter does not kill a request unless
    /// it carries that request (id, namespace, procedure and input), so that a stray message
    /// naming someone else's id cannot.
    Mismatch,
}

impl Settled {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MarkedDead => "marked_dead",
            Self::NotQueued => "not_queued",
            Self::UnknownRequest => "unknown_request",
            Self::Mismatch => "mismatch",
        }
    }
}

/// The consumer of `{prefix}.dead.status`.
pub struct DeadLetters {
    amqp_url: Secret,
    topology: Topology,
    pool: Pool,
    /// Up while the consumer holds a broker connection (`provisio_broker_up`).
    broker: Readiness,
    /// The fleet's key, to tell the letters the queue manager signed (which may be signed
    /// again and republished) from the others.
    signing_key: Secret,
}

impl DeadLetters {
    pub fn new(cfg: &Config, pool: Pool, broker: Readiness) -> Self {
        Self {
            amqp_url: cfg.amqp.url.clone(),
            topology: Topology::new(&cfg.amqp),
            pool,
            broker,
            signing_key: cfg.security.signing_key.clone(),
        }
    }

    /// Consumes until `stop`, reconnecting (with back-off) whenever the broker goes away.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        for outcome in [
            Settled::MarkedDead,
            Settled::NotQueued,
            Settled::UnknownRequest,
            Settled::Mismatch,
        ] {
            metrics::counter!(m::DEAD_LETTERS_SETTLED, "outcome" => outcome.as_str()).increment(0);
        }
        let mut reconnect = Reconnect::broker();
        while !stop.is_cancelled() {
            match self.clone().consume(&stop, &mut reconnect).await {
                Ok(()) => break,
                Err(e) => {
                    self.broker.set(false);
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?reconnect.next_delay(), "dead-letter consumer lost the broker; reconnecting");
                    if !reconnect.pause(&stop).await {
                        break;
                    }
                }
            }
        }
    }

    async fn consume(
        self: Arc<Self>,
        stop: &CancellationToken,
        reconnect: &mut Reconnect,
    ) -> anyhow::Result<()> {
        let conn = amqp::connect(self.amqp_url.expose(), Duration::from_secs(5)).await?;
        let ch = conn.create_channel().await?;
        self.topology
            .declare(&ch)
            .await
            .context("declaring the topology")?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let queue = self.topology.dead_status_queue();
        let mut consumer = ch
            .basic_consume(
                queue.clone().into(),
                format!("auditor-{}", std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        reconnect.healthy();
        self.broker.set(true);
        tracing::info!(queue, "consuming dead letters");
        let mut tasks = JoinSet::new();
        let result = loop {
            while tasks.try_join_next().is_some() {}
            let next = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                d = consumer.next() => d,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("consumer stream ended")),
            };
            let me = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let letter = Letter::read(&delivery.data, &delivery.properties);
                let signed = letter.signature.as_deref().is_some_and(|sig| {
                    signing::verify(me.signing_key.expose().as_bytes(), &delivery.data, sig)
                });
                // `None`: shutting down before the record was written; the broker delivers
                // the message again (to this auditor's successor or another one).
                let Some(settled) = me.settle(&letter, signed, &stop).await else {
                    return;
                };
                metrics::counter!(m::DEAD_LETTERS_SETTLED, "outcome" => settled.as_str())
                    .increment(1);
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "cannot ack a dead letter; it will be delivered again");
                }
            });
        };
        // Unacked deliveries go back to the queue with the connection; settling is idempotent.
        tasks.abort_all();
        let _ = conn.close(200, "auditor stopping".into()).await;
        result
    }

    /// Records `letter` (and its request as dead, when it is that request's message),
    /// retrying while the database is away or while the request still has an unfinished
    /// transaction. `None` when `stop` came first.
    async fn settle(
        &self,
        letter: &Letter,
        signed: bool,
        stop: &CancellationToken,
    ) -> Option<Settled> {
        let id = letter.request_id.as_deref().unwrap_or("");
        let mut retry = Duration::from_millis(500);
        loop {
            let wait = match self.record(letter, signed).await {
                Ok(Some(settled)) => {
                    match settled {
                        Settled::MarkedDead => tracing::warn!(
                            request_id = id,
                            reason = letter.reason,
                            "request is dead: its message was dead-lettered"
                        ),
                        Settled::NotQueued => tracing::info!(
                            request_id = id,
                            reason = letter.reason,
                            "dead letter of a request that is not queued; recorded for operators only"
                        ),
                        Settled::UnknownRequest => tracing::warn!(
                            request_id = id,
                            reason = letter.reason,
                            "dead letter of no known request; recorded for operators only"
                        ),
                        Settled::Mismatch => tracing::warn!(
                            request_id = id,
                            reason = letter.reason,
                            "dead letter names a request but is not its message; recorded for operators only"
                        ),
                    }
                    return Some(settled);
                }
                Ok(None) => {
                    tracing::debug!(
                        request_id = id,
                        "dead letter of a request with an unfinished transaction; waiting"
                    );
                    RECHECK
                }
                Err(e) => {
                    tracing::warn!(request_id = id, error = format!("{e:#}"), retry_in = ?retry, "cannot record a dead letter; retrying");
                    let wait = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    wait
                }
            };
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One attempt, in one transaction: the request's status (when the letter is its message
    /// and it was waiting for it) and the letter's record commit together. `Ok(None)`: the
    /// request has a transaction that is not finished (running, or awaiting recovery), whose
    /// outcome would overwrite ours; look again later.
    async fn record(&self, letter: &Letter, signed: bool) -> anyhow::Result<Option<Settled>> {
        let mut client = self.pool.get().await.context("database")?;
        let tx = client.transaction().await?;
        let decided = match letter.request_id.as_deref() {
            None => Some((Settled::UnknownRequest, None)),
            Some(id) => Self::decide(&tx, id, letter).await?,
        };
        let Some((settled, meta)) = decided else {
            return Ok(None);
        };
        // Only a letter that is its request's message is filed under it; the others (no id,
        // an unknown id, someone else's id) are nobody's and can only be deleted.
        let request_id = matches!(settled, Settled::MarkedDead | Settled::NotQueued)
            .then_some(letter.request_id.as_deref())
            .flatten();
        let field = |k: &str| {
            letter
                .body
                .as_ref()
                .and_then(|b| b.get(k))
                .and_then(Value::as_str)
        };
        let (envelope, redacted) = letter.redacted();
        let (lane, trusted) = letter.route();
        let body_bytes = i32::try_from(letter.body_bytes).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO dead_letters (request_id, message_id, reason, error, namespace, procedure, \
                 lane, trusted, source, signed, envelope, credentials_redacted, body_bytes, settled, fingerprint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (fingerprint) WHERE status = 'dead' DO NOTHING",
            &[
                &request_id as &(dyn tokio_postgres::types::ToSql + Sync),
                &letter.request_id,
                &letter.reason,
                &letter.message,
                &field("namespace"),
                &field("procedure"),
                &lane,
                &trusted,
                &letter.source,
                &signed,
                &envelope,
                &redacted,
                &body_bytes,
                &settled.as_str(),
                &letter.fingerprint,
            ],
        )
        .await?;
        tx.commit().await?;
        if let Some((namespace, procedure)) = meta {
            // The row's names were checked when the request was accepted, except an inline
            // procedure's, which is the caller's choice: the envelope's `steps` tell it apart.
            let inline = letter
                .body
                .as_ref()
                .is_some_and(|b| b.get("steps").is_some_and(|s| !s.is_null()));
            let procedure = m::accepted_procedure_label(&procedure, inline);
            metrics::counter!(m::REQUESTS_FINISHED, "namespace" => namespace, "procedure" => procedure, "status" => "dead")
                .increment(1);
        }
        Ok(Some(settled))
    }

    /// Whether the letter kills request `id`, marking it dead in `tx` if so (with the
    /// request's names, for the metrics); `None` while its transaction is unfinished.
    async fn decide(
        tx: &deadpool_postgres::Transaction<'_>,
        id: &str,
        letter: &Letter,
    ) -> anyhow::Result<Option<(Settled, Option<(String, String)>)>> {
        let body = letter.body.as_ref();
        let field = |k: &str| body.and_then(|b| b.get(k)).and_then(Value::as_str);
        if field("id").is_some_and(|body_id| body_id != id) {
            return Ok(Some((Settled::Mismatch, None)));
        }
        let input = body.map(|b| b.get("input").cloned().unwrap_or(Value::Null));
        // The row lock orders this against an engine opening a transaction for the request:
        // either that transaction is visible to the check below, or the engine finds the
        // request dead and opens nothing.
        let Some(row) = tx
            .query_opt(
                "SELECT status, namespace, procedure, \
                        coalesce(namespace = $2 AND procedure = $3 AND input = $4, false) \
                 FROM requests WHERE id = $1 FOR UPDATE",
                &[&id, &field("namespace"), &field("procedure"), &input],
            )
            .await?
        else {
            return Ok(Some((Settled::UnknownRequest, None)));
        };
        let (status, namespace, procedure, matches): (String, String, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !matches {
            return Ok(Some((Settled::Mismatch, None)));
        }
        if !matches!(status.as_str(), "queued" | "running") {
            return Ok(Some((Settled::NotQueued, None)));
        }
        let unfinished: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM transactions WHERE request_id = $1 \
                   AND status IN ('running', 'prepared', 'committing', 'rolling_back'))",
                &[&id],
            )
            .await?
            .get(0);
        // `running`: an attempt holds the request (with separate log servers its transaction
        // is not in this database); it ends queued (recovered) or final, and then we decide.
        if unfinished || status == "running" {
            return Ok(None);
        }
        tx.execute(
            "UPDATE requests SET status = 'dead', error = $2, finished_at = now() WHERE id = $1",
            &[&id, &letter.error()],
        )
        .await?;
        Ok(Some((Settled::MarkedDead, Some((namespace, procedure)))))
    }
}

#[cfg(test)]
#[path = "dead_tests.rs"]
mod tests;
