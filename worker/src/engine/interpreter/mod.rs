//! The procedure interpreter: runs compiled steps against providers, logging per the
//! transaction model, and rolls back in reverse order on failure.
//!
//! Logging rule (compensating): a completed step's record — with its rollback data — is
//! durable before the next provider call starts. Records are written lazily, just before that
//! next call (or with the outcome, for the last step), so a procedure costs one group commit
//! per provider call rather than two.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use provisio_shared::domain::{PrincipalRef, TxModel};
use provisio_shared::jq::{Converted, Fields};
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::procedure::{Namespace, Procedure, Step};
use provisio_shared::sealing::Keyring;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use provisio_providers::Registry;

mod call;
mod rollback;
mod steps;
mod two_phase;

use crate::txlog::{Begin, LogError, LogSink, Record, Reply, StepRecord};
pub use rollback::{compensate_unlogged, undo_with_retry};

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

/// The failure code of a run whose opening, written with its first call's intent, opened
/// nothing (the request is finished, busy, or not on its first attempt), or could not be
/// written: no call was made, and the request is opened the ordinary way and run again.
pub const NOT_OPENED: &str = "not_opened";

/// A completed call that rollback may have to undo.
#[derive(Debug, Clone)]
pub struct Completed {
    path: String,
    provider: String,
    action: String,
    data: Value,
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
    /// The run's opening, written with its first call's intent, opened nothing: no call was
    /// made and nothing was written; open the request the ordinary way and run it again.
    pub not_opened: bool,
    /// The run made no call, so its opening (given back here) is still to be written: with
    /// the outcome.
    pub unwritten_opening: Option<Begin>,
    /// Step records not yet written; they go into the outcome's commit.
    pub pending: Vec<StepRecord>,
    /// Completed calls whose records are only in `pending`: to undo if the outcome is fenced.
    pub unlogged: Vec<Completed>,
    /// Completed calls whose records are durable (not undone): with `unlogged`, what the
    /// engine must undo itself if the log server goes bad before the outcome is written.
    pub logged: Vec<Completed>,
    pub summary: Vec<Value>,
    /// A sensitive procedure ran (nested ones included): the output, error messages and audit
    /// data may carry a sensitive value and are sealed before they are stored.
    pub tainted: bool,
}

impl Outcome {
    /// The run made no call: its opening is still to be written.
    pub fn open_pending(&self) -> bool {
        self.unwritten_opening.is_some()
    }
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
    /// `request` and the caller as jq reads them, converted once per run (neither changes
    /// after [`Run::new`]).
    request_jq: Converted,
    caller_jq: Converted,
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
    /// Seals the records of a sensitive run: the keyring, and the request id they are bound to.
    sealer: Option<(Keyring, String)>,
    /// A sensitive procedure started: from then on every record this run logs is sealed (jq
    /// may have copied a sensitive value anywhere in the context, so the taint never lifts).
    tainted: bool,
    /// The transaction's opening, not yet written: it goes with the first flush (the first
    /// call's intent), and the flag rises once it is durable (the lease keeper renews only
    /// opened transactions).
    opening: Option<(Begin, Arc<AtomicBool>)>,
}

/// Variables visible to expressions in one procedure invocation.
#[derive(Debug, Clone, Default)]
struct Scope {
    input: Value,
    /// `input` as jq reads it: converted once for all of the invocation's expressions.
    input_jq: Converted,
    steps: StepResults,
    vars: Map<String, Value>,
    locals: Vec<(String, Value)>,
    error: Option<Value>,
}

impl Scope {
    fn new(input: Value) -> Self {
        Self {
            input_jq: Converted::new(&input),
            input,
            ..Self::default()
        }
    }
}

/// A scope's step results by step id, each also kept as jq reads it: converted once when
/// its step ends rather than again for every later expression (a profile of `demo.hello`
/// found a seventh of an engine's CPU in those conversions). Only these methods change the
/// results, so the two forms cannot drift apart.
#[derive(Debug, Clone, Default)]
struct StepResults {
    values: Map<String, Value>,
    converted: std::collections::HashMap<String, Converted>,
}

impl StepResults {
    fn insert(&mut self, id: String, v: Value) {
        self.converted.insert(id.clone(), Converted::new(&v));
        self.values.insert(id, v);
    }

    fn remove(&mut self, id: &str) {
        self.values.remove(id);
        self.converted.remove(id);
    }

    fn values(&self) -> &Map<String, Value> {
        &self.values
    }
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
        let caller_jq = Converted::new(&match &principal {
            Some(p) => json!({"id": p.id.to_string(), "name": p.name}),
            None => Value::Null,
        });
        Self {
            tx_id,
            model,
            registry,
            txlog,
            namespaces,
            request_jq: Converted::new(&request),
            caller_jq,
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
            sealer: None,
            tainted: false,
            opening: None,
        }
    }

    /// Writes the transaction's opening `begin` with the first call's intent, in one commit,
    /// instead of on its own before the run; `opened` rises when it is durable.
    #[must_use]
    pub fn with_opening(mut self, begin: Begin, opened: Arc<AtomicBool>) -> Self {
        self.opening = Some((begin, opened));
        self
    }

    /// Seals what a sensitive procedure logs with `keyring`, bound to `request_id`.
    #[must_use]
    pub fn with_sealing(mut self, keyring: Keyring, request_id: &str) -> Self {
        self.sealer = Some((keyring, request_id.to_owned()));
        self
    }

    /// `rec` as it may be logged: in a tainted run, its input, output and rollback data sealed
    /// whole and its error's message sealed (codes stay readable).
    fn sealed(&self, mut rec: StepRecord) -> StepRecord {
        if let (true, Some((ring, id))) = (self.tainted, &self.sealer) {
            for v in [&mut rec.input, &mut rec.output, &mut rec.rollback_data]
                .into_iter()
                .flatten()
            {
                *v = ring.seal_some(v, id);
            }
            if let Some(e) = &mut rec.error {
                *e = ring.seal_messages(e, id);
            }
        }
        rec
    }

    /// Queues a step record for the next commit (sealed if the run is tainted).
    fn log_step(&mut self, rec: StepRecord) {
        let rec = self.sealed(rec);
        self.pending.push(rec);
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
        if result.as_ref().is_err_and(|f| f.code == NOT_OPENED) {
            // Nothing was written and no call made (every call's intent comes first).
            return self.outcome(result, false, 0, Vec::new(), false);
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
        let not_opened = result.as_ref().is_err_and(|f| f.code == NOT_OPENED);
        Outcome {
            result,
            rollback_failed,
            rolled_back,
            not_undone,
            marked: self.marked,
            audit_data: std::mem::take(&mut self.audit_data),
            fenced,
            rerouted: false,
            not_opened,
            unwritten_opening: self.opening.take().map(|(b, _)| b),
            pending: std::mem::take(&mut self.pending),
            unlogged,
            logged,
            summary: std::mem::take(&mut self.summary),
            tainted: self.tainted,
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
            // Before anything else: an input-validation message quotes the value it refuses.
            self.tainted |= procedure.sensitive;
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
            let mut scope = Scope::new(input);
            self.marked |= procedure.audit;
            let qualified = format!("{}.{}", procedure.namespace, procedure.name);
            self.running.push(qualified.clone());
            let ran = self
                .run_steps(&ns, &procedure.steps, &mut scope, prefix, depth)
                .await;
            self.running.pop();
            ran?;
            let output = match &procedure.output {
                Some(e) => e.eval_fields(self.fields(&scope)).map_err(|e| {
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
                let mut ctx = self.fields(&scope);
                ctx.value("output", &output);
                let data = expr.eval_fields(ctx).map_err(|e| {
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

    /// What a step's expressions see, converted for jq straight from the scope.
    fn fields(&self, scope: &Scope) -> Fields {
        let mut f = Fields::default();
        f.converted("input", &scope.input_jq)
            .object_cached("steps", scope.steps.values(), |id| {
                scope.steps.converted.get(id)
            })
            .object("vars", &scope.vars)
            .converted("request", &self.request_jq)
            .converted("caller", &self.caller_jq);
        for (k, v) in &scope.locals {
            f.value(k, v);
        }
        if let Some(e) = &scope.error {
            f.value("error", e);
        }
        f
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

    /// Makes pending step records durable (before the next provider call), all in one commit.
    async fn flush(&mut self) -> Result<(), Failure> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending);
        if let Some((begin, opened)) = self.opening.take() {
            return match self
                .txlog
                .write_record(Record::BeginWith(begin, records))
                .await
            {
                Ok(Reply::Began { .. }) => {
                    opened.store(true, Ordering::Relaxed);
                    self.logged = self.completed.len();
                    Ok(())
                }
                Ok(other) => Err(Failure {
                    code: NOT_OPENED.into(),
                    message: format!("the transaction was not opened: {other:?}"),
                    step: None,
                }),
                Err(e) => Err(Failure {
                    code: NOT_OPENED.into(),
                    message: format!("the transaction was not opened: {e}"),
                    step: None,
                }),
            };
        }
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
}

#[cfg(test)]
#[path = "interpreter_tests.rs"]
mod tests;
