//! Per-principal rate limits on submissions (`queue_manager.rate_limit`).
//!
//! Each principal has a token bucket (GCRA, from `governor`): `burst` submissions at once,
//! refilled at `per_principal_per_second`. A submission over the limit is refused with `429`
//! and `Retry-After` before anything is validated or stored, so a runaway producer costs the
//! service little and cannot crowd the queues for the others. A batch takes one allowance per
//! element, all or nothing: it is accepted whole or refused whole, never cut in two.
//!
//! Refused submissions take nothing from the bucket. State is one small entry per principal
//! that has submitted (keys are authenticated principals, never client-chosen values), so
//! memory is bounded by the principals table.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use provisio_shared::config::RateLimitConfig;

use crate::api::ApiError;

pub struct RateLimits {
    limiter: DefaultKeyedRateLimiter<uuid::Uuid>,
    burst: NonZeroU32,
}

impl RateLimits {
    /// The limits configured, or `None` when they are off.
    pub fn new(cfg: &RateLimitConfig) -> Option<Self> {
        let period = cfg.period()?;
        let burst = NonZeroU32::new(cfg.effective_burst()).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(Self {
            limiter: RateLimiter::dashmap(quota),
            burst,
        })
    }

    /// Takes `n` submissions from `principal`'s allowance, or refuses them all: `429` with
    /// the time until they would fit, or `400` for a batch that never can.
    pub fn check(&self, principal: uuid::Uuid, n: usize) -> Result<(), ApiError> {
        let Some(n) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        match self.limiter.check_key_n(&principal, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Err(ApiError::RateLimited {
                    message: format!(
                        "too many submissions by this principal; retry in {} s",
                        retry_after_secs(wait)
                    ),
                    retry_after: wait,
                })
            }
            Err(_) => Err(ApiError::Malformed(format!(
                "a batch of {n} requests exceeds this principal's burst of {} \
                 (queue_manager.rate_limit.burst); send smaller batches",
                self.burst
            ))),
        }
    }
}

/// `Retry-After` is whole seconds; rounding down would invite a retry that is refused again.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
#[path = "ratelimit_tests.rs"]
mod tests;
