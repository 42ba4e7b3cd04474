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
mod request;

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
use provisio_shared::domain::{Envelope, Permission, PrincipalRef, Priority, RequestKind, Status};
use provisio_shared::namespaces::NamespaceCache;
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
    leases: Mutex<HashMap<Uuid, Held>>,
    /// Principals as the database has them now (`None`: gone or disabled), briefly cached.
    principals: Mutex<HashMap<envelope::Who, (Option<PrincipalRef>, Instant)>>,
    /// Recovers an earlier attempt of a redelivered request before running it again.
    pub recovery: Option<Arc<crate::recovery::Recovery>>,
    /// Opens sealed credentials for the provider call, seals them again for a retry.
    pub keyring: provisio_shared::sealing::Keyring,
}

/// A transaction whose lease this engine keeps.
struct Held {
    server: usize,
    /// Raised when the lease could not be renewed: the transaction is no longer ours.
    lost: Arc<AtomicBool>,
    /// Raised once the opening is durable; until then there is nothing to renew (an opening
    /// written with the first call's intent is not written yet when the run starts).
    opened: Arc<AtomicBool>,
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
        // The configured keyring replaces this default in `main` (configuration checked it).
        let cfg_signing_key = cfg.security.signing_key.clone();
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
            principals: Mutex::new(HashMap::new()),
            recovery: None,
            keyring: provisio_shared::sealing::Keyring::derived(cfg_signing_key.expose()),
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
            Err(envelope::Refused::Dead(reason, detail)) => {
                if matches!(reason, "forbidden" | "unauthenticated") {
                    self.deny(reason, None, &envelope, &detail);
                }
                return self.dead_letter(body, props, reason, &detail).await;
            }
            Err(envelope::Refused::Unavailable(e)) => {
                tracing::warn!(request_id = %envelope.id, error = %e, "cannot check the principal; requeueing");
                return Disposition::Requeue;
            }
        };
        let needed = match (source, envelope.kind) {
            (Source::Trusted, _) | (_, RequestKind::Trusted) => Permission::ExecuteTrusted,
            _ => Permission::Execute,
        };
        if !principal.has(needed.as_str()) {
            let why = format!("principal `{}` lacks `{needed}`", principal.name);
            self.deny("forbidden", Some(&principal), &envelope, &why);
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

    /// A delivery refused for who sent it: counted, and recorded as a security event (in the
    /// background: the refusal never waits for the insert, and never fails with it).
    pub(super) fn deny(
        &self,
        reason: &'static str,
        principal: Option<&PrincipalRef>,
        envelope: &Envelope,
        detail: &str,
    ) {
        metrics::counter!(provisio_shared::metrics::DENIALS, "reason" => reason).increment(1);
        let pool = self.pool.clone();
        let (id, name) = (principal.map(|p| p.id), principal.map(|p| p.name.clone()));
        let detail = serde_json::json!({
            "request_id": envelope.id, "engine": self.engine_id, "detail": detail,
        });
        tokio::spawn(async move {
            let written = async {
                let client = pool.get().await?;
                client
                    .execute(
                        "INSERT INTO security_events (principal_id, principal_name, source, reason, detail) \
                         VALUES ($1, $2, 'engine', $3, $4)",
                        &[&id, &name, &reason, &detail],
                    )
                    .await?;
                anyhow::Ok(())
            };
            if let Err(e) = written.await {
                tracing::warn!(error = %e, "cannot record a security event");
            }
        });
    }

    /// The enabled principal `name` with its permissions, or `None`.
    async fn principal_named(&self, name: &str) -> anyhow::Result<Option<PrincipalRef>> {
        let client = self.pool.get().await.context("database")?;
        Ok(provisio_shared::security::principal(&client, PrincipalBy::Name, name).await?)
    }
}
