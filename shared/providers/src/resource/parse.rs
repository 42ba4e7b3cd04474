//! Reading the resource manager's inputs.

use provisio_provider::ProviderError;
use serde_json::{Map, Value};

use super::{MAX_NAME, Strategy};
use crate::input::{invalid, kind, object, string};

pub(super) struct AllocateReq {
    pub(super) pool: String,
    pub(super) amount: i32,
    pub(super) consumer: Option<String>,
    pub(super) strategy: Option<Strategy>,
}

impl AllocateReq {
    pub(super) fn parse(input: &Value, what: &str) -> Result<Self, ProviderError> {
        let m = object(input, what)?;
        let amount = match m.get("amount") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_i64()
                .and_then(|a| i32::try_from(a).ok())
                .filter(|a| *a >= 1)
                .ok_or_else(|| {
                    invalid(format!(
                        "{what}: `amount` must be a whole number from 1 to {}, not {v}",
                        i32::MAX
                    ))
                })?,
        };
        let consumer = match m.get("consumer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() <= MAX_NAME => Some(s.clone()),
            Some(Value::String(_)) => {
                return Err(invalid(format!(
                    "{what}: `consumer` is longer than {MAX_NAME} characters"
                )));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "{what}: `consumer` must be a string, not {}",
                    kind(other)
                )));
            }
        };
        let strategy = match m.get("strategy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Strategy::parse(s).ok_or_else(|| {
                invalid(format!(
                    "{what}: `strategy` must be `least_used` or `ranked`, not {s:?}"
                ))
            })?),
            Some(other) => {
                return Err(invalid(format!(
                    "{what}: `strategy` must be a string, not {}",
                    kind(other)
                )));
            }
        };
        Ok(Self {
            pool: name(m, "pool", what)?,
            amount,
            consumer,
            strategy,
        })
    }
}

pub(super) fn check_name(what: &str, s: &str) -> Result<(), ProviderError> {
    let problem = if s.is_empty() {
        "is empty"
    } else if s.chars().count() > MAX_NAME {
        "is too long"
    } else if s.trim() != s {
        "has leading or trailing blanks"
    } else if s.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(invalid(format!("{what} name {problem}: {s:?}")))
}

pub(super) fn name(
    m: &Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<String, ProviderError> {
    let s = string(m, field, what)?;
    check_name(&format!("{what}: `{field}`"), s)?;
    Ok(s.to_owned())
}
