//! The engine role: consume the request lanes, run each request's procedure as one
//! transaction, commit the outcome, publish it, then ack.
//!
//! [`Engine::handle`] processes one delivery and says what to do with it; [`Engine::run`] is
//! the loop around it (consumers, concurrency, reconnects, draining). Tests step `handle`.

mod attempt;
pub mod interpreter;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use provisio_shared::amqp::{self, Outgoing, Publisher, Topology, header_str, long_str};
use provisio_shared::config::Config;
use provisio_shared::domain::{Envelope, PrincipalRef, Priority, RequestKind, Status, TxModel};
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::procedure::Access;
use provisio_shared::security::PrincipalBy;
use provisio_shared::signing;
use provisio_shared::telemetry::Readiness;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::logset::LogSet;
use crate::providers::Registry;
use crate::txlog::Begin;
use attempt::{Opened, Written};
use interpreter::Run;

/// Pause before a delivery that could not be made durable goes back to the queue.
const REQUEUE_DELAY: Duration = Duration::from_secs(2);

/// What the loop does with a delivery once `handle` is done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Finished (or dead-lettered): remove it from the queue.
    Ack,
    /// Could not be made durable (database down): let the broker deliver it again.
    Requeue,
}

/// Where a delivery came from, which decides the permission it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Lane(Priority),
    Trusted,
}

pub struct Engine {
    pub cfg: Config,
    pub pool: Pool,
    pub log: Arc<LogSet>,
    pub registry: Registry,
    pub namespaces: NamespaceCache,
    pub publisher: Publisher,
    pub topology: Topology,
    pub engine_id: String,
    /// `engine_id` as every log record of this engine carries it (the fencing token).
    owner: Arc<str>,
    pub ready: Readiness,
    /// Transactions this engine runs, each with the flag raised when its lease is lost.
    /// (log server, lost flag) of each.
    leases: Mutex<HashMap<Uuid, (usize, Arc<AtomicBool>)>>,
    amqp_users: Mutex<HashMap<String, (PrincipalRef, Instant)>>,
    /// Recovers an earlier attempt of a redelivered request before running it again.
    pub recovery: Option<Arc<crate::recovery::Recovery>>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        pool: Pool,
        log: Arc<LogSet>,
        registry: Registry,
        namespaces: NamespaceCache,
        publisher: Publisher,
        ready: Readiness,
    ) -> Self {
        let topology = Topology::new(&cfg.amqp);
        let engine_id = format!("engine-{}", Uuid::now_v7());
        Self {
            cfg,
            pool,
            log,
            registry,
            namespaces,
            publisher,
            topology,
            owner: Arc::from(engine_id.as_str()),
            engine_id,
            ready,
            leases: Mutex::new(HashMap::new()),
            amqp_users: Mutex::new(HashMap::new()),
            recovery: None,
        }
    }

    /// Processes one delivery. Never panics on input; every bad message ends acked in the
    /// dead-letter queue with its reason.
    pub async fn handle(
        &self,
        body: &[u8],
        props: &BasicProperties,
        source: Source,
        redelivered: bool,
    ) -> Disposition {
        let envelope = match Envelope::parse(body) {
            Ok(e) => e,
            Err(e) => {
                return self
                    .dead_letter(body, props, "malformed", &e.to_string())
                    .await;
            }
        };
        let principal = match self.authenticate(&envelope, body, props).await {
            Ok(p) => p,
            Err(reason) => {
                return self
                    .dead_letter(body, props, "unauthenticated", &reason)
                    .await;
            }
        };
        let needed = match (source, envelope.kind) {
            (Source::Trusted, _) | (_, RequestKind::Trusted) => "execute_trusted",
            _ => "execute",
        };
        if !principal.has(needed) {
            let why = format!("principal `{}` lacks `{needed}`", principal.name);
            return self.dead_letter(body, props, "forbidden", &why).await;
        }
        let span = tracing::info_span!("request", request_id = %envelope.id, namespace = %envelope.namespace, procedure = %envelope.procedure, redelivered);
        match self
            .run_request(&envelope, principal, props)
            .instrument(span)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(request_id = %envelope.id, error = %e, "outcome not durable; requeueing");
                Disposition::Requeue
            }
        }
    }

    async fn authenticate(
        &self,
        env: &Envelope,
        body: &[u8],
        props: &BasicProperties,
    ) -> Result<PrincipalRef, String> {
        if let Some(sig) = header_str(props, signing::SIGNATURE_HEADER) {
            if !signing::verify(
                self.cfg.security.signing_key.expose().as_bytes(),
                body,
                &sig,
            ) {
                return Err("envelope signature does not verify".into());
            }
            return env
                .principal
                .clone()
                .ok_or_else(|| "signed envelope names no principal".to_owned());
        }
        // Direct AMQP producers: RabbitMQ has validated `user_id` against the connection.
        let Some(user) = props.user_id().as_ref().map(|u| u.as_str().to_owned()) else {
            return Err("neither a queue-manager signature nor an AMQP user_id".into());
        };
        if let Ok(cache) = self.amqp_users.lock()
            && let Some((p, at)) = cache.get(&user)
            && at.elapsed() < Duration::from_mins(1)
        {
            return Ok(p.clone());
        }
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| format!("database: {e}"))?;
        let p = provisio_shared::security::principal(&client, PrincipalBy::AmqpUser, &user)
            .await
            .map_err(|e| format!("database: {e}"))?
            .ok_or_else(|| format!("AMQP user `{user}` is not mapped to a principal"))?;
        if let Ok(mut cache) = self.amqp_users.lock() {
            cache.insert(user, (p.clone(), Instant::now()));
        }
        Ok(p)
    }

    async fn dead_letter(
        &self,
        body: &[u8],
        props: &BasicProperties,
        reason: &str,
        detail: &str,
    ) -> Disposition {
        tracing::warn!(reason, detail, "dead-lettering a message");
        // Keep the producer's headers (the queue manager's signature among them), so that an
        // operator can replay the message as it was.
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert("x-provisio-reason".into(), long_str(reason));
        headers.insert("x-provisio-error".into(), long_str(detail));
        headers.insert("x-provisio-engine".into(), long_str(&self.engine_id));
        let mut out = BasicProperties::default().with_headers(headers);
        if let Some(id) = props.message_id() {
            out = out.with_message_id(id.clone());
        }
        let exchange = self.topology.dead_exchange();
        match self
            .publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: "",
                body,
                properties: out,
            })
            .await
        {
            Ok(()) => {
                metrics::counter!(provisio_shared::metrics::DEAD_LETTERS, "reason" => reason.to_owned()).increment(1);
                Disposition::Ack
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot dead-letter; requeueing");
                Disposition::Requeue
            }
        }
    }

    async fn run_request(
        &self,
        env: &Envelope,
        principal: PrincipalRef,
        props: &BasicProperties,
    ) -> anyhow::Result<Disposition> {
        let started = Instant::now();
        let tx_id = Uuid::now_v7();
        let mut lookup = match env.namespace_version {
            Some(v) => self.namespaces.get(env.namespace.as_str(), v).await,
            None => self.namespaces.current(env.namespace.as_str()).await,
        }
        .context("loading the namespace")?;
        // A trusted request may bring its own procedure, compiled in the namespace's context.
        let inline = match (&env.steps, env.kind, &lookup) {
            (Some(steps), RequestKind::Trusted, Some(ns)) => {
                let doc = self
                    .namespaces
                    .document(ns.name.as_str(), ns.version)
                    .await
                    .context("loading the namespace document")?
                    .unwrap_or(Value::Null);
                Some(
                    provisio_shared::procedure::with_inline(
                        &doc,
                        env.procedure.as_str(),
                        steps,
                        self.namespaces.catalog(),
                    )
                    .map(Arc::new),
                )
            }
            _ => None,
        };
        let mut inline_problems = None;
        match inline {
            Some(Ok(ns)) => lookup = Some(ns),
            Some(Err(problems)) => inline_problems = Some(problems),
            None => {}
        }
        let procedure = lookup
            .as_ref()
            .and_then(|ns| ns.procedures.get(env.procedure.as_str()).cloned());
        // `run_as`: the procedure acts for that principal (the submitter stays on record).
        let acting = match &env.run_as {
            Some(name) if env.kind == RequestKind::Trusted => self.principal_named(name).await?,
            _ => Some(principal.clone()),
        };
        let model = procedure.as_ref().map_or(TxModel::Read, |p| p.model);
        let begin = Begin {
            tx_id,
            request_id: env.id.to_string(),
            namespace: env.namespace.to_string(),
            procedure: env.procedure.to_string(),
            namespace_version: lookup.as_ref().map_or(0, |ns| ns.version),
            model: model.as_str(),
            audit: procedure.as_ref().is_some_and(|p| p.audit),
            engine_id: self.engine_id.clone(),
            lease_seconds: self.cfg.engine.lease_seconds as f64,
            input: env.input.clone(),
            principal_id: Some(principal.id),
            priority: env.priority.as_str(),
        };
        // Redelivery is not re-execution: a request with a final status is answered from its
        // record. Logged models learn it atomically from opening the transaction; `read` ones
        // (which open nothing) ask first.
        let mut attempt = 1;
        let Some(server) = self.log.pick() else {
            tracing::warn!("every transaction-log server is on the bad-server list; requeueing");
            return Ok(Disposition::Requeue);
        };
        if model == TxModel::Read {
            if self.is_final(env.id.as_str()).await? {
                self.publish_stored_outcome(env, props).await;
                return Ok(Disposition::Ack);
            }
        } else {
            match self.open(&begin, server).await? {
                Opened::Began(a) => attempt = a,
                Opened::AlreadyFinished => {
                    tracing::info!(request_id = %env.id, "already finished; answering from the record");
                    self.publish_stored_outcome(env, props).await;
                    return Ok(Disposition::Ack);
                }
                Opened::Busy => return Ok(Disposition::Requeue),
            }
        }
        let refuse = |code: &str, message: String| Some(json!({"code": code, "message": message}));
        let refusal = match (&lookup, &procedure) {
            _ if inline_problems.is_some() => refuse(
                "invalid_inline",
                format!(
                    "the inline procedure is invalid: {:?}",
                    inline_problems
                        .as_ref()
                        .map(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>())
                ),
            ),
            _ if acting.is_none() => refuse(
                "unknown_principal",
                format!(
                    "`run_as`: no enabled principal `{}`",
                    env.run_as.clone().unwrap_or_default()
                ),
            ),
            (Some(_), Some(p))
                if p.access == Access::Private
                    && !principal.has("execute_private")
                    && env.steps.is_none() =>
            {
                refuse(
                    "forbidden",
                    format!("procedure `{}` is private", env.procedure),
                )
            }
            (Some(_), Some(_)) => None,
            _ => refuse(
                "unknown_procedure",
                format!(
                    "procedure `{}.{}` does not exist",
                    env.namespace, env.procedure
                ),
            ),
        };
        let (Some(ns), Some(procedure), None) = (lookup, procedure, refusal.clone()) else {
            let written = self
                .finish(
                    begin,
                    server,
                    model == TxModel::Read,
                    Vec::new(),
                    "failed",
                    Status::Failed,
                    None,
                    refusal.clone(),
                    json!([]),
                    None,
                    (false, None),
                )
                .await?;
            if written != Written::Yes {
                return Ok(Disposition::Requeue);
            }
            self.publish_outcome(
                env,
                props,
                &outcome_record(env, Status::Failed, None, refusal.as_ref(), attempt),
            )
            .await;
            return Ok(Disposition::Ack);
        };

        let lease_lost = if model == TxModel::Read {
            Arc::new(AtomicBool::new(false))
        } else {
            self.hold_lease(tx_id, server)
        };
        let sink = self.log.sink(server);
        let credentials = if principal.has("execute_with_credentials") {
            env.credentials.clone()
        } else {
            None
        };
        let request_ctx = json!({"id": env.id, "namespace": env.namespace, "procedure": env.procedure, "priority": env.priority, "attempt": attempt});
        let run = Run::new(
            tx_id,
            self.owner.clone(),
            model,
            &self.registry,
            &sink,
            &self.namespaces,
            acting,
            credentials,
            request_ctx,
            self.cfg.validation.enable_schema_validation,
        )
        .with_lease_flag(lease_lost)
        .with_pause_after_prepare(
            (self.cfg.providers.test.enabled && self.cfg.providers.test.pause_after_prepare_ms > 0)
                .then(|| Duration::from_millis(self.cfg.providers.test.pause_after_prepare_ms)),
        );
        let outcome = run.execute(&ns, &procedure, env.input.clone()).await;
        // Labels from the namespace that ran, never from what the client chose: inline
        // procedures are `inline`, so metric cardinality stays bounded.
        let (ns_label, proc_label) = provisio_shared::metrics::request_labels(
            Some(&ns),
            env.procedure.as_str(),
            env.steps.is_some(),
        );
        if outcome.fenced {
            self.release_lease(tx_id);
            metrics::counter!(provisio_shared::metrics::FENCED).increment(1);
            tracing::warn!(%tx_id, "the transaction was taken over (lease lost); leaving the request to recovery and redelivery");
            return Ok(Disposition::Requeue);
        }
        if outcome.rerouted {
            // Its log server went bad and every call was undone: run it again elsewhere.
            self.release_lease(tx_id);
            let why = outcome
                .result
                .as_ref()
                .err()
                .map(interpreter::Failure::to_json);
            self.release_request(env.id.as_str(), tx_id, why.as_ref())
                .await?;
            tracing::warn!(%tx_id, "the transaction's log server is on the bad-server list; the request goes to another server");
            return Ok(Disposition::Requeue);
        }
        let (tx_status, status, output, error) = match &outcome.result {
            Ok(out) => ("committed", Status::Succeeded, Some(out.clone()), None),
            Err(f) if outcome.rollback_failed => {
                let mut e = f.to_json();
                e["not_undone"] = Value::Array(outcome.not_undone.clone());
                ("in_doubt", Status::InDoubt, None, Some(e))
            }
            Err(f) => (
                if model == TxModel::Read {
                    "failed"
                } else {
                    "rolled_back"
                },
                Status::Failed,
                None,
                Some(f.to_json()),
            ),
        };
        if outcome.rolled_back > 0 {
            metrics::counter!(provisio_shared::metrics::ROLLBACKS, "namespace" => ns_label.clone(), "procedure" => proc_label.clone()).increment(1);
        }
        // Request-level retry: a cleanly failed attempt runs again later (from PostgreSQL,
        // via the scheduler), or parks for an operator once the retries are spent.
        let (status, retry_at) = match (&env.retry, status) {
            (Some(policy), Status::Failed)
                if model != TxModel::Read && i64::from(attempt) <= i64::from(policy.count) =>
            {
                let at = Utc::now()
                    + chrono::Duration::milliseconds(
                        i64::try_from(policy.interval_ms).unwrap_or(i64::MAX),
                    );
                let mut again = env.clone();
                again.credentials = None;
                (
                    Status::Scheduled,
                    serde_json::to_value(&again).ok().map(|e| (at, e)),
                )
            }
            (Some(policy), Status::Failed)
                if model != TxModel::Read && policy.on_exhausted == "park" =>
            {
                // The envelope is kept as for a retry, so that an operator can resume the
                // request (`POST /v1/requests/{id}:resume`); the time is only where the row's
                // `not_before` points meanwhile: nothing publishes a parked request.
                let mut again = env.clone();
                again.credentials = None;
                (
                    Status::Parked,
                    serde_json::to_value(&again).ok().map(|e| (Utc::now(), e)),
                )
            }
            (_, s) => (s, None),
        };
        let finished = self
            .finish(
                begin,
                server,
                model == TxModel::Read,
                outcome.pending,
                tx_status,
                status,
                output.clone(),
                error.clone(),
                Value::Array(outcome.summary),
                retry_at,
                (
                    outcome.marked,
                    (!outcome.audit_data.is_empty()).then_some(Value::Array(outcome.audit_data)),
                ),
            )
            .await;
        self.release_lease(tx_id);
        match finished? {
            Written::Yes => {}
            Written::Fenced => {
                // Taken over between the last step and the outcome: undo what only we know of.
                interpreter::compensate_unlogged(&self.registry, tx_id, &outcome.unlogged).await;
                metrics::counter!(provisio_shared::metrics::FENCED).increment(1);
                tracing::warn!(%tx_id, "the outcome was fenced (lease lost); leaving the request to recovery and redelivery");
                return Ok(Disposition::Requeue);
            }
            Written::ServerBad => {
                // Nobody else can undo these until the server is back: undo them all here, and
                // run the request again on a server that answers.
                let mut all = outcome.logged;
                all.extend(outcome.unlogged);
                let failed = interpreter::compensate_unlogged(&self.registry, tx_id, &all).await;
                let why = serde_json::json!({"code": interpreter::SERVER_BAD, "message": "the transaction's log server stopped answering; the request runs again on another one", "not_undone": failed});
                self.release_request(env.id.as_str(), tx_id, Some(&why))
                    .await?;
                tracing::warn!(%tx_id, "the transaction's log server went bad before the outcome was written; the request goes to another server");
                return Ok(Disposition::Requeue);
            }
        }
        let labels = [
            ("namespace", ns_label),
            ("procedure", proc_label),
            ("status", status.as_str().to_owned()),
        ];
        metrics::counter!(provisio_shared::metrics::REQUESTS_FINISHED, &labels).increment(1);
        metrics::histogram!(provisio_shared::metrics::REQUEST_RUN_DURATION, &labels)
            .record(started.elapsed().as_secs_f64());
        record_durations(env, &labels);
        self.publish_outcome(
            env,
            props,
            &outcome_record(env, status, output.as_ref(), error.as_ref(), attempt),
        )
        .await;
        Ok(Disposition::Ack)
    }

    /// The enabled principal `name` with its permissions, or `None`.
    async fn principal_named(&self, name: &str) -> anyhow::Result<Option<PrincipalRef>> {
        let client = self.pool.get().await.context("database")?;
        Ok(provisio_shared::security::principal(&client, PrincipalBy::Name, name).await?)
    }

    async fn is_final(&self, id: &str) -> anyhow::Result<bool> {
        let client = self.pool.get().await.context("database")?;
        let row = client
            .query_opt("SELECT status FROM requests WHERE id = $1", &[&id])
            .await
            .context("reading the request")?;
        Ok(row.is_some_and(|r| {
            r.get::<_, String>(0)
                .parse::<Status>()
                .is_ok_and(Status::is_final)
        }))
    }

    /// Publishes the stored record of a request that finished earlier.
    async fn publish_stored_outcome(&self, env: &Envelope, props: &BasicProperties) {
        match self.record(env.id.as_str()).await {
            Ok(Some(r)) => self.publish_outcome(env, props, &r).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the outcome to publish it"),
        }
    }

    /// Publishes an outcome to `{prefix}.results` (and `reply_to`). Best effort: the record in
    /// PostgreSQL is the truth, so a lost notification loses nothing.
    async fn publish_outcome(&self, env: &Envelope, props: &BasicProperties, record: &Value) {
        let status = record
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        let body = record.to_string();
        let rk = format!("{}.{}.{}", env.namespace, env.procedure, status);
        let exchange = self.topology.results_exchange();
        let props_out = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(env.id.as_str().into());
        if let Err(e) = self
            .publisher
            .publish_unconfirmed(Outgoing {
                exchange: &exchange,
                routing_key: &rk,
                body: body.as_bytes(),
                properties: props_out.clone(),
            })
            .await
        {
            tracing::warn!(error = %e, "cannot publish the outcome");
        }
        if let Some(reply_to) = props.reply_to() {
            let mut p = props_out;
            if let Some(c) = props.correlation_id() {
                p = p.with_correlation_id(c.clone());
            }
            let _ = self
                .publisher
                .publish_unconfirmed(Outgoing {
                    exchange: "",
                    routing_key: reply_to.as_str(),
                    body: body.as_bytes(),
                    properties: p,
                })
                .await;
        }
    }

    async fn record(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let client = self.pool.get().await.context("database")?;
        let row = client
            .query_opt(
                "SELECT id, namespace, procedure, status, output, error, attempts, submitted_at, finished_at FROM requests WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| {
            json!({
                "id": r.get::<_, String>(0), "namespace": r.get::<_, String>(1), "procedure": r.get::<_, String>(2),
                "status": r.get::<_, String>(3), "output": r.get::<_, Option<Value>>(4), "error": r.get::<_, Option<Value>>(5),
                "attempts": r.get::<_, i32>(6), "submitted_at": r.get::<_, DateTime<Utc>>(7),
                "finished_at": r.get::<_, Option<DateTime<Utc>>>(8),
            })
        }))
    }

    /// Consumes until `shutdown`; reconnects when the broker goes away. On shutdown, stops
    /// consuming, lets running requests finish within the grace period, and returns; anything
    /// unacked goes back to the queue when the connection closes.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let leases = {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let every = Duration::from_secs((me.cfg.engine.lease_seconds / 3).max(1));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(every) => {}
                    }
                    if let Err(e) = me.renew_leases().await {
                        tracing::warn!(error = %e, "cannot renew leases");
                    }
                }
            })
        };
        let mut delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.clone().consume(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    // A session that got as far as consuming was a success: the next outage
                    // starts again from the shortest pause.
                    if self.ready.get() {
                        delay = Duration::from_millis(200);
                    }
                    self.ready.set(false);
                    tracing::warn!(error = %e, "broker connection lost; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        leases.abort();
        Ok(())
    }

    async fn consume(self: Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let conn = amqp::connect(self.cfg.amqp.url.expose(), Duration::from_secs(5)).await?;
        let prefetch = self.cfg.engine.prefetch;
        let setup = conn.create_channel().await?;
        self.topology.declare(&setup).await?;
        let mut channels: Vec<(Channel, String, Source)> = Vec::new();
        let sources = [
            (
                self.topology.lane_queue(Priority::High),
                Source::Lane(Priority::High),
            ),
            (self.topology.trusted_queue(), Source::Trusted),
            (
                self.topology.lane_queue(Priority::Normal),
                Source::Lane(Priority::Normal),
            ),
            (
                self.topology.lane_queue(Priority::Low),
                Source::Lane(Priority::Low),
            ),
        ];
        let mut consumers = Vec::new();
        for (i, (queue, source)) in sources.into_iter().enumerate() {
            let ch = conn.create_channel().await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let tag = format!("{}-{i}", self.engine_id);
            let consumer = ch
                .basic_consume(
                    queue.clone().into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push((consumer, source));
            channels.push((ch, tag, source));
        }
        self.ready.set(true);
        tracing::info!(engine = %self.engine_id, prefetch, "consuming");
        let permits = Arc::new(Semaphore::new(usize::from(prefetch)));
        let mut tasks = JoinSet::new();
        let (mut high, mut trusted, mut normal, mut low) = {
            let mut it = consumers.into_iter().map(|(c, _)| c);
            let (Some(a), Some(b), Some(c), Some(d)) = (it.next(), it.next(), it.next(), it.next())
            else {
                anyhow::bail!("consumers missing");
            };
            (a, b, c, d)
        };
        let result: anyhow::Result<()> = loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                p = permits.clone().acquire_owned() => p?,
            };
            // `biased`: when several lanes have messages, high wins, then trusted, normal, low.
            let (delivery, source) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                d = high.next() => (d, Source::Lane(Priority::High)),
                d = trusted.next() => (d, Source::Trusted),
                d = normal.next() => (d, Source::Lane(Priority::Normal)),
                d = low.next() => (d, Source::Lane(Priority::Low)),
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("consumer stream ended")),
            };
            let me = self.clone();
            tasks.spawn(async move {
                metrics::gauge!(provisio_shared::metrics::INFLIGHT).increment(1.0);
                let disposition = me
                    .handle(&delivery.data, &delivery.properties, source, delivery.redelivered)
                    .await;
                let r = match disposition {
                    Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
                    Disposition::Requeue => {
                        // Whatever made it undurable (the database, usually) will not be back
                        // in a millisecond: do not spin the message through the broker, whose
                        // delivery limit would dead-letter it.
                        tokio::time::sleep(REQUEUE_DELAY).await;
                        delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await
                    }
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot settle a delivery; the broker will redeliver it");
                }
                metrics::gauge!(provisio_shared::metrics::INFLIGHT).decrement(1.0);
                drop(permit);
            });
        };
        // Stop new deliveries first, then drain what we hold.
        for (ch, tag, _) in &channels {
            let _ = ch
                .basic_cancel(tag.clone().into(), BasicCancelOptions::default())
                .await;
        }
        if result.is_ok() {
            let grace = Duration::from_secs(self.cfg.engine.grace_seconds);
            tracing::info!(running = tasks.len(), ?grace, "draining");
            let drained =
                tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
                    .await;
            if drained.is_err() {
                tracing::warn!(
                    abandoned = tasks.len(),
                    "grace period over; leaving the rest to redelivery and recovery"
                );
                tasks.abort_all();
            }
            let _ = conn.close(200, "engine shutting down".into()).await;
        } else {
            // Running requests finish on their own; their acks may fail, and the redelivery is
            // then answered from the committed outcome.
            tasks.detach_all();
        }
        result
    }
}

/// The outcome message of a request just finished (the same fields as the stored record).
fn outcome_record(
    env: &Envelope,
    status: Status,
    output: Option<&Value>,
    error: Option<&Value>,
    attempts: i32,
) -> Value {
    json!({
        "id": env.id, "namespace": env.namespace, "procedure": env.procedure, "status": status,
        "output": output, "error": error, "attempts": attempts,
        "submitted_at": env.submitted_at, "finished_at": Utc::now(),
    })
}

/// Seconds from `from` to `to`, never negative (clocks of different hosts).
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
}

/// The request's duration counts from when it could run: submission, or its `not_before`
/// when it waited in the schedule (a request-level retry: its due time). The wait a producer
/// asked for goes to its own histogram, so that latency alerts do not fire on schedules.
fn record_durations(env: &Envelope, labels: &[(&'static str, String); 3]) {
    let Some(submitted) = env.submitted_at else {
        return;
    };
    let due = env.not_before.filter(|t| *t > submitted);
    if let Some(due) = due {
        metrics::histogram!(provisio_shared::metrics::SCHEDULED_WAIT,
            "namespace" => labels[0].1.clone(), "procedure" => labels[1].1.clone())
        .record(seconds_between(submitted, due));
    }
    metrics::histogram!(provisio_shared::metrics::REQUEST_DURATION, labels)
        .record(seconds_between(due.unwrap_or(submitted), Utc::now()));
}
