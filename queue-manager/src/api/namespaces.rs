//! Namespace administration: apply a new version (validated with every error reported),
//! list, show with history.

use provisio_shared::domain::Permission;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use provisio_shared::procedure::{self, ExternalProcedures, Problem};
use serde_json::{Value, json};

use super::{ApiError, Caller};
use crate::app::App;

struct Known(BTreeMap<String, BTreeSet<String>>);

impl ExternalProcedures for Known {
    fn exists(&self, namespace: &str, procedure: &str) -> bool {
        self.0.get(namespace).is_some_and(|p| p.contains(procedure))
    }
}

fn invalid(problems: Vec<Problem>) -> ApiError {
    ApiError::Invalid {
        message: format!("namespace is invalid ({} problems)", problems.len()),
        details: serde_json::to_value(problems).unwrap_or(Value::Null),
    }
}

/// The body of `PUT /v1/namespaces/{name}` read as a document of that namespace (not yet
/// compiled): `413` past `limit`, `400` when not UTF-8, `422` when not YAML or JSON or when it
/// names another namespace. Also the property tests' way in (`check_namespace_body`).
pub(crate) fn read_document<'b>(
    name: &str,
    body: &'b [u8],
    limit: usize,
) -> Result<(Value, &'b str), ApiError> {
    if body.len() > limit {
        return Err(ApiError::TooLarge(limit));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::Malformed("namespace document is not UTF-8".into()))?;
    let doc = procedure::parse_document(text).map_err(|p| invalid(vec![p]))?;
    if doc.get("namespace").and_then(Value::as_str) != Some(name) {
        return Err(invalid(vec![Problem {
            path: "namespace".into(),
            message: format!("the document must name the namespace `{name}` of its URL"),
        }]));
    }
    Ok((doc, text))
}

/// Compiles a document read by [`read_document`]; `422` with every problem when invalid.
pub(crate) fn compile_document(
    doc: &Value,
    catalog: &dyn procedure::Catalog,
    known: &dyn ExternalProcedures,
) -> Result<(), ApiError> {
    procedure::compile(doc, 0, catalog, known)
        .map(|_| ())
        .map_err(invalid)
}

pub async fn apply(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::Admin)?;
    let (doc, text) = read_document(&name, &body, app.cfg.queue_manager.max_body_bytes)?;
    let mut client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            "SELECT DISTINCT ON (name) name, document->'procedures' FROM namespaces \
             WHERE name <> $1 ORDER BY name, version DESC",
            &[&name],
        )
        .await
        .map_err(ApiError::db)?;
    let known = Known(
        rows.iter()
            .map(|r| {
                let procs: Value = r.get(1);
                let names = procs
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                (r.get::<_, String>(0), names)
            })
            .collect(),
    );
    compile_document(&doc, app.namespaces.catalog(), &known)?;

    let tx = client.transaction().await.map_err(ApiError::db)?;
    // Serialize concurrent applies of the same namespace.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('ns:' || $1))",
        &[&name],
    )
    .await
    .map_err(ApiError::db)?;
    let current = tx
        .query_opt(
            "SELECT version, document FROM namespaces WHERE name = $1 ORDER BY version DESC LIMIT 1",
            &[&name],
        )
        .await
        .map_err(ApiError::db)?;
    if let Some(row) = &current {
        let (version, existing): (i32, Value) = (row.get(0), row.get(1));
        if existing == doc {
            return Ok((
                StatusCode::OK,
                Json(json!({"namespace": name, "version": version, "changed": false})),
            ));
        }
    }
    let version = current.map_or(1, |r| r.get::<_, i32>(0) + 1);
    tx.execute(
        "INSERT INTO namespaces (name, version, document, source, applied_by) VALUES ($1, $2, $3, $4, $5)",
        &[&name, &version, &doc, &text, &caller.0.name],
    )
    .await
    .map_err(ApiError::db)?;
    // Delivered at commit to every queue manager and engine following versions.
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&provisio_shared::namespaces::CHANNEL, &name],
    )
    .await
    .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    app.namespaces.invalidate(&name);
    tracing::info!(namespace = %name, version, by = %caller.0.name, "namespace applied");
    Ok((
        StatusCode::CREATED,
        Json(json!({"namespace": name, "version": version, "changed": true})),
    ))
}

pub async fn list(State(app): State<Arc<App>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            "SELECT name, max(version), max(applied_at) FROM namespaces GROUP BY name ORDER BY name",
            &[],
        )
        .await
        .map_err(ApiError::db)?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"name": r.get::<_, String>(0), "version": r.get::<_, i32>(1),
                   "applied_at": r.get::<_, DateTime<Utc>>(2)})
        })
        .collect();
    Ok(Json(json!({"namespaces": items})))
}

pub async fn get(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    let rows = client
        .query(
            "SELECT version, document, applied_at, applied_by FROM namespaces WHERE name = $1 ORDER BY version DESC",
            &[&name],
        )
        .await
        .map_err(ApiError::db)?;
    let Some(first) = rows.first() else {
        return Err(ApiError::NotFound(format!(
            "namespace `{name}` does not exist"
        )));
    };
    let history: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"version": r.get::<_, i32>(0), "applied_at": r.get::<_, DateTime<Utc>>(2),
                   "applied_by": r.get::<_, Option<String>>(3)})
        })
        .collect();
    Ok(Json(json!({
        "name": name,
        "version": first.get::<_, i32>(0),
        "document": first.get::<_, Value>(1),
        "history": history,
    })))
}
