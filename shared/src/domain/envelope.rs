use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Name, OnExhausted, Priority, RequestId};

/// The request as it travels through RabbitMQ: the queue manager publishes it, AMQP producers
/// may publish it directly, engines consume it. The JSON Schema in
/// `schemas/request-envelope.schema.json` describes the same shape for other languages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub id: RequestId,
    pub namespace: Name,
    pub procedure: Name,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub kind: RequestKind,
    /// The namespace version current when the queue manager accepted the request. Engines run
    /// that version, so that "applied, then submitted" always means "runs the new version".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_version: Option<i32>,
    /// Who submitted it. Trusted only when the envelope carries a valid queue-manager signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<PrincipalRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<DateTime<Utc>>,
    /// When a scheduled request (or a request-level retry) became due; set by the scheduler
    /// when it publishes one. Only measurements read it: the request's duration counts from
    /// here rather than from submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    #[default]
    Queued,
    Trusted,
}

/// Defined in the provider contract, which hands it to providers with each call.
pub use provisio_provider::PrincipalRef;

/// Request-level retries (docs/design.md §2.4), distinct from a step's `retry`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub count: u32,
    pub interval_ms: u64,
    #[serde(default)]
    pub on_exhausted: OnExhausted,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid JSON for a request: {0}")]
    Malformed(String),
}

impl Envelope {
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of JSON-safe fields cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "envelope_tests.rs"]
mod tests;
