//! Principals and their API keys (admin). Keys are shown once, at creation, and stored as
//! argon2 hashes; revoking one takes effect within `queue_manager.key_cache_seconds`.

use provisio_shared::domain::Permission;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::JsonBody;
use super::{ApiError, Caller};
use crate::app::App;
use crate::auth::{generate_key, hash_key, lookup_of};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPrincipal {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    /// The RabbitMQ user a direct AMQP producer connects as.
    #[serde(default)]
    amqp_user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    groups: Vec<String>,
}

async fn principal_id(
    client: &deadpool_postgres::Object,
    name: &str,
) -> Result<uuid::Uuid, ApiError> {
    client
        .query_opt("SELECT id FROM principals WHERE name = $1", &[&name])
        .await
        .map_err(ApiError::db)?
        .map(|r| r.get(0))
        .ok_or_else(|| ApiError::NotFound(format!("principal `{name}` does not exist")))
}

async fn set_groups(
    tx: &deadpool_postgres::Transaction<'_>,
    id: uuid::Uuid,
    groups: &[String],
) -> Result<(), ApiError> {
    let known: Vec<String> = tx
        .query("SELECT name FROM groups WHERE name = ANY($1)", &[&groups])
        .await
        .map_err(ApiError::db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(unknown) = groups.iter().find(|g| !known.contains(g)) {
        return Err(ApiError::Invalid {
            message: format!("no group `{unknown}`"),
            details: json!([{"path": "/groups"}]),
        });
    }
    tx.execute("DELETE FROM group_members WHERE principal_id = $1", &[&id])
        .await
        .map_err(ApiError::db)?;
    tx.execute(
        "INSERT INTO group_members (group_name, principal_id) SELECT unnest($1::text[]), $2",
        &[&groups, &id],
    )
    .await
    .map_err(ApiError::db)?;
    Ok(())
}

/// `POST /v1/principals`
pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    JsonBody(body): JsonBody<NewPrincipal>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::Admin)?;
    if body.name.is_empty() || body.name.len() > 128 || body.name.chars().any(char::is_control) {
        return Err(ApiError::Malformed(
            "`name` must be 1-128 printable characters".into(),
        ));
    }
    let kind = body.kind.clone().unwrap_or_else(|| "service".to_owned());
    if !matches!(kind.as_str(), "person" | "service") {
        return Err(ApiError::Malformed(
            "`kind` is `person` or `service`".into(),
        ));
    }
    let mut client = app.pool.get().await.map_err(ApiError::db)?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    let id = uuid::Uuid::now_v7();
    let inserted = tx
        .execute(
            "INSERT INTO principals (id, name, kind, amqp_user) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&id, &body.name, &kind, &body.amqp_user],
        )
        .await
        .map_err(ApiError::db)?;
    if inserted == 0 {
        return Err(ApiError::Conflict(format!(
            "a principal named `{}` (or with that AMQP user) exists",
            body.name
        )));
    }
    set_groups(&tx, id, &body.groups).await?;
    tx.commit().await.map_err(ApiError::db)?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"id": id, "name": body.name, "kind": kind, "amqp_user": body.amqp_user, "groups": body.groups}),
        ),
    ))
}

/// `PUT /v1/principals/{name}/groups`
pub async fn put_groups(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Groups>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let mut client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    set_groups(&tx, id, &body.groups).await?;
    tx.commit().await.map_err(ApiError::db)?;
    Ok(Json(json!({"name": name, "groups": body.groups})))
}

/// `POST /v1/principals/{name}/keys`: a new key, shown this once.
pub async fn create_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::Admin)?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    let key = generate_key();
    let hash = tokio::task::spawn_blocking({
        let key = key.clone();
        move || hash_key(&key)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let key_id = uuid::Uuid::now_v7();
    client
        .execute(
            "INSERT INTO api_keys (id, principal_id, lookup, hash) VALUES ($1, $2, $3, $4)",
            &[&key_id, &id, &lookup_of(&key), &hash],
        )
        .await
        .map_err(ApiError::db)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": key_id, "principal": name, "key": key})),
    ))
}

/// `DELETE /v1/principals/{name}/keys/{key_id}`
pub async fn revoke_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((name, key_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let key_id = uuid::Uuid::parse_str(&key_id)
        .map_err(|_| ApiError::NotFound(format!("key `{key_id}` does not exist")))?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    let n = client
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND principal_id = $2 AND revoked_at IS NULL",
            &[&key_id, &id],
        )
        .await
        .map_err(ApiError::db)?;
    if n == 0 {
        return Err(ApiError::NotFound(format!(
            "no active key `{key_id}` of `{name}`"
        )));
    }
    Ok(Json(json!({"id": key_id, "revoked": true})))
}
