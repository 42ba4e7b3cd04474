//! Compilation of a namespace document: every expression and schema compiled once, and every
//! problem collected with its path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::doc::{self, NamespaceDoc, RetryDoc, StepDoc};
use super::{
    Catalog, ExternalProcedures, Namespace, Problem, Procedure, Step, StepKind, check_schema,
};
use crate::domain::Name;
use crate::jq::Expr;

/// Where a step sits: its procedure, its document path and its step path.
#[derive(Clone, Copy)]
struct At<'s> {
    procedure: &'s str,
    path: &'s str,
    step_path: &'s str,
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
        let sensitive_inputs = c.sensitive_inputs(&base, pdoc);
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
                    sensitive: !sensitive_inputs.is_empty()
                        || steps.iter().any(Step::any_sensitive),
                    sensitive_inputs,
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
        let kind = self.kind_of(path, d)?;
        let when = self.expr(&format!("{path}.when"), d.when.as_deref());
        let input = self.expr(&format!("{path}.input"), d.input.as_deref());
        let save = self.expr(&format!("{path}.save"), d.save.as_deref());
        let retry = d.retry.as_ref().map(RetryDoc::to_backoff);
        let timeout = d.timeout_ms.map(Duration::from_millis);
        self.misplaced_keys(path, d, kind);
        let at = At {
            procedure,
            path,
            step_path: &step_path,
        };
        let kind = match kind {
            "call" => self.call(path, d.call.as_deref().unwrap_or_default())?,
            "procedure" => self.procedure(at, d.procedure.as_deref().unwrap_or_default())?,
            "set" => self.set(path, d),
            "for_each" => self.for_each(at, d, ids)?,
            "switch" => self.switch(at, d, ids)?,
            "try" => StepKind::Try {
                body: self.block(at, "try", d.r#try.as_deref(), ids),
                catch: self.block(at, "catch", d.catch.as_deref(), ids),
            },
            _ => self.fail(path, d)?,
        };
        Some(Step {
            id: d.id.clone(),
            path: step_path,
            when,
            input,
            save,
            retry,
            timeout,
            sensitive: d.sensitive.unwrap_or(false),
            kind,
        })
    }

    /// The input properties `pdoc` marks `sensitive: true`; `sensitive` anywhere else in its
    /// schemas is a problem.
    fn sensitive_inputs(&mut self, base: &str, pdoc: &doc::ProcedureDoc) -> Vec<Vec<String>> {
        let mut found = Vec::new();
        if let Some(schema) = &pdoc.input_schema {
            let path = format!("{base}.input_schema");
            self.sensitive_properties(schema, &path, Some(&[]), &mut found);
        }
        if let Some(schema) = &pdoc.output_schema {
            let path = format!("{base}.output_schema");
            self.sensitive_properties(schema, &path, None, &mut Vec::new());
        }
        found
    }

    /// Collects the properties of an input schema marked `sensitive: true`. `prefix` is the
    /// property path of `schema` when it is the input's schema or a property's (reached through
    /// `properties` only), `None` elsewhere — where `sensitive` is a problem: the engine could
    /// not tell which value it marks.
    fn sensitive_properties(
        &mut self,
        schema: &serde_json::Value,
        path: &str,
        prefix: Option<&[String]>,
        found: &mut Vec<Vec<String>>,
    ) {
        match schema {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let here = format!("{path}.{k}");
                    match (k.as_str(), prefix) {
                        ("sensitive", Some(prefix)) => match v {
                            serde_json::Value::Bool(true) => found.push(prefix.to_vec()),
                            serde_json::Value::Bool(false) => {}
                            other => self.problem(
                                &here,
                                format!("`sensitive` is true or false, not {other}"),
                            ),
                        },
                        ("sensitive", None) => self.problem(
                            &here,
                            "`sensitive` marks the input schema or one of its properties \
                             (under `properties`, at any depth), nothing else"
                                .into(),
                        ),
                        ("properties", Some(prefix)) if v.is_object() => {
                            for (name, sub) in v.as_object().into_iter().flatten() {
                                let mut p = prefix.to_vec();
                                p.push(name.clone());
                                self.sensitive_properties(
                                    sub,
                                    &format!("{here}.{name}"),
                                    Some(&p),
                                    found,
                                );
                            }
                        }
                        // Values, not schemas: a `sensitive` key in them is data.
                        ("default" | "const" | "enum" | "examples", _) => {}
                        _ => self.sensitive_properties(v, &here, None, found),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    self.sensitive_properties(v, &format!("{path}[{i}]"), None, found);
                }
            }
            _ => {}
        }
    }

    /// The one kind key a step has; a step with none or several is a problem.
    fn kind_of(&mut self, path: &str, d: &StepDoc) -> Option<&'static str> {
        let kinds: Vec<&'static str> = [
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
        if let [one] = kinds[..] {
            return Some(one);
        }
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
        None
    }

    /// Keys that belong to one kind only, found on a step of another kind.
    fn misplaced_keys(&mut self, path: &str, d: &StepDoc, kind: &str) {
        let misplaced = |present: bool, key: &str, owner: &str| {
            (present && kind != owner).then(|| (key.to_owned(), owner.to_owned()))
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
    }

    fn call(&mut self, path: &str, target: &str) -> Option<StepKind> {
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
        Some(StepKind::Call {
            provider: provider.to_owned(),
            action: action.to_owned(),
        })
    }

    /// A `procedure` step: the callee must exist (in this document, or in another namespace's
    /// current version), and calls within the namespace feed the cycle check.
    fn procedure(&mut self, at: At<'_>, target: &str) -> Option<StepKind> {
        let path = at.path;
        let (ns, name) = match target.split_once('.') {
            Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
            None => (None, target.to_owned()),
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
                .entry(at.procedure.to_owned())
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
            Ok(name) => Some(StepKind::Procedure {
                namespace: ns,
                name,
            }),
            Err(e) => {
                self.problem(&format!("{path}.procedure"), e.to_string());
                None
            }
        }
    }

    fn set(&mut self, path: &str, d: &StepDoc) -> StepKind {
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

    fn for_each(
        &mut self,
        at: At<'_>,
        d: &StepDoc,
        ids: &mut BTreeSet<String>,
    ) -> Option<StepKind> {
        let path = at.path;
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
            at.procedure,
            &format!("{path}.steps"),
            &format!("{}.each", at.step_path),
            body,
            ids,
        );
        Some(StepKind::ForEach {
            items: items?,
            var,
            steps,
        })
    }

    fn switch(&mut self, at: At<'_>, d: &StepDoc, ids: &mut BTreeSet<String>) -> Option<StepKind> {
        let path = at.path;
        let on = self.expr(&format!("{path}.switch"), d.switch.as_deref());
        let mut cases = Vec::new();
        for (value, body) in d.cases.iter().flatten() {
            let steps = self.steps(
                at.procedure,
                &format!("{path}.cases.{value}"),
                &format!("{}.case-{value}", at.step_path),
                body,
                ids,
            );
            cases.push((value.clone(), steps));
        }
        let default = self.block(at, "default", d.default.as_deref(), ids);
        Some(StepKind::Switch {
            on: on?,
            cases,
            default,
        })
    }

    /// A nested block (`try`, `catch`, `default`): its document key is also its path segment.
    fn block(
        &mut self,
        at: At<'_>,
        key: &str,
        docs: Option<&[StepDoc]>,
        ids: &mut BTreeSet<String>,
    ) -> Vec<Step> {
        self.steps(
            at.procedure,
            &format!("{}.{key}", at.path),
            &format!("{}.{key}", at.step_path),
            docs.unwrap_or_default(),
            ids,
        )
    }

    fn fail(&mut self, path: &str, d: &StepDoc) -> Option<StepKind> {
        let f = d.fail.clone().unwrap_or_default();
        let message = self.expr(
            &format!("{path}.fail.message"),
            Some(f.message.as_deref().unwrap_or("\"failed\"")),
        );
        if f.code.is_empty() {
            self.problem(&format!("{path}.fail.code"), "fail needs a code".into());
        }
        Some(StepKind::Fail {
            code: f.code,
            message: message?,
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
