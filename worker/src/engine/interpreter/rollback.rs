//! Rollback: undoing completed calls newest first, each undo logged, and undoing calls that
//! were never logged when the run lost its transaction.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use provisio_shared::provider::{ProviderError, Rollback};
use provisio_shared::retry::{Attempt, retry};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Completed, Failure, Run};
use crate::txlog::Record;
use provisio_providers::Registry;

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
        if let Err(e) = undo_with_retry(&provider, &rb, false).await {
            tracing::error!(%tx_id, path = %c.path, error = %e, "cannot undo an unlogged call of a fenced transaction");
            failed.push(c.path.clone());
        } else {
            tracing::warn!(%tx_id, path = %c.path, "undid an unlogged call of a fenced transaction");
        }
    }
    failed
}

/// One undo, retried with back-off: `rollback`, or `rollback_unknown` for a call whose
/// completion was never logged. A panic counts as a permanent failure. The engine's
/// rollbacks and recovery's share it, so both survive a panicking provider alike.
pub async fn undo_with_retry(
    provider: &Arc<dyn provisio_shared::provider::Provider>,
    rb: &Rollback,
    unknown: bool,
) -> Result<(), ProviderError> {
    let policy = provisio_shared::retry::Backoff::attempts(
        5,
        Duration::from_millis(50),
        Duration::from_secs(2),
    );
    retry(&policy, |_| {
        let (provider, rb) = (provider.clone(), rb);
        async move {
            let call = async {
                if unknown {
                    provider.rollback_unknown(rb).await
                } else {
                    provider.rollback(rb).await
                }
            };
            match AssertUnwindSafe(call).catch_unwind().await {
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

impl Run<'_> {
    /// Rolls back completed calls after `mark`, newest first, each rollback logged. A rollback
    /// that fails does not stop the walk: older steps are still undone. Returns how many were
    /// undone and what could not be (the transaction is then in doubt); `Err` only when the log
    /// cannot be written (or the transaction is no longer ours).
    pub(super) async fn rollback_to(
        &mut self,
        mark: usize,
    ) -> Result<(usize, Vec<Value>), Failure> {
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
                    undo_with_retry(&provider, &rb, false).await
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
            let rec = self.sealed(rec);
            self.txlog.write_record(Record::Steps(vec![rec])).await?;
            if let Err(e) = r {
                // A sensitive run's provider messages may quote its values: the code only.
                let shown = if self.tainted {
                    e.code.clone()
                } else {
                    e.to_string()
                };
                tracing::error!(path = %c.path, error = %shown, "rollback failed; going on with the older steps");
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
