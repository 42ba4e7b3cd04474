//! `POST /v1/requests` and `GET /v1/requests/{id}`.
//!
//! Durability contract (kept by [`crate::accept`]): the request row is inserted in a PostgreSQL
//! transaction that commits only after the broker confirmed the message, so a `2xx` means both
//! are durable, and any failure before that leaves neither (`503`, nothing accepted).

use provisio_shared::domain::Permission;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use provisio_shared::domain::Status;
use serde::Deserialize;
use serde_json::{Value, json};

mod submit;

pub(crate) use submit::{check_batch_body, check_body};
pub use submit::{submit, submit_batch, submit_trusted};

use super::{ApiError, Caller};
use crate::app::App;

fn strip_owner(mut rec: Value) -> Value {
    if let Some(m) = rec.as_object_mut() {
        m.remove("principal_id");
    }
    rec
}

/// The request's record if the caller may see it: its submitter and admins may; anyone else
/// is told it does not exist (so ids cannot be probed).
async fn visible_record(app: &App, caller: &Caller, id: &str) -> Result<Value, ApiError> {
    let not_found = || ApiError::NotFound(format!("request `{id}` does not exist"));
    let rec = record(app, id).await?.ok_or_else(not_found)?;
    let owner = rec["principal_id"]
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    if owner != Some(caller.0.id) && !caller.has(Permission::Admin) {
        return Err(not_found());
    }
    Ok(rec)
}

pub async fn get(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let rec = visible_record(&app, &caller, &id).await?;
    Ok(Json(strip_owner(rec)))
}

/// `DELETE /v1/requests/{id}`: cancels a request that has not been handed to an engine yet
/// (scheduled or parked); anything else is `409`.
pub async fn cancel(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let rec = visible_record(&app, &caller, &id).await?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let n = client
        .execute(
            "UPDATE requests SET status = 'cancelled', finished_at = now() \
             WHERE id = $1 AND status IN ('scheduled', 'parked')",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?;
    if n == 0 {
        return Err(ApiError::Conflict(format!(
            "request `{id}` is {}; only scheduled or parked requests can be cancelled",
            rec["status"].as_str().unwrap_or("?")
        )));
    }
    let rec = visible_record(&app, &caller, &id).await?;
    Ok(Json(strip_owner(rec)))
}

/// `POST /v1/requests/{id}:resume`: a parked request (its retries spent) runs again, as
/// `scheduled` for now from the envelope kept when it was parked, with the same id. A
/// resumed request that fails again parks again. The submitter or an admin may resume it.
pub async fn action(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(target): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // Request ids may contain `:`; the action is what follows the last one.
    let (id, verb) = target.rsplit_once(':').ok_or_else(|| {
        ApiError::NotFound("no such route: use POST /v1/requests/{id}:resume".into())
    })?;
    if verb != "resume" {
        return Err(ApiError::NotFound(format!("no action `{verb}`")));
    }
    let rec = visible_record(&app, &caller, id).await?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let n = client
        .execute(
            "UPDATE requests SET status = 'scheduled', not_before = now(), finished_at = NULL \
             WHERE id = $1 AND status = 'parked' AND envelope IS NOT NULL",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?;
    drop(client);
    if n == 0 {
        let status = rec["status"].as_str().unwrap_or("?");
        return Err(ApiError::Conflict(if status == "parked" {
            format!(
                "request `{id}` was parked without its envelope (by an older engine): it cannot be \
                 resumed; submit it again with a new id"
            )
        } else {
            format!("request `{id}` is {status}; only a parked request can be resumed")
        }));
    }
    tracing::info!(
        request_id = id,
        by = caller.0.name,
        "parked request resumed"
    );
    super::publish_now(&app, id).await;
    let rec = visible_record(&app, &caller, id).await?;
    Ok(Json(strip_owner(rec)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    /// The `next` of the previous page: the id of its last request.
    #[serde(default)]
    after: Option<String>,
}

/// `GET /v1/requests`: newest first, keyset-paginated; admins see every request, others their
/// own.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Malformed(format!("query: {}", e.body_text())))?;
    if let Some(st) = &q.status {
        st.parse::<Status>()
            .map_err(|e| ApiError::Malformed(e.to_string()))?;
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::Malformed(
            "limit must be between 1 and 500".into(),
        ));
    }
    let owner: Option<uuid::Uuid> = (!caller.has(Permission::Admin)).then_some(caller.0.id);
    let client = app.pool.get().await.map_err(ApiError::db)?;
    if let Some(after) = &q.after {
        let known = client
            .query_opt("SELECT 1 FROM requests WHERE id = $1", &[after])
            .await
            .map_err(ApiError::db)?;
        if known.is_none() {
            return Err(ApiError::Malformed(format!(
                "`after`: no request `{after}`"
            )));
        }
    }
    let rows = client
        .query(
            "SELECT id, namespace, procedure, status, attempts, submitted_at, finished_at FROM requests r \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR namespace = $2) \
               AND ($3::uuid IS NULL OR principal_id = $3) \
               AND ($4::text IS NULL OR (submitted_at, id) < \
                    (SELECT submitted_at, id FROM requests WHERE id = $4)) \
             ORDER BY submitted_at DESC, id DESC LIMIT $5",
            &[&q.status, &q.namespace, &owner, &q.after, &limit],
        )
        .await
        .map_err(ApiError::db)?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, String>(0), "namespace": r.get::<_, String>(1),
                "procedure": r.get::<_, String>(2), "status": r.get::<_, String>(3),
                "attempts": r.get::<_, i32>(4), "submitted_at": r.get::<_, DateTime<Utc>>(5),
                "finished_at": r.get::<_, Option<DateTime<Utc>>>(6),
            })
        })
        .collect();
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|v| v["id"].clone()))
        .flatten();
    Ok(Json(json!({"requests": items, "next": next})))
}

/// A request's record as the API shows it (plus `principal_id`, for the owner check).
async fn record(app: &App, id: &str) -> Result<Option<Value>, ApiError> {
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let row = client
        .query_opt(
            "SELECT id, namespace, procedure, status, output, error, attempts, submitted_at, \
             started_at, finished_at, steps, principal_id FROM requests WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?;
    let Some(row) = row else { return Ok(None) };
    let mut rec = json!({
        "id": row.get::<_, String>(0),
        "namespace": row.get::<_, String>(1),
        "procedure": row.get::<_, String>(2),
        "status": row.get::<_, String>(3),
        "attempts": row.get::<_, i32>(6),
        "submitted_at": row.get::<_, DateTime<Utc>>(7),
        "principal_id": row.get::<_, Option<uuid::Uuid>>(11),
    });
    let optional = [
        ("output", row.get::<_, Option<Value>>(4)),
        ("error", row.get::<_, Option<Value>>(5)),
        ("steps", row.get::<_, Option<Value>>(10)),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            rec[k] = v;
        }
    }
    if let Some(t) = row.get::<_, Option<DateTime<Utc>>>(8) {
        rec["started_at"] = json!(t);
    }
    if let Some(t) = row.get::<_, Option<DateTime<Utc>>>(9) {
        rec["finished_at"] = json!(t);
    }
    // A sensitive procedure's output and error messages are sealed: shown redacted.
    provisio_shared::sealing::redact(&mut rec);
    Ok(Some(rec))
}
