//! The one place that uses the `backoff` crate.
//!
//! `backoff` is required by the design but listed by RustSec as unmaintained
//! (RUSTSEC-2025-0012). Keeping every use behind this module means its maintained successor
//! (`backon`) can replace it here without touching callers.

use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoff;

/// Exponential backoff with an optional bound on attempts and on total time.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max_interval: Duration,
    pub multiplier: f64,
    /// Attempts in all, the first included. `None`: bounded by `max_elapsed` only.
    pub max_attempts: Option<u32>,
    pub max_elapsed: Option<Duration>,
}

impl Backoff {
    pub fn attempts(max_attempts: u32, initial: Duration, max_interval: Duration) -> Self {
        Self {
            initial,
            max_interval,
            multiplier: 2.0,
            max_attempts: Some(max_attempts.max(1)),
            max_elapsed: None,
        }
    }

    pub fn for_duration(max_elapsed: Duration) -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(2),
            multiplier: 2.0,
            max_attempts: None,
            max_elapsed: Some(max_elapsed),
        }
    }
}

/// What an attempt says about the next one.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Worth trying again.
    Retry(E),
    /// Trying again cannot help.
    Stop(E),
}

/// Runs `op` until it succeeds, says stop, or the policy is exhausted; returns the last error.
pub async fn retry<T, E, F, Fut>(policy: &Backoff, mut op: F) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let eb = ExponentialBackoff {
        initial_interval: policy.initial,
        current_interval: policy.initial,
        max_interval: policy.max_interval,
        multiplier: policy.multiplier,
        randomization_factor: 0.2,
        max_elapsed_time: policy.max_elapsed,
        ..ExponentialBackoff::default()
    };
    let max_attempts = policy.max_attempts;
    let mut attempt = 0u32;
    backoff::future::retry(eb, || {
        attempt += 1;
        let n = attempt;
        let fut = op(n);
        async move {
            match fut.await {
                Ok(v) => Ok(v),
                Err(Attempt::Stop(e)) => Err(backoff::Error::permanent(e)),
                Err(Attempt::Retry(e)) if max_attempts.is_some_and(|m| n >= m) => {
                    Err(backoff::Error::permanent(e))
                }
                Err(Attempt::Retry(e)) => Err(backoff::Error::transient(e)),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_until_success() {
        let policy = Backoff::attempts(5, Duration::from_millis(1), Duration::from_millis(2));
        let out: Result<u32, &str> = retry(&policy, |n| async move {
            if n < 3 {
                Err(Attempt::Retry("not yet"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(out, Ok(3));
    }

    #[tokio::test]
    async fn stops_after_max_attempts_with_the_last_error() {
        let policy = Backoff::attempts(4, Duration::from_millis(1), Duration::from_millis(2));
        let mut seen = 0;
        let out: Result<(), u32> = retry(&policy, |n| {
            seen = n;
            async move { Err(Attempt::Retry(n)) }
        })
        .await;
        assert_eq!(out, Err(4));
        assert_eq!(seen, 4);
    }

    #[tokio::test]
    async fn stop_is_not_retried() {
        let policy = Backoff::attempts(5, Duration::from_millis(1), Duration::from_millis(2));
        let out: Result<(), u32> = retry(&policy, |n| async move { Err(Attempt::Stop(n)) }).await;
        assert_eq!(out, Err(1));
    }
}
