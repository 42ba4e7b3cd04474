//! Dead letters (admin): the auditors record every dead-lettered message in `dead_letters`
//! (credentials never in clear); here operators list them, requeue them after fixing the
//! cause, or discard them.
//!
//! Requeueing keeps the request's identity: the request (status `dead`) becomes `scheduled`
//! for now with the letter's envelope, in one transaction with the letter's `requeued` mark,
//! and is published like any due request — signed again by this queue manager, to its lane,
//! with the same id. A `2xx` therefore means the requeue is durable; the publish itself is
//! tried at once and otherwise left to the scheduler. Only a letter that is its request's
//! message, signed by a queue manager, without credentials, can be requeued: the others
//! (stray or forged letters, a direct AMQP producer's message, a request with credentials,
//! which are never stored) can only be deleted, and their producer must submit again.

use provisio_shared::domain::Permission;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use provisio_shared::domain::Envelope;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Row;

use super::{ApiError, Caller};
use crate::app::App;

/// Letters requeued by one bulk call at most; the answer says when more are left.
const BULK_MAX: i64 = 1000;

const COLUMNS: &str = "d.id, d.request_id, d.message_id, d.reason, d.error, d.namespace, \
     d.procedure, d.lane, d.trusted, d.source, d.signed, d.envelope, d.credentials_redacted, \
     d.body_bytes, d.settled, d.status, d.dead_at, d.requeued_at, d.requeued_by, r.status";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    /// `dead` (default: waiting for an operator), `requeued`, or `all`.
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    /// The `next` of the previous page: the id of its last letter.
    #[serde(default)]
    after: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

fn item(r: &Row) -> Value {
    let mut v = json!({
        "id": r.get::<_, i64>(0),
        "request_id": r.get::<_, Option<String>>(1),
        "message_id": r.get::<_, Option<String>>(2),
        "reason": r.get::<_, String>(3),
        "error": r.get::<_, String>(4),
        "namespace": r.get::<_, Option<String>>(5),
        "procedure": r.get::<_, Option<String>>(6),
        "lane": r.get::<_, Option<String>>(7),
        "trusted": r.get::<_, bool>(8),
        "source": r.get::<_, Option<String>>(9),
        "signed": r.get::<_, bool>(10),
        "envelope": r.get::<_, Option<Value>>(11),
        "credentials_redacted": r.get::<_, bool>(12),
        "body_bytes": r.get::<_, i32>(13),
        "settled": r.get::<_, String>(14),
        "status": r.get::<_, String>(15),
        "dead_at": r.get::<_, DateTime<Utc>>(16),
        "request_status": r.get::<_, Option<String>>(19),
    });
    if let Some(at) = r.get::<_, Option<DateTime<Utc>>>(17) {
        v["requeued_at"] = json!(at);
        v["requeued_by"] = json!(r.get::<_, Option<String>>(18));
    }
    // Shown, never stored: the operator sees that the message had credentials.
    if r.get::<_, bool>(12)
        && let Some(env) = v["envelope"].as_object_mut()
    {
        env.insert("credentials".into(), json!("[redacted]"));
    }
    // Sealed values (sensitive input properties) are shown redacted too; they stay sealed in
    // the stored envelope, so a requeued letter still carries them.
    provisio_shared::sealing::redact(&mut v);
    v
}

/// `GET /v1/dead-letters`: oldest first, keyset-paginated by id.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let Query(q) = query.map_err(|e| ApiError::Malformed(format!("query: {}", e.body_text())))?;
    let status = match q.status.as_deref() {
        None | Some("dead") => Some("dead"),
        Some("requeued") => Some("requeued"),
        Some("all") => None,
        Some(other) => {
            return Err(ApiError::Malformed(format!(
                "`status`: `{other}` is not one of dead, requeued, all"
            )));
        }
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Malformed(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM dead_letters d LEFT JOIN requests r ON r.id = d.request_id \
                 WHERE ($1::text IS NULL OR d.status = $1) AND ($2::text IS NULL OR d.reason = $2) \
                   AND ($3::text IS NULL OR d.namespace = $3) \
                   AND ($4::text IS NULL OR d.request_id = $4) \
                   AND ($5::bigint IS NULL OR d.id > $5) \
                 ORDER BY d.id LIMIT $6"
            ),
            &[
                &status,
                &q.reason,
                &q.namespace,
                &q.request_id,
                &q.after,
                &limit,
            ],
        )
        .await
        .map_err(ApiError::db)?;
    let items: Vec<Value> = rows.iter().map(item).collect();
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|v| v["id"].clone()))
        .flatten();
    Ok(Json(json!({"dead_letters": items, "next": next})))
}

/// `POST /v1/dead-letters/{id}:requeue`.
pub async fn action(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(target): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let (id, verb) = target
        .rsplit_once(':')
        .ok_or_else(|| ApiError::NotFound("no such route: use {id}:requeue".into()))?;
    if verb != "requeue" {
        return Err(ApiError::NotFound(format!("no action `{verb}`")));
    }
    let id = parse_id(id)?;
    let request_id = requeue_one(&app, id, &caller.0.name).await?;
    let request_status = super::publish_now(&app, &request_id).await;
    let letter = letter(&app, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    Ok(Json(json!({
        "dead_letter": letter,
        "request": {"id": request_id, "status": request_status},
    })))
}

/// `POST /v1/dead-letters:requeue`: every letter waiting (`dead`), or those with this
/// `reason` and/or `namespace`; each on its own, those that cannot be requeued listed with why.
pub async fn requeue_many(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let filter: Filter = if body.iter().all(u8::is_ascii_whitespace) {
        Filter::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Malformed(format!("request body: {e}")))?
    };
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            "SELECT id FROM dead_letters WHERE status = 'dead' \
               AND ($1::text IS NULL OR reason = $1) AND ($2::text IS NULL OR namespace = $2) \
             ORDER BY id LIMIT $3",
            &[&filter.reason, &filter.namespace, &(BULK_MAX + 1)],
        )
        .await
        .map_err(ApiError::db)?;
    drop(client);
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let more = ids.len() as i64 > BULK_MAX;
    let mut requeued = Vec::new();
    let mut skipped = Vec::new();
    for id in ids
        .into_iter()
        .take(usize::try_from(BULK_MAX).unwrap_or(usize::MAX))
    {
        match requeue_one(&app, id, &caller.0.name).await {
            Ok(request_id) => requeued.push((id, request_id)),
            Err(e @ (ApiError::Conflict(_) | ApiError::NotFound(_))) => {
                skipped.push(json!({"id": id, "reason": e.to_string()}));
            }
            Err(e) => return Err(e),
        }
    }
    let request_ids: Vec<String> = requeued.iter().map(|(_, r)| r.clone()).collect();
    let statuses = super::publish_all_now(&app, &request_ids).await;
    let requeued: Vec<Value> = requeued
        .into_iter()
        .map(|(id, request_id)| {
            let status = statuses
                .iter()
                .find(|(r, _)| *r == request_id)
                .map_or("scheduled", |(_, s)| *s);
            json!({"id": id, "request_id": request_id, "request_status": status})
        })
        .collect();
    Ok(Json(
        json!({"requeued": requeued, "skipped": skipped, "more": more}),
    ))
}

/// `DELETE /v1/dead-letters/{id}`: the record goes (the broker archive keeps its copy until
/// its length limit pushes it out); the request, if any, stays as it is.
pub async fn delete(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let id = parse_id(&id)?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let n = client
        .execute("DELETE FROM dead_letters WHERE id = $1", &[&id])
        .await
        .map_err(ApiError::db)?;
    if n == 0 {
        return Err(ApiError::NotFound(format!("no dead letter {id}")));
    }
    Ok(Json(json!({"id": id, "deleted": true})))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse::<i64>()
        .map_err(|_| ApiError::NotFound(format!("no dead letter `{id}`")))
}

async fn letter(app: &App, id: i64) -> Result<Option<Value>, ApiError> {
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM dead_letters d LEFT JOIN requests r ON r.id = d.request_id \
                 WHERE d.id = $1"
            ),
            &[&id],
        )
        .await
        .map_err(ApiError::db)?;
    Ok(row.as_ref().map(item))
}

/// Makes letter `id`'s request `scheduled` for now with the letter's envelope, and marks the
/// letter requeued, in one transaction; returns the request id. `Conflict` says why a letter
/// cannot be requeued.
async fn requeue_one(app: &App, id: i64, by: &str) -> Result<String, ApiError> {
    let mut client = app.pool.get().await.map_err(ApiError::db)?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    let row = tx
        .query_opt(
            "SELECT request_id, status, signed, credentials_redacted, envelope \
             FROM dead_letters WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    let (request_id, status, signed, redacted, envelope): (
        Option<String>,
        String,
        bool,
        bool,
        Option<Value>,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if status == "requeued" {
        return Err(ApiError::Conflict(format!(
            "dead letter {id} was requeued already"
        )));
    }
    let Some(request_id) = request_id else {
        return Err(ApiError::Conflict(format!(
            "dead letter {id} is no known request's message (no request id, an unknown one, or \
             not the body of the request it names): it can only be deleted"
        )));
    };
    if redacted {
        return Err(ApiError::Conflict(format!(
            "dead letter {id} carried credentials, which are never stored: it cannot be requeued \
             with them; its producer must submit the request again (with a new id)"
        )));
    }
    if !signed {
        return Err(ApiError::Conflict(format!(
            "dead letter {id} is not signed by a queue manager (a direct AMQP producer's message, \
             or forged): only its producer can publish it again"
        )));
    }
    let envelope = envelope
        .and_then(|e| {
            serde_json::from_value::<Envelope>(e.clone())
                .ok()
                .map(|_| e)
        })
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "dead letter {id}'s body is not an envelope: it can only be deleted"
            ))
        })?;
    let request_status: String = tx
        .query_opt(
            "SELECT status FROM requests WHERE id = $1 FOR UPDATE",
            &[&request_id],
        )
        .await
        .map_err(ApiError::db)?
        .map(|r| r.get(0))
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "request `{request_id}` of dead letter {id} no longer exists"
            ))
        })?;
    if request_status != "dead" {
        return Err(ApiError::Conflict(format!(
            "request `{request_id}` is {request_status}: only a dead request is requeued"
        )));
    }
    tx.execute(
        "UPDATE requests SET status = 'scheduled', not_before = now(), envelope = $2, \
         error = NULL, finished_at = NULL WHERE id = $1",
        &[&request_id, &envelope],
    )
    .await
    .map_err(ApiError::db)?;
    tx.execute(
        "UPDATE dead_letters SET status = 'requeued', requeued_at = now(), requeued_by = $2 \
         WHERE id = $1",
        &[&id, &by],
    )
    .await
    .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    tracing::info!(dead_letter = id, request_id, by, "dead letter requeued");
    Ok(request_id)
}
