use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// The client's idempotency key: 1–128 printable characters. Two requests with the same id are
/// the same request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RequestId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestIdError {
    #[error("request id must not be empty")]
    Empty,
    #[error("request id is {0} characters long; at most 128 are allowed")]
    TooLong(usize),
    #[error("request id contains a non-printable character at position {0}")]
    NotPrintable(usize),
}

impl RequestId {
    pub fn parse(s: impl Into<String>) -> Result<Self, RequestIdError> {
        let s = s.into();
        let len = s.chars().count();
        if len == 0 {
            return Err(RequestIdError::Empty);
        }
        if len > 128 {
            return Err(RequestIdError::TooLong(len));
        }
        if let Some(pos) = s.chars().position(char::is_control) {
            return Err(RequestIdError::NotPrintable(pos));
        }
        Ok(Self(s))
    }

    /// A server-made id: UUIDv7, so that ids sort by creation time.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_printable_ids_up_to_128_chars() {
        assert!(RequestId::parse("a").is_ok());
        assert!(RequestId::parse("order-42/ü ok").is_ok());
        assert!(RequestId::parse("x".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_control_characters() {
        assert_eq!(RequestId::parse(""), Err(RequestIdError::Empty));
        assert_eq!(
            RequestId::parse("x".repeat(129)),
            Err(RequestIdError::TooLong(129))
        );
        assert_eq!(
            RequestId::parse("ab\ncd"),
            Err(RequestIdError::NotPrintable(2))
        );
    }

    #[test]
    fn generated_ids_are_valid_and_ordered() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert!(RequestId::parse(a.as_str()).is_ok());
        assert!(a.as_str() < b.as_str());
    }
}
