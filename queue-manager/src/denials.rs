//! Refused calls, counted (`provisio_denials_total`) and kept in `security_events`. The row is
//! written by a task of its own, so that a denial's answer never waits for it nor fails with
//! it: the queue of events is bounded, and an event that finds it full (a flood of bad keys)
//! is counted but not stored.

use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::error::{ErrorCode, ErrorMessage};
use crate::app::App;

/// Events waiting for their insert; past this, events are dropped (and logged).
const QUEUE: usize = 1024;

/// One refused call.
#[derive(Debug, Clone)]
pub struct Event {
    pub principal: Option<(uuid::Uuid, String)>,
    /// `METHOD /route` (the route's pattern, not the path: no ids in it).
    pub source: String,
    /// One of [`provisio_shared::metrics::DENIAL_REASONS`].
    pub reason: &'static str,
    pub detail: Value,
}

/// The sink of denials: counts at once, stores in the background.
#[derive(Clone)]
pub struct SecurityEvents {
    tx: mpsc::Sender<Event>,
}

impl SecurityEvents {
    /// Starts the writer; it ends when the last `SecurityEvents` is dropped.
    pub fn start(pool: Pool) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let Err(err) = insert(&pool, &e).await {
                    tracing::warn!(error = %err, reason = e.reason, source = %e.source, "cannot record a security event");
                }
            }
        });
        Self { tx }
    }

    pub fn record(&self, event: Event) {
        metrics::counter!(provisio_shared::metrics::DENIALS, "reason" => event.reason).increment(1);
        tracing::info!(reason = event.reason, source = %event.source, principal = ?event.principal.as_ref().map(|p| &p.1), "call refused");
        if let Err(e) = self.tx.try_send(event) {
            tracing::warn!(error = %e, "security event not stored: the writer is behind");
        }
    }
}

async fn insert(pool: &Pool, e: &Event) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let (id, name) = e.principal.clone().unzip();
    client
        .execute(
            "INSERT INTO security_events (principal_id, principal_name, source, reason, detail) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&id, &name, &e.source, &e.reason, &e.detail],
        )
        .await?;
    Ok(())
}

/// What the key check learnt about the caller, for the denial that may follow: the middleware
/// puts an empty one in the request, the `Caller` extractor fills it.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<SeenInner>>);

#[derive(Default)]
struct SeenInner {
    principal: Option<(uuid::Uuid, String)>,
    expired: bool,
}

impl Seen {
    pub fn principal(&self, id: uuid::Uuid, name: &str, expired: bool) {
        if let Ok(mut s) = self.0.lock() {
            s.principal = Some((id, name.to_owned()));
            s.expired = expired;
        }
    }

    fn take(&self) -> (Option<(uuid::Uuid, String)>, bool) {
        self.0
            .lock()
            .map(|mut s| (s.principal.take(), s.expired))
            .unwrap_or_default()
    }
}

/// Middleware of every route: a `401`, `403` or `429` answer is a denial.
pub async fn audit(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let seen = Seen::default();
    req.extensions_mut().insert(seen.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let source = format!("{} {route}", req.method());
    let resp = next.run(req).await;
    let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>().copied() else {
        return resp;
    };
    let (principal, expired) = seen.take();
    let reason = match code {
        "unauthorized" if expired => "expired_key",
        "unauthorized" => "unauthenticated",
        "forbidden" => "forbidden",
        "rate_limited" => "rate_limited",
        _ => return resp,
    };
    let message = resp
        .extensions()
        .get::<ErrorMessage>()
        .map(|m| m.0.clone())
        .unwrap_or_default();
    app.security.record(Event {
        principal,
        source,
        reason,
        detail: json!({"status": resp.status().as_u16(), "message": message}),
    });
    resp
}
