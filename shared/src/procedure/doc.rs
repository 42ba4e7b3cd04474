use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use serde::de::{DeserializeOwned, Deserializer};

use super::Access;

/// Reads a field, falling back to its default when it has the wrong shape. The document has
/// already been checked against the JSON Schema, which reported the problem with its path;
/// reading on lets the compiler report every *other* problem in the same answer.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(T::deserialize(v).unwrap_or_default())
}
use crate::domain::TxModel;

/// `audit:` as written: a flag, or an expression whose value is kept as audit data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditDoc {
    Flag(bool),
    Data(String),
}

impl Default for AuditDoc {
    fn default() -> Self {
        Self::Flag(false)
    }
}

impl AuditDoc {
    pub fn marked(&self) -> bool {
        !matches!(self, Self::Flag(false))
    }
}

/// A namespace document as written by users (`schemas/namespace.schema.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamespaceDoc {
    #[serde(default, deserialize_with = "lenient")]
    pub namespace: String,
    #[serde(default, deserialize_with = "lenient")]
    pub description: String,
    #[serde(default, deserialize_with = "lenient")]
    pub procedures: BTreeMap<String, ProcedureDoc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcedureDoc {
    #[serde(default, deserialize_with = "lenient")]
    pub description: String,
    #[serde(default, deserialize_with = "lenient")]
    pub access: Access,
    #[serde(default, deserialize_with = "lenient")]
    pub transaction: TxModel,
    /// `true`: marked for audit; a jq expression: marked, and the value it gives (over the
    /// procedure's context at its end, `.output` included) is the procedure's audit data.
    #[serde(default, deserialize_with = "lenient")]
    pub audit: AuditDoc,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub input_schema: Option<Value>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub output_schema: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub steps: Vec<StepDoc>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub output: Option<String>,
}

/// Every key any step kind may have; the compiler checks that exactly one kind key is present
/// and reports misplaced keys, which gives better messages than an untagged enum would.
/// Unknown keys are the JSON Schema's to report (`additionalProperties: false`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepDoc {
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub when: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub input: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub save: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry: Option<RetryDoc>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub call: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub procedure: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub set: Option<BTreeMap<String, String>>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub for_each: Option<String>,
    #[serde(
        default,
        rename = "as",
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub r#as: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub steps: Option<Vec<StepDoc>>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub switch: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub cases: Option<BTreeMap<String, Vec<StepDoc>>>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub default: Option<Vec<StepDoc>>,
    #[serde(
        default,
        rename = "try",
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub r#try: Option<Vec<StepDoc>>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub catch: Option<Vec<StepDoc>>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub fail: Option<FailDoc>,
    /// `true`: the step's output (and its input record) is sensitive, which makes the whole
    /// procedure sensitive (docs/procedures.md, "Sensitive values").
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub sensitive: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailDoc {
    #[serde(default, deserialize_with = "lenient")]
    pub code: String,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryDoc {
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_attempts: Option<u32>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial_ms: Option<u64>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ms: Option<u64>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub multiplier: Option<f64>,
}
