//! The namespace language (docs/procedures.md): the document as users write it
//! ([`NamespaceDoc`]), and its compiled form ([`Namespace`]) with every jq expression and JSON
//! Schema compiled once.
//!
//! Compilation is also validation: it collects *every* error with its path instead of
//! stopping at the first, so that `provisioctl apply` can show a user all of them at once.

mod doc;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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
}

impl fmt::Debug for Procedure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Procedure")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("access", &self.access)
            .field("model", &self.model)
            .field("steps", &self.steps)
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
    pub kind: StepKind,
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

/// Parses YAML or JSON text into a document; YAML is a superset, so one parser serves both.
pub fn parse_document(text: &str) -> Result<serde_json::Value, Problem> {
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

/// Compiles a document, returning every problem found.
pub fn compile(
    value: &serde_json::Value,
    version: i32,
    catalog: &dyn Catalog,
    external: &dyn ExternalProcedures,
) -> Result<Namespace, Vec<Problem>> {
    let schema_problems = check_schema(value);
    let doc: NamespaceDoc = match serde_json::from_value(value.clone()) {
        Ok(d) => d,
        Err(e) => {
            let mut problems = schema_problems;
            if problems.is_empty() {
                problems.push(Problem {
                    path: String::new(),
                    message: format!("does not match the namespace schema: {e}"),
                });
            }
            return Err(problems);
        }
    };
    let mut c = Compiler {
        problems: schema_problems,
        catalog,
        external,
        doc: &doc,
        calls: BTreeMap::new(),
    };
    let ns_name = match Name::parse(doc.namespace.clone()) {
        Ok(n) => Some(n),
        Err(e) => {
            c.problem("namespace", e.to_string());
            None
        }
    };
    let mut procedures = HashMap::new();
    for (pname, pdoc) in &doc.procedures {
        let base = format!("procedures.{pname}");
        let name = match Name::parse(pname.clone()) {
            Ok(n) => Some(n),
            Err(e) => {
                c.problem(&base, e.to_string());
                None
            }
        };
        let input_schema = c.schema(&format!("{base}.input_schema"), pdoc.input_schema.as_ref());
        let output_schema = c.schema(
            &format!("{base}.output_schema"),
            pdoc.output_schema.as_ref(),
        );
        let mut ids = BTreeSet::new();
        let steps = c.steps(pname, &format!("{base}.steps"), "", &pdoc.steps, &mut ids);
        let output = c.expr(&format!("{base}.output"), pdoc.output.as_deref());
        let audit_data = match &pdoc.audit {
            doc::AuditDoc::Data(e) => c.expr(&format!("{base}.audit"), Some(e.as_str())),
            doc::AuditDoc::Flag(_) => None,
        };
        if pdoc.steps.is_empty() {
            c.problem(
                &format!("{base}.steps"),
                "a procedure needs at least one step".into(),
            );
        }
        if let (Some(ns), Some(name)) = (ns_name.clone(), name) {
            procedures.insert(
                pname.clone(),
                Arc::new(Procedure {
                    namespace: ns,
                    name,
                    access: pdoc.access,
                    model: pdoc.transaction,
                    audit: pdoc.audit.marked(),
                    audit_data,
                    input_schema,
                    output_schema,
                    steps,
                    output,
                }),
            );
        }
    }
    c.check_cycles();
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    let Some(name) = ns_name else {
        return Err(c.problems);
    };
    Ok(Namespace {
        name,
        version,
        description: doc.description.clone(),
        procedures,
    })
}

struct Compiler<'a> {
    problems: Vec<Problem>,
    catalog: &'a dyn Catalog,
    external: &'a dyn ExternalProcedures,
    doc: &'a NamespaceDoc,
    /// caller → callees in this namespace, for the cycle check.
    calls: BTreeMap<String, BTreeSet<String>>,
}

impl Compiler<'_> {
    fn problem(&mut self, path: &str, message: String) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message,
        });
    }

    fn expr(&mut self, path: &str, src: Option<&str>) -> Option<Expr> {
        let src = src?;
        match Expr::compile(src) {
            Ok(e) => Some(e),
            Err(e) => {
                self.problem(path, e.to_string());
                None
            }
        }
    }

    fn schema(
        &mut self,
        path: &str,
        schema: Option<&serde_json::Value>,
    ) -> Option<jsonschema::Validator> {
        let schema = schema?;
        match jsonschema::validator_for(schema) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(path, format!("not a valid JSON Schema: {e}"));
                None
            }
        }
    }

    fn steps(
        &mut self,
        procedure: &str,
        path: &str,
        step_prefix: &str,
        docs: &[StepDoc],
        ids: &mut BTreeSet<String>,
    ) -> Vec<Step> {
        docs.iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let step_path = if step_prefix.is_empty() {
                    i.to_string()
                } else {
                    format!("{step_prefix}.{i}")
                };
                self.step(procedure, &format!("{path}[{i}]"), step_path, d, ids)
            })
            .collect()
    }

    fn step(
        &mut self,
        procedure: &str,
        path: &str,
        step_path: String,
        d: &StepDoc,
        ids: &mut BTreeSet<String>,
    ) -> Option<Step> {
        if let Some(id) = &d.id {
            if Name::parse(id.clone()).is_err() {
                self.problem(
                    &format!("{path}.id"),
                    format!("`{id}` is not a valid step id"),
                );
            } else if !ids.insert(id.clone()) {
                self.problem(
                    &format!("{path}.id"),
                    format!("step id `{id}` is used twice in this procedure"),
                );
            }
        }
        let kinds: Vec<&str> = [
            ("call", d.call.is_some()),
            ("procedure", d.procedure.is_some()),
            ("set", d.set.is_some()),
            ("for_each", d.for_each.is_some()),
            ("switch", d.switch.is_some()),
            ("try", d.r#try.is_some()),
            ("fail", d.fail.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, present)| present.then_some(k))
        .collect();
        if kinds.len() != 1 {
            self.problem(
                path,
                if kinds.is_empty() {
                    "a step needs exactly one of call, procedure, set, for_each, switch, try, fail"
                        .to_owned()
                } else {
                    format!(
                        "a step has exactly one kind, this one has {}",
                        kinds.join(", ")
                    )
                },
            );
            return None;
        }
        let when = self.expr(&format!("{path}.when"), d.when.as_deref());
        let input = self.expr(&format!("{path}.input"), d.input.as_deref());
        let save = self.expr(&format!("{path}.save"), d.save.as_deref());
        let retry = d.retry.as_ref().map(RetryDoc::to_backoff);
        let timeout = d.timeout_ms.map(Duration::from_millis);
        // Keys that belong to one kind only.
        let misplaced = |present: bool, key: &str, owner: &str| {
            (present && kinds[0] != owner).then(|| (key.to_owned(), owner.to_owned()))
        };
        for (key, owner) in [
            misplaced(d.r#as.is_some(), "as", "for_each"),
            misplaced(d.steps.is_some(), "steps", "for_each"),
            misplaced(d.cases.is_some(), "cases", "switch"),
            misplaced(d.default.is_some(), "default", "switch"),
            misplaced(d.catch.is_some(), "catch", "try"),
        ]
        .into_iter()
        .flatten()
        {
            self.problem(
                &format!("{path}.{key}"),
                format!("`{key}` belongs to a `{owner}` step"),
            );
        }
        let kind = match kinds[0] {
            "call" => {
                let target = d.call.clone().unwrap_or_default();
                let Some((provider, action)) = target.split_once('.') else {
                    self.problem(
                        &format!("{path}.call"),
                        format!("`{target}` must be `provider.action`"),
                    );
                    return None;
                };
                if let Err(m) = self.catalog.check_action(provider, action) {
                    self.problem(&format!("{path}.call"), m);
                }
                StepKind::Call {
                    provider: provider.to_owned(),
                    action: action.to_owned(),
                }
            }
            "procedure" => {
                let target = d.procedure.clone().unwrap_or_default();
                let (ns, name) = match target.split_once('.') {
                    Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
                    None => (None, target.clone()),
                };
                let same = ns.as_deref().is_none_or(|n| n == self.doc.namespace);
                let exists = if same {
                    self.doc.procedures.contains_key(&name)
                } else {
                    ns.as_deref()
                        .is_some_and(|n| self.external.exists(n, &name))
                };
                if !exists {
                    self.problem(
                        &format!("{path}.procedure"),
                        format!("procedure `{target}` does not exist"),
                    );
                }
                if same {
                    self.calls
                        .entry(procedure.to_owned())
                        .or_default()
                        .insert(name.clone());
                }
                let ns = match ns.filter(|_| !same).map(Name::parse) {
                    Some(Ok(n)) => Some(n),
                    Some(Err(e)) => {
                        self.problem(&format!("{path}.procedure"), e.to_string());
                        None
                    }
                    None => None,
                };
                match Name::parse(name) {
                    Ok(name) => StepKind::Procedure {
                        namespace: ns,
                        name,
                    },
                    Err(e) => {
                        self.problem(&format!("{path}.procedure"), e.to_string());
                        return None;
                    }
                }
            }
            "set" => {
                let mut vars = Vec::new();
                for (k, src) in d.set.iter().flatten() {
                    if Name::parse(k.clone()).is_err() {
                        self.problem(
                            &format!("{path}.set.{k}"),
                            format!("`{k}` is not a valid variable name"),
                        );
                    }
                    if let Some(e) = self.expr(&format!("{path}.set.{k}"), Some(src)) {
                        vars.push((k.clone(), e));
                    }
                }
                StepKind::Set(vars)
            }
            "for_each" => {
                let items = self.expr(&format!("{path}.for_each"), d.for_each.as_deref());
                let var = d.r#as.clone().unwrap_or_else(|| "item".to_owned());
                if matches!(
                    var.as_str(),
                    "input" | "steps" | "vars" | "caller" | "request" | "error"
                ) || Name::parse(var.clone()).is_err()
                {
                    self.problem(
                        &format!("{path}.as"),
                        format!("`{var}` cannot be a loop variable"),
                    );
                }
                let body = d.steps.as_deref().unwrap_or_default();
                if body.is_empty() {
                    self.problem(&format!("{path}.steps"), "for_each needs steps".into());
                }
                let steps = self.steps(
                    procedure,
                    &format!("{path}.steps"),
                    &format!("{step_path}.each"),
                    body,
                    ids,
                );
                StepKind::ForEach {
                    items: items?,
                    var,
                    steps,
                }
            }
            "switch" => {
                let on = self.expr(&format!("{path}.switch"), d.switch.as_deref());
                let mut cases = Vec::new();
                for (value, body) in d.cases.iter().flatten() {
                    let steps = self.steps(
                        procedure,
                        &format!("{path}.cases.{value}"),
                        &format!("{step_path}.case-{value}"),
                        body,
                        ids,
                    );
                    cases.push((value.clone(), steps));
                }
                let default = self.steps(
                    procedure,
                    &format!("{path}.default"),
                    &format!("{step_path}.default"),
                    d.default.as_deref().unwrap_or_default(),
                    ids,
                );
                StepKind::Switch {
                    on: on?,
                    cases,
                    default,
                }
            }
            "try" => {
                let body = self.steps(
                    procedure,
                    &format!("{path}.try"),
                    &format!("{step_path}.try"),
                    d.r#try.as_deref().unwrap_or_default(),
                    ids,
                );
                let catch = self.steps(
                    procedure,
                    &format!("{path}.catch"),
                    &format!("{step_path}.catch"),
                    d.catch.as_deref().unwrap_or_default(),
                    ids,
                );
                StepKind::Try { body, catch }
            }
            _ => {
                let f = d.fail.clone().unwrap_or_default();
                let message = self.expr(
                    &format!("{path}.fail.message"),
                    Some(f.message.as_deref().unwrap_or("\"failed\"")),
                );
                if f.code.is_empty() {
                    self.problem(&format!("{path}.fail.code"), "fail needs a code".into());
                }
                StepKind::Fail {
                    code: f.code,
                    message: message?,
                }
            }
        };
        Some(Step {
            id: d.id.clone(),
            path: step_path,
            when,
            input,
            save,
            retry,
            timeout,
            kind,
        })
    }

    /// Procedures calling each other in a cycle would recurse forever at run time.
    fn check_cycles(&mut self) {
        fn visit(
            node: &str,
            calls: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            found: &mut Vec<Vec<String>>,
        ) {
            if let Some(pos) = stack.iter().position(|n| n == node) {
                let mut cycle = stack[pos..].to_vec();
                cycle.push(node.to_owned());
                found.push(cycle);
                return;
            }
            if !done.insert(node.to_owned()) {
                return;
            }
            stack.push(node.to_owned());
            for next in calls.get(node).into_iter().flatten() {
                visit(next, calls, stack, done, found);
            }
            stack.pop();
        }
        let mut found = Vec::new();
        let mut done = BTreeSet::new();
        for start in self.calls.keys() {
            visit(start, &self.calls, &mut Vec::new(), &mut done, &mut found);
        }
        for cycle in found {
            self.problem(
                &format!("procedures.{}", cycle[0]),
                format!(
                    "procedures call each other in a cycle: {}",
                    cycle.join(" → ")
                ),
            );
        }
    }
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
mod tests;
