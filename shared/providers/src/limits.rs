//! Per-provider concurrency and rate limits (configuration `providers.limits.NAME`), enforced
//! per engine by wrapping the provider.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use provisio_provider::{Call, Executed, Provider, ProviderError, Rollback};
use provisio_shared::config::ProviderLimits;
use provisio_shared::metrics as m;
use tokio::sync::{Mutex, Semaphore};

/// A token bucket refilled continuously at `rate` tokens per second, holding at most `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

pub struct Limited {
    inner: Arc<dyn Provider>,
    concurrency: Option<Semaphore>,
    bucket: Option<Mutex<Bucket>>,
}

impl Limited {
    pub fn wrap(inner: Arc<dyn Provider>, limits: &ProviderLimits) -> Arc<dyn Provider> {
        if limits.concurrency == 0 && limits.rate_per_second <= 0.0 {
            return inner;
        }
        // Zero series of a limited provider, present before its first call.
        let name = inner.name().to_owned();
        metrics::counter!(m::PROVIDER_THROTTLED, "provider" => name.clone()).increment(0);
        let _ = metrics::histogram!(m::PROVIDER_WAIT, "provider" => name.clone());
        metrics::gauge!(m::PROVIDER_INFLIGHT, "provider" => name).set(0.0);
        Arc::new(Self {
            inner,
            concurrency: (limits.concurrency > 0).then(|| Semaphore::new(limits.concurrency)),
            bucket: (limits.rate_per_second > 0.0).then(|| {
                Mutex::new(Bucket {
                    rate: limits.rate_per_second,
                    tokens: limits.rate_per_second.max(1.0),
                    at: Instant::now(),
                })
            }),
        })
    }

    async fn admit(&self) {
        let name = self.inner.name().to_owned();
        let started = Instant::now();
        if let Some(bucket) = &self.bucket {
            loop {
                let wait = bucket.lock().await.take();
                match wait {
                    None => break,
                    Some(d) => {
                        metrics::counter!(m::PROVIDER_THROTTLED, "provider" => name.clone())
                            .increment(1);
                        tokio::time::sleep(d).await;
                    }
                }
            }
        }
        metrics::histogram!(m::PROVIDER_WAIT, "provider" => name)
            .record(started.elapsed().as_secs_f64());
    }
}

impl Provider for Limited {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(async move {
            let _permit = match &self.concurrency {
                Some(s) => Some(s.acquire().await.map_err(|_| {
                    ProviderError::retryable("unavailable", "provider is shutting down")
                })?),
                None => None,
            };
            self.admit().await;
            let gauge =
                metrics::gauge!(m::PROVIDER_INFLIGHT, "provider" => self.inner.name().to_owned());
            gauge.increment(1.0);
            let r = self.inner.execute(call).await;
            gauge.decrement(1.0);
            r
        })
    }
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        // Rollbacks are not throttled: undoing must not wait behind new work.
        self.inner.rollback(rb)
    }
    fn rollback_unknown<'a>(
        &'a self,
        rb: &'a Rollback,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        self.inner.rollback_unknown(rb)
    }
    fn supports_two_phase(&self) -> bool {
        self.inner.supports_two_phase()
    }
    fn prepare(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.inner.prepare(tx_id)
    }
    fn commit(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.inner.commit(tx_id)
    }
    fn abort(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.inner.abort(tx_id)
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
