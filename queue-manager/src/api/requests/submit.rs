//! Submitting requests: one, trusted, or a batch; validated, then made durable by the
//! [`crate::accept::Acceptor`].

use provisio_shared::domain::Permission;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use provisio_shared::domain::{
    Envelope, Name, Priority, RequestId, RequestKind, RetryPolicy, Status,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{record, strip_owner};
use crate::api::body::JsonBody;
use crate::api::{ApiError, Caller};
use crate::app::App;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    namespace: String,
    procedure: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    not_before: Option<DateTime<Utc>>,
    #[serde(default)]
    credentials: Option<Value>,
    #[serde(default)]
    retry: Option<RetryPolicy>,
    // Trusted requests only (`POST /v1/requests/trusted`).
    /// Run as this principal (by name) instead of the caller.
    #[serde(default)]
    run_as: Option<String>,
    /// An inline, ad-hoc procedure named `procedure`, compiled in the namespace's context.
    #[serde(default)]
    steps: Option<Value>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    transaction: Option<provisio_shared::domain::TxModel>,
}

impl SubmitBody {
    fn has_trusted_fields(&self) -> bool {
        self.run_as.is_some()
            || self.steps.is_some()
            || self.output.is_some()
            || self.transaction.is_some()
    }
}

#[derive(Debug, Deserialize)]
pub struct SubmitQuery {
    /// Seconds to wait for the outcome: `200` with the record when it finished, else `202`.
    #[serde(default)]
    wait: Option<u64>,
}

pub async fn submit(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    submit_any(app, caller, query, body, false).await
}

/// `POST /v1/requests/trusted`: as a queued request, plus `run_as` and inline `steps`; needs
/// `execute_trusted`, and goes through the trusted queue.
pub async fn submit_trusted(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    submit_any(app, caller, query, body, true).await
}

async fn submit_any(
    app: Arc<App>,
    caller: Caller,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    body: SubmitBody,
    trusted: bool,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    rate_limit(&app, &caller, 1)?;
    let Query(query) =
        query.map_err(|e| ApiError::Malformed(format!("query: {}", e.body_text())))?;
    let wait = query
        .wait
        .map(|w| Duration::from_secs(w.min(app.cfg.queue_manager.max_wait_seconds)));
    let id = match &body.id {
        Some(id) => RequestId::parse(id.clone()).map_err(|e| ApiError::Malformed(e.to_string()))?,
        None => RequestId::generate(),
    };
    let registration = match wait {
        Some(wait) => Some(app.waiters.register_followed(id.as_str(), wait).await),
        None => None,
    };
    let status = accept_one(&app, &caller, body, id.clone(), trusted).await?;
    if let (Some(wait), Some(reg)) = (wait, registration)
        && let Some(rec) = wait_for(
            &app,
            id.as_str(),
            &status,
            tokio::time::Instant::now() + wait,
            reg,
        )
        .await?
    {
        return Ok((StatusCode::OK, Json(rec)));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": status})),
    ))
}

/// `POST /v1/requests:batch`: each element is accepted (or refused) on its own; the answer
/// lists one result per element, in order, with the status code it would have had alone.
/// With `?wait=SECONDS`, the elements accepted are waited for together, up to that long: each
/// that finished meanwhile is answered `200` with its record.
pub async fn submit_batch(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    JsonBody(items): JsonBody<Vec<Value>>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::Malformed(format!("query: {}", e.body_text())))?;
    if items.len() > MAX_BATCH_ITEMS {
        return Err(too_many(items.len()));
    }
    rate_limit(&app, &caller, items.len())?;
    let deadline = query.wait.map(|w| {
        tokio::time::Instant::now()
            + Duration::from_secs(w.min(app.cfg.queue_manager.max_wait_seconds))
    });
    let work = items.into_iter().map(|item| {
        let (app, caller) = (&app, &caller);
        async move {
            let outcome = async {
                let body: SubmitBody = serde_json::from_value(item)
                    .map_err(|e| ApiError::Malformed(format!("request: {e}")))?;
                let id = match &body.id {
                    Some(id) => RequestId::parse(id.clone())
                        .map_err(|e| ApiError::Malformed(e.to_string()))?,
                    None => RequestId::generate(),
                };
                let registration = match deadline {
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        Some(app.waiters.register_followed(id.as_str(), left).await)
                    }
                    None => None,
                };
                let status = accept_one(app, caller, body, id.clone(), false).await?;
                if let (Some(deadline), Some(reg)) = (deadline, registration)
                    && let Some(rec) = wait_for(app, id.as_str(), &status, deadline, reg).await?
                {
                    return Ok::<_, ApiError>(json!({
                        "status": 200, "id": id, "request_status": rec["status"], "record": rec,
                    }));
                }
                Ok::<_, ApiError>(json!({"status": 202, "id": id, "request_status": status}))
            }
            .await;
            outcome.unwrap_or_else(|e| {
                // The answer is 200; the refused element still counts as a refusal.
                crate::api::error::count_rejected(e.code());
                json!({"status": e.status().as_u16(), "error": {"code": e.code(), "message": e.to_string()}})
            })
        }
    });
    let results = futures_util::future::join_all(work).await;
    Ok(Json(json!({"results": results})))
}

const MAX_BATCH_ITEMS: usize = 1000;

fn too_many(n: usize) -> ApiError {
    ApiError::Malformed(format!(
        "a batch holds at most {MAX_BATCH_ITEMS} requests, this one {n}"
    ))
}

/// Waits until `deadline` for request `id`, accepted with `status`, to finish; its record
/// (without the owner) if it did.
async fn wait_for(
    app: &App,
    id: &str,
    status: &str,
    deadline: tokio::time::Instant,
    mut reg: crate::wait::Registration,
) -> Result<Option<Value>, ApiError> {
    let finished = status.parse::<Status>().is_ok_and(Status::is_final)
        || tokio::time::timeout_at(deadline, &mut reg.woken)
            .await
            .is_ok_and(|r| r.is_ok());
    if finished
        && let Some(rec) = record(app, id).await?
        && rec["status"]
            .as_str()
            .and_then(|s| s.parse::<Status>().ok())
            .is_some_and(Status::is_final)
    {
        return Ok(Some(strip_owner(rec)));
    }
    Ok(None)
}

/// Takes `n` submissions from the caller's allowance (all or nothing), when limits are on.
fn rate_limit(app: &App, caller: &Caller, n: usize) -> Result<(), ApiError> {
    match &app.rate_limits {
        Some(limits) => limits.check(caller.0.id, n),
        None => Ok(()),
    }
}

/// Validates one request and makes it durable; returns its status.
async fn accept_one(
    app: &App,
    caller: &Caller,
    body: SubmitBody,
    id: RequestId,
    trusted: bool,
) -> Result<String, ApiError> {
    check_permissions(caller, &body, trusted)?;
    let (priority, not_before) = check_options(&body)?;
    let namespace = Name::parse(body.namespace.clone())
        .map_err(|e| ApiError::NotFound(format!("namespace: {e}")))?;
    let procedure_name = Name::parse(body.procedure.clone())
        .map_err(|e| ApiError::NotFound(format!("procedure: {e}")))?;
    // The version from the cache (kept warm by notifications); the insert below reads the
    // current one inside the transaction and, if a newer one was applied meanwhile, the
    // request is validated again against that one.
    let ns = app
        .namespaces
        .current(namespace.as_str())
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::NotFound(format!("namespace `{namespace}` does not exist")))?;
    if let Some(run_as) = &body.run_as {
        principal_named(app, run_as).await?;
    }
    let mut sensitive = Vec::new();
    let inline = if let Some(steps) = &body.steps {
        let inline = json!({
            "transaction": body.transaction.unwrap_or_default(),
            "steps": steps,
            "output": body.output,
        });
        compile_inline(app, &ns, procedure_name.as_str(), &inline).await?;
        Some(inline)
    } else {
        sensitive = crate::accept::check_procedure(
            &ns,
            &caller.0,
            &procedure_name,
            &body.input,
            app.cfg.validation.enable_schema_validation,
        )?;
        None
    };

    // A body with secrets in it (credentials, sensitive values) is fingerprinted with a key: a
    // plain hash of a short password could be reversed by trying them all.
    let secret_key = (!sensitive.is_empty() || body.credentials.is_some())
        .then(|| app.cfg.security.signing_key.expose().as_bytes());
    let body_hash = hash_of(
        secret_key,
        &json!({
            "namespace": body.namespace, "procedure": body.procedure, "input": body.input,
            "priority": priority.as_str(), "credentials": body.credentials, "not_before": not_before,
            "trusted": trusted, "run_as": body.run_as, "inline": inline, "retry": body.retry,
        }),
    );
    let envelope = Envelope {
        id: id.clone(),
        namespace: namespace.clone(),
        procedure: procedure_name.clone(),
        // Sensitive input properties are sealed here, like credentials; the engine opens them
        // for the run.
        input: app.keyring.seal_paths(&body.input, &sensitive, id.as_str()),
        priority,
        kind: if trusted {
            RequestKind::Trusted
        } else {
            RequestKind::Queued
        },
        namespace_version: Some(ns.version),
        principal: Some(caller.0.clone()),
        run_as: body.run_as.clone(),
        steps: inline,
        // Sealed here, before the envelope reaches PostgreSQL or RabbitMQ; opened by the
        // engine for the provider call only.
        credentials: body
            .credentials
            .as_ref()
            .map(|c| app.keyring.seal(c, id.as_str())),
        retry: body.retry.clone(),
        submitted_at: Some(Utc::now()),
        // The scheduler sets it when it publishes the request.
        not_before: None,
    };

    app.acceptor
        .accept(crate::accept::Submission {
            body_hash,
            checked_version: ns.version,
            envelope,
            clear_input: body.input,
            not_before,
            trusted,
        })
        .await
}

/// What the submission routes answer for a body before anything is looked up, for a caller
/// with every permission: the same extractor and the same checks, in the same order, as
/// [`submit`] and [`submit_trusted`]. The property tests' way in (`api::checks`).
pub(crate) fn check_body(bytes: &[u8], trusted: bool) -> Result<(), ApiError> {
    check_parsed(crate::api::body::parse_json(bytes)?, trusted)
}

/// As [`check_body`] for `POST /v1/requests:batch`: the whole body refused, or one answer
/// per element.
pub(crate) fn check_batch_body(bytes: &[u8]) -> Result<Vec<Result<(), ApiError>>, ApiError> {
    let items: Vec<Value> = crate::api::body::parse_json(bytes)?;
    if items.len() > MAX_BATCH_ITEMS {
        return Err(too_many(items.len()));
    }
    Ok(items
        .into_iter()
        .map(|item| {
            let body = serde_json::from_value(item)
                .map_err(|e| ApiError::Malformed(format!("request: {e}")))?;
            check_parsed(body, false)
        })
        .collect())
}

fn check_parsed(body: SubmitBody, trusted: bool) -> Result<(), ApiError> {
    let everyone = Caller(provisio_shared::domain::PrincipalRef {
        id: uuid::Uuid::nil(),
        name: "property-test".into(),
        permissions: vec![Permission::Admin.as_str().into()],
    });
    if let Some(id) = &body.id {
        RequestId::parse(id.clone()).map_err(|e| ApiError::Malformed(e.to_string()))?;
    }
    check_permissions(&everyone, &body, trusted)?;
    check_options(&body)?;
    Name::parse(body.namespace).map_err(|e| ApiError::NotFound(format!("namespace: {e}")))?;
    Name::parse(body.procedure).map_err(|e| ApiError::NotFound(format!("procedure: {e}")))?;
    Ok(())
}

/// The permissions the request needs, and trusted-only fields kept off the queued route.
fn check_permissions(caller: &Caller, body: &SubmitBody, trusted: bool) -> Result<(), ApiError> {
    if trusted {
        caller.require(Permission::ExecuteTrusted)?;
    } else {
        caller.require(Permission::Execute)?;
        if body.has_trusted_fields() {
            return Err(ApiError::Malformed(
                "`run_as`, `steps`, `output` and `transaction` belong to POST /v1/requests/trusted"
                    .into(),
            ));
        }
        if body.credentials.is_some() {
            caller.require(Permission::ExecuteWithCredentials)?;
        }
    }
    Ok(())
}

/// Priority, retry policy and schedule: the priority and the `not_before` still ahead.
fn check_options(body: &SubmitBody) -> Result<(Priority, Option<DateTime<Utc>>), ApiError> {
    let priority = match body.priority.as_deref() {
        None => Priority::Normal,
        Some(p) => p
            .parse::<Priority>()
            .map_err(|e| ApiError::Malformed(format!("{e}: use high, normal or low")))?,
    };
    if let Some(r) = &body.retry
        && r.count > 100
    {
        return Err(ApiError::Invalid {
            message: "`retry`: count at most 100".into(),
            details: json!([{"path": "/retry"}]),
        });
    }
    // Scheduled and retried requests may carry credentials: they are sealed before they are
    // stored or published (`shared::sealing`).
    let not_before = body.not_before.filter(|t| *t > Utc::now());
    Ok((priority, not_before))
}

/// The principal a trusted request runs as; it must exist and be enabled.
async fn principal_named(app: &App, name: &str) -> Result<(), ApiError> {
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let found = client
        .query_opt(
            "SELECT 1 FROM principals WHERE name = $1 AND NOT disabled",
            &[&name],
        )
        .await
        .map_err(ApiError::db)?;
    if found.is_none() {
        return Err(ApiError::Invalid {
            message: format!("`run_as`: no enabled principal `{name}`"),
            details: json!([{"path": "/run_as"}]),
        });
    }
    Ok(())
}

/// Compiles an inline procedure in its namespace's context, reporting every problem.
async fn compile_inline(
    app: &App,
    ns: &provisio_shared::procedure::Namespace,
    name: &str,
    inline: &Value,
) -> Result<(), ApiError> {
    let doc = app
        .namespaces
        .document(ns.name.as_str(), ns.version)
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::NotFound(format!("namespace `{}` does not exist", ns.name)))?;
    provisio_shared::procedure::with_inline(&doc, name, inline, app.namespaces.catalog())
        .map(|_| ())
        .map_err(|problems| ApiError::Invalid {
            message: format!(
                "the inline procedure is invalid ({} problems)",
                problems.len()
            ),
            details: serde_json::to_value(problems).unwrap_or(Value::Null),
        })
}

/// SHA-256 of the value with object keys sorted, so that key order does not make two equal
/// requests look different.
fn hash_of(key: Option<&[u8]>, v: &Value) -> String {
    fn canonical(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    canonical(v, &mut s);
    match key {
        Some(key) => format!("hmac:{}", provisio_shared::signing::sign(key, s.as_bytes())),
        None => hex::encode(Sha256::digest(s.as_bytes())),
    }
}

#[cfg(test)]
#[path = "submit_tests.rs"]
mod tests;
