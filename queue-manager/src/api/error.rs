use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Every error the HTTP API answers with; each maps to one status and a stable `code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Malformed(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{message}")]
    Invalid { message: String, details: Value },
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: std::time::Duration,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The `code` of the error an answer carries (a response extension), so that the submission
/// routes can count their refusals by code without parsing bodies.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// The message of a refusal (401, 403, 429), for the security event that records it.
#[derive(Clone, Debug)]
pub struct ErrorMessage(pub String);

impl ApiError {
    /// Every `code` (the `provisio_requests_rejected_total` series that exist from the start).
    pub const CODES: &'static [&'static str] = &[
        "malformed",
        "unauthorized",
        "forbidden",
        "not_found",
        "conflict",
        "too_large",
        "invalid",
        "rate_limited",
        "unavailable",
        "internal",
    ];

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::TooLarge(_) => "too_large",
            Self::Invalid { .. } => "invalid",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// A database failure: the whole cause goes to the log, the client learns only that the
    /// database is unavailable (its messages may name tables and values).
    pub fn db(e: impl std::fmt::Debug) -> Self {
        tracing::warn!(error = ?e, "database error");
        Self::Unavailable("database unavailable; nothing was accepted".into())
    }
}

/// Counts a refused submission: only requests someone tried to submit are "rejected", not a
/// `GET` of an unknown id or an admin call.
pub fn count_rejected(code: &'static str) {
    metrics::counter!(provisio_shared::metrics::REQUESTS_REJECTED, "code" => code).increment(1);
}

/// Middleware of the submission routes: counts an error answer by its code, whether the
/// handler or an extractor (key, body) refused.
pub async fn count_rejections(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    if let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>() {
        count_rejected(code);
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, Self::Internal(_) | Self::Unavailable(_)) {
            tracing::warn!(error = %self, "request failed");
        }
        let mut body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        if let Self::Invalid { details, .. } = &self {
            body["error"]["details"] = details.clone();
        }
        let mut resp = (self.status(), Json(body)).into_response();
        resp.extensions_mut().insert(ErrorCode(self.code()));
        if matches!(
            self,
            Self::Unauthorized | Self::Forbidden(_) | Self::RateLimited { .. }
        ) {
            resp.extensions_mut().insert(ErrorMessage(self.to_string()));
        }
        if matches!(self, Self::Unauthorized) {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Self::RateLimited { retry_after, .. } = &self {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(crate::ratelimit::retry_after_secs(*retry_after)),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed() {
        let all = [
            ApiError::Malformed(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::TooLarge(0),
            ApiError::Invalid {
                message: String::new(),
                details: Value::Null,
            },
            ApiError::RateLimited {
                message: String::new(),
                retry_after: std::time::Duration::ZERO,
            },
            ApiError::Unavailable(String::new()),
            ApiError::Internal(String::new()),
        ];
        let codes: Vec<&str> = all.iter().map(ApiError::code).collect();
        assert_eq!(codes, ApiError::CODES);
    }
}
