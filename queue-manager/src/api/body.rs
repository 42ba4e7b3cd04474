//! A JSON body extractor whose every failure is one of our JSON errors (axum's own rejections
//! are plain text).

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::app::App;
use std::sync::Arc;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<App>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let limit = app.cfg.queue_manager.max_body_bytes;
        let content_type_ok = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| !ct.starts_with("multipart/"));
        if !content_type_ok {
            return Err(ApiError::Malformed(
                "multipart bodies are not accepted; send JSON".into(),
            ));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::TooLarge(limit))?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body as every route reads it: any failure (not UTF-8, truncated, wrong type,
/// unknown field, nested past serde_json's recursion limit) is a `400 malformed`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::Malformed(format!("request body: {e}")))
}
