//! In-doubt transactions (admin): list them with what could not be undone, and ask for an
//! operator action — retry the rollback (after fixing the provider) or resolve by hand with a
//! note. Actions are recorded in `operator_commands` and carried out by the leading auditor,
//! which has the providers and every log server; `?wait=SECONDS` waits for the result.

use provisio_shared::domain::Permission;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, Caller};
use crate::app::App;

/// The longest `?wait` honoured on an action.
const MAX_WAIT: Duration = Duration::from_mins(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionQuery {
    #[serde(default)]
    wait: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
    note: Option<String>,
}

/// `GET /v1/transactions?status=in_doubt`: newest first, with `not_undone`.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let Query(q) = query.map_err(|e| ApiError::Malformed(e.body_text()))?;
    if q.status.as_deref().is_some_and(|s| s != "in_doubt") {
        return Err(ApiError::Malformed(
            "only `status=in_doubt` is listed: finished transactions are in the audit tables"
                .into(),
        ));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            "SELECT current_tx, id, namespace, procedure, tx_server, error, finished_at FROM requests \
             WHERE status = 'in_doubt' AND current_tx IS NOT NULL \
             ORDER BY finished_at DESC NULLS LAST, id LIMIT $1",
            &[&limit],
        )
        .await
        .map_err(ApiError::db)?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            // A sensitive procedure's error messages are sealed: shown redacted.
            let error: Option<Value> = r
                .get::<_, Option<Value>>(5)
                .map(|e| provisio_shared::sealing::redacted(&e));
            let not_undone = error
                .as_ref()
                .and_then(|e| e.get("not_undone"))
                .cloned()
                .unwrap_or_else(|| json!([]));
            json!({
                "id": r.get::<_, Uuid>(0),
                "request_id": r.get::<_, String>(1),
                "namespace": r.get::<_, String>(2),
                "procedure": r.get::<_, String>(3),
                "status": "in_doubt",
                "server": r.get::<_, Option<String>>(4),
                "error": error,
                "not_undone": not_undone,
                "finished_at": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(6),
            })
        })
        .collect();
    Ok(Json(json!({"transactions": list})))
}

/// `POST /v1/transactions/{id}:retry-rollback` and `POST /v1/transactions/{id}:resolve`.
pub async fn action(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(target): Path<String>,
    query: Result<Query<ActionQuery>, QueryRejection>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::Admin)?;
    let Query(q) = query.map_err(|e| ApiError::Malformed(e.body_text()))?;
    let (id, verb) = target.split_once(':').ok_or_else(|| {
        ApiError::NotFound("no such route: use {id}:retry-rollback or {id}:resolve".into())
    })?;
    let kind = match verb {
        "retry-rollback" => "retry_rollback",
        "resolve" => "resolve",
        other => return Err(ApiError::NotFound(format!("no action `{other}`"))),
    };
    let tx_id = Uuid::parse_str(id)
        .map_err(|_| ApiError::Malformed(format!("`{id}` is not a transaction id")))?;
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Malformed(format!("request body: {e}")))?
    };
    let note = body.note.filter(|n| !n.trim().is_empty());
    if kind == "resolve" && note.is_none() {
        return Err(ApiError::Malformed(
            "resolving by hand needs a `note` saying what was done".into(),
        ));
    }
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let row = client
        .query_opt(
            "SELECT id, status FROM requests WHERE current_tx = $1",
            &[&tx_id],
        )
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::NotFound(format!("no transaction {tx_id}")))?;
    let (request_id, status): (String, String) = (row.get(0), row.get(1));
    if status != "in_doubt" {
        return Err(ApiError::Conflict(format!(
            "transaction {tx_id} is not in doubt (its request is `{status}`)"
        )));
    }
    let command = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO operator_commands (id, kind, request_id, tx_id, requested_by, note) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &command as &(dyn tokio_postgres::types::ToSql + Sync),
                &kind,
                &request_id,
                &tx_id,
                &caller.0.name,
                &note,
            ],
        )
        .await
        .map_err(ApiError::db)?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let r = client
            .query_one(
                "SELECT status, result FROM operator_commands WHERE id = $1",
                &[&command],
            )
            .await
            .map_err(ApiError::db)?;
        let status: String = r.get(0);
        let answer = json!({
            "command": command, "kind": kind, "transaction": tx_id, "request_id": request_id,
            "status": status, "result": r.get::<_, Option<Value>>(1),
        });
        if status != "pending" {
            return Ok((StatusCode::OK, Json(answer)));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok((StatusCode::ACCEPTED, Json(answer)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
