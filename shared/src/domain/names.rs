use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A namespace, procedure, step or provider name: `[a-z][a-z0-9_-]{0,63}`. Names end up in
/// AMQP routing keys, metric labels and SQL, so they are kept boring on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a valid name: use 1-64 characters of a-z, 0-9, `_` and `-`, starting with a letter"
)]
pub struct NameError(pub String);

impl Name {
    pub fn parse(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        let mut chars = s.chars();
        let ok = s.len() <= 64
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok { Ok(Self(s)) } else { Err(NameError(s)) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_identifiers() {
        for ok in ["a", "hosting", "create_mailbox", "x-1"] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "1a", "A", "a.b", "a b", "é", &"a".repeat(65)] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
    }
}
