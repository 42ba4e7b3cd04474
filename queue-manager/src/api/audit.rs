//! Audit queries (admin): what the auditor swept into the audit tables, per the audit level.
//! Newest first, keyset-paginated (`after` = the `next` of the previous page), filtered by
//! time range (`from` ≤ started_at < `to`), namespace, procedure, outcome and request id.

use provisio_shared::domain::Permission;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{ApiError, Caller};
use crate::app::App;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    from: Option<DateTime<Utc>>,
    #[serde(default)]
    to: Option<DateTime<Utc>>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    procedure: Option<String>,
    /// The transaction's final status: committed, rolled_back, failed, in_doubt.
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    after: Option<Uuid>,
}

const OUTCOMES: [&str; 4] = ["committed", "rolled_back", "failed", "in_doubt"];

fn row_json(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "request_id": r.get::<_, String>(1),
        "namespace": r.get::<_, String>(2),
        "procedure": r.get::<_, String>(3),
        "outcome": r.get::<_, String>(4),
        "started_at": r.get::<_, DateTime<Utc>>(5),
        "finished_at": r.get::<_, Option<DateTime<Utc>>>(6),
        "swept_at": r.get::<_, DateTime<Utc>>(7),
        // A sensitive procedure's output and audit data are sealed: shown redacted.
        "data": r.get::<_, Option<Value>>(8).map(|d| provisio_shared::sealing::redacted(&d)),
    })
}

/// An error's description as shown: a sealed one (a sensitive procedure's message, kept as
/// its JSON text) is redacted.
fn description(text: String) -> String {
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if provisio_shared::sealing::is_sealed(&v) => {
            provisio_shared::sealing::REDACTED.to_owned()
        }
        _ => text,
    }
}

const COLUMNS: &str =
    "tx_id, request_id, namespace, procedure, status, started_at, finished_at, swept_at, data";

/// `GET /v1/audit/transactions`.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let Query(q) = query.map_err(|e| ApiError::Malformed(e.body_text()))?;
    if let Some(o) = &q.outcome
        && !OUTCOMES.contains(&o.as_str())
    {
        return Err(ApiError::Malformed(format!(
            "`outcome` must be one of {OUTCOMES:?}, not `{o}`"
        )));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // Every filter is a parameter that is either NULL (no filter) or the value.
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_transactions a \
         WHERE ($1::timestamptz IS NULL OR started_at >= $1) \
           AND ($2::timestamptz IS NULL OR started_at < $2) \
           AND ($3::text IS NULL OR namespace = $3) \
           AND ($4::text IS NULL OR procedure = $4) \
           AND ($5::text IS NULL OR status = $5) \
           AND ($6::text IS NULL OR request_id = $6) \
           AND ($7::uuid IS NULL OR (started_at, tx_id) < \
                (SELECT started_at, tx_id FROM audit_transactions WHERE tx_id = $7)) \
         ORDER BY started_at DESC, tx_id DESC LIMIT $8"
    );
    let params: [&(dyn ToSql + Sync); 8] = [
        &q.from,
        &q.to,
        &q.namespace,
        &q.procedure,
        &q.outcome,
        &q.request_id,
        &q.after,
        &limit,
    ];
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client.query(&sql, &params).await.map_err(ApiError::db)?;
    let list: Vec<Value> = rows.iter().map(row_json).collect();
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.get::<_, Uuid>(0)))
        .flatten();
    Ok(Json(json!({"transactions": list, "next": next})))
}

/// `GET /v1/audit/transactions/{id}`: the transaction with its procedure and error rows.
pub async fn get(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::Malformed(format!("`{id}` is not a transaction id")))?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM audit_transactions WHERE tx_id = $1"),
            &[&id],
        )
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::NotFound(format!("no audited transaction {id}")))?;
    let procedures: Vec<Value> = client
        .query(
            "SELECT step_number, namespace, procedure FROM audit_procedures WHERE tx_id = $1 ORDER BY step_number",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?
        .iter()
        .map(|r| {
            json!({"step": r.get::<_, i32>(0), "namespace": r.get::<_, String>(1), "procedure": r.get::<_, String>(2)})
        })
        .collect();
    let errors: Vec<Value> = client
        .query(
            "SELECT seq, source, code, description FROM audit_errors WHERE tx_id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?
        .iter()
        .map(|r| {
            json!({"seq": r.get::<_, i32>(0), "source": r.get::<_, String>(1), "code": r.get::<_, String>(2), "description": description(r.get::<_, String>(3))})
        })
        .collect();
    let mut t = row_json(&row);
    t["procedures"] = Value::Array(procedures);
    t["errors"] = Value::Array(errors);
    Ok(Json(t))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    from: Option<DateTime<Utc>>,
    #[serde(default)]
    to: Option<DateTime<Utc>>,
    #[serde(default)]
    reason: Option<String>,
    /// The principal's name.
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    #[serde(default)]
    after: Option<i64>,
}

/// `GET /v1/audit/security-events`: refused calls, newest first, paged like the transactions
/// (`after` = the previous page's `next`).
pub async fn security_events(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let Query(q) = query.map_err(|e| ApiError::Malformed(e.body_text()))?;
    let reasons = provisio_shared::metrics::DENIAL_REASONS;
    if let Some(r) = &q.reason
        && !reasons.contains(&r.as_str())
    {
        return Err(ApiError::Malformed(format!(
            "`reason` must be one of {reasons:?}, not `{r}`"
        )));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let params: [&(dyn ToSql + Sync); 6] =
        [&q.from, &q.to, &q.reason, &q.principal, &q.after, &limit];
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            "SELECT id, at, principal_id, principal_name, source, reason, detail \
             FROM security_events \
             WHERE ($1::timestamptz IS NULL OR at >= $1) \
               AND ($2::timestamptz IS NULL OR at < $2) \
               AND ($3::text IS NULL OR reason = $3) \
               AND ($4::text IS NULL OR principal_name = $4) \
               AND ($5::bigint IS NULL OR (at, id) < \
                    (SELECT at, id FROM security_events WHERE id = $5)) \
             ORDER BY at DESC, id DESC LIMIT $6",
            &params,
        )
        .await
        .map_err(ApiError::db)?;
    let events: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, i64>(0),
                "at": r.get::<_, DateTime<Utc>>(1),
                "principal_id": r.get::<_, Option<Uuid>>(2),
                "principal": r.get::<_, Option<String>>(3),
                "source": r.get::<_, String>(4),
                "reason": r.get::<_, String>(5),
                "detail": r.get::<_, Value>(6),
            })
        })
        .collect();
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.get::<_, i64>(0)))
        .flatten();
    Ok(Json(json!({"events": events, "next": next})))
}
