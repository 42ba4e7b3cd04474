//! One provider call: its intent logged first, retries with back-off, a timeout, a panic
//! turned into a permanent failure, and its completion queued for the next commit.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use provisio_shared::domain::TxModel;
use provisio_shared::metrics as m;
use provisio_shared::procedure::Step;
use provisio_shared::provider::{Call, Executed, Participation, Provider, ProviderError};
use provisio_shared::retry::{Attempt, Backoff, retry};
use serde_json::{Value, json};

use super::{Completed, Failure, Run};

impl Run<'_> {
    pub(super) async fn call(
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
            self.log_step(intent);
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
            input,
            caller: self.principal.clone(),
            credentials: self.credentials.clone(),
            participation: if self.model == TxModel::TwoPhase {
                Participation::TwoPhase
            } else {
                Participation::Compensating
            },
        };
        let started = Instant::now();
        let policy = step.retry.clone().unwrap_or_else(|| {
            Backoff::attempts(1, Duration::from_millis(1), Duration::from_millis(1))
        });
        let r = retry(&policy, |_| attempt(&provider, &call, step.timeout)).await;
        metrics::histogram!(m::STEP_DURATION, "provider" => provider_name.to_owned())
            .record(started.elapsed().as_secs_f64());
        let outcome = if r.is_ok() { "ok" } else { "error" };
        metrics::counter!(m::PROVIDER_CALLS,
            "provider" => provider_name.to_owned(), "action" => action.to_owned(), "outcome" => outcome)
        .increment(1);
        self.settle(provider_name, &provider, call, r, step)
    }

    /// Queues the call's completion (or failure) for the next commit and remembers what
    /// rollback would have to undo.
    fn settle(
        &mut self,
        provider_name: &str,
        provider: &Arc<dyn Provider>,
        call: Call,
        r: Result<Executed, ProviderError>,
        step: &Step,
    ) -> Result<Executed, Failure> {
        let (action, path) = (&call.action, &call.step_path);
        match r {
            Ok(executed) => {
                self.summary.push(json!({"path": path, "id": step.id, "call": format!("{provider_name}.{action}"), "status": "done"}));
                if self.model != TxModel::Read {
                    let mut rec = self.step_record("execute", path, provider_name, action);
                    rec.output = Some(executed.output.clone());
                    rec.rollback_data.clone_from(&executed.rollback);
                    // Two-phase participants are undone by `abort`, not call by call.
                    let held_open =
                        self.model == TxModel::TwoPhase && provider.supports_two_phase();
                    if let (false, Some(data)) = (held_open, &executed.rollback) {
                        self.completed.push(Completed {
                            path: path.clone(),
                            provider: provider_name.to_owned(),
                            action: action.clone(),
                            data: data.clone(),
                        });
                    }
                    rec.input = Some(call.input);
                    self.log_step(rec);
                }
                Ok(executed)
            }
            Err(e) => {
                self.summary.push(json!({"path": path, "id": step.id, "call": format!("{provider_name}.{action}"), "status": "failed", "error": e.code}));
                if self.model != TxModel::Read {
                    // The intent is settled: the call failed and cleaned up after itself.
                    let mut rec = self.step_record("error", path, provider_name, action);
                    rec.error = Some(json!({"code": e.code, "message": e.message}));
                    self.log_step(rec);
                }
                Err(Failure::new(&e.code, e.message, path))
            }
        }
    }
}

/// One attempt at a call: bounded by the step's timeout (a timeout may be retried), and a
/// panicking provider becomes a permanent failure instead of taking the engine down.
async fn attempt(
    provider: &Arc<dyn Provider>,
    call: &Call,
    timeout: Option<Duration>,
) -> Result<Executed, Attempt<ProviderError>> {
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
            metrics::counter!(m::STEP_RETRIES, "provider" => provider.name().to_owned())
                .increment(1);
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
