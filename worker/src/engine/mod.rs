//! The engine role: consume the request lanes, run each request's procedure as one
//! transaction, commit the outcome, publish it, then ack.
//!
//! [`Engine::handle`] processes one delivery and says what to do with it; [`Engine::run`] is
//! the loop around it (consumers, concurrency, reconnects, draining). Tests step `handle`.

mod attempt;
mod consume;
mod envelope;
pub mod interpreter;
mod outcome;

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
use crate::txlog::Begin;
use attempt::{Opened, Written};
use interpreter::Run;
use outcome::{outcome_record, record_durations};
use provisio_providers::Registry;

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
}
