//! The HTTP API (docs/design.md §2.1, schemas/openapi.yaml). One module per resource; each
//! handler returns `ApiError`.

mod audit;
mod body;
pub mod checks;
mod dead_letters;
pub mod error;
mod namespaces;
mod principals;
mod requests;
mod resources;
mod transactions;

use std::sync::Arc;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::middleware::from_fn;
use axum::routing::{delete, get, post, put};
use provisio_shared::domain::{Permission, PrincipalRef};

use crate::app::App;
pub use error::ApiError;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/v1/requests",
            post(requests::submit.layer(from_fn(error::count_rejections))).get(requests::list),
        )
        .route(
            "/v1/requests:batch",
            post(requests::submit_batch.layer(from_fn(error::count_rejections))),
        )
        .route(
            "/v1/requests/trusted",
            post(requests::submit_trusted.layer(from_fn(error::count_rejections))),
        )
        .route(
            "/v1/requests/{id}",
            get(requests::get)
                .delete(requests::cancel)
                .post(requests::action),
        )
        .route("/v1/dead-letters", get(dead_letters::list))
        .route("/v1/dead-letters:requeue", post(dead_letters::requeue_many))
        .route(
            "/v1/dead-letters/{target}",
            post(dead_letters::action).delete(dead_letters::delete),
        )
        .route("/v1/resources/pools", get(resources::pools))
        .route("/v1/principals", post(principals::create))
        .route("/v1/principals/{name}/groups", put(principals::put_groups))
        .route(
            "/v1/principals/{name}/disabled",
            put(principals::put_disabled),
        )
        .route("/v1/principals/{name}/keys", post(principals::create_key))
        .route(
            "/v1/principals/{name}/keys/{key_id}",
            delete(principals::revoke_key),
        )
        .route("/v1/audit/transactions", get(audit::list))
        .route("/v1/audit/transactions/{id}", get(audit::get))
        .route("/v1/transactions", get(transactions::list))
        .route("/v1/transactions/{target}", post(transactions::action))
        .route("/v1/namespaces", get(namespaces::list))
        .route(
            "/v1/namespaces/{name}",
            put(namespaces::apply).get(namespaces::get),
        )
        .route(
            "/v1/principals/{name}/grants",
            put(principals::put_grants).get(principals::get_grants),
        )
        .route("/v1/audit/security-events", get(audit::security_events))
        // Only matched routes: the route's pattern names the denial's source.
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::denials::audit,
        ))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(app)
}

/// The authenticated caller. Extracting it is what makes a handler require a key.
pub struct Caller(pub PrincipalRef);

impl Caller {
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.has(permission) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "principal `{}` lacks the `{permission}` permission",
                self.0.name
            )))
        }
    }

    /// `admin` implies every permission.
    pub fn has(&self, permission: Permission) -> bool {
        self.0.has(permission.as_str())
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let seen = parts.extensions.get::<crate::denials::Seen>();
        match app.keys.authenticate(key).await {
            Ok(p) => {
                if let Some(seen) = seen {
                    seen.principal(p.id, &p.name, false);
                }
                Ok(Caller(p))
            }
            Err(crate::auth::AuthError::Expired(p)) => {
                if let Some(seen) = seen {
                    seen.principal(p.id, &p.name, true);
                }
                Err(ApiError::Unauthorized)
            }
            Err(crate::auth::AuthError::Invalid) => Err(ApiError::Unauthorized),
            Err(crate::auth::AuthError::Db(e)) => Err(ApiError::db(e)),
            Err(e @ crate::auth::AuthError::Hashing) => Err(ApiError::Internal(e.to_string())),
        }
    }
}

/// Publishes requests an operator just made due (resumed, requeued), best effort: whatever is
/// not published now, the scheduler publishes at its next pass. Each id with `queued`
/// (published) or `scheduled`.
async fn publish_all_now(app: &App, ids: &[String]) -> Vec<(String, &'static str)> {
    if ids.is_empty() {
        return Vec::new();
    }
    let published = crate::scheduler::publish_now(
        &app.pool,
        &app.publisher,
        &app.cfg.security.signing_key,
        ids,
    )
    .await
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot publish at once; the scheduler will");
        Vec::new()
    });
    ids.iter()
        .map(|id| {
            let s = if published.contains(id) {
                "queued"
            } else {
                "scheduled"
            };
            (id.clone(), s)
        })
        .collect()
}

/// [`publish_all_now`] for one request.
async fn publish_now(app: &App, id: &str) -> &'static str {
    publish_all_now(app, &[id.to_owned()])
        .await
        .first()
        .map_or("scheduled", |(_, s)| *s)
}
