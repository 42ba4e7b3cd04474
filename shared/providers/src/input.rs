//! Reading provider inputs: typed fields with errors that name the field and what was
//! found instead, always `invalid_input` (permanent).

use provisio_provider::ProviderError;
use serde_json::{Map, Value};
use uuid::Uuid;

pub fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::permanent("invalid_input", message)
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn object<'v>(v: &'v Value, what: &str) -> Result<&'v Map<String, Value>, ProviderError> {
    v.as_object()
        .ok_or_else(|| invalid(format!("{what} must be an object, not {}", kind(v))))
}

pub fn string<'v>(
    m: &'v Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<&'v str, ProviderError> {
    match m.get(field) {
        None | Some(Value::Null) => Err(invalid(format!("{what}: `{field}` is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(format!(
            "{what}: `{field}` must be a string, not {}",
            kind(other)
        ))),
    }
}

pub fn boolean(m: &Map<String, Value>, field: &str, what: &str) -> Result<bool, ProviderError> {
    match m.get(field) {
        None | Some(Value::Null) => Err(invalid(format!("{what}: `{field}` is required"))),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid(format!(
            "{what}: `{field}` must be a boolean, not {}",
            kind(other)
        ))),
    }
}

pub fn uuid(m: &Map<String, Value>, field: &str, what: &str) -> Result<Uuid, ProviderError> {
    let s = string(m, field, what)?;
    Uuid::parse_str(s).map_err(|_| invalid(format!("{what}: `{field}` is not a UUID: {s:?}")))
}
