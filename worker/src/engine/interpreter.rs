//! The procedure interpreter: runs compiled steps against providers, logging per the
//! transaction model, and rolls back in reverse order on failure.
//!
//! Logging rule (compensating): a completed step's record — with its rollback data — is
//! durable before the next provider call starts. Records are written lazily, just before that
//! next call (or with the outcome, for the last step), so a procedure costs one group commit
//! per provider call rather than two.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use provisio_shared::domain::{PrincipalRef, TxModel};
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::procedure::{Namespace, Procedure, Step, StepKind};
use provisio_shared::provider::{Call, Executed, Participation, ProviderError, Rollback};
use provisio_shared::retry::{Attempt, retry};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::txlog::{LogError, LogSink, Record, StepRecord};
use provisio_providers::Registry;

/// Nested `procedure` steps deeper than this fail (cycles are rejected at apply time; this
/// bounds cross-namespace chains that validation cannot see whole).
const MAX_DEPTH: usize = 32;

/// Why a procedure (or one step of it) failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub step: Option<String>,
}

impl Failure {
    fn new(code: &str, message: impl Into<String>, step: &str) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            step: Some(step.to_owned()),
        }
    }
    pub fn to_json(&self) -> Value {
        let mut v = json!({"code": self.code, "message": self.message});
        if let Some(s) = &self.step {
            v["step"] = json!(s);
        }
        v
    }
}

impl From<LogError> for Failure {
    fn from(e: LogError) -> Self {
        let code = match e {
            LogError::Fenced(_) => FENCED,
            LogError::Bad(_) => SERVER_BAD,
            LogError::Unavailable(_) | LogError::Stopped => "txlog_unavailable",
        };
        Self {
            code: code.into(),
            message: e.to_string(),
            step: None,
        }
    }
}

/// The failure code of a run that lost its transaction (lease expired, recovery took over):
/// it must stop at once, roll back nothing that is logged, and write no outcome.
pub const FENCED: &str = "fenced";

/// The failure code of a run whose log server went on the bad-server list: it undoes every
/// call it made (nobody else can, while the server is away) and the request moves to another
/// server.
pub const SERVER_BAD: &str = "txlog_server_bad";

/// A completed call that rollback may have to undo.
#[derive(Debug, Clone)]
pub struct Completed {
    path: String,
    provider: String,
    action: String,
    data: Value,
}

/// Undoes calls whose completion never became durable, newest first, without logging (the
/// log is no longer ours to write). Used when a run is fenced: recovery undoes what the log
/// shows, and only this engine knows about these. Returns the paths it could not undo.
pub async fn compensate_unlogged(
    registry: &Registry,
    tx_id: Uuid,
    unlogged: &[Completed],
) -> Vec<String> {
    let mut failed = Vec::new();
    for c in unlogged.iter().rev() {
        let Some(provider) = registry.get(&c.provider).cloned() else {
            failed.push(c.path.clone());
            continue;
        };
        let rb = Rollback {
            tx_id,
            idempotency_key: format!("{tx_id}:{}", c.path),
            step_path: c.path.clone(),
            action: c.action.clone(),
            data: c.data.clone(),
        };
        if let Err(e) = rollback_with_retry(&provider, &rb).await {
            tracing::error!(%tx_id, path = %c.path, error = %e, "cannot undo an unlogged call of a fenced transaction");
            failed.push(c.path.clone());
        } else {
            tracing::warn!(%tx_id, path = %c.path, "undid an unlogged call of a fenced transaction");
        }
    }
    failed
}

/// One rollback call, retried with back-off; a panic counts as a permanent failure.
async fn rollback_with_retry(
    provider: &Arc<dyn provisio_shared::provider::Provider>,
    rb: &Rollback,
) -> Result<(), ProviderError> {
    let policy = provisio_shared::retry::Backoff::attempts(
        5,
        Duration::from_millis(50),
        Duration::from_secs(2),
    );
    retry(&policy, |_| {
        let (provider, rb) = (provider.clone(), rb);
        async move {
            match AssertUnwindSafe(provider.rollback(rb)).catch_unwind().await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if e.retryable => Err(Attempt::Retry(e)),
                Ok(Err(e)) => Err(Attempt::Stop(e)),
                Err(_) => Err(Attempt::Stop(ProviderError::permanent(
                    "provider_panic",
                    "provider panicked in rollback",
                ))),
            }
        }
    })
    .await
}

/// The outcome of a run, before it is committed.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Value, Failure>,
    /// Rollback could not complete: the transaction is in doubt.
    pub rollback_failed: bool,
    pub rolled_back: usize,
    /// Steps whose rollback failed (path, provider, action, error): what an operator must undo.
    pub not_undone: Vec<Value>,
    /// Some procedure that ran (nested ones included) is marked for audit.
    pub marked: bool,
    /// The audit data of procedures with an `audit:` expression.
    pub audit_data: Vec<Value>,
    /// The transaction was taken from this engine: write no outcome; the request runs again.
    pub fenced: bool,
    /// The transaction's log server went bad and every call was undone: the request is to run
    /// again on another server.
    pub rerouted: bool,
    /// Step records not yet written; they go into the outcome's commit.
    pub pending: Vec<StepRecord>,
    /// Completed calls whose records are only in `pending`: to undo if the outcome is fenced.
    pub unlogged: Vec<Completed>,
    /// Completed calls whose records are durable (not undone): with `unlogged`, what the
    /// engine must undo itself if the log server goes bad before the outcome is written.
    pub logged: Vec<Completed>,
    pub summary: Vec<Value>,
}

pub struct Run<'a> {
    pub tx_id: Uuid,
    pub model: TxModel,
    pub registry: &'a Registry,
    pub txlog: &'a dyn LogSink,
    pub namespaces: &'a NamespaceCache,
    pub principal: Option<PrincipalRef>,
    pub credentials: Option<Value>,
    pub request: Value,
    pub validate_schemas: bool,
    completed: Vec<Completed>,
    /// `completed[..logged]` are durable in the log.
    logged: usize,
    owner: Arc<str>,
    lease_lost: Option<Arc<AtomicBool>>,
    /// Some procedure that ran (nested ones included) is marked for audit.
    marked: bool,
    /// `namespace.procedure` of the procedures being run, innermost last.
    running: Vec<String>,
    /// What `audit:` expressions gave, in the order their procedures ended.
    audit_data: Vec<Value>,
    seq: i32,
    pending: Vec<StepRecord>,
    summary: Vec<Value>,
    /// Two-phase participants of this transaction (providers holding effects open).
    participants: std::collections::BTreeSet<String>,
    pause_after_prepare: Option<Duration>,
}

/// Variables visible to expressions in one procedure invocation.
#[derive(Debug, Clone, Default)]
struct Scope {
    input: Value,
    steps: Map<String, Value>,
    vars: Map<String, Value>,
    locals: Vec<(String, Value)>,
    error: Option<Value>,
}

impl<'a> Run<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tx_id: Uuid,
        owner: Arc<str>,
        model: TxModel,
        registry: &'a Registry,
        txlog: &'a dyn LogSink,
        namespaces: &'a NamespaceCache,
        principal: Option<PrincipalRef>,
        credentials: Option<Value>,
        request: Value,
        validate_schemas: bool,
    ) -> Self {
        Self {
            tx_id,
            model,
            registry,
            txlog,
            namespaces,
            principal,
            credentials,
            request,
            validate_schemas,
            completed: Vec::new(),
            logged: 0,
            owner,
            lease_lost: None,
            marked: false,
            running: Vec::new(),
            audit_data: Vec::new(),
            seq: 0,
            pending: Vec::new(),
            summary: Vec::new(),
            participants: std::collections::BTreeSet::new(),
            pause_after_prepare: None,
        }
    }

    /// The flag the lease keeper raises when this transaction's lease could not be renewed
    /// (taken over): the run then starts no further call.
    #[must_use]
    pub fn with_lease_flag(mut self, lost: Arc<AtomicBool>) -> Self {
        self.lease_lost = Some(lost);
        self
    }

    fn check_lease(&self) -> Result<(), Failure> {
        if self
            .lease_lost
            .as_ref()
            .is_some_and(|l| l.load(Ordering::Relaxed))
        {
            return Err(Failure::from(LogError::Fenced(self.tx_id)));
        }
        Ok(())
    }

    /// Fault injection for tests: pause between prepare and the commit decision.
    #[must_use]
    pub fn with_pause_after_prepare(mut self, pause: Option<Duration>) -> Self {
        self.pause_after_prepare = pause;
        self
    }

    /// Runs `procedure` with `input`; on failure rolls back everything completed.
    pub async fn execute(
        mut self,
        ns: &Arc<Namespace>,
        procedure: &Procedure,
        input: Value,
    ) -> Outcome {
        let mut result = self.invoke(ns.clone(), procedure, input, "", 0).await;
        let mut rollback_failed = false;
        let mut rolled_back = 0;
        let mut not_undone = Vec::new();
        if result.is_ok() && self.model == TxModel::TwoPhase {
            match self.two_phase_commit().await {
                Ok(()) => {}
                Err((f, false)) => result = Err(f),
                Err((f, true)) => {
                    // The decision was logged: the transaction must commit; recovery finishes it.
                    return self.outcome(Err(f), true, 0, Vec::new(), false);
                }
            }
        }
        let fenced = |r: &Result<Value, Failure>| r.as_ref().is_err_and(|f| f.code == FENCED);
        let bad = |r: &Result<Value, Failure>| r.as_ref().is_err_and(|f| f.code == SERVER_BAD);
        if result.is_err() && self.model != TxModel::Read && !fenced(&result) && !bad(&result) {
            match self.rollback_to(0).await {
                Ok((n, failed)) => {
                    rolled_back = n;
                    if !failed.is_empty() {
                        rollback_failed = true;
                        not_undone = failed;
                    }
                }
                Err(f) if f.code == FENCED || f.code == SERVER_BAD => result = Err(f),
                Err(_) => rollback_failed = true,
            }
            if self.model == TxModel::TwoPhase
                && !fenced(&result)
                && !bad(&result)
                && !self.abort_participants().await
            {
                rollback_failed = true;
            }
        }
        if bad(&result) {
            // The log server is gone for now: nobody else can undo these calls until it is
            // back, so this engine undoes all of them (recovery may repeat the logged ones
            // later; rollbacks are idempotent), and the request is run again elsewhere.
            let all = std::mem::take(&mut self.completed);
            self.logged = 0;
            let failed = compensate_unlogged(self.registry, self.tx_id, &all).await;
            if self.model == TxModel::TwoPhase {
                self.abort_participants().await;
            }
            let mut o = self.outcome(
                result,
                !failed.is_empty(),
                all.len() - failed.len(),
                Vec::new(),
                false,
            );
            o.rerouted = failed.is_empty();
            return o;
        }
        if fenced(&result) {
            // Recovery owns the transaction now and undoes what the log shows; what only this
            // engine knows about (completed calls not yet logged) it undoes itself.
            let unlogged = self
                .completed
                .split_off(self.logged.min(self.completed.len()));
            let failed = compensate_unlogged(self.registry, self.tx_id, &unlogged).await;
            if !failed.is_empty() {
                tracing::error!(tx_id = %self.tx_id, ?failed, "a fenced transaction left calls that could not be undone");
            }
            return self.outcome(result, false, 0, Vec::new(), true);
        }
        self.outcome(result, rollback_failed, rolled_back, not_undone, false)
    }

    fn outcome(
        &mut self,
        result: Result<Value, Failure>,
        rollback_failed: bool,
        rolled_back: usize,
        not_undone: Vec<Value>,
        fenced: bool,
    ) -> Outcome {
        let unlogged = self
            .completed
            .split_off(self.logged.min(self.completed.len()));
        let logged = std::mem::take(&mut self.completed);
        Outcome {
            result,
            rollback_failed,
            rolled_back,
            not_undone,
            marked: self.marked,
            audit_data: std::mem::take(&mut self.audit_data),
            fenced,
            rerouted: false,
            pending: std::mem::take(&mut self.pending),
            unlogged,
            logged,
            summary: std::mem::take(&mut self.summary),
        }
    }

    fn invoke<'b>(
        &'b mut self,
        ns: Arc<Namespace>,
        procedure: &'b Procedure,
        input: Value,
        prefix: &'b str,
        depth: usize,
    ) -> BoxFuture<'b, Result<Value, Failure>> {
        Box::pin(async move {
            let where_ = if prefix.is_empty() {
                procedure.name.as_str()
            } else {
                prefix
            };
            if self.validate_schemas
                && depth > 0
                && let Some(schema) = &procedure.input_schema
                && let Some(e) = schema.iter_errors(&input).next()
            {
                return Err(Failure::new(
                    "input_invalid",
                    format!("{}: {e}", e.instance_path()),
                    where_,
                ));
            }
            let mut scope = Scope {
                input,
                ..Scope::default()
            };
            self.marked |= procedure.audit;
            let qualified = format!("{}.{}", procedure.namespace, procedure.name);
            self.running.push(qualified.clone());
            let ran = self
                .run_steps(&ns, &procedure.steps, &mut scope, prefix, depth)
                .await;
            self.running.pop();
            ran?;
            let output = match &procedure.output {
                Some(e) => e.eval_one(&self.context(&scope)).map_err(|e| {
                    Failure::new(
                        "expression_failed",
                        e.to_string(),
                        &format!("{where_}.output"),
                    )
                })?,
                None => Value::Null,
            };
            if self.validate_schemas
                && let Some(schema) = &procedure.output_schema
                && let Some(e) = schema.iter_errors(&output).next()
            {
                return Err(Failure::new(
                    "output_invalid",
                    format!(
                        "output does not match the output schema at `{}`: {e}",
                        e.instance_path()
                    ),
                    where_,
                ));
            }
            if let Some(expr) = &procedure.audit_data {
                let mut ctx = self.context(&scope);
                ctx["output"] = output.clone();
                let data = expr.eval_one(&ctx).map_err(|e| {
                    Failure::new(
                        "expression_failed",
                        e.to_string(),
                        &format!("{where_}.audit"),
                    )
                })?;
                self.audit_data
                    .push(json!({"procedure": qualified, "path": prefix, "data": data}));
            }
            Ok(output)
        })
    }

    fn context(&self, scope: &Scope) -> Value {
        let mut m = Map::new();
        m.insert("input".into(), scope.input.clone());
        m.insert("steps".into(), Value::Object(scope.steps.clone()));
        m.insert("vars".into(), Value::Object(scope.vars.clone()));
        m.insert(
            "caller".into(),
            self.principal
                .as_ref()
                .map_or(Value::Null, |p| json!({"id": p.id, "name": p.name})),
        );
        m.insert("request".into(), self.request.clone());
        for (k, v) in &scope.locals {
            m.insert(k.clone(), v.clone());
        }
        if let Some(e) = &scope.error {
            m.insert("error".into(), e.clone());
        }
        Value::Object(m)
    }

    fn run_steps<'b>(
        &'b mut self,
        ns: &'b Arc<Namespace>,
        steps: &'b [Step],
        scope: &'b mut Scope,
        prefix: &'b str,
        depth: usize,
    ) -> BoxFuture<'b, Result<(), Failure>> {
        Box::pin(async move {
            for (i, step) in steps.iter().enumerate() {
                let path = if prefix.is_empty() {
                    i.to_string()
                } else {
                    format!("{prefix}.{i}")
                };
                self.run_step(ns, step, scope, &path, depth).await?;
            }
            Ok(())
        })
    }

    async fn run_step(
        &mut self,
        ns: &Arc<Namespace>,
        step: &Step,
        scope: &mut Scope,
        path: &str,
        depth: usize,
    ) -> Result<(), Failure> {
        let expr_err = |what: &str, e: &dyn std::fmt::Display| {
            Failure::new("expression_failed", format!("{what}: {e}"), path)
        };
        if let Some(when) = &step.when {
            let go = when
                .eval_bool(&self.context(scope))
                .map_err(|e| expr_err("when", &e))?;
            if !go {
                self.summary
                    .push(json!({"path": path, "id": step.id, "status": "skipped"}));
                return Ok(());
            }
        }
        let input = || -> Result<Value, Failure> {
            match &step.input {
                Some(e) => e
                    .eval_one(&self.context(scope))
                    .map_err(|e| expr_err("input", &e)),
                None => Ok(scope.input.clone()),
            }
        };
        let result: Option<Value> = match &step.kind {
            StepKind::Call { provider, action } => {
                let input = input()?;
                let executed = self
                    .call(provider, action, input.clone(), step, path)
                    .await?;
                let mut out = executed.output;
                if let Some(save) = &step.save {
                    let mut ctx = self.context(scope);
                    ctx["result"] = out;
                    out = save.eval_one(&ctx).map_err(|e| expr_err("save", &e))?;
                }
                Some(out)
            }
            StepKind::Procedure { namespace, name } => {
                if depth + 1 > MAX_DEPTH {
                    return Err(Failure::new(
                        "too_deep",
                        format!("procedures nested deeper than {MAX_DEPTH}"),
                        path,
                    ));
                }
                let input = input()?;
                let target_ns = match namespace {
                    None => ns.clone(),
                    Some(other) => self
                        .namespaces
                        .current(other.as_str())
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
                let proc_ = target_ns
                    .procedures
                    .get(name.as_str())
                    .cloned()
                    .ok_or_else(|| {
                        Failure::new(
                            "unknown_procedure",
                            format!("procedure `{name}` does not exist"),
                            path,
                        )
                    })?;
                let nested_prefix = format!("{path}>{name}");
                let mut out = self
                    .invoke(target_ns, &proc_, input, &nested_prefix, depth + 1)
                    .await?;
                if let Some(save) = &step.save {
                    let mut ctx = self.context(scope);
                    ctx["result"] = out;
                    out = save.eval_one(&ctx).map_err(|e| expr_err("save", &e))?;
                }
                Some(out)
            }
            StepKind::Set(vars) => {
                for (k, e) in vars {
                    let v = e
                        .eval_one(&self.context(scope))
                        .map_err(|e| expr_err(&format!("set.{k}"), &e))?;
                    scope.vars.insert(k.clone(), v);
                }
                None
            }
            StepKind::ForEach { items, var, steps } => {
                let list = items
                    .eval_one(&self.context(scope))
                    .map_err(|e| expr_err("for_each", &e))?;
                let Value::Array(list) = list else {
                    return Err(Failure::new(
                        "expression_failed",
                        format!("for_each needs an array, got {list}"),
                        path,
                    ));
                };
                let mut results = Vec::with_capacity(list.len());
                for (k, item) in list.into_iter().enumerate() {
                    let before: Vec<String> = scope.steps.keys().cloned().collect();
                    scope.locals.push((var.clone(), item));
                    let r = self
                        .run_steps(ns, steps, scope, &format!("{path}[{k}]"), depth)
                        .await;
                    scope.locals.pop();
                    let mine: Map<String, Value> = scope
                        .steps
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
                Some(Value::Array(results))
            }
            StepKind::Switch { on, cases, default } => {
                let v = on
                    .eval_one(&self.context(scope))
                    .map_err(|e| expr_err("switch", &e))?;
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
                let mark = self.completed.len();
                let r = self
                    .run_steps(ns, body, scope, &format!("{path}.try"), depth)
                    .await;
                if let Err(failure) = r {
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
                        .run_steps(ns, catch, scope, &format!("{path}.catch"), depth)
                        .await;
                    scope.error = saved;
                    r?;
                }
                None
            }
            StepKind::Fail { code, message } => {
                let msg = message
                    .eval_one(&self.context(scope))
                    .map_err(|e| expr_err("fail.message", &e))?;
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

    /// Prepare every participant, log the decision, commit every participant. The error says
    /// whether the decision had been logged (then the transaction must still commit).
    async fn two_phase_commit(&mut self) -> Result<(), (Failure, bool)> {
        self.flush().await.map_err(|f| (f, false))?;
        if self.participants.is_empty() {
            return Ok(());
        }
        let participants: Vec<String> = self.participants.iter().cloned().collect();
        for name in &participants {
            let Some(p) = self.registry.get(name).cloned() else {
                continue;
            };
            if let Err(e) = p.prepare(self.tx_id).await {
                return Err((
                    Failure::new("prepare_failed", format!("{name}: {e}"), "prepare"),
                    false,
                ));
            }
        }
        self.txlog
            .write_record(Record::Status {
                tx_id: self.tx_id,
                status: "prepared",
                owner: self.owner.clone(),
            })
            .await
            .map_err(|e| (Failure::from(e), false))?;
        if let Some(pause) = self.pause_after_prepare {
            tracing::warn!(tx_id = %self.tx_id, ?pause, "fault injection: pausing between prepare and commit");
            tokio::time::sleep(pause).await;
        }
        // The decision. Once durable, every participant must commit, whatever happens.
        self.txlog
            .write_record(Record::Status {
                tx_id: self.tx_id,
                status: "committing",
                owner: self.owner.clone(),
            })
            .await
            .map_err(|e| (Failure::from(e), false))?;
        for name in &participants {
            let Some(p) = self.registry.get(name).cloned() else {
                continue;
            };
            let policy = provisio_shared::retry::Backoff::attempts(
                5,
                Duration::from_millis(50),
                Duration::from_secs(2),
            );
            let r = retry(&policy, |_| {
                let p = p.clone();
                let tx = self.tx_id;
                async move { p.commit(tx).await.map_err(Attempt::Retry) }
            })
            .await;
            if let Err(e) = r {
                return Err((
                    Failure::new("commit_failed", format!("{name}: {e}"), "commit"),
                    true,
                ));
            }
        }
        Ok(())
    }

    /// Discards every participant's pending or prepared effects; false if one could not.
    async fn abort_participants(&mut self) -> bool {
        let mut ok = true;
        for name in std::mem::take(&mut self.participants) {
            let Some(p) = self.registry.get(&name).cloned() else {
                continue;
            };
            if let Err(e) = p.abort(self.tx_id).await {
                tracing::error!(provider = %name, error = %e, "two-phase abort failed");
                ok = false;
            } else {
                self.summary
                    .push(json!({"path": format!("abort:{name}"), "status": "rolled_back"}));
            }
        }
        ok
    }

    /// Makes pending step records durable (before the next provider call), all in one commit.
    async fn flush(&mut self) -> Result<(), Failure> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending);
        self.txlog.write_record(Record::Steps(records)).await?;
        self.logged = self.completed.len();
        Ok(())
    }

    fn step_record(
        &mut self,
        kind: &'static str,
        path: &str,
        provider: &str,
        action: &str,
    ) -> StepRecord {
        let seq = self.next_seq();
        StepRecord {
            tx_id: self.tx_id,
            seq,
            kind,
            path: path.to_owned(),
            provider: Some(provider.to_owned()),
            action: Some(action.to_owned()),
            input: None,
            output: None,
            rollback_data: None,
            error: None,
            owner: self.owner.clone(),
            procedure: self.running.last().cloned(),
        }
    }

    fn next_seq(&mut self) -> i32 {
        self.seq += 1;
        self.seq
    }

    async fn call(
        &mut self,
        provider_name: &str,
        action: &str,
        input: Value,
        step: &Step,
        path: &str,
    ) -> Result<Executed, Failure> {
        let provider = self.registry.get(provider_name).cloned().ok_or_else(|| {
            Failure::new(
                "unknown_provider",
                format!("provider `{provider_name}` is not available on this engine"),
                path,
            )
        })?;
        if self.model != TxModel::Read {
            // The intent goes into the same commit as the previous step's completion: if this
            // engine dies during the call, recovery knows a call may have happened and undoes it.
            let mut intent = self.step_record("intent", path, provider_name, action);
            intent.input = Some(input.clone());
            self.pending.push(intent);
            self.flush().await?;
            self.check_lease()?;
        }
        if self.model == TxModel::TwoPhase && provider.supports_two_phase() {
            // A participant from its first call on, so that abort also cleans up a failed one.
            self.participants.insert(provider_name.to_owned());
        }
        let call = Call {
            tx_id: self.tx_id,
            idempotency_key: format!("{}:{path}", self.tx_id),
            step_path: path.to_owned(),
            action: action.to_owned(),
            input: input.clone(),
            caller: self.principal.clone(),
            credentials: self.credentials.clone(),
            participation: if self.model == TxModel::TwoPhase {
                Participation::TwoPhase
            } else {
                Participation::Compensating
            },
        };
        let started = Instant::now();
        let timeout = step.timeout;
        let attempt = |_: u32| {
            let (provider, call) = (provider.clone(), &call);
            async move {
                let fut = AssertUnwindSafe(provider.execute(call)).catch_unwind();
                let r = match timeout {
                    Some(t) => match tokio::time::timeout(t, fut).await {
                        Ok(r) => r,
                        Err(_) => Ok(Err(ProviderError::retryable(
                            "timeout",
                            format!("no answer within {} ms", t.as_millis()),
                        ))),
                    },
                    None => fut.await,
                };
                match r {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) if e.retryable => {
                        metrics::counter!(provisio_shared::metrics::STEP_RETRIES, "provider" => provider.name().to_owned()).increment(1);
                        Err(Attempt::Retry(e))
                    }
                    Ok(Err(e)) => Err(Attempt::Stop(e)),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".to_owned());
                        tracing::error!(provider = provider.name(), panic = %what, "provider panicked");
                        Err(Attempt::Stop(ProviderError::permanent(
                            "provider_panic",
                            format!("provider panicked: {what}"),
                        )))
                    }
                }
            }
        };
        let policy = step.retry.clone().unwrap_or_else(|| {
            provisio_shared::retry::Backoff::attempts(
                1,
                Duration::from_millis(1),
                Duration::from_millis(1),
            )
        });
        let r = retry(&policy, attempt).await;
        metrics::histogram!(provisio_shared::metrics::STEP_DURATION,
            "provider" => provider_name.to_owned())
        .record(started.elapsed().as_secs_f64());
        let outcome = if r.is_ok() { "ok" } else { "error" };
        metrics::counter!(provisio_shared::metrics::PROVIDER_CALLS,
            "provider" => provider_name.to_owned(), "action" => action.to_owned(), "outcome" => outcome)
        .increment(1);
        match r {
            Ok(executed) => {
                self.summary.push(json!({"path": path, "id": step.id, "call": format!("{provider_name}.{action}"), "status": "done"}));
                if self.model != TxModel::Read {
                    let mut rec = self.step_record("execute", path, provider_name, action);
                    rec.input = Some(input);
                    rec.output = Some(executed.output.clone());
                    rec.rollback_data.clone_from(&executed.rollback);
                    self.pending.push(rec);
                    // Two-phase participants are undone by `abort`, not call by call.
                    let held_open =
                        self.model == TxModel::TwoPhase && provider.supports_two_phase();
                    if let (false, Some(data)) = (held_open, &executed.rollback) {
                        self.completed.push(Completed {
                            path: path.to_owned(),
                            provider: provider_name.to_owned(),
                            action: action.to_owned(),
                            data: data.clone(),
                        });
                    }
                }
                Ok(executed)
            }
            Err(e) => {
                self.summary.push(json!({"path": path, "id": step.id, "call": format!("{provider_name}.{action}"), "status": "failed", "error": e.code}));
                if self.model != TxModel::Read {
                    // The intent is settled: the call failed and cleaned up after itself.
                    let mut rec = self.step_record("error", path, provider_name, action);
                    rec.error = Some(json!({"code": e.code, "message": e.message}));
                    self.pending.push(rec);
                }
                Err(Failure::new(&e.code, e.message, path))
            }
        }
    }

    /// Rolls back completed calls after `mark`, newest first, each rollback logged. A rollback
    /// that fails does not stop the walk: older steps are still undone. Returns how many were
    /// undone and what could not be (the transaction is then in doubt); `Err` only when the log
    /// cannot be written (or the transaction is no longer ours).
    async fn rollback_to(&mut self, mark: usize) -> Result<(usize, Vec<Value>), Failure> {
        self.flush().await?;
        let mut n = 0;
        let mut failed = Vec::new();
        while self.completed.len() > mark {
            self.check_lease()?;
            let Some(c) = self.completed.pop() else { break };
            self.logged = self.logged.min(self.completed.len());
            let r = match self.registry.get(&c.provider).cloned() {
                Some(provider) => {
                    let rb = Rollback {
                        tx_id: self.tx_id,
                        idempotency_key: format!("{}:{}", self.tx_id, c.path),
                        step_path: c.path.clone(),
                        action: c.action.clone(),
                        data: c.data.clone(),
                    };
                    rollback_with_retry(&provider, &rb).await
                }
                None => Err(ProviderError::permanent(
                    "unknown_provider",
                    format!("cannot roll back: provider `{}` missing", c.provider),
                )),
            };
            let error = r
                .as_ref()
                .err()
                .map(|e| json!({"code": e.code, "message": e.message}));
            let mut rec = self.step_record("rollback", &c.path, &c.provider, &c.action);
            rec.input = Some(c.data.clone());
            rec.error.clone_from(&error);
            self.txlog.write_record(Record::Steps(vec![rec])).await?;
            if let Err(e) = r {
                tracing::error!(path = %c.path, error = %e, "rollback failed; going on with the older steps");
                failed.push(json!({"path": c.path, "provider": c.provider, "action": c.action, "error": error}));
                self.summary
                    .push(json!({"path": c.path, "status": "rollback_failed"}));
                continue;
            }
            self.summary
                .push(json!({"path": c.path, "status": "rolled_back"}));
            n += 1;
        }
        Ok((n, failed))
    }
}

#[cfg(test)]
#[path = "interpreter_tests.rs"]
mod tests;
