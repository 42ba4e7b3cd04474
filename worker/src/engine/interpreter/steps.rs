//! One step of a procedure, by kind: a provider call, a nested procedure, `set`, `for_each`,
//! `switch`, `try`/`catch` and `fail`.

use std::sync::Arc;

use provisio_shared::domain::TxModel;
use provisio_shared::jq::Expr;
use provisio_shared::procedure::{Namespace, Step, StepKind};
use serde_json::{Map, Value, json};

use super::{FENCED, Failure, MAX_DEPTH, Run, Scope};

/// Where a step sits: its namespace, its path in the step tree and its nesting depth.
#[derive(Clone, Copy)]
struct At<'s> {
    ns: &'s Arc<Namespace>,
    path: &'s str,
    depth: usize,
}

fn expr_err(path: &str, what: &str, e: &dyn std::fmt::Display) -> Failure {
    Failure::new("expression_failed", format!("{what}: {e}"), path)
}

impl Run<'_> {
    pub(super) async fn run_step(
        &mut self,
        ns: &Arc<Namespace>,
        step: &Step,
        scope: &mut Scope,
        path: &str,
        depth: usize,
    ) -> Result<(), Failure> {
        let at = At { ns, path, depth };
        if let Some(when) = &step.when {
            let go = when
                .eval_fields_bool(self.fields(scope))
                .map_err(|e| expr_err(path, "when", &e))?;
            if !go {
                self.summary
                    .push(json!({"path": path, "id": step.id, "status": "skipped"}));
                return Ok(());
            }
        }
        let result: Option<Value> = match &step.kind {
            StepKind::Call { provider, action } => {
                let input = self.step_input(step, scope, path)?;
                let executed = self.call(provider, action, input, step, path).await?;
                Some(self.save(step, scope, executed.output, path)?)
            }
            StepKind::Procedure { namespace, name } => {
                let out = self
                    .nested(
                        at,
                        step,
                        scope,
                        namespace
                            .as_ref()
                            .map(provisio_shared::domain::Name::as_str),
                        name.as_str(),
                    )
                    .await?;
                Some(self.save(step, scope, out, path)?)
            }
            StepKind::Set(vars) => {
                for (k, e) in vars {
                    let v = e
                        .eval_fields(self.fields(scope))
                        .map_err(|e| expr_err(path, &format!("set.{k}"), &e))?;
                    scope.vars.insert(k.clone(), v);
                }
                None
            }
            StepKind::ForEach { items, var, steps } => {
                Some(self.for_each(at, scope, items, var, steps).await?)
            }
            StepKind::Switch { on, cases, default } => {
                let v = on
                    .eval_fields(self.fields(scope))
                    .map_err(|e| expr_err(path, "switch", &e))?;
                let key = match &v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let (label, body) = cases
                    .iter()
                    .find(|(c, _)| *c == key)
                    .map_or(("default".to_owned(), default), |(c, b)| {
                        (format!("case-{c}"), b)
                    });
                self.run_steps(ns, body, scope, &format!("{path}.{label}"), depth)
                    .await?;
                None
            }
            StepKind::Try { body, catch } => {
                self.try_catch(at, scope, body, catch).await?;
                None
            }
            StepKind::Fail { code, message } => {
                let msg = message
                    .eval_fields(self.fields(scope))
                    .map_err(|e| expr_err(path, "fail.message", &e))?;
                let msg = match msg {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                return Err(Failure::new(code, msg, path));
            }
        };
        if let (Some(id), Some(v)) = (&step.id, result) {
            scope.steps.insert(id.clone(), v);
        }
        Ok(())
    }

    /// The step's `input` expression, or the procedure's own input when it has none.
    fn step_input(&self, step: &Step, scope: &Scope, path: &str) -> Result<Value, Failure> {
        match &step.input {
            Some(e) => e
                .eval_fields(self.fields(scope))
                .map_err(|e| expr_err(path, "input", &e)),
            None => Ok(scope.input.clone()),
        }
    }

    /// Applies the step's `save` expression (with the raw answer as `.result`), if any.
    fn save(&self, step: &Step, scope: &Scope, out: Value, path: &str) -> Result<Value, Failure> {
        let Some(save) = &step.save else {
            return Ok(out);
        };
        let mut ctx = self.fields(scope);
        ctx.value("result", &out);
        save.eval_fields(ctx)
            .map_err(|e| expr_err(path, "save", &e))
    }

    /// A `procedure` step: looks the procedure up (in another namespace's current version when
    /// named) and runs it as part of this transaction.
    async fn nested(
        &mut self,
        at: At<'_>,
        step: &Step,
        scope: &Scope,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Failure> {
        let path = at.path;
        if at.depth + 1 > MAX_DEPTH {
            return Err(Failure::new(
                "too_deep",
                format!("procedures nested deeper than {MAX_DEPTH}"),
                path,
            ));
        }
        let input = self.step_input(step, scope, path)?;
        let target_ns = match namespace {
            None => at.ns.clone(),
            Some(other) => self
                .namespaces
                .current(other)
                .await
                .map_err(|e| Failure::new("unavailable", e.to_string(), path))?
                .ok_or_else(|| {
                    Failure::new(
                        "unknown_procedure",
                        format!("namespace `{other}` does not exist"),
                        path,
                    )
                })?,
        };
        let proc_ = target_ns.procedures.get(name).cloned().ok_or_else(|| {
            Failure::new(
                "unknown_procedure",
                format!("procedure `{name}` does not exist"),
                path,
            )
        })?;
        let nested_prefix = format!("{path}>{name}");
        self.invoke(target_ns, &proc_, input, &nested_prefix, at.depth + 1)
            .await
    }

    /// A `for_each` step: runs the body once per item; each iteration's step results are
    /// collected into one object and removed from the scope again, so iterations do not see
    /// each other's results.
    async fn for_each(
        &mut self,
        at: At<'_>,
        scope: &mut Scope,
        items: &Expr,
        var: &str,
        steps: &[Step],
    ) -> Result<Value, Failure> {
        let path = at.path;
        let list = items
            .eval_fields(self.fields(scope))
            .map_err(|e| expr_err(path, "for_each", &e))?;
        let Value::Array(list) = list else {
            return Err(Failure::new(
                "expression_failed",
                format!("for_each needs an array, got {list}"),
                path,
            ));
        };
        let mut results = Vec::with_capacity(list.len());
        for (k, item) in list.into_iter().enumerate() {
            let before: Vec<String> = scope.steps.values().keys().cloned().collect();
            scope.locals.push((var.to_owned(), item));
            let r = self
                .run_steps(at.ns, steps, scope, &format!("{path}[{k}]"), at.depth)
                .await;
            scope.locals.pop();
            let mine: Map<String, Value> = scope
                .steps
                .values()
                .iter()
                .filter(|(key, _)| !before.contains(key))
                .map(|(key, v)| (key.clone(), v.clone()))
                .collect();
            for key in mine.keys() {
                scope.steps.remove(key);
            }
            r?;
            results.push(Value::Object(mine));
        }
        Ok(Value::Array(results))
    }

    /// A `try` step: a failing body is rolled back to where the block began, then `catch`
    /// runs with the failure as `.error`. A fenced run never catches: it must stop.
    async fn try_catch(
        &mut self,
        at: At<'_>,
        scope: &mut Scope,
        body: &[Step],
        catch: &[Step],
    ) -> Result<(), Failure> {
        let path = at.path;
        let mark = self.completed.len();
        let r = self
            .run_steps(at.ns, body, scope, &format!("{path}.try"), at.depth)
            .await;
        let Err(failure) = r else {
            return Ok(());
        };
        if failure.code == FENCED {
            return Err(failure);
        }
        if self.model != TxModel::Read {
            let (_, failed) = self.rollback_to(mark).await?;
            if !failed.is_empty() {
                return Err(Failure {
                    code: "rollback_failed".into(),
                    message: format!(
                        "rolling back the try block failed: {}",
                        Value::Array(failed)
                    ),
                    step: Some(path.to_owned()),
                });
            }
        }
        let saved = scope.error.replace(failure.to_json());
        let r = self
            .run_steps(at.ns, catch, scope, &format!("{path}.catch"), at.depth)
            .await;
        scope.error = saved;
        r
    }
}
