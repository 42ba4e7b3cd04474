//! One authenticated, authorised request, from its namespace to its committed outcome: resolve
//! what to run, open the attempt (or answer a finished request from its record), refuse what
//! cannot run, run the procedure, decide the outcome (with request-level retries) and write it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use provisio_shared::domain::{
    Envelope, OnExhausted, Permission, PrincipalRef, RequestKind, Status, TxModel, TxStatus,
};
use provisio_shared::procedure::{Access, Namespace, Problem, Procedure};
use provisio_shared::sealing::{Keyring, SealError};
use serde_json::{Value, json};
use uuid::Uuid;

use super::attempt::{Decided, Opened, Written};
use super::interpreter::{self, Outcome, Run};
use super::outcome::{outcome_record, record_durations};
use super::{Disposition, Engine};
use crate::txlog::Begin;
use provisio_shared::amqp::header_str;

/// What a delivery names, looked up: the namespace version and procedure (an inline one for a
/// trusted request with steps), and who the procedure acts for.
struct Resolved {
    namespace: Option<Arc<Namespace>>,
    procedure: Option<Arc<Procedure>>,
    inline_problems: Option<Vec<Problem>>,
    /// `None`: `run_as` names no enabled principal.
    acting: Option<PrincipalRef>,
    /// The credentials in clear, for a submitter allowed to pass them; `Err` when sealed
    /// credentials do not open (a key this engine lacks, or tampering).
    credentials: Result<Option<Value>, SealError>,
    /// The input with its sensitive properties opened, for the run (in memory only); `Err`
    /// when a sealed one does not open.
    input: Result<Value, SealError>,
    /// The procedure's sensitive input properties.
    sensitive_inputs: Vec<Vec<String>>,
    model: TxModel,
}

/// The attempt under way: its transaction, log server and number.
#[derive(Clone, Copy)]
struct Attempt {
    tx_id: Uuid,
    server: usize,
    number: i32,
}

impl Engine {
    pub(super) async fn run_request(
        &self,
        env: &Envelope,
        principal: PrincipalRef,
        props: &BasicProperties,
    ) -> anyhow::Result<Disposition> {
        let started = Instant::now();
        let mut resolved = self.resolve(env, &principal).await?;
        let Some(server) = self.log.pick() else {
            tracing::warn!("every transaction-log server is on the bad-server list; requeueing");
            return Ok(Disposition::Requeue);
        };
        let mut refusal = refusal(env, &principal, &resolved)
            .or_else(|| self.unchecked_input(env, props, &resolved));
        if let (Some(ns), Some(procedure), None) = (
            resolved.namespace.clone(),
            resolved.procedure.clone(),
            &refusal,
        ) && self.opens_with_first_call(&procedure)
        {
            // The opening goes with the first call's intent, one commit instead of two, and
            // only if this is the request's first attempt (what the run assumes).
            let mut begin = self.begin(env, &principal, &resolved);
            begin.first_only = true;
            let attempt = Attempt {
                tx_id: begin.tx_id,
                server,
                number: 1,
            };
            if let Some(d) = self
                .run_attempt(
                    env,
                    props,
                    (attempt, started, Some(begin)),
                    resolved,
                    (ns, procedure),
                )
                .await?
            {
                return Ok(d);
            }
            // Nothing was opened (finished, busy, or not the first attempt) and no call made:
            // the ordinary way, which knows what to do in each case. The refused run used up
            // what was resolved; resolving again is the price of a rare path, so that the
            // common one moves its input instead of copying it.
            metrics::counter!(provisio_shared::metrics::OPENINGS_REFUSED).increment(1);
            resolved = self.resolve(env, &principal).await?;
            refusal = self::refusal(env, &principal, &resolved)
                .or_else(|| self.unchecked_input(env, props, &resolved));
        }
        let begin = self.begin(env, &principal, &resolved);
        // Redelivery is not re-execution: a request with a final status is answered from its
        // record. Logged models learn it atomically from opening the transaction; `read` ones
        // (which open nothing) ask first.
        let number = if resolved.model == TxModel::Read {
            if self.is_final(env.id.as_str()).await? {
                self.publish_stored_outcome(env, props).await;
                return Ok(Disposition::Ack);
            }
            1
        } else {
            match self.open(&begin, server).await? {
                Opened::Began(a) => a,
                Opened::AlreadyFinished => {
                    tracing::info!(request_id = %env.id, "already finished; answering from the record");
                    self.publish_stored_outcome(env, props).await;
                    return Ok(Disposition::Ack);
                }
                Opened::Busy => return Ok(Disposition::Requeue),
            }
        };
        let attempt = Attempt {
            tx_id: begin.tx_id,
            server,
            number,
        };
        if let Some(r) = refusal.as_ref().filter(|r| r["code"] == "forbidden") {
            let detail = r["message"].as_str().unwrap_or_default();
            self.deny("forbidden", Some(&principal), env, detail);
        }
        let (Some(ns), Some(procedure), None) = (
            resolved.namespace.clone(),
            resolved.procedure.clone(),
            refusal.as_ref(),
        ) else {
            return self
                .refuse(env, props, begin, attempt, resolved.model, refusal)
                .await;
        };
        let d = self
            .run_attempt(
                env,
                props,
                (attempt, started, None),
                resolved,
                (ns, procedure),
            )
            .await?;
        Ok(d.unwrap_or(Disposition::Requeue))
    }

    /// Whether a request of `procedure` opens its transaction with its first call's intent
    /// (docs/decisions.md, "The opening with the first call").
    fn opens_with_first_call(&self, procedure: &Procedure) -> bool {
        // The separate log layout opens in the configuration database first, which cannot
        // share a commit with the log server's records.
        self.cfg.engine.open_with_first_call
            && !self.log.separate
            && procedure.model != TxModel::Read
    }

    /// Runs an attempt and writes its outcome. With `opening` the attempt is not opened yet
    /// (its opening goes with the first call's intent, or with the outcome when it makes no
    /// call), and `None` means it could not be opened: nothing was written and no call made.
    async fn run_attempt(
        &self,
        env: &Envelope,
        props: &BasicProperties,
        (attempt, started, opening): (Attempt, Instant, Option<Begin>),
        resolved: Resolved,
        (ns, procedure): (Arc<Namespace>, Arc<Procedure>),
    ) -> anyhow::Result<Option<Disposition>> {
        let (tx_id, server) = (attempt.tx_id, attempt.server);
        let credentials = resolved.credentials.ok().flatten();
        let input = resolved.input.unwrap_or_default();
        let mut outcome = self
            .execute(
                env,
                resolved.acting,
                (credentials, input),
                (&ns, &procedure),
                attempt,
                opening,
            )
            .await;
        if outcome.not_opened {
            self.release_lease(tx_id);
            return Ok(None);
        }
        // Labels from the namespace that ran, never from what the client chose: inline
        // procedures are `inline`, so metric cardinality stays bounded.
        let (ns_label, proc_label) = provisio_shared::metrics::request_labels(
            Some(&ns),
            env.procedure.as_str(),
            env.steps.is_some(),
        );
        if let Some(d) = self.taken_away(env, tx_id, &outcome).await? {
            return Ok(Some(d));
        }
        if outcome.rolled_back > 0 {
            metrics::counter!(provisio_shared::metrics::ROLLBACKS, "namespace" => ns_label.clone(), "procedure" => proc_label.clone()).increment(1);
        }
        let sealing = Sealing {
            keyring: &self.keyring,
            sensitive_inputs: &resolved.sensitive_inputs,
        };
        let opening = outcome.unwritten_opening.take();
        let open_now = opening.is_some();
        let (decided, leftovers) = decide(env, outcome, procedure.model, attempt.number, &sealing);
        let (status, output, error) = (
            decided.status,
            decided.output.clone(),
            decided.error.clone(),
        );
        let finished = self
            .finish(tx_id, env.id.as_str(), server, opening, decided)
            .await;
        self.release_lease(tx_id);
        if open_now && matches!(finished, Ok(Written::Fenced)) {
            // The run made no call, and its opening (written with the outcome) opened nothing.
            return Ok(None);
        }
        if let Some(d) = self.not_written(env, tx_id, finished?, leftovers).await? {
            return Ok(Some(d));
        }
        let labels = [
            ("namespace", ns_label),
            ("procedure", proc_label),
            ("status", status.as_str().to_owned()),
        ];
        metrics::counter!(provisio_shared::metrics::REQUESTS_FINISHED, &labels).increment(1);
        metrics::histogram!(provisio_shared::metrics::REQUEST_RUN_DURATION, &labels)
            .record(started.elapsed().as_secs_f64());
        record_durations(env, &labels);
        self.publish_outcome(
            env,
            props,
            &outcome_record(env, status, output.as_ref(), error.as_ref(), attempt.number),
        )
        .await;
        Ok(Some(Disposition::Ack))
    }

    /// The queue manager validated the input of what it signed; a direct producer's input is
    /// checked here, against the same schema, with the same switch.
    fn unchecked_input(
        &self,
        env: &Envelope,
        props: &BasicProperties,
        resolved: &Resolved,
    ) -> Option<Value> {
        let direct = header_str(props, provisio_shared::signing::SIGNATURE_HEADER).is_none();
        (direct && self.cfg.validation.enable_schema_validation)
            .then(|| invalid_input(env, resolved.procedure.as_deref()))
            .flatten()
    }

    /// Loads the namespace version the request names (or the current one), compiles a trusted
    /// request's inline procedure in its context, and resolves `run_as`.
    async fn resolve(&self, env: &Envelope, principal: &PrincipalRef) -> anyhow::Result<Resolved> {
        let mut namespace = match env.namespace_version {
            Some(v) => self.namespaces.get(env.namespace.as_str(), v).await,
            None => self.namespaces.current(env.namespace.as_str()).await,
        }
        .context("loading the namespace")?;
        let mut inline_problems = None;
        if let (Some(steps), RequestKind::Trusted, Some(ns)) = (&env.steps, env.kind, &namespace) {
            let doc = self
                .namespaces
                .document(ns.name.as_str(), ns.version)
                .await
                .context("loading the namespace document")?
                .unwrap_or(Value::Null);
            match provisio_shared::procedure::with_inline(
                &doc,
                env.procedure.as_str(),
                steps,
                self.namespaces.catalog(),
            ) {
                Ok(ns) => namespace = Some(Arc::new(ns)),
                Err(problems) => inline_problems = Some(problems),
            }
        }
        let procedure = namespace
            .as_ref()
            .and_then(|ns| ns.procedures.get(env.procedure.as_str()).cloned());
        // `run_as`: the procedure acts for that principal (the submitter stays on record).
        let acting = match &env.run_as {
            Some(name) if env.kind == RequestKind::Trusted => self.principal_named(name).await?,
            _ => Some(principal.clone()),
        };
        let model = procedure.as_ref().map_or(TxModel::Read, |p| p.model);
        let credentials = match &env.credentials {
            Some(c) if principal.has(Permission::ExecuteWithCredentials.as_str()) => {
                self.keyring.open(c, env.id.as_str()).map(Some)
            }
            _ => Ok(None),
        };
        let sensitive_inputs = procedure
            .as_ref()
            .map(|p| p.sensitive_inputs.clone())
            .unwrap_or_default();
        let id = env.id.as_str();
        Ok(Resolved {
            input: self.keyring.open_paths(&env.input, &sensitive_inputs, id),
            sensitive_inputs,
            namespace,
            procedure,
            inline_problems,
            acting,
            credentials,
            model,
        })
    }

    fn begin(&self, env: &Envelope, principal: &PrincipalRef, r: &Resolved) -> Begin {
        Begin {
            tx_id: Uuid::now_v7(),
            request_id: env.id.to_string(),
            namespace: env.namespace.to_string(),
            procedure: env.procedure.to_string(),
            namespace_version: r.namespace.as_ref().map_or(0, |ns| ns.version),
            model: r.model.as_str(),
            audit: r.procedure.as_ref().is_some_and(|p| p.audit),
            engine_id: self.engine_id.clone(),
            lease_seconds: self.cfg.engine.lease_seconds as f64,
            // As it may be stored: sensitive properties sealed (a direct AMQP producer's
            // arrive clear and are sealed here).
            input: self
                .keyring
                .seal_paths(&env.input, &r.sensitive_inputs, env.id.as_str()),
            principal_id: Some(principal.id),
            priority: env.priority.as_str(),
            first_only: false,
        }
    }

    /// Ends a request that cannot run with `failed` and the reason.
    async fn refuse(
        &self,
        env: &Envelope,
        props: &BasicProperties,
        begin: Begin,
        attempt: Attempt,
        model: TxModel,
        refusal: Option<Value>,
    ) -> anyhow::Result<Disposition> {
        let decided = Decided {
            steps: Vec::new(),
            tx_status: TxStatus::Failed,
            status: Status::Failed,
            output: None,
            error: refusal.clone(),
            summary: json!([]),
            retry_at: None,
            audit: false,
            audit_data: None,
        };
        let written = self
            .finish(
                attempt.tx_id,
                env.id.as_str(),
                attempt.server,
                (model == TxModel::Read).then_some(begin),
                decided,
            )
            .await?;
        if written != Written::Yes {
            return Ok(Disposition::Requeue);
        }
        let record = outcome_record(env, Status::Failed, None, refusal.as_ref(), attempt.number);
        self.publish_outcome(env, props, &record).await;
        Ok(Disposition::Ack)
    }

    /// Runs the procedure as one transaction, holding its lease meanwhile.
    async fn execute(
        &self,
        env: &Envelope,
        acting: Option<PrincipalRef>,
        (credentials, input): (Option<Value>, Value),
        (ns, procedure): (&Arc<Namespace>, &Arc<Procedure>),
        attempt: Attempt,
        opening: Option<Begin>,
    ) -> Outcome {
        let (model, tx_id) = (procedure.model, attempt.tx_id);
        let opened = Arc::new(AtomicBool::new(opening.is_none()));
        let lease_lost = if model == TxModel::Read {
            Arc::new(AtomicBool::new(false))
        } else {
            self.hold_lease(tx_id, attempt.server, opened.clone())
        };
        let sink = self.log.sink(attempt.server);
        let request_ctx = json!({"id": env.id, "namespace": env.namespace, "procedure": env.procedure, "priority": env.priority, "attempt": attempt.number});
        let test = &self.cfg.providers.test;
        let run = Run::new(
            tx_id,
            self.owner.clone(),
            model,
            &self.registry,
            &sink,
            &self.namespaces,
            acting,
            credentials,
            request_ctx,
            self.cfg.validation.enable_schema_validation,
        )
        .with_lease_flag(lease_lost)
        .with_sealing(self.keyring.clone(), env.id.as_str())
        .with_pause_after_prepare(
            (test.enabled && test.pause_after_prepare_ms > 0)
                .then(|| Duration::from_millis(test.pause_after_prepare_ms)),
        );
        let run = match opening {
            Some(b) => run.with_opening(b, opened),
            None => run,
        };
        run.execute(ns, procedure, input).await
    }

    /// The run lost its transaction: fenced (recovery took over), or its log server went bad
    /// and it undid every call. Either way the delivery goes back to the queue.
    async fn taken_away(
        &self,
        env: &Envelope,
        tx_id: Uuid,
        outcome: &Outcome,
    ) -> anyhow::Result<Option<Disposition>> {
        if outcome.fenced {
            self.release_lease(tx_id);
            metrics::counter!(provisio_shared::metrics::FENCED).increment(1);
            tracing::warn!(%tx_id, "the transaction was taken over (lease lost); leaving the request to recovery and redelivery");
            return Ok(Some(Disposition::Requeue));
        }
        if outcome.rerouted {
            // Its log server went bad and every call was undone: run it again elsewhere.
            self.release_lease(tx_id);
            let why = outcome
                .result
                .as_ref()
                .err()
                .map(interpreter::Failure::to_json);
            self.release_request(env.id.as_str(), tx_id, why.as_ref())
                .await?;
            tracing::warn!(%tx_id, "the transaction's log server is on the bad-server list; the request goes to another server");
            return Ok(Some(Disposition::Requeue));
        }
        Ok(None)
    }

    /// The outcome could not be written: undo what only this engine knows of and requeue.
    async fn not_written(
        &self,
        env: &Envelope,
        tx_id: Uuid,
        written: Written,
        leftovers: Leftovers,
    ) -> anyhow::Result<Option<Disposition>> {
        match written {
            Written::Yes => Ok(None),
            Written::Fenced => {
                // Taken over between the last step and the outcome.
                interpreter::compensate_unlogged(&self.registry, tx_id, &leftovers.unlogged).await;
                metrics::counter!(provisio_shared::metrics::FENCED).increment(1);
                tracing::warn!(%tx_id, "the outcome was fenced (lease lost); leaving the request to recovery and redelivery");
                Ok(Some(Disposition::Requeue))
            }
            Written::ServerBad => {
                // Nobody else can undo these until the server is back: undo them all here, and
                // run the request again on a server that answers.
                let mut all = leftovers.logged;
                all.extend(leftovers.unlogged);
                let failed = interpreter::compensate_unlogged(&self.registry, tx_id, &all).await;
                let why = json!({"code": interpreter::SERVER_BAD, "message": "the transaction's log server stopped answering; the request runs again on another one", "not_undone": failed});
                self.release_request(env.id.as_str(), tx_id, Some(&why))
                    .await?;
                tracing::warn!(%tx_id, "the transaction's log server went bad before the outcome was written; the request goes to another server");
                Ok(Some(Disposition::Requeue))
            }
        }
    }
}

/// Why a resolved request cannot run, as the outcome's error; `None` when it can.
fn refusal(env: &Envelope, principal: &PrincipalRef, r: &Resolved) -> Option<Value> {
    let refuse = |code: &str, message: String| Some(json!({"code": code, "message": message}));
    if let Some(problems) = &r.inline_problems {
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return refuse(
            "invalid_inline",
            format!("the inline procedure is invalid: {:?}", Some(problems)),
        );
    }
    if let Err(e) = &r.credentials {
        return refuse("credentials_unreadable", e.to_string());
    }
    if let Err(e) = &r.input {
        return refuse("sensitive_unreadable", e.to_string());
    }
    if r.acting.is_none() {
        return refuse(
            "unknown_principal",
            format!(
                "`run_as`: no enabled principal `{}`",
                env.run_as.clone().unwrap_or_default()
            ),
        );
    }
    match (&r.namespace, &r.procedure) {
        (Some(_), Some(p))
            if p.access == Access::Private
                && !principal.has(Permission::ExecutePrivate.as_str())
                && env.steps.is_none() =>
        {
            refuse(
                "forbidden",
                format!("procedure `{}` is private", env.procedure),
            )
        }
        (Some(_), Some(_)) => None,
        _ => refuse(
            "unknown_procedure",
            format!(
                "procedure `{}.{}` does not exist",
                env.namespace, env.procedure
            ),
        ),
    }
}

/// The top-level input against the procedure's input schema, as the queue manager checks it
/// (its `422 invalid`): every violation, with its path.
fn invalid_input(env: &Envelope, procedure: Option<&Procedure>) -> Option<Value> {
    let details = procedure?.input_violations(&env.input);
    (!details.is_empty()).then(|| {
        json!({
            "code": "input_invalid",
            "message": "input does not match the procedure's input schema",
            "details": details,
        })
    })
}

/// How a decided outcome is sealed: the keyring, and the procedure's sensitive inputs (sealed
/// in a kept envelope).
struct Sealing<'a> {
    keyring: &'a Keyring,
    sensitive_inputs: &'a [Vec<String>],
}

/// The calls a run completed, for the case its outcome cannot be written.
struct Leftovers {
    logged: Vec<interpreter::Completed>,
    unlogged: Vec<interpreter::Completed>,
}

/// The outcome to write: statuses from the run's result, and a request-level retry — a cleanly
/// failed attempt runs again later (from PostgreSQL, via the scheduler), or parks for an
/// operator once the retries are spent.
fn decide(
    env: &Envelope,
    outcome: Outcome,
    model: TxModel,
    attempt: i32,
    sealing: &Sealing<'_>,
) -> (Decided, Leftovers) {
    let (tx_status, status, mut output, mut error) = match &outcome.result {
        Ok(out) => (
            TxStatus::Committed,
            Status::Succeeded,
            Some(out.clone()),
            None,
        ),
        Err(f) if outcome.rollback_failed => {
            let mut e = f.to_json();
            e["not_undone"] = Value::Array(outcome.not_undone.clone());
            (TxStatus::InDoubt, Status::InDoubt, None, Some(e))
        }
        Err(f) => (
            if model == TxModel::Read {
                TxStatus::Failed
            } else {
                TxStatus::RolledBack
            },
            Status::Failed,
            None,
            Some(f.to_json()),
        ),
    };
    let (status, retry_at) = match (&env.retry, status) {
        (Some(policy), Status::Failed)
            if model != TxModel::Read && i64::from(attempt) <= i64::from(policy.count) =>
        {
            let at = Utc::now()
                + chrono::Duration::milliseconds(
                    i64::try_from(policy.interval_ms).unwrap_or(i64::MAX),
                );
            (Status::Scheduled, kept_envelope(env, at, sealing))
        }
        (Some(policy), Status::Failed)
            if model != TxModel::Read && policy.on_exhausted == OnExhausted::Park =>
        {
            // The envelope is kept as for a retry, so that an operator can resume the request
            // (`POST /v1/requests/{id}:resume`); the time is only where the row's `not_before`
            // points meanwhile: nothing publishes a parked request.
            (Status::Parked, kept_envelope(env, Utc::now(), sealing))
        }
        (_, s) => (s, None),
    };
    let mut audit_data =
        (!outcome.audit_data.is_empty()).then_some(Value::Array(outcome.audit_data));
    if outcome.tainted {
        // A sensitive procedure ran: jq may have copied a sensitive value into any of these.
        let (ring, id) = (sealing.keyring, env.id.as_str());
        output = output.map(|o| ring.seal_some(&o, id));
        error = error.map(|e| ring.seal_messages(&e, id));
        audit_data = audit_data.map(|a| ring.seal(&a, id));
    }
    let decided = Decided {
        steps: outcome.pending,
        tx_status,
        status,
        output,
        error,
        summary: Value::Array(outcome.summary),
        retry_at,
        audit: outcome.marked,
        audit_data,
    };
    let leftovers = Leftovers {
        logged: outcome.logged,
        unlogged: outcome.unlogged,
    };
    (decided, leftovers)
}

/// The envelope a retried or parked request runs from later, its credentials and sensitive
/// input properties sealed (those of a direct AMQP producer arrive clear; nothing is stored
/// clear).
fn kept_envelope(
    env: &Envelope,
    at: DateTime<Utc>,
    sealing: &Sealing<'_>,
) -> Option<(DateTime<Utc>, Value)> {
    let (keyring, id) = (sealing.keyring, env.id.as_str());
    let mut again = env.clone();
    again.credentials = env.credentials.as_ref().map(|c| keyring.seal(c, id));
    again.input = keyring.seal_paths(&env.input, sealing.sensitive_inputs, id);
    serde_json::to_value(&again).ok().map(|e| (at, e))
}
