//! The namespace language (docs/procedures.md): the document as users write it
//! ([`NamespaceDoc`]), and its compiled form ([`Namespace`]) with every jq expression and JSON
//! Schema compiled once.
//!
//! Compilation is also validation: it collects *every* error with its path instead of
//! stopping at the first, so that `provisioctl apply` can show a user all of them at once.

mod compiler;
mod doc;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use compiler::compile;
pub use doc::{FailDoc, NamespaceDoc, ProcedureDoc, RetryDoc, StepDoc};

use crate::domain::{Name, TxModel};
use crate::jq::Expr;
use crate::retry::Backoff;

/// One problem in a namespace document, located by a path such as
/// `procedures.create_mailbox.steps[2].input`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What the compiler needs to know about providers: which actions exist.
pub trait Catalog {
    /// `Err(message)` when the provider or the action is unknown.
    fn check_action(&self, provider: &str, action: &str) -> Result<(), String>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Public,
    #[default]
    Private,
}

/// A compiled namespace version. Immutable; engines cache it by (name, version).
#[derive(Debug)]
pub struct Namespace {
    pub name: Name,
    pub version: i32,
    pub description: String,
    pub procedures: HashMap<String, Arc<Procedure>>,
}

pub struct Procedure {
    pub namespace: Name,
    pub name: Name,
    pub access: Access,
    pub model: TxModel,
    /// Marked for audit (`audit: true` or an expression).
    pub audit: bool,
    /// `audit: <expression>`: the procedure's own audit data, evaluated at its end.
    pub audit_data: Option<Expr>,
    pub input_schema: Option<jsonschema::Validator>,
    pub output_schema: Option<jsonschema::Validator>,
    pub steps: Vec<Step>,
    pub output: Option<Expr>,
    /// The input properties marked `sensitive: true` in `input_schema` (property names from
    /// the top; `[]`: the whole input), sealed by the queue manager before the request is
    /// stored or published.
    pub sensitive_inputs: Vec<Vec<String>>,
    /// The procedure declares a sensitive input property or a sensitive step: every record of
    /// it that reaches the log (and the run's output, error messages and audit data) is sealed.
    pub sensitive: bool,
}

impl Procedure {
    /// The input's violations of the input schema, each with its JSON-pointer path: what a
    /// 422 (queue manager) or an `input_invalid` failure (engine, direct producers) lists.
    /// The validator's message quotes the value, so it is withheld at, inside or above a
    /// sensitive property.
    pub fn input_violations(&self, input: &serde_json::Value) -> Vec<serde_json::Value> {
        let Some(schema) = &self.input_schema else {
            return Vec::new();
        };
        schema
            .iter_errors(input)
            .map(|e| {
                let path = e.instance_path().to_string();
                let message = if touches_sensitive(&path, &self.sensitive_inputs) {
                    "does not match the schema (the message is withheld: it could quote a \
                     sensitive value)"
                        .to_owned()
                } else {
                    e.to_string()
                };
                serde_json::json!({"path": path, "message": message})
            })
            .collect()
    }
}

/// Whether the JSON pointer `path` (`/a/b`) is at, inside or above one of the sensitive
/// properties: a message about it may quote a sensitive value.
fn touches_sensitive(path: &str, sensitive: &[Vec<String>]) -> bool {
    let segments: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    sensitive
        .iter()
        .any(|p| segments.starts_with(p) || p.starts_with(&segments))
}

impl fmt::Debug for Procedure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Procedure")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("access", &self.access)
            .field("model", &self.model)
            .field("steps", &self.steps)
            .field("sensitive", &self.sensitive)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Step {
    pub id: Option<String>,
    /// Stable address of the step inside its procedure, e.g. `2` or `3.try.0`; part of the
    /// providers' idempotency key, so it must not depend on run-time data.
    pub path: String,
    pub when: Option<Expr>,
    pub input: Option<Expr>,
    pub save: Option<Expr>,
    pub retry: Option<Backoff>,
    pub timeout: Option<Duration>,
    /// `sensitive: true` on the step.
    pub sensitive: bool,
    pub kind: StepKind,
}

impl Step {
    /// This step or one nested in it (`for_each`, `switch`, `try`/`catch`) is sensitive.
    pub fn any_sensitive(&self) -> bool {
        self.sensitive
            || match &self.kind {
                StepKind::ForEach { steps, .. } => steps.iter().any(Step::any_sensitive),
                StepKind::Switch { cases, default, .. } => cases
                    .iter()
                    .flat_map(|(_, s)| s)
                    .chain(default)
                    .any(Step::any_sensitive),
                StepKind::Try { body, catch } => body.iter().chain(catch).any(Step::any_sensitive),
                _ => false,
            }
    }
}

#[derive(Debug)]
pub enum StepKind {
    Call {
        provider: String,
        action: String,
    },
    Procedure {
        /// `None`: the same namespace.
        namespace: Option<Name>,
        name: Name,
    },
    Set(Vec<(String, Expr)>),
    ForEach {
        items: Expr,
        var: String,
        steps: Vec<Step>,
    },
    Switch {
        on: Expr,
        cases: Vec<(String, Vec<Step>)>,
        default: Vec<Step>,
    },
    Try {
        body: Vec<Step>,
        catch: Vec<Step>,
    },
    Fail {
        code: String,
        message: Expr,
    },
}

/// Validation-only lookups that need the configuration database.
pub trait ExternalProcedures {
    /// Whether `namespace.procedure` exists in the current version of another namespace.
    fn exists(&self, namespace: &str, procedure: &str) -> bool;
}

/// Accepts no cross-namespace calls (used where no database is at hand).
pub struct NoExternal;
impl ExternalProcedures for NoExternal {
    fn exists(&self, _: &str, _: &str) -> bool {
        false
    }
}

/// Compiles `doc` with an extra (or replaced) procedure `name` made of `inline`
/// (`{transaction, steps, output}`): a trusted request's ad-hoc procedure, which may call the
/// namespace's procedures. Problems are reported with paths under `inline`.
pub fn with_inline(
    doc: &serde_json::Value,
    name: &str,
    inline: &serde_json::Value,
    catalog: &dyn Catalog,
) -> Result<Namespace, Vec<Problem>> {
    let mut doc = doc.clone();
    let mut proc_doc = serde_json::Map::new();
    proc_doc.insert("access".into(), "private".into());
    for key in ["transaction", "steps", "output"] {
        if let Some(v) = inline.get(key).filter(|v| !v.is_null()) {
            proc_doc.insert(key.into(), v.clone());
        }
    }
    match doc
        .get_mut("procedures")
        .and_then(serde_json::Value::as_object_mut)
    {
        Some(p) => {
            p.insert(name.to_owned(), serde_json::Value::Object(proc_doc));
        }
        None => {
            return Err(vec![Problem {
                path: String::new(),
                message: "the namespace has no procedures".into(),
            }]);
        }
    }
    let prefix = format!("procedures.{name}");
    compile(&doc, 0, catalog, &NoExternal).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| Problem {
                path: p.path.replacen(&prefix, "inline", 1),
                message: p.message,
            })
            .collect()
    })
}

/// Past this many brackets open at once, a document is refused before the YAML parser sees
/// it: its time grows with the square of the nesting (seconds for a few thousand levels), and
/// it refuses anything past 128 levels anyway.
const MAX_OPEN_BRACKETS: usize = 1024;

/// Parses YAML or JSON text into a document; YAML is a superset, so one parser serves both.
pub fn parse_document(text: &str) -> Result<serde_json::Value, Problem> {
    // Counted without regard to quoting: a bound, not a measure.
    let (mut open, mut most) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                open += 1;
                most = most.max(open);
            }
            b']' | b'}' => open = open.saturating_sub(1),
            _ => {}
        }
    }
    if most > MAX_OPEN_BRACKETS {
        return Err(Problem {
            path: String::new(),
            message: format!(
                "not valid YAML or JSON: more than {MAX_OPEN_BRACKETS} brackets open at once"
            ),
        });
    }
    serde_norway::from_str::<serde_json::Value>(text).map_err(|e| Problem {
        path: String::new(),
        message: format!("not valid YAML or JSON: {e}"),
    })
}

/// The language's contract, `schemas/namespace.schema.json`, compiled once.
fn document_schema() -> Option<&'static jsonschema::Validator> {
    static SCHEMA: std::sync::OnceLock<Option<jsonschema::Validator>> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let text = include_str!("../../../schemas/namespace.schema.json");
            let value: serde_json::Value = serde_json::from_str(text).ok()?;
            jsonschema::validator_for(&value).ok()
        })
        .as_ref()
}

/// `/procedures/p/steps/0/call` → `procedures.p.steps[0].call`.
fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() {
            out.push('[');
            out.push_str(&seg);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Checks a document against the namespace JSON Schema, returning every violation.
pub fn check_schema(value: &serde_json::Value) -> Vec<Problem> {
    let Some(schema) = document_schema() else {
        return vec![Problem {
            path: String::new(),
            message: "the namespace schema is unavailable".into(),
        }];
    };
    schema
        .iter_errors(value)
        .map(|e| Problem {
            path: pointer_to_path(&e.instance_path().to_string()),
            message: e.to_string(),
        })
        .collect()
}

impl RetryDoc {
    pub fn to_backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(self.initial_ms.unwrap_or(100)),
            max_interval: Duration::from_millis(self.max_ms.unwrap_or(5_000)),
            multiplier: self.multiplier.unwrap_or(2.0),
            max_attempts: Some(self.max_attempts.unwrap_or(3).max(1)),
            max_elapsed: None,
        }
    }
}

#[cfg(test)]
#[path = "procedure_tests.rs"]
mod tests;
