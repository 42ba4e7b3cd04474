//! Principals and their API keys (admin). Keys are shown once, at creation, and stored as
//! argon2 hashes, optionally with an expiry. Principals hold permissions through groups and
//! grants of their own. Every change here is announced by PostgreSQL (`provisio_auth`) and
//! empties the key caches of every queue manager.

use provisio_shared::domain::Permission;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::JsonBody;
use super::{ApiError, Caller};
use crate::app::App;
use crate::auth::{generate_key, hash_new_key, lookup_of};

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

/// The optional body of `POST /v1/principals/{name}/keys`: when the key stops working.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

impl NewKey {
    /// An empty body is a key that does not expire (older clients send none).
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(body).map_err(|e| ApiError::Malformed(format!("request body: {e}")))
    }

    fn expires_at(&self) -> Result<Option<DateTime<Utc>>, ApiError> {
        let at = match (self.expires_at, self.ttl_seconds) {
            (Some(_), Some(_)) => {
                return Err(ApiError::Malformed(
                    "give `expires_at` or `ttl_seconds`, not both".into(),
                ));
            }
            (Some(at), None) => at,
            (None, Some(ttl)) => {
                let ttl = i64::try_from(ttl)
                    .ok()
                    .and_then(chrono::Duration::try_seconds)
                    .ok_or_else(|| ApiError::Malformed("`ttl_seconds` is too large".into()))?;
                Utc::now()
                    .checked_add_signed(ttl)
                    .ok_or_else(|| ApiError::Malformed("`ttl_seconds` is too large".into()))?
            }
            (None, None) => return Ok(None),
        };
        if at <= Utc::now() {
            return Err(ApiError::Invalid {
                message: "the key would expire before it is created".into(),
                details: json!([{"path": "/expires_at"}]),
            });
        }
        Ok(Some(at))
    }
}

/// `POST /v1/principals/{name}/keys`: a new key, shown this once; optionally expiring
/// (`expires_at`, or `ttl_seconds` from now).
pub async fn create_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::Admin)?;
    let expires_at = NewKey::parse(&body)?.expires_at()?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    let key = generate_key();
    let hash = hash_new_key(&key)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let key_id = uuid::Uuid::now_v7();
    client
        .execute(
            "INSERT INTO api_keys (id, principal_id, lookup, hash, expires_at) VALUES ($1, $2, $3, $4, $5)",
            &[&key_id, &id, &lookup_of(&key), &hash, &expires_at],
        )
        .await
        .map_err(ApiError::db)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": key_id, "principal": name, "key": key, "expires_at": expires_at})),
    ))
}

/// The permissions of a `PUT .../grants` body: a JSON list, or `{"grants": [...]}` (the shape
/// of `PUT .../groups`). Unknown permissions are named with their index.
fn parse_grants(body: &Value) -> Result<Vec<Permission>, ApiError> {
    let malformed =
        || ApiError::Malformed("the body is a list of permissions, or {\"grants\": [...]}".into());
    let (list, path) = match body {
        Value::Array(list) => (list, ""),
        Value::Object(o) if o.len() == 1 => match o.get("grants") {
            Some(Value::Array(list)) => (list, "/grants"),
            _ => return Err(malformed()),
        },
        _ => return Err(malformed()),
    };
    let mut perms = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let p = v.as_str().and_then(|s| s.parse::<Permission>().ok());
        let Some(p) = p else {
            let known: Vec<&str> = Permission::ALL.iter().map(|p| p.as_str()).collect();
            return Err(ApiError::Invalid {
                message: format!("unknown permission {v}; known: {known:?}"),
                details: json!([{"path": format!("{path}/{i}")}]),
            });
        };
        if !perms.contains(&p) {
            perms.push(p);
        }
    }
    Ok(perms)
}

/// `PUT /v1/principals/{name}/grants`: the principal's own grants (besides its groups'),
/// replaced. Effective on every queue manager at its next request (`provisio_auth`).
pub async fn put_grants(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let perms = parse_grants(&body)?;
    let names: Vec<&str> = perms.iter().map(|p| p.as_str()).collect();
    let mut client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    tx.execute("DELETE FROM grants WHERE principal_id = $1", &[&id])
        .await
        .map_err(ApiError::db)?;
    tx.execute(
        "INSERT INTO grants (permission, principal_id) SELECT unnest($1::text[]), $2",
        &[&names, &id],
    )
    .await
    .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    describe_grants(&client, id, &name).await.map(Json)
}

/// `PUT /v1/principals/{name}/disabled`: `true` (or `{"disabled": true}`) takes every
/// permission away at once — every key refused by every queue manager within seconds
/// (`provisio_auth`), and every accepted request refused when an engine picks it up — while
/// keys, grants and history stay for an audit or a later `false`. An admin cannot disable
/// itself: the last admin doing so would lock everyone out.
pub async fn put_disabled(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let disabled = match &body {
        Value::Bool(b) => *b,
        Value::Object(o) if o.len() == 1 && o.get("disabled").is_some_and(Value::is_boolean) => o
            .get("disabled")
            .and_then(Value::as_bool)
            .unwrap_or_default(),
        _ => {
            return Err(ApiError::Malformed(
                "the body is `true`, `false`, or {\"disabled\": true|false}".into(),
            ));
        }
    };
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    if disabled && id == caller.0.id {
        return Err(ApiError::Conflict(
            "a principal cannot disable itself; another admin can".into(),
        ));
    }
    client
        .execute(
            "UPDATE principals SET disabled = $2 WHERE id = $1 AND disabled <> $2",
            &[&id, &disabled],
        )
        .await
        .map_err(ApiError::db)?;
    describe_grants(&client, id, &name).await.map(Json)
}

/// `GET /v1/principals/{name}/grants`: its own grants, its groups, and the permissions they
/// add up to (implications applied).
pub async fn get_grants(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let id = principal_id(&client, &name).await?;
    describe_grants(&client, id, &name).await.map(Json)
}

async fn describe_grants(
    client: &deadpool_postgres::Object,
    id: uuid::Uuid,
    name: &str,
) -> Result<Value, ApiError> {
    let column =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let grants = client
        .query(
            "SELECT permission FROM grants WHERE principal_id = $1 ORDER BY 1",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?;
    let groups = client
        .query(
            "SELECT group_name FROM group_members WHERE principal_id = $1 ORDER BY 1",
            &[&id],
        )
        .await
        .map_err(ApiError::db)?;
    let disabled: bool = client
        .query_one("SELECT disabled FROM principals WHERE id = $1", &[&id])
        .await
        .map_err(ApiError::db)?
        .get(0);
    let permissions = provisio_shared::security::permissions_of(client, id)
        .await
        .map_err(ApiError::db)?;
    Ok(json!({
        "name": name,
        "grants": column(grants),
        "groups": column(groups),
        "permissions": if disabled { Vec::new() } else { permissions },
        "disabled": disabled,
    }))
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
