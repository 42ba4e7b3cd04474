//! The provider contract (docs/design.md §5). The built-in implementations live in
//! `provisio-providers`; the trait lives in a crate of its own, without the server's
//! dependencies, so that an out-of-tree provider depends on this crate only.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A boxed, sendable future: the same type as `futures_util::future::BoxFuture`, spelled out
/// so that implementing a provider needs no further dependency.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The principal as the queue manager authenticated it, with the permissions it had then.
/// (Part of the request envelope too; it lives here because a call hands it to providers.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalRef {
    pub id: uuid::Uuid,
    pub name: String,
    #[serde(default)]
    pub permissions: Vec<String>,
}

impl PrincipalRef {
    pub fn has(&self, permission: &str) -> bool {
        self.permissions
            .iter()
            .any(|p| p == permission || p == "admin")
    }
}

/// One call of a provider action.
#[derive(Debug, Clone)]
pub struct Call {
    pub tx_id: Uuid,
    /// `{tx_id}:{step_path}`: a provider that sees the same key twice must act once.
    pub idempotency_key: String,
    pub step_path: String,
    pub action: String,
    pub input: Value,
    pub caller: Option<PrincipalRef>,
    /// Present only when the caller holds `execute_with_credentials`.
    pub credentials: Option<Value>,
    /// Whether the procedure runs two-phase (providers that support it hold the effect open).
    pub participation: Participation,
}

/// The result of an execute: what the step returns, and what undoing it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    pub output: Value,
    /// Logged before the next step starts; `None` means "nothing to undo".
    pub rollback: Option<Value>,
}

/// A rollback of one completed call.
#[derive(Debug, Clone)]
pub struct Rollback {
    pub tx_id: Uuid,
    pub idempotency_key: String,
    pub step_path: String,
    pub action: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderError {
    pub code: String,
    pub message: String,
    /// Retrying the same call may succeed (timeouts, 5xx, contention).
    pub retryable: bool,
}

impl ProviderError {
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: true,
        }
    }
}

/// How a call takes part in its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Participation {
    /// The call takes effect at once; undoing it is a compensating `rollback`.
    Compensating,
    /// The call's effect is held open until `prepare` and `commit` (two-phase participants).
    TwoPhase,
}

pub trait Provider: Send + Sync {
    fn name(&self) -> &str;

    /// Performs one call. For a two-phase transaction, `phase` is `TwoPhase` and a provider
    /// that supports it keeps the effect pending until [`Provider::commit`].
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>>;

    /// Undoes a completed call. Must be idempotent: recovery may repeat it.
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        let _ = rb;
        Box::pin(async { Ok(()) })
    }

    /// Undoes a call whose outcome is unknown: its engine died during the call, so the log has
    /// its intent (`rb.data` = `{"input": ...}`) but no result. The call may or may not have
    /// happened, and `rb.idempotency_key` is the key it was made with. Must be idempotent, and
    /// a no-op when the call never happened. Providers that cannot tell leave the default,
    /// which reports a permanent failure: the transaction then ends `in_doubt` for an operator
    /// rather than being silently assumed clean.
    fn rollback_unknown<'a>(
        &'a self,
        rb: &'a Rollback,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        let _ = rb;
        Box::pin(async {
            Err(ProviderError::permanent(
                "unknown_outcome",
                "the provider cannot undo a call whose outcome is unknown",
            ))
        })
    }

    /// Whether this provider can hold calls of a two-phase transaction open.
    fn supports_two_phase(&self) -> bool {
        false
    }

    /// Two-phase: makes every pending effect of `tx_id` durable but not yet visible.
    fn prepare(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        let _ = tx_id;
        Box::pin(async { Ok(()) })
    }

    /// Two-phase: makes prepared effects of `tx_id` visible. Must be idempotent.
    fn commit(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        let _ = tx_id;
        Box::pin(async { Ok(()) })
    }

    /// Two-phase: discards pending or prepared effects of `tx_id`. Must be idempotent.
    fn abort(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        let _ = tx_id;
        Box::pin(async { Ok(()) })
    }
}
